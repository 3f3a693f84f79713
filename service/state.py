"""What one running app holds: the runner, one batcher per operation, readiness and admission.

Lifecycle: :meth:`ServiceState.start` loads the checkpoint (unless it was loaded before),
warms the model up and starts the batchers, then the service is ready.
:meth:`ServiceState.begin_shutdown` turns readiness off and closes admission, while
queued and running work is still answered; :meth:`ServiceState.stop` waits for that
work and stops the model's thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from service.batcher import Batcher
from service.metrics import Metrics
from service.runner import Encoded, ModelRunner, Scorable, Score
from service.schemas import AnomalyInfo, Batching, Limits, ModelInfo
from service.settings import Settings

LOG_LIKELIHOOD, ENCODE, DECODE, SAMPLE = "log_likelihood", "encode", "decode", "sample"
R = TypeVar("R")


class ServiceState:
    """The runner, its batchers and the readiness of one app (see the module docstring)."""

    def __init__(self, settings: Settings, runner: ModelRunner, metrics: Metrics) -> None:
        self.settings = settings
        self.runner = runner
        self.metrics = metrics

        def batcher(operation: str, process: Callable[[list[Any]], list[R]]) -> Batcher[Any, R]:
            return Batcher(
                lambda batch: runner.call(process, batch),
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

    @property
    def ready(self) -> bool:
        """Loaded, warmed up and not shutting down."""
        return self._started and not self._shutting_down

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    async def start(self) -> None:
        """Load (if needed) and warm up the model, start the batchers; then the service is ready."""
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self.runner.load)
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
        await asyncio.to_thread(self.runner.close)

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
            limits=Limits(
                max_images_per_request=settings.max_images_per_request,
                max_sample_n=settings.max_sample_n,
                max_body_bytes=settings.max_body_bytes,
                request_timeout_s=settings.request_timeout_s,
            ),
        )
