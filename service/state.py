"""What one running app holds: per model its runner and batchers (:class:`ModelState`); readiness and admission.

Each model has its own runner (its own worker thread), its own queue per operation, its
own anomaly calibration and request limits. Lifecycle: :meth:`ServiceState.start` loads
every checkpoint (unless loaded before), warms each model up and starts its batchers; the
service is ready once all are.

Supervision: a batch a model fails on answers its requests with :class:`ModelFailed`
(503) and turns readiness off; a probe (a one-image warm-up) retries every
``PROBE_INTERVAL_S`` and turns it back on once the model answers. A batcher whose loop
failed is unready until it restarts (``service.batcher``).
:meth:`ServiceState.begin_shutdown` turns readiness off and closes admission, while
queued and running work is still answered; :meth:`ServiceState.stop` waits for that
work and stops the models' threads.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np

from service.batcher import Batcher
from service.limits import RequestLimits
from service.metrics import Metrics
from service.runner import Encoded, ModelRunner, Scorable, Score
from service.schemas import AnomalyInfo, Batching, Limits, ModelInfo, ModelSummary
from service.settings import Settings

LOG_LIKELIHOOD, ENCODE, DECODE, SAMPLE = "log_likelihood", "encode", "decode", "sample"
PROBE_INTERVAL_S = 1.0  # between probes of a model that failed a batch
MODELS_PREFIX = "/models/"  # the routes of a named model (service.routes.named_router)
R = TypeVar("R")
log = logging.getLogger("service.state")


class ModelFailed(Exception):
    """The model raised on a batch; the service probes it until it answers again."""

    retry_after_s = math.ceil(PROBE_INTERVAL_S)


class ModelState:
    """One served model: its name, runner, one batcher per operation, request limits and health."""

    def __init__(self, name: str, settings: Settings, runner: ModelRunner, metrics: Metrics) -> None:
        self.name = name
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
                listener=metrics.listener(name, operation),
                name=f"{name} {operation.replace('_', '-')}",
            )

        self.scores: Batcher[Scorable, Score] = batcher(LOG_LIKELIHOOD, runner.score_batch)
        self.encodings: Batcher[np.ndarray, Encoded] = batcher(ENCODE, runner.encode_batch)
        self.decodings: Batcher[np.ndarray, np.ndarray | None] = batcher(DECODE, runner.decode_batch)
        self.samples: Batcher[np.ndarray, np.ndarray | None] = batcher(SAMPLE, runner.decode_batch)
        self.batchers = {
            LOG_LIKELIHOOD: self.scores,
            ENCODE: self.encodings,
            DECODE: self.decodings,
            SAMPLE: self.samples,
        }
        self._closing = False
        self._probe: asyncio.Task[None] | None = None  # while the model is failing
        self.limits: RequestLimits | None = None  # once the model is loaded

    def body_cap(self, path: str) -> int | None:
        """The body cap of a request path (without a ``/models/{name}`` prefix) in bytes; None before the model
        (and so its size) is known."""
        return None if self.limits is None else self.limits.body_cap(path)

    @property
    def healthy(self) -> bool:
        """The model answering and every batching loop running."""
        return self.model_healthy and all(batcher.healthy for batcher in self.batchers.values())

    def unhealthy_reason(self) -> str | None:
        """Why this model cannot take work now, in words for a 503; None when it can."""
        which = f"model {self.name!r}"
        if not self.model_healthy:
            return f"{which} failed on a recent batch and is being probed; retry shortly"
        failed = [name for name, batcher in self.batchers.items() if not batcher.healthy]
        if failed:
            return f"the batching loop of {which} {', '.join(failed)} failed and is restarting; retry shortly"
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
            if self._probe is None and not self._closing:
                self._probe = asyncio.get_running_loop().create_task(self._probe_until_healthy())
            raise ModelFailed(f"the model failed on this batch ({type(exc).__name__}); retry shortly") from exc

    async def _probe_until_healthy(self) -> None:
        """Warm up on one image every PROBE_INTERVAL_S until it succeeds; then the model is healthy again."""
        while not self._closing:
            await asyncio.sleep(PROBE_INTERVAL_S)
            try:
                await self.runner.call(self.runner.warm_up, 1)
            except Exception as exc:
                log.warning("model probe failed (%s: %s); still unready", type(exc).__name__, exc)
            else:
                log.info("model probe succeeded; ready again")
                break
        self._probe = None

    async def start(self) -> None:
        """Load (if needed) and warm up the model, then start its batchers."""
        await asyncio.to_thread(self.runner.load)
        self.limits = RequestLimits.of(self.settings, self.runner.image_shape, self.runner.latent_dim)
        await self.runner.call(self.runner.warm_up, self.settings.max_batch_size)
        info = self.model_info()
        self.metrics.model.labels(model=self.name).info(
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
            self.metrics.track_queue_depth(self.name, operation, lambda batcher=batcher: batcher.depth)

    def close(self) -> None:
        """Close admission; queued and running work still runs."""
        self._closing = True
        for batcher in self.batchers.values():
            batcher.close()

    async def stop(self) -> None:
        """Answer everything queued or running, stop the model's thread."""
        self.close()
        await asyncio.gather(*(batcher.stop() for batcher in self.batchers.values()))
        if self._probe is not None:
            self._probe.cancel()
        await asyncio.to_thread(self.runner.close)

    def summary(self, default: bool) -> ModelSummary:
        """What GET /models lists for this model."""
        info = self.model_info()
        return ModelSummary(name=self.name, dataset=info.dataset, image_shape=info.image_shape, default=default)

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
            labels=list(config.labels) or None,
        )


