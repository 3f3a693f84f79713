"""The app as a whole: lifespan and readiness, overload, deadlines, shutdown draining, batch invariance."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
import torch
from fastapi import FastAPI
from service_testing import eventually, files, random_pixels, to_png

from model.checkpoint import Checkpoint, CheckpointError
from service.app import create_app
from service.runner import ModelRunner, Scorable, Score
from service.settings import Settings

WAIT_S = 10  # real seconds before a wait on the model thread counts as a failure


class GatedRunner(ModelRunner):
    """A runner whose scoring can be held (``gate``) or made to fail, counting the batches it scores."""

    def __init__(self, weights: Path) -> None:
        super().__init__(weights, "cpu")
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.batches: list[int] = []
        self.fail_next = False

    def score_batch(self, images: list[Scorable]) -> list[Score]:
        self.batches.append(len(images))
        self.entered.set()
        if not self.gate.wait(WAIT_S):
            raise TimeoutError("the test never opened the gate")
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("injected failure")
        return super().score_batch(images)

    def hold(self) -> None:
        """Hold the next batches at the gate; forget the warm-up's batches."""
        self.gate.clear()
        self.entered.clear()
        self.batches.clear()

    async def until_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, WAIT_S)


@pytest.fixture
def gated(tiny_checkpoint: Path) -> GatedRunner:
    return GatedRunner(tiny_checkpoint)


