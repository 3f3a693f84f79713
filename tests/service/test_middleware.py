"""Request IDs on every response, one structured log line per request, the body limit, the 500 fallback."""

from __future__ import annotations

import json
import logging
import re

import httpx
import pytest
from service_testing import files, random_pixels, to_png
from starlette.types import Message, Receive, Scope, Send

from service.metrics import Metrics
from service.middleware import BodyLimitMiddleware, RequestContextMiddleware


async def test_the_client_request_id_is_echoed(client: httpx.AsyncClient) -> None:
    for path in ("/healthz", "/nowhere"):
        response = await client.get(path, headers={"X-Request-ID": "abc-123"})
        assert response.headers["x-request-id"] == "abc-123"


async def test_a_request_id_is_made_when_absent_or_unusable(client: httpx.AsyncClient) -> None:
    first = (await client.get("/healthz")).headers["x-request-id"]
    second = (await client.get("/healthz", headers={"X-Request-ID": "x" * 500})).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", first) and re.fullmatch(r"[0-9a-f]{32}", second) and first != second


async def test_error_responses_carry_the_request_id(client: httpx.AsyncClient) -> None:
    headers = {"X-Request-ID": "err-1"}
    responses = [
        await client.post("/log-likelihood", content=b"x", headers={**headers, "content-type": "text/plain"}),
        await client.post("/log-likelihood", files=files([b"junk"]), headers=headers),
        await client.get("/sample", params={"n": 0}, headers=headers),
        await client.post("/log-likelihood", content=b"x" * (17 * 2**20), headers=headers),
    ]
    assert [r.status_code for r in responses] == [415, 400, 422, 413]
    assert all(r.headers["x-request-id"] == "err-1" for r in responses)


async def test_one_structured_log_line_per_request(client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture) -> None:
    pngs = [to_png(image) for image in random_pixels(2, 0)]
    with caplog.at_level(logging.INFO, logger="service.access"):
        await client.post("/log-likelihood", files=files(pngs), headers={"X-Request-ID": "log-1"})
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "service.access"]
    assert len(lines) == 1
    line = lines[0]
    assert {k: line[k] for k in ("request_id", "method", "endpoint", "status", "images")} == {
        "request_id": "log-1", "method": "POST", "endpoint": "/log-likelihood", "status": 200, "images": 2,
    }  # fmt: skip
    assert line["latency_ms"] > 0


class Collect:
    """An ASGI ``send`` that keeps the messages."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def __call__(self, message: Message) -> None:
        self.messages.append(message)

    @property
    def status(self) -> int:
        return int(self.messages[0]["status"])

    @property
    def body(self) -> dict:
        return json.loads(b"".join(m.get("body", b"") for m in self.messages[1:]))


def http_scope(headers: list[tuple[bytes, bytes]]) -> Scope:
    return {"type": "http", "method": "POST", "path": "/", "headers": headers, "query_string": b""}


async def no_body() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def test_an_invalid_content_length_is_400() -> None:
    async def never(scope: Scope, receive: Receive, send: Send) -> None:
        raise AssertionError("the app must not run")

    send = Collect()
    await BodyLimitMiddleware(never, cap_for=lambda path: 10, body_timeout_s=1.0)(http_scope([(b"content-length", b"12abc")]), no_body, send)
    assert send.status == 400 and "Content-Length" in send.body["detail"]


async def test_an_escaping_exception_is_a_500_naming_the_request(caplog: pytest.LogCaptureFixture) -> None:
    async def broken(scope: Scope, receive: Receive, send: Send) -> None:
        raise KeyError("bug")

    metrics, send = Metrics(8), Collect()
    with caplog.at_level(logging.ERROR, logger="service.access"):
        await RequestContextMiddleware(broken, metrics)(http_scope([(b"x-request-id", b"r-9")]), no_body, send)
    assert send.status == 500 and "request r-9" in send.body["detail"]
    assert (b"x-request-id", b"r-9") in send.messages[0]["headers"]
    assert "KeyError" in caplog.text  # the traceback is logged
    assert metrics.registry.get_sample_value("glow_requests_total", {"model": "", "endpoint": "unmatched",
                                                                            "status": "500"}) == 1


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/model", "/models", "/", "/docs", "/metrics", "/sample?n=1"])
async def test_head_is_get_without_the_body(client: httpx.AsyncClient, path: str) -> None:
    get, head = await client.get(path), await client.head(path)
    assert head.status_code == get.status_code == 200
    assert head.content == b"" and get.content
    same = ("content-type",) if path == "/metrics" else ("content-type", "content-length")  # metrics move
    assert all(head.headers.get(name) == get.headers.get(name) for name in same)
    assert head.headers["x-request-id"]


async def test_head_of_a_post_only_route_is_405(client: httpx.AsyncClient) -> None:
    response = await client.head("/log-likelihood")
    assert response.status_code == 405 and response.content == b""