class ServiceState:
    """The models of one app, the default first, and the app's readiness (see the module docstring)."""

    def __init__(self, settings: Settings, runners: Mapping[str, ModelRunner], metrics: Metrics) -> None:
        if not runners:
            raise ValueError("a service needs at least one model")
        self.settings = settings
        self.metrics = metrics
        self.models = {name: ModelState(name, settings, runner, metrics) for name, runner in runners.items()}
        self.default = next(iter(self.models.values()))
        self._started = False
        self._shutting_down = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def ready(self) -> bool:
        """Every model loaded, warmed up and healthy, and not shutting down."""
        return self.unready_reason() is None

    def unready_reason(self) -> str | None:
        """Why the service is not ready, in words for a 503; None when it is ready."""
        if self._shutting_down:
            return "the server is shutting down; retry later or elsewhere"
        if not self._started:
            return "the models are still loading; retry shortly"
        for model in self.models.values():
            reason = model.unhealthy_reason()
            if reason is not None:
                return reason
        return None

    def body_cap(self, path: str) -> int | None:
        """The body cap of a request path: the named model's for ``/models/{name}/...``, else the default's."""
        if path.startswith(MODELS_PREFIX):
            name, _, rest = path[len(MODELS_PREFIX):].partition("/")
            model = self.models.get(name)
            if model is not None:
                return model.body_cap("/" + rest)
        return self.default.body_cap(path)

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    async def start(self) -> None:
        """Load (if needed) and warm up every model, start the batchers; then the service is ready."""
        self._loop = asyncio.get_running_loop()
        for model in self.models.values():
            await model.start()
        self._started = True

    def begin_shutdown(self) -> None:
        """Readiness off, admission closed; queued and running work still runs, without waiting to fill batches."""
        self._shutting_down = True
        for model in self.models.values():
            model.close()

    def request_shutdown(self) -> None:
        """:meth:`begin_shutdown` from a signal handler or another thread."""
        self._shutting_down = True
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.begin_shutdown)

    async def stop(self) -> None:
        """Begin shutting down, answer everything queued or running, stop the models' threads."""
        self.begin_shutdown()
        await asyncio.gather(*(model.stop() for model in self.models.values()))

    def summaries(self) -> list[ModelSummary]:
        """What GET /models lists, the default first."""
        return [model.summary(model is self.default) for model in self.models.values()]
