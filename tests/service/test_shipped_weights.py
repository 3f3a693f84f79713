"""The shipped Fashion-MNIST checkpoint, served in-process and by a real server; skipped until it is exported."""

from __future__ import annotations

import base64
import signal
from collections.abc import Callable

import httpx
import numpy as np
import pytest
import torch
from service_testing import ServerProcess, files, from_png, random_pixels, to_png

from model.anomaly import AnomalyScorer
from model.checkpoint import load_checkpoint
from service.app import create_app
from service.client import GlowClient
from service.models import shipped_weights
from service.settings import DEFAULT_WEIGHTS, Settings

pytestmark = pytest.mark.skipif(
    not (DEFAULT_WEIGHTS / "glow.safetensors").is_file(),
    reason=f"the shipped checkpoint {DEFAULT_WEIGHTS} is not there yet (python -m model.export writes it)",
)


async def test_the_shipped_checkpoint_serves_the_contract(make_settings: Callable[..., Settings]) -> None:
    checkpoint = load_checkpoint(DEFAULT_WEIGHTS, "cpu")
    scorer = AnomalyScorer(checkpoint.model, checkpoint.calibration, fpr=0.01)
    app = create_app(make_settings(weights=DEFAULT_WEIGHTS, max_batch_size=8))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            info = (await http.get("/model")).json()
            assert "fashion" in info["dataset"].lower() and info["image_shape"] == [1, 28, 28]
            assert 0 < info["test_bits_per_dim_bin_centre"] < 8 and 0 < info["test_bits_per_dim"] < 8
            samples = (await http.get("/sample", params={"n": 4, "temperature": 0.7, "seed": 0})).json()
            sampled = [from_png(base64.b64decode(image)) for image in samples["images"]]
            noise = random_pixels(4, 0)
            response = await http.post("/log-likelihood", files=files([to_png(x) for x in sampled + noise]))
    results = response.json()["results"]
    expected = scorer.score(torch.from_numpy(np.stack(sampled + noise)))
    assert [r["log_likelihood"] for r in results] == pytest.approx(expected.log_likelihood.tolist(), rel=1e-4)
    assert all(r["is_anomaly"] for r in results[4:])  # uniform noise is nothing like clothing
    assert max(r["bits_per_dim"] for r in results[:4]) < min(r["bits_per_dim"] for r in results[4:])


def test_a_real_server_with_the_default_weights() -> None:
    server = ServerProcess(["--device", "cpu", "--max-batch-size", "8"])  # no --weights: the shipped default
    try:
        server.wait_listening()
        with GlowClient(server.url, timeout=60) as glow:
            assert glow.ready() and "fashion" in glow.model_info().dataset.lower()
            samples = glow.sample(n=2, seed=3)
            assert len(glow.score(samples.images)) == 2
        server.process.send_signal(signal.SIGTERM)
        assert server.finish() == 0
    finally:
        server.kill()


async def test_the_shipped_rgb_model_beside_the_default(make_settings: Callable[..., Settings]) -> None:
    """weights/photos (3x32x32) and the default (1x28x28) in one service: each route scores with its own model."""
    photos = shipped_weights("photos")
    if not (photos / "glow.safetensors").is_file():
        pytest.skip(f"{photos} is not in this checkout")
    checkpoint = load_checkpoint(photos, "cpu")
    scorer = AnomalyScorer(checkpoint.model, checkpoint.calibration, fpr=0.01)
    app = create_app(make_settings(weights=("fashion-mnist", "photos"), max_batch_size=8))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            listed = (await http.get("/models")).json()["models"]
            assert [(m["name"], m["image_shape"]) for m in listed] == [("fashion-mnist", [1, 28, 28]),
                                                                      ("photos", [3, 32, 32])]
            samples = (await http.get("/models/photos/sample", params={"n": 4, "temperature": 0.7, "seed": 0})).json()
            sampled = [from_png(base64.b64decode(image)) for image in samples["images"]]
            assert all(x.shape == (3, 32, 32) for x in sampled)
            noise = random_pixels(4, 0, (3, 32, 32))
            scored = await http.post("/models/photos/log-likelihood", files=files([to_png(x) for x in sampled + noise]))
            wrong_size = await http.post("/log-likelihood", files=files([to_png(sampled[0])]))
    results = scored.json()["results"]
    expected = scorer.score(torch.from_numpy(np.stack(sampled + noise)))
    assert [r["log_likelihood"] for r in results] == pytest.approx(expected.log_likelihood.tolist(), rel=1e-4)
    assert not any(r["is_anomaly"] for r in results[:4]) and all(r["is_anomaly"] for r in results[4:])
    assert wrong_size.status_code == 422  # a 32x32 photo patch is not a 28x28 image for the default model
