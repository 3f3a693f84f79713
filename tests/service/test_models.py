"""Several models in one service: --weights entries, GET /models, /models/{name}/..., per-model queues and metrics."""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi import FastAPI
from service_testing import REPO, ServerProcess, eventually, files, make_checkpoint, random_pixels, to_png

from model.anomaly import AnomalyScorer
from model.checkpoint import load_checkpoint
from service.app import create_app
from service.models import ModelSpec, model_specs, shipped_weights
from service.runner import ModelRunner
from service.settings import Settings

MODEL_ENDPOINTS = [("GET", "/model"), ("POST", "/log-likelihood"), ("GET", "/sample"), ("POST", "/encode"),
                   ("POST", "/decode")]  # fmt: skip


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny checkpoint, other weights than ``tiny_checkpoint``."""
    return make_checkpoint(tmp_path_factory.mktemp("other"), seed=1)


# ------------------------------------------------------------------ --weights entries
def test_entries_name_their_models(tiny_checkpoint: Path, other_checkpoint: Path) -> None:
    specs = model_specs([f"first={tiny_checkpoint}", str(other_checkpoint / "glow.safetensors"), "x=missing"])
    assert specs == [ModelSpec("first", tiny_checkpoint), ModelSpec(other_checkpoint.name, other_checkpoint / "glow.safetensors"),
                     ModelSpec("x", Path("missing"))]  # fmt: skip
    assert model_specs([f"a={tiny_checkpoint},b={other_checkpoint}"]) == [
        ModelSpec("a", tiny_checkpoint), ModelSpec("b", other_checkpoint)
    ]


def test_a_folder_of_checkpoints_serves_each_under_its_folder_name(
    tmp_path: Path, tiny_checkpoint: Path, other_checkpoint: Path
) -> None:
    shutil.copytree(other_checkpoint, tmp_path / "zeta")
    shutil.copytree(tiny_checkpoint, tmp_path / "alpha")
    (tmp_path / "notes").mkdir()  # not a checkpoint: ignored
    assert model_specs([str(tmp_path)]) == [ModelSpec("alpha", tmp_path / "alpha"), ModelSpec("zeta", tmp_path / "zeta")]
    with pytest.raises(ValueError, match="holds several checkpoints; name each one"):
        model_specs([f"all={tmp_path}"])


def test_shipped_names_resolve_and_the_default_is_shipped() -> None:
    assert model_specs(["mnist"]) == [ModelSpec("mnist", shipped_weights("mnist"))]
    assert shipped_weights("fashion-mnist") == REPO / "weights" / "fashion-mnist"


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (["a=x", "a=y"], "more than one model named a"),
        (["one/mnist", "two/mnist"], "more than one model named mnist"),
        (["bad/name=x"], "the name 'bad/name' must be"),
        ([","], "no checkpoint given"),
    ],
)
def test_ambiguous_or_bad_entries_are_refused(entries: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        model_specs(entries)


def test_main_refuses_two_models_of_one_name_in_one_line(
    tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.__main__ import main

    assert main(["--weights", f"a={tiny_checkpoint}", "--weights", f"a={tiny_checkpoint}", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "more than one model named a" in err


# --------------------------------------------------------------------- serving
@pytest.fixture
async def two_models(
    make_settings: Callable[..., Settings], tiny_checkpoint: Path, other_checkpoint: Path
) -> AsyncIterator[httpx.AsyncClient]:
    """A client of an app serving ``tiny`` (the default) and ``other``."""
    app = create_app(make_settings(weights=(f"tiny={tiny_checkpoint}", f"other={other_checkpoint}")))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://service.test") as http:
            yield http


async def test_models_lists_every_model_the_default_first(two_models: httpx.AsyncClient) -> None:
    response = await two_models.get("/models")
    assert response.status_code == 200
    assert response.json() == {"models": [
        {"name": "tiny", "dataset": "synthetic", "image_shape": [1, 28, 28], "default": True},
        {"name": "other", "dataset": "synthetic", "image_shape": [1, 28, 28], "default": False},
    ]}  # fmt: skip


async def test_each_name_serves_its_own_model_and_the_prefixless_routes_the_default(
    two_models: httpx.AsyncClient, tiny_checkpoint: Path, other_checkpoint: Path
) -> None:
    images = random_pixels(2, 4)
    pngs = files([to_png(image) for image in images])
    for prefix, checkpoint in (("", tiny_checkpoint), ("/models/tiny", tiny_checkpoint),
                               ("/models/other", other_checkpoint)):  # fmt: skip
        reference = load_checkpoint(checkpoint, "cpu")
        expected = AnomalyScorer(reference.model, reference.calibration).score(torch.from_numpy(np.stack(images)))
        info = (await two_models.get(f"{prefix}/model")).json()
        assert info["weights_sha256"] == reference.meta["weights_sha256"]
        body = (await two_models.post(f"{prefix}/log-likelihood", files=pngs)).json()
        assert [r["log_likelihood"] for r in body["results"]] == pytest.approx(expected.log_likelihood.tolist(),
                                                                                rel=1e-5)
        assert body["threshold"] == pytest.approx(float(AnomalyScorer(reference.model, reference.calibration).threshold))
    tiny = (await two_models.get("/models/tiny/sample", params={"n": 2, "seed": 3})).json()
    other = (await two_models.get("/models/other/sample", params={"n": 2, "seed": 3})).json()
    assert tiny["images"] != other["images"]


@pytest.mark.parametrize(("method", "path"), MODEL_ENDPOINTS)
async def test_an_unknown_name_is_404_listing_the_names(two_models: httpx.AsyncClient, method: str, path: str) -> None:
    response = await two_models.request(method, f"/models/nope{path}")
    assert response.status_code == 404
    assert response.json() == {"detail": "no model named 'nope'; this service serves: tiny, other"}


async def test_metrics_carry_the_model_label(two_models: httpx.AsyncClient) -> None:
    png = files([to_png(random_pixels(1, 0)[0])])
    await two_models.post("/log-likelihood", files=png)
    await two_models.post("/models/other/log-likelihood", files=png)
    await two_models.post("/models/other/log-likelihood", files=png)
    text = (await two_models.get("/metrics")).text
    assert 'glow_requests_total{endpoint="/log-likelihood",model="tiny",status="200"} 1.0' in text
    assert 'glow_requests_total{endpoint="/models/{name}/log-likelihood",model="other",status="200"} 2.0' in text
    assert 'glow_batch_size_count{model="tiny",operation="log_likelihood"} 1.0' in text
    assert 'glow_batch_size_count{model="other",operation="log_likelihood"} 2.0' in text
    assert 'glow_queue_depth{model="other",operation="encode"} 0.0' in text
    assert text.count("glow_model_info{") == 2


async def test_openapi_documents_the_named_routes(two_models: httpx.AsyncClient) -> None:
    paths = (await two_models.get("/openapi.json")).json()["paths"]
    assert "/models" in paths
    for method, path in MODEL_ENDPOINTS:
        operation = paths[f"/models/{{name}}{path}"][method.lower()]
        assert "404" in operation["responses"]
        [name] = [parameter for parameter in operation["parameters"] if parameter["in"] == "path"]
        assert name["name"] == "name" and name["schema"]["enum"] == ["tiny", "other"]


class SlowLoad(ModelRunner):
    """A runner whose load waits for ``gate``."""

    def __init__(self, weights: Path, gate: threading.Event) -> None:
        super().__init__(weights, "cpu")
        self.gate = gate

    def load(self) -> None:
        assert self.gate.wait(30)
        super().load()


async def test_ready_only_once_every_model_is(
    make_settings: Callable[..., Settings], tiny_checkpoint: Path, other_checkpoint: Path
) -> None:
    gate = threading.Event()
    settings = make_settings(weights=(f"tiny={tiny_checkpoint}", f"other={other_checkpoint}"))
    app: FastAPI = create_app(settings, {"tiny": ModelRunner(tiny_checkpoint, "cpu"),
                                         "other": SlowLoad(other_checkpoint, gate)})  # fmt: skip
    released = asyncio.Event()

    async def serve() -> None:
        async with app.router.lifespan_context(app):
            await released.wait()

    serving = asyncio.ensure_future(serve())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://service.test") as http:
        await eventually(lambda: app.state.service.models["tiny"].runner.loaded)
        assert (await http.get("/readyz")).status_code == 503
        assert (await http.get("/models/tiny/model")).status_code == 503
        gate.set()
        await eventually(lambda: app.state.service.ready)
        assert (await http.get("/readyz")).status_code == 200
    released.set()
    await serving


def test_a_real_server_serves_both_shipped_checkpoints() -> None:
    """``python -m service --weights fashion=weights/fashion-mnist --weights mnist=weights/mnist``."""
    server = ServerProcess(["--weights", "fashion=weights/fashion-mnist", "--weights", "mnist=weights/mnist",
                            "--device", "cpu", "--max-batch-size", "4"])  # fmt: skip
    try:
        server.wait_listening()
        listed = httpx.get(f"{server.url}/models").json()["models"]
        assert [(m["name"], m["dataset"], m["default"]) for m in listed] == [
            ("fashion", "fashion-mnist", True), ("mnist", "mnist", False)]
        png = files([to_png(random_pixels(1, 0)[0])])
        default = httpx.post(f"{server.url}/log-likelihood", files=png).json()["results"][0]
        fashion = httpx.post(f"{server.url}/models/fashion/log-likelihood", files=png).json()["results"][0]
        mnist = httpx.post(f"{server.url}/models/mnist/log-likelihood", files=png).json()["results"][0]
        assert default == fashion and mnist["log_likelihood"] != fashion["log_likelihood"]
        server.process.terminate()
        assert server.finish() == 0
    finally:
        server.kill()