def client_of(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://service.test")


@pytest.fixture
def png() -> bytes:
    return to_png(random_pixels(1, 0)[0])


def score(http: httpx.AsyncClient, png: bytes) -> asyncio.Task[httpx.Response]:
    return asyncio.ensure_future(http.post("/log-likelihood", files=files([png])))


async def test_not_ready_before_the_lifespan_starts(make_settings: Callable[..., Settings], png: bytes) -> None:
    app = create_app(make_settings())
    async with client_of(app) as http:
        assert (await http.get("/healthz")).status_code == 200
        for response in (await http.get("/readyz"), await http.post("/log-likelihood", files=files([png]))):
            assert response.status_code == 503 and response.headers["retry-after"] == "1"
            assert "still loading" in response.json()["detail"]


async def test_a_bad_checkpoint_fails_the_lifespan(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    app = create_app(make_settings(weights=tmp_path / "missing"))
    with pytest.raises(CheckpointError, match="not found"):
        async with app.router.lifespan_context(app):
            pass


async def test_probes_and_metrics_answer_while_a_batch_computes(
    make_settings: Callable[..., Settings], gated: GatedRunner, png: bytes
) -> None:
    app = create_app(make_settings(), gated)
    async with app.router.lifespan_context(app), client_of(app) as http:
        gated.hold()
        pending = score(http, png)
        await gated.until_entered()
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/readyz")).status_code == 200
        assert (await http.get("/metrics")).status_code == 200
        assert not pending.done()
        gated.gate.set()
        assert (await pending).status_code == 200


async def test_a_full_queue_is_503_with_retry_after(
    make_settings: Callable[..., Settings], gated: GatedRunner, png: bytes
) -> None:
    settings = make_settings(max_batch_size=1, max_queue_size=2, max_images_per_request=2, max_sample_n=2)
    app = create_app(settings, gated)
    async with app.router.lifespan_context(app), client_of(app) as http:
        gated.hold()
        running = score(http, png)
        await gated.until_entered()
        queued = [score(http, png), score(http, png)]
        await eventually(lambda: app.state.service.default.scores.depth == 2)
        refused = await http.post("/log-likelihood", files=files([png]))
        assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
        assert "queue full" in refused.json()["detail"]
        assert (await http.get("/healthz")).status_code == 200  # overload is not death
        gated.gate.set()
        assert [r.status_code for r in await asyncio.gather(running, *queued)] == [200, 200, 200]
    assert gated.batches == [1, 1, 1]  # the refused request never reached the model


async def test_a_request_past_its_deadline_is_504_without_reaching_the_model(
    make_settings: Callable[..., Settings], gated: GatedRunner, png: bytes
) -> None:
    app = create_app(make_settings(max_batch_size=1, request_timeout_s=0.2), gated)
    async with app.router.lifespan_context(app), client_of(app) as http:
        gated.hold()
        running = score(http, png)
        await gated.until_entered()
        late = await http.post("/log-likelihood", files=files([png]))
        assert late.status_code == 504 and "in the queue" in late.json()["detail"]
        gated.gate.set()
        assert (await running).status_code == 200  # past its deadline too, but already running
    assert gated.batches == [1]


async def test_a_failing_batch_fails_only_its_own_requests(
    make_settings: Callable[..., Settings], gated: GatedRunner, png: bytes
) -> None:
    app = create_app(make_settings(max_batch_size=2, max_wait_ms=10_000), gated)
    async with app.router.lifespan_context(app), client_of(app) as http:
        gated.hold()
        gated.fail_next = True
        doomed = [score(http, png), score(http, png)]  # one batch of two
        await gated.until_entered()
        later = [score(http, png), score(http, png)]
        await eventually(lambda: app.state.service.default.scores.depth == 2)
        gated.gate.set()
        failed = await asyncio.gather(*doomed)
        assert [r.status_code for r in failed] == [503, 503]  # answered, retryable: the service probes the model
        assert all(r.json()["detail"].startswith("the model failed on this batch") for r in failed)
        assert [r.status_code for r in await asyncio.gather(*later)] == [200, 200]
    assert gated.batches == [2, 2]


async def test_shutdown_turns_readiness_off_refuses_new_work_and_answers_queued_work(
    make_settings: Callable[..., Settings], gated: GatedRunner, png: bytes
) -> None:
    app = create_app(make_settings(max_batch_size=2, max_wait_ms=60_000), gated)
    async with client_of(app) as http:
        async with app.router.lifespan_context(app):
            gated.hold()
            running = [score(http, png), score(http, png)]
            await gated.until_entered()
            queued = score(http, png)  # alone: would wait a minute for a second image
            await eventually(lambda: app.state.service.default.scores.depth == 1)
            app.state.service.begin_shutdown()
            ready = await http.get("/readyz")
            assert ready.status_code == 503 and "shutting down" in ready.json()["detail"]
            refused = await http.post("/log-likelihood", files=files([png]))
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            gated.gate.set()
        # the lifespan has ended: everything admitted was answered
        assert [r.status_code for r in await asyncio.gather(*running, queued)] == [200, 200, 200]
    assert gated.batches == [2, 1]


async def test_the_lifespan_end_drains_queued_work(make_settings: Callable[..., Settings], png: bytes) -> None:
    app = create_app(make_settings(max_batch_size=64, max_wait_ms=60_000))
    async with client_of(app) as http:
        async with app.router.lifespan_context(app):
            pending = [score(http, png) for _ in range(3)]
            await eventually(lambda: app.state.service.default.scores.depth == 3)
        async with asyncio.timeout(WAIT_S):
            assert [r.status_code for r in await asyncio.gather(*pending)] == [200, 200, 200]


async def test_a_cancelled_request_is_dropped_before_its_batch(
    make_settings: Callable[..., Settings], gated: GatedRunner, png: bytes
) -> None:
    app = create_app(make_settings(max_batch_size=1), gated)
    async with app.router.lifespan_context(app), client_of(app) as http:
        gated.hold()
        running = score(http, png)
        await gated.until_entered()
        abandoned = score(http, png)
        await eventually(lambda: app.state.service.default.scores.depth == 1)
        abandoned.cancel()  # in-process, the client's cancellation reaches the handler
        await eventually(lambda: app.state.service.default.scores.depth == 0)
        gated.gate.set()
        assert (await running).status_code == 200
    assert gated.batches == [1]


async def test_batching_does_not_change_scores(
    make_settings: Callable[..., Settings], reference: Checkpoint
) -> None:
    """64 concurrent single-image requests == each image scored alone, to 1e-4 relative."""
    images = random_pixels(64, 42)
    app = create_app(make_settings(max_batch_size=64, max_wait_ms=500))
    async with app.router.lifespan_context(app), client_of(app) as http:
        responses = await asyncio.gather(*(http.post("/log-likelihood", files=files([to_png(x)])) for x in images))
        metrics, model = app.state.service.metrics, app.state.service.default.name
    got = [r.json()["results"][0]["log_likelihood"] for r in responses]
    alone = [reference.model.log_prob(torch.from_numpy(x)[None]).item() for x in images]
    assert got == pytest.approx(alone, rel=1e-4)
    labels = {"model": model, "operation": "log_likelihood"}
    batches = metrics.registry.get_sample_value("glow_batch_size_count", labels)
    scored = metrics.registry.get_sample_value("glow_batch_size_sum", labels)
    assert scored == 64 and batches < 64  # batched for real: fewer model calls than requests


@pytest.fixture
async def started(make_settings: Callable[..., Settings]) -> AsyncIterator[FastAPI]:
    app = create_app(make_settings())
    async with app.router.lifespan_context(app):
        yield app


async def test_request_shutdown_is_safe_from_a_signal_handler(started: FastAPI) -> None:
    state = started.state.service
    await asyncio.to_thread(state.request_shutdown)  # from another thread, as a signal handler may be
    assert state.shutting_down and not state.ready
    await eventually(lambda: all(batcher.closed for batcher in state.default.batchers.values()))
