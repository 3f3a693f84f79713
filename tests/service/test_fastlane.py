"""The lean path of the image endpoints: it answers exactly as FastAPI's path does, and hands FastAPI what it
cannot parse as FastAPI would."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from service_testing import files, random_pixels, to_png
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from service.fastlane import FastLaneMiddleware, Lane
from service.routes import LANE_PATHS, named_router, resolve_model, router

PNGS = [to_png(image) for image in random_pixels(3, 7)]
WIDE = to_png(random_pixels(1, 8, (1, 28, 30))[0])
VIA_FASTAPI = {"via": "fastapi"}  # a parameter no endpoint takes: the lane leaves the request to FastAPI, which ignores it


def requests(name: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """Requests of every outcome the lane can give, by case: (path, httpx keyword arguments)."""
    return {
        "multipart": ("/log-likelihood", {"files": files(PNGS)}),
        "json": ("/log-likelihood", {"json": {"images": [base64.b64encode(p).decode() for p in PNGS]}}),
        "heatmap": ("/log-likelihood", {"files": files(PNGS[:1]), "params": {"heatmap": "true"}}),
        "overlay-yes": ("/log-likelihood", {"files": files(PNGS[:1]), "params": {"heatmap_overlay": "Yes"}}),
        "named": (f"/models/{name}/log-likelihood", {"files": files(PNGS)}),
        "encode": ("/encode", {"files": files(PNGS[:2])}),
        "named-encode": (f"/models/{name}/encode", {"files": files(PNGS[:1])}),
        "resize": ("/log-likelihood", {"files": files([WIDE]), "params": {"resize": "1"}}),
        "wrong-size-422": ("/log-likelihood", {"files": files([WIDE])}),
        "junk-400": ("/log-likelihood", {"files": files([b"junk"])}),
        "content-type-415": ("/log-likelihood", {"content": b"x", "headers": {"content-type": "text/plain"}}),
        "not-json-400": ("/encode", {"content": b"{", "headers": {"content-type": "application/json"}}),
        "too-many-413": ("/log-likelihood", {"files": files(PNGS * 30)}),
        "unknown-model-404": ("/models/nobody/log-likelihood", {"files": files(PNGS)}),
        "heatmap-on-encode-422": ("/encode", {"json": {"images": [base64.b64encode(PNGS[0]).decode()], "heatmap": True}}),
    }


def comparable(response: httpx.Response) -> tuple[int, Any, str | None, str | None]:
    body = response.json() if response.headers.get("content-type") == "application/json" else response.content
    return response.status_code, body, response.headers.get("content-type"), response.headers.get("retry-after")


@pytest.mark.parametrize("case", list(requests("tiny")))
async def test_the_lane_answers_as_fastapi_does(app: FastAPI, client: httpx.AsyncClient, case: str) -> None:
    path, options = requests(app.state.service.default.name)[case]
    lane = await client.post(path, **options)
    fastapi = await client.post(path, **{**options, "params": {**options.get("params", {}), **VIA_FASTAPI}})
    assert comparable(lane) == comparable(fastapi)
    assert lane.status_code == int(case.rsplit("-", 1)[1]) if case[-3:].isdigit() else lane.status_code == 200


async def test_the_lane_answers_503_while_not_ready(make_settings: Any) -> None:
    from service.app import create_app

    app = create_app(make_settings())  # lifespan not run: the models are not loaded
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://service.test") as client:
        lane = await client.post("/log-likelihood", files=files(PNGS[:1]))
        fastapi = await client.post("/log-likelihood", files=files(PNGS[:1]), params=VIA_FASTAPI)
    assert comparable(lane) == comparable(fastapi)
    assert lane.status_code == 503 and lane.headers["retry-after"] == "1"


async def test_the_lane_serves_its_requests_and_passes_on_the_rest(app: FastAPI) -> None:
    passed: list[str] = []

    async def downstream(scope: Scope, receive: Receive, send: Send) -> None:
        passed.append(f"{scope['method']} {scope['path']}?{scope['query_string'].decode()}")
        await Response(status_code=299)(scope, receive, send)

    lane = FastLaneMiddleware(downstream, routes=[*router.routes, *named_router.routes], paths=LANE_PATHS,
                              resolve_model=resolve_model)

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        await lane({**scope, "app": app, "state": {}}, receive, send)

    name = app.state.service.default.name
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://service.test") as client:
        served = [
            await client.post(path, files=files(PNGS[:1]), params=params)
            for path, params in [("/log-likelihood", {}), (f"/models/{name}/encode", {}),
                                 ("/log-likelihood", {"heatmap": "off", "resize": "T"})]
        ]
        others = [
            await client.post("/log-likelihood", files=files(PNGS[:1]), params={"heatmap": "maybe"}),
            await client.post("/log-likelihood", files=files(PNGS[:1]), params=[("resize", "1"), ("resize", "0")]),
            await client.post("/encode", files=files(PNGS[:1]), params={"heatmap": "true"}),
            await client.post("/decode", json={"latents": []}),
            await client.get("/log-likelihood"),
            await client.post("/models//log-likelihood", files=files(PNGS[:1])),
            await client.post(f"/models/{name}/log-likelihood/more", files=files(PNGS[:1])),
        ]
    assert [r.status_code for r in served] == [200, 200, 200]
    assert [r.status_code for r in others] == [299] * len(others)
    assert passed == [
        "POST /log-likelihood?heatmap=maybe", "POST /log-likelihood?resize=1&resize=0", "POST /encode?heatmap=true",
        "POST /decode?", "GET /log-likelihood?", "POST /models//log-likelihood?", f"POST /models/{name}/log-likelihood/more?",
    ]


async def test_lane_requests_are_counted_under_their_route_template(app: FastAPI, client: httpx.AsyncClient) -> None:
    name = app.state.service.default.name
    await client.post(f"/models/{name}/log-likelihood", files=files(PNGS[:1]))
    await client.post("/log-likelihood", files=files(PNGS[:2]))
    text = (await client.get("/metrics")).text
    assert f'glow_requests_total{{endpoint="/models/{{name}}/log-likelihood",model="{name}",status="200"}} 1.0' in text
    assert f'glow_requests_total{{endpoint="/log-likelihood",model="{name}",status="200"}} 1.0' in text


@pytest.mark.parametrize(
    ("query", "flags"),
    [
        (b"", {}),
        (b"heatmap=TRUE&resize=0", {"heatmap": True, "resize": False}),
        (b"heatmap_overlay=on", {"heatmap_overlay": True}),
        (b"heatmap=", None),  # FastAPI: 422
        (b"heatmap=2", None),
        (b"heatmap=1&heatmap=1", None),  # repeated: FastAPI decides which counts
        (b"label=3", None),  # not a flag of the endpoint
    ],
)
def test_flags_are_parsed_only_as_fastapi_would(query: bytes, flags: dict[str, bool] | None) -> None:
    default, named = (next(r for r in routes.routes if r.path.endswith("/log-likelihood")) for routes in (router, named_router))
    assert Lane(default, named).flags_of(query) == flags
