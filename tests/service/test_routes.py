"""Every endpoint of the contract and every error status, through httpx.ASGITransport with the lifespan run.

Every test taking ``client`` or ``limited`` runs twice: against the routes without a
prefix (the default model) and against ``/models/mnist/...`` (the tiny checkpoint served
as ``mnist``). tests/service/test_models.py checks that several models are each served
under their own name.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi import FastAPI
from PIL import Image
from service_testing import files, from_png, random_pixels, to_png

from model.anomaly import LOG_LIKELIHOOD_FLOOR, SCORE_CAP, AnomalyScorer, method_name, rows_for
from model.glow import Glow
from model.checkpoint import Checkpoint
from service.app import create_app
from service.settings import Settings

CONTRACT_MODEL_FIELDS = {
    "name", "dataset", "image_shape", "n_bits", "levels", "steps_per_level", "hidden_channels", "parameters",
    "test_bits_per_dim", "test_bits_per_dim_bin_centre", "weights_sha256", "device", "dtype", "batching",
}  # fmt: skip
SCORE_FIELDS = {"log_likelihood", "bits_per_dim", "anomaly_score", "percentile", "is_anomaly"}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def expected_scores(scorer: AnomalyScorer, images: list[np.ndarray]) -> list[float]:
    return scorer.score(torch.from_numpy(np.stack(images))).log_likelihood.tolist()


def log_likelihoods(response: httpx.Response) -> list[float]:
    assert response.status_code == 200, response.text
    return [result["log_likelihood"] for result in response.json()["results"]]


MODEL_PATHS = frozenset({"/model", "/log-likelihood", "/sample", "/encode", "/decode"})


@pytest.fixture(params=["", "/models/mnist"], ids=["default-routes", "named-routes"])
def prefix(request: pytest.FixtureRequest) -> str:
    """Where the model endpoints are reached: without a prefix (the default model) or under a model's name."""
    return request.param


@pytest.fixture
def named(make_settings: Callable[..., Settings], tiny_checkpoint: Path) -> Callable[..., Settings]:
    """Settings serving the tiny checkpoint as ``mnist``; keyword overrides."""
    return lambda **overrides: make_settings(weights=f"mnist={tiny_checkpoint}", **overrides)


