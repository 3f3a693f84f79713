"""What one running app holds: the runner, one batcher per operation, readiness and admission.

Lifecycle: :meth:`ServiceState.start` loads the checkpoint (unless it was loaded before),
warms the model up and starts the batchers, then the service is ready.

Supervision: a batch the model fails on answers its requests with :class:`ModelFailed`
(503) and turns readiness off; a probe (a one-image warm-up) retries every
``PROBE_INTERVAL_S`` and turns it back on once the model answers. A batcher whose loop
failed is unready until it restarts (``service.batcher``).
:meth:`ServiceState.begin_shutdown` turns readiness off and closes admission, while
queued and running work is still answered; :meth:`ServiceState.stop` waits for that
work and stops the model's thread.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from service.batcher import Batcher
from service.limits import RequestLimits
from service.metrics import Metrics
from service.runner import Encoded, ModelRunner, Scorable, Score
from service.schemas import AnomalyInfo, Batching, Limits, ModelInfo
from service.settings import Settings

LOG_LIKELIHOOD, ENCODE, DECODE, SAMPLE = "log_likelihood", "encode", "decode", "sample"
PROBE_INTERVAL_S = 1.0  # between probes of a model that failed a batch
R = TypeVar("R")
log = logging.getLogger("service.state")


class ModelFailed(Exception):
    """The model raised on a batch; the service probes it until it answers again."""

    retry_after_s = math.ceil(PROBE_INTERVAL_S)


class ServiceState:
    """The runner, its batchers and the readiness of one app (see the module docstring)."""

    def __init__(self, settings: Settings, runner: ModelRunner, metrics: Metrics) -> None:
        self.settings = settings
        self.runner = runner
        self.metrics = metrics

        def batcher(operation: str, process: Callable[[list[Any]], list[R]]) -> Batcher[Any, R]:
            return Batcher(
                lambda batch: self._run_batch(operation, process, batch),
                max_batch_size=settings.max_batch_size,
                max_wait_s=settings.max_wait_ms / 1000,
                max_queue_size=settings.max_queue_size,
                timeout_s=settings.request_timeout_s,
                listener=metrics.listener(operation),
                name=operation.replace("_", "-"),
            )

        self.scores: Batcher[Scorable, Score] = batcher(LOG_LIKELIHOOD, runner.score_batch)
        self.encodings: Batcher[np.ndarray, Encoded] = batcher(ENCODE, runner.encode_batch)
        self.decodings: Batcher[np.ndarray, np.ndarray] = batcher(DECODE, runner.decode_batch)
        self.samples: Batcher[np.ndarray, np.ndarray] = batcher(SAMPLE, runner.decode_batch)
        self.batchers = {
            LOG_LIKELIHOOD: self.scores,
            ENCODE: self.encodings,
            DECODE: self.decodings,
            SAMPLE: self.samples,
        }
        self._started = False
        self._shutting_down = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._probe: asyncio.Task[None] | None = None  # while the model is failing
        self.limits: RequestLimits | None = None  # once the model is loaded

    def body_cap(self, path: str) -> int | None:
        """The body cap of a request path in bytes; None before the model (and so its size) is known."""
        return None if self.limits is None else self.limits.body_cap(path)

    @property
    def ready(self) -> bool:
        """Loaded, warmed up, not shutting down, the model answering and every batching loop running."""
        return (
            self._started
            and not self._shutting_down
            and self.model_healthy
            and all(batcher.healthy for batcher in self.batchers.values())
        )

    def unready_reason(self) -> str | None:
        """Why the service is not ready, in words for a 503; None when it is ready."""
        if self._shutting_down:
            return "the server is shutting down; retry later or elsewhere"
        if not self._started:
            return "the model is still loading; retry shortly"
        if not self.model_healthy:
            return "the model failed on a recent batch and is being probed; retry shortly"
        failed = [name for name, batcher in self.batchers.items() if not batcher.healthy]
        if failed:
            return f"the batching loop of {', '.join(failed)} failed and is restarting; retry shortly"
        return None

    @property
    def model_healthy(self) -> bool:
        """False from a batch the model failed on until a probe succeeds."""
        return self._probe is None

    async def _run_batch(self, operation: str, process: Callable[[list[Any]], list[R]], batch: list[Any]) -> list[R]:
        """``process(batch)`` in the model's thread; a failure there is logged, probed, and ModelFailed."""
        try:
            return await self.runner.call(process, batch)
        except Exception as exc:
            log.exception("the model failed on a batch of %d for %s", len(batch), operation)
            if self._probe is None and not self._shutting_down:
                self._probe = asyncio.get_running_loop().create_task(self._probe_until_healthy())
            raise ModelFailed(f"the model failed on this batch ({type(exc).__name__}); retry shortly") from exc

    async def _probe_until_healthy(self) -> None:
        """Warm up on one image every PROBE_INTERVAL_S until it succeeds; then the model is healthy again."""
        while not self._shutting_down:
            await asyncio.sleep(PROBE_INTERVAL_S)
            try:
                await self.runner.call(self.runner.warm_up, 1)
            except Exception as exc:
                log.warning("model probe failed (%s: %s); still unready", type(exc).__name__, exc)
            else:
                log.info("model probe succeeded; ready again")
                break
        self._probe = None

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    async def start(self) -> None:
        """Load (if needed) and warm up the model, start the batchers; then the service is ready."""
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self.runner.load)
        self.limits = RequestLimits.of(self.settings, self.runner.image_shape, self.runner.latent_dim)
        await self.runner.call(self.runner.warm_up, self.settings.max_batch_size)
        info = self.model_info()
        self.metrics.model.info(
            {
                "name": info.name,
                "dataset": info.dataset,
                "image_shape": "x".join(map(str, info.image_shape)),
                "parameters": str(info.parameters),
                "weights_sha256": info.weights_sha256,
                "device": info.device,
                "dtype": info.dtype,
                "form": self.runner.form,
            }
        )
        for operation, batcher in self.batchers.items():
            batcher.start()
            self.metrics.track_queue_depth(operation, lambda batcher=batcher: batcher.depth)
        self._started = True

    def begin_shutdown(self) -> None:
        """Readiness off, admission closed; queued and running work still runs, without waiting to fill batches."""
        self._shutting_down = True
        for batcher in self.batchers.values():
            batcher.close()

    def request_shutdown(self) -> None:
        """:meth:`begin_shutdown` from a signal handler or another thread."""
        self._shutting_down = True
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.begin_shutdown)

    async def stop(self) -> None:
        """Begin shutting down, answer everything queued or running, stop the model's thread."""
        self.begin_shutdown()
        await asyncio.gather(*(batcher.stop() for batcher in self.batchers.values()))
        if self._probe is not None:
            self._probe.cancel()
        await asyncio.to_thread(self.runner.close)

    def limits_info(self) -> Limits:
        """The request limits /model reports."""
        settings = self.settings
        limits = self.limits or RequestLimits.of(settings, self.runner.image_shape, self.runner.latent_dim)
        return Limits(
            max_images_per_request=settings.max_images_per_request,
            max_sample_n=settings.max_sample_n,
            max_body_bytes=limits.largest_body,
            body_bytes={"images": limits.images_body, "decode": limits.decode_body, "other": limits.other_body},
            max_image_bytes=limits.image_bytes,
            max_source_pixels=settings.max_source_pixels,
            max_in_flight=settings.max_in_flight,
            body_timeout_s=settings.body_timeout_s,
            request_timeout_s=settings.request_timeout_s,
        )

    def model_info(self) -> ModelInfo:
        """What GET /model returns."""
        runner, settings = self.runner, self.settings
        meta = runner.checkpoint.meta
        config = runner.model.config
        metrics = meta.get("metrics") or {}
        dataset = meta.get("dataset") or {}
        return ModelInfo(
            name=str(meta.get("name", runner.checkpoint.weights_path.parent.name)),
            dataset=str(dataset.get("name", "unknown") if isinstance(dataset, dict) else dataset),
            image_shape=list(config.image_shape),
            n_bits=config.n_bits,
            levels=config.levels,
            steps_per_level=config.steps_per_level,
            hidden_channels=config.hidden_channels,
            parameters=runner.parameters,
            test_bits_per_dim=metrics.get("test_bits_per_dim"),
            test_bits_per_dim_bin_centre=metrics.get("test_bits_per_dim_bin_centre"),
            weights_sha256=str(meta["weights_sha256"]),
            device=runner.device,
            dtype=runner.dtype,
            batching=Batching(
                max_batch_size=settings.max_batch_size,
                max_wait_ms=settings.max_wait_ms,
                max_queue_size=settings.max_queue_size,
            ),
            latent_dim=runner.latent_dim,
            latent_shapes=[list(shape) for shape in runner.model.latent_shapes],
            anomaly=AnomalyInfo(
                method=runner.scorer.method,
                description=runner.scorer.description,
                threshold=runner.scorer.threshold,
                false_positive_rate=runner.scorer.fpr,
                reference_size=runner.scorer.reference.numel(),
            ),
            limits=self.limits_info(),
        )