@asynccontextmanager
async def prefixed(app: FastAPI, prefix: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client of a started app whose requests to the model endpoints go to ``prefix`` + the endpoint."""

    async def route(request: httpx.Request) -> None:
        if request.url.path in MODEL_PATHS:
            request.url = request.url.copy_with(path=prefix + request.url.path)

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://service.test",
                                 event_hooks={"request": [route]}) as http:
        yield http


@pytest.fixture
async def app(named: Callable[..., Settings]) -> AsyncIterator[FastAPI]:
    """A started app serving the tiny checkpoint as ``mnist``."""
    application = create_app(named())
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def client(app: FastAPI, prefix: str) -> AsyncIterator[httpx.AsyncClient]:
    async with prefixed(app, prefix) as http:
        yield http


@pytest.fixture
async def limited(named: Callable[..., Settings], prefix: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client of an app with small limits: 3 images per request, 64 KiB bodies, n <= 4."""
    limited_app = create_app(named(max_images_per_request=3, max_body_bytes=65536, max_sample_n=4))
    async with limited_app.router.lifespan_context(limited_app), prefixed(limited_app, prefix) as http:
        yield http


# ------------------------------------------------------------------ probes and metadata
async def test_health_and_readiness(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ready"}


async def test_model_describes_the_checkpoint(client: httpx.AsyncClient, reference: Checkpoint) -> None:
    info = (await client.get("/model")).json()
    assert CONTRACT_MODEL_FIELDS <= set(info)
    config = reference.model.config
    assert info["image_shape"] == [1, 28, 28] and info["n_bits"] == config.n_bits == 8
    assert (info["levels"], info["steps_per_level"], info["hidden_channels"]) == (2, 1, 8)
    assert info["parameters"] == sum(p.numel() for p in reference.model.parameters())
    assert info["weights_sha256"] == reference.meta["weights_sha256"]
    assert (info["name"], info["dataset"], info["device"], info["dtype"]) == ("tiny", "synthetic", "cpu", "float32")
    assert info["test_bits_per_dim"] is None and info["test_bits_per_dim_bin_centre"] is None  # not measured
    assert info["batching"] == {"max_batch_size": 8, "max_wait_ms": 1.0, "max_queue_size": 1024}
    assert info["latent_dim"] == reference.model.latent_dim == 784
    assert sum(c * h * w for c, h, w in info["latent_shapes"]) == 784
    assert info["anomaly"]["method"] == "complexity+energy+level+global" and info["anomaly"]["reference_size"] == 8
    assert "max(z, 0) of bits/dim less the image's lossless-WebP bits/dim" in info["anomaly"]["description"]


# ------------------------------------------------------------------------ log-likelihood
async def test_log_likelihood_multipart_and_json_agree_with_the_model(
    client: httpx.AsyncClient, reference_scorer: AnomalyScorer
) -> None:
    images = random_pixels(3, 0)
    pngs = [to_png(image) for image in images]
    multipart = await client.post("/log-likelihood", files=files(pngs))
    as_json = await client.post("/log-likelihood", json={"images": [b64(png) for png in pngs]})
    expected = expected_scores(reference_scorer, images)
    assert log_likelihoods(multipart) == pytest.approx(expected, rel=1e-6)  # in input order
    assert multipart.json() == as_json.json()
    body = multipart.json()
    assert all(set(result) == SCORE_FIELDS for result in body["results"])
    assert body["anomaly_method"] == method_name(rows_for(False)) and body["threshold"] == reference_scorer.threshold
    first = body["results"][0]
    assert first["bits_per_dim"] == pytest.approx(-first["log_likelihood"] / (784 * np.log(2)))
    assert 0 <= first["percentile"] <= 100 and isinstance(first["is_anomaly"], bool)


async def test_the_orientation_option_scores_with_it_and_says_so(make_settings: Callable[..., Settings],
                                                                 reference: Checkpoint) -> None:
    app = create_app(make_settings(anomaly_orientation=True))
    oriented = AnomalyScorer(reference.model, reference.calibration, orientation=True)
    images = random_pixels(2, 3)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://service.test") as http:
            body = (await http.post("/log-likelihood", files=files([to_png(image) for image in images]))).json()
            info = (await http.get("/model")).json()
    assert body["anomaly_method"] == info["anomaly"]["method"] == method_name(rows_for(True))
    assert body["threshold"] == info["anomaly"]["threshold"] == oriented.threshold
    expected = oriented.score(torch.from_numpy(np.stack(images))).anomaly_score.tolist()
    assert [r["anomaly_score"] for r in body["results"]] == pytest.approx(expected, rel=1e-4, abs=1e-4)


async def test_rgb_images_are_converted(client: httpx.AsyncClient, reference_scorer: AnomalyScorer) -> None:
    (rgb,) = random_pixels(1, 1, (3, 28, 28))
    gray = np.asarray(Image.fromarray(rgb.transpose(1, 2, 0)).convert("L"))[None]
    response = await client.post("/log-likelihood", files=files([to_png(rgb)]))
    assert log_likelihoods(response) == pytest.approx(expected_scores(reference_scorer, [gray]), rel=1e-6)


async def test_jpeg_images_are_accepted(client: httpx.AsyncClient, reference_scorer: AnomalyScorer) -> None:
    jpeg = to_png(random_pixels(1, 2)[0], format="JPEG")
    decoded = np.asarray(Image.open(io.BytesIO(jpeg)))[None]
    response = await client.post("/log-likelihood", json={"images": [b64(jpeg)]})
    assert log_likelihoods(response) == pytest.approx(expected_scores(reference_scorer, [decoded]), rel=1e-6)


async def test_wrong_size_is_422_unless_resize(client: httpx.AsyncClient, reference_scorer: AnomalyScorer) -> None:
    (small,) = random_pixels(1, 3, (1, 14, 20))
    png = to_png(small)
    refused = await client.post("/log-likelihood", files=files([png]))
    assert refused.status_code == 422
    assert "20x14" in refused.json()["detail"] and "28x28" in refused.json()["detail"]
    resized = np.asarray(Image.fromarray(small[0]).resize((28, 28), Image.Resampling.LANCZOS))[None]
    expected = pytest.approx(expected_scores(reference_scorer, [resized]), rel=1e-6)
    assert log_likelihoods(await client.post("/log-likelihood?resize=true", files=files([png]))) == expected
    by_field = await client.post("/log-likelihood", json={"images": [b64(png)], "resize": True})
    assert log_likelihoods(by_field) == expected


UNFINISHED = (b'--B\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n\r\n'
              + to_png(random_pixels(1, 0)[0]) + b"\r\n")  # a whole part, and no closing delimiter


@pytest.mark.parametrize(
    ("make_request", "status", "message"),
    [
        (lambda: {"files": files([b"not an image"])}, 400, "images[0]: not a PNG or JPEG"),
        (lambda: {"json": {"images": ["%%% not base64"]}}, 400, "images[0]: not valid base64"),
        (lambda: {"content": b'{"images": [', "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
        (lambda: {"content": b"", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
        (lambda: {"json": {"images": "abc"}}, 422, "images: Input should be a valid array"),
        (lambda: {"json": {"images": []}}, 422, "images: List should have at least 1 item"),
        (lambda: {"json": {"images": [b64(b"x")], "colour": 1}}, 422, "colour: Extra inputs are not permitted"),
        (lambda: {"files": [("image", ("a.png", b"x", "image/png"))]}, 422, "no 'images' parts"),
        (lambda: {"data": {"images": "text"}, "files": [("other", ("a", b"x"))]}, 400, "is a text field"),
        (lambda: {"content": b"--x--", "headers": {"content-type": "multipart/form-data"}}, 400, "multipart"),
        (lambda: {"content": UNFINISHED, "headers": {"content-type": "multipart/form-data; boundary=B"}}, 400,
         "malformed multipart body: it ends before its closing delimiter '--B--'"),
        (lambda: {"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "unsupported content type"),
        (lambda: {"content": b"hello"}, 415, "'(none)'"),
    ],
    ids=[
        "undecodable-image", "bad-base64", "bad-json", "empty-body", "images-not-a-list", "no-images",
        "extra-field", "no-images-part", "text-part", "no-boundary", "truncated", "text-plain", "no-content-type",
    ],
)  # fmt: skip
async def test_bad_image_requests_get_a_clear_4xx(
    client: httpx.AsyncClient, make_request: Callable[[], dict], status: int, message: str
) -> None:
    for path in ("/log-likelihood", "/encode"):
        response = await client.post(path, **make_request())
        assert response.status_code == status, response.text
        assert message in response.json()["detail"]


async def test_too_many_images_is_413(limited: httpx.AsyncClient) -> None:
    pngs = [to_png(image) for image in random_pixels(4, 4)]
    for kwargs in ({"files": files(pngs)}, {"json": {"images": [b64(png) for png in pngs]}}):
        response = await limited.post("/log-likelihood", **kwargs)
        assert response.status_code == 413 and "at most 3" in response.json()["detail"]
    assert (await limited.post("/log-likelihood", files=files(pngs[:3]))).status_code == 200


async def test_a_body_over_the_limit_is_413(limited: httpx.AsyncClient) -> None:
    big = {"images": [b64(bytes(50_000))]}
    declared = await limited.post("/log-likelihood", json=big)
    assert declared.status_code == 413 and "65536 bytes" in declared.json()["detail"]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while streaming
        for _ in range(70):
            yield b" " * 1000

    streamed = await limited.post("/log-likelihood", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413 and "65536 bytes" in streamed.json()["detail"]


async def test_a_decompression_bomb_is_413(client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)
    response = await client.post("/log-likelihood", files=files([to_png(random_pixels(1, 5)[0])]))
    assert response.status_code == 413 and "decompression bomb" in response.json()["detail"]


async def test_one_bad_request_does_not_fail_the_others_in_its_batch(
    make_settings: Callable[..., Settings], reference_scorer: AnomalyScorer
) -> None:
    app = create_app(make_settings(max_batch_size=16, max_wait_ms=50))
    images = random_pixels(6, 6)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            bad = [to_png(random_pixels(1, 7, (1, 27, 28))[0]), b"junk"]
            responses = await asyncio.gather(
                *(http.post("/log-likelihood", files=files([to_png(image)])) for image in images),
                *(http.post("/log-likelihood", files=files([blob])) for blob in bad),
            )
    assert [r.status_code for r in responses] == [200] * 6 + [422, 400]
    got = [log_likelihoods(r)[0] for r in responses[:6]]
    assert got == pytest.approx(expected_scores(reference_scorer, images), rel=1e-6)


# ---------------------------------------------------------------------------- sample
async def test_sample_json_is_reproducible_and_matches_the_model(
    client: httpx.AsyncClient, reference: Checkpoint
) -> None:
    response = await client.get("/sample", params={"n": 3, "temperature": 0.5, "seed": 11})
    assert response.status_code == 200
    body = response.json()
    assert (body["temperature"], body["seed"], len(body["images"])) == (0.5, 11, 3)
    images = np.stack([from_png(base64.b64decode(image)) for image in body["images"]])
    assert np.array_equal(images, reference.model.sample(3, 0.5, seed=11).numpy())
    again = await client.get("/sample", params={"n": 3, "temperature": 0.5, "seed": 11})
    assert again.json()["images"] == body["images"]
    other = await client.get("/sample", params={"n": 3, "temperature": 0.5, "seed": 12})
    assert other.json()["images"] != body["images"]


async def test_sample_without_seed_reports_the_seed_it_drew(client: httpx.AsyncClient) -> None:
    first = (await client.get("/sample", params={"n": 2})).json()
    assert first["temperature"] == 0.7 and isinstance(first["seed"], int)
    replay = (await client.get("/sample", params={"n": 2, "seed": first["seed"]})).json()
    assert replay["images"] == first["images"]


async def test_sample_defaults_to_16_images(client: httpx.AsyncClient) -> None:
    assert len((await client.get("/sample")).json()["images"]) == 16


async def test_sample_png_is_one_grid(client: httpx.AsyncClient) -> None:
    response = await client.get("/sample", params={"n": 5, "seed": 3, "format": "png"})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.headers["x-seed"] == "3"
    grid = Image.open(io.BytesIO(response.content))
    assert grid.mode == "L" and grid.size == (3 * 28 + 4 * 2, 2 * 28 + 3 * 2)  # 3 columns, 2 rows, 2 px padding


async def test_samples_whose_inverse_overflows_are_refused_not_drawn_grey(client: httpx.AsyncClient) -> None:
    response = await client.get("/sample", params={"n": 2, "temperature": 1e38, "seed": 5})
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail.startswith("samples [0, 1] of seed 5 at temperature 1e+38: the inverse flow overflows")
    png = await client.get("/sample", params={"n": 2, "temperature": 1e38, "seed": 5, "format": "png"})
    assert png.status_code == 422


async def test_decode_refuses_latents_whose_inverse_overflows_and_names_them(client: httpx.AsyncClient) -> None:
    latents = [[0.0] * 784, [3e38] * 784, [0.1] * 784]
    response = await client.post("/decode", json={"latents": latents})
    assert response.status_code == 422
    assert response.json()["detail"].startswith("latents [1]: the inverse flow overflows on them")
    fine = await client.post("/decode", json={"latents": [latents[0], latents[2]]})
    assert fine.status_code == 200 and len(fine.json()["images"]) == 2


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"n": 0}, "query parameter 'n'"),
        ({"n": 5}, "at most 4"),
        ({"n": "many"}, "query parameter 'n'"),
        ({"temperature": 0}, "query parameter 'temperature': Input should be greater than 0"),
        ({"temperature": -1}, "query parameter 'temperature'"),
        ({"temperature": "nan"}, "query parameter 'temperature': Input should be a finite number"),
        ({"temperature": "inf"}, "query parameter 'temperature': Input should be a finite number"),
        ({"seed": -1}, "query parameter 'seed'"),
        ({"format": "gif"}, "query parameter 'format'"),
    ],
)
async def test_bad_sample_parameters_are_422(limited: httpx.AsyncClient, params: dict, message: str) -> None:
    response = await limited.get("/sample", params=params)
    assert response.status_code == 422
    assert message in response.json()["detail"]


# ------------------------------------------------------------------- encode and decode
async def test_encode_returns_latents_and_log_likelihoods(
    client: httpx.AsyncClient, reference: Checkpoint, reference_scorer: AnomalyScorer
) -> None:
    images = random_pixels(2, 8)
    response = await client.post("/encode", files=files([to_png(image) for image in images]))
    assert response.status_code == 200
    body = response.json()
    assert body["latent_dim"] == 784 and [len(z) for z in body["latents"]] == [784, 784]
    expected = reference.model.encode(torch.from_numpy(np.stack(images))).numpy()
    assert np.allclose(np.array(body["latents"]), expected, atol=1e-5)
    assert body["log_likelihood"] == pytest.approx(expected_scores(reference_scorer, images), rel=1e-6)


async def test_decode_of_encode_gives_back_the_same_pixels(client: httpx.AsyncClient) -> None:
    images = random_pixels(4, 9)
    encoded = (await client.post("/encode", files=files([to_png(image) for image in images]))).json()
    response = await client.post("/decode", json={"latents": encoded["latents"]})
    assert response.status_code == 200
    decoded = [from_png(base64.b64decode(image)) for image in response.json()["images"]]
    assert all(np.array_equal(got, want) for got, want in zip(decoded, images, strict=True))


async def test_images_that_overflow_float32_are_refused_by_encode_and_flagged_by_log_likelihood(
        app, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """The overflow policy (README): /encode 422 naming the images; /log-likelihood a finite floor, the cap, flagged."""
    images = random_pixels(3, 10)
    original = Glow.log_prob_and_levels

    def overflowing(self: Glow, x: torch.Tensor, noise: torch.Tensor | None = None):
        log_prob, latents, levels = original(self, x, noise)
        if len(x) == 3:
            latents[0][2] = float("inf")
            log_prob[2] = -float("inf")
        return log_prob, latents, levels

    runner = app.state.service.default.runner
    folded = runner.model.fold()  # eager: its log_prob_and_levels is Glow's, patched below
    monkeypatch.setattr(runner, "_inference", folded)
    monkeypatch.setattr(runner.scorer, "inference", folded)
    monkeypatch.setattr(Glow, "log_prob_and_levels", overflowing)
    response = await client.post("/encode", files=files([to_png(image) for image in images]))
    assert response.status_code == 422 and response.json()["detail"].startswith("images [2]: their latents overflow")
    response = await client.post("/log-likelihood", files=files([to_png(image) for image in images]))
    assert response.status_code == 200
    results = response.json()["results"]
    assert (results[2]["log_likelihood"], results[2]["anomaly_score"]) == (LOG_LIKELIHOOD_FLOOR, SCORE_CAP)
    assert results[2]["is_anomaly"] and results[2]["percentile"] == 100
    assert all(r["anomaly_score"] < SCORE_CAP for r in results[:2])


def latent_body(values: str, count: int = 784) -> dict:
    row = ", ".join([values] + ["0.0"] * (count - 1))
    return {"content": f'{{"latents": [[{", ".join(["0.0"] * 784)}], [{row}]]}}'.encode(),
            "headers": {"content-type": "application/json"}}  # fmt: skip


@pytest.mark.parametrize(
    ("make_request", "status", "message"),
    [
        (lambda: latent_body("NaN"), 422, "latents[1] holds NaN or infinite values"),
        (lambda: latent_body("Infinity"), 422, "latents[1] holds NaN or infinite values"),
        (lambda: latent_body("-1e400"), 422, "latents[1] holds NaN or infinite values"),
        (lambda: latent_body("1e39"), 422, "latents[1] holds values beyond +-3.403e+38 (float32's range)"),
        (lambda: latent_body("0.0", count=783), 422, "latents[1] has 783 values; this model's latents have 784"),
        (lambda: latent_body('"0.5"'), 422, "latents[1][0]: Input should be a valid number"),
        (lambda: {"json": {"latents": []}}, 422, "latents: List should have at least 1 item"),
        (lambda: {"json": {"z": [[0.0]]}}, 422, "latents: Field required"),
        (lambda: {"json": {"latents": [[0.0]] * 4}}, 413, "4 latents in one request; at most 3"),
        (lambda: {"content": b"{", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
        (lambda: {"files": files([b"x"])}, 415, "unsupported content type 'multipart/form-data'"),
    ],
    ids=["nan", "inf", "overflow", "huge", "wrong-length", "string", "empty", "missing", "too-many", "bad-json", "415"],
)
async def test_bad_latents_get_a_clear_4xx(
    limited: httpx.AsyncClient, make_request: Callable[[], dict], status: int, message: str
) -> None:
    response = await limited.post("/decode", **make_request())
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]


# ----------------------------------------------------------------------- everything else
async def test_unknown_paths_and_methods_are_json_errors(client: httpx.AsyncClient) -> None:
    missing = await client.get("/nowhere")
    assert missing.status_code == 404 and missing.json() == {"detail": "Not Found"}
    assert (await client.get("/log-likelihood")).status_code == 405


async def test_openapi_documents_every_endpoint_and_docs_render(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    paths = {"/healthz", "/readyz", "/metrics", "/model", "/log-likelihood", "/sample", "/encode", "/decode"}
    assert paths <= set(schema["paths"])
    body = schema["paths"]["/log-likelihood"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)
    responses = schema["paths"]["/log-likelihood"]["post"]["responses"]
    assert {"200", "400", "413", "415", "422", "503", "504"} <= set(responses)
    assert "LogLikelihoodResponse" in json.dumps(responses["200"])
    assert {"ModelInfo", "SampleResponse", "EncodeResponse", "DecodeResponse"} <= set(schema["components"]["schemas"])
    docs = await client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()

