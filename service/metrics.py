"""Prometheus collectors of one app, in a registry of its own (so apps in one process never collide).

Every collector carries a ``model`` label: the name a model is served under (empty for
requests that reach no model, such as ``/healthz``).

Several server processes (``--workers``, ``service.workers``) share one set of figures
through prometheus_client's multiprocess mode: with ``PROMETHEUS_MULTIPROC_DIR`` set before
the process starts, every counter and histogram writes to a file there, and any worker's
exposition merges them all (counters and histograms summed; the queue-depth gauge summed
over live workers, each worker's depth as of its last batch or scrape). ``glow_model``
(an Info, which that mode cannot hold) comes from the answering worker: every worker
serves the same checkpoints.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def batch_size_buckets(max_batch_size: int) -> tuple[float, ...]:
    """Powers of two up to ``max_batch_size``, and ``max_batch_size`` itself."""
    sizes = {2**k for k in range(max_batch_size.bit_length()) if 2**k <= max_batch_size} | {max_batch_size}
    return tuple(float(size) for size in sorted(sizes))


class Metrics:
    """Request, queue, batch and model collectors of one app."""

    def __init__(self, max_batch_size: int) -> None:
        self.registry = CollectorRegistry()
        self.shared_dir = os.environ.get(MULTIPROCESS_DIR)  # set: the figures of every worker (module docstring)
        self._depths: list[tuple[Gauge, Callable[[], float]]] = []
        self.requests = Counter(
            "glow_requests", "HTTP requests by model, endpoint and status code", ["model", "endpoint", "status"],
            registry=self.registry
        )
        self.latency = Histogram(
            "glow_request_latency_seconds",
            "HTTP request latency, first byte in to last byte out",
            ["model", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "glow_queue_wait_seconds",
            "time a request waited in its operation's queue before its first item ran",
            ["model", "operation"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "glow_batch_size",
            "items (images or latents) per model call",
            ["model", "operation"],
            buckets=batch_size_buckets(max_batch_size),
            registry=self.registry,
        )
        self.batch_latency = Histogram(
            "glow_batch_latency_seconds",
            "time of one model call on a batch",
            ["model", "operation"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "glow_queue_depth", "items waiting in each operation's queue", ["model", "operation"],
            registry=self.registry, multiprocess_mode="livesum"
        )
        self.local = CollectorRegistry()  # what only this process reports, beside the shared figures
        self.model = Info("glow_model", "each checkpoint being served", ["model"], registry=self.local)

    def observe_request(self, endpoint: str, status: int, seconds: float, model: str = "") -> None:
        self.requests.labels(model=model, endpoint=endpoint, status=str(status)).inc()
        self.latency.labels(model=model, endpoint=endpoint).observe(seconds)

    def track_queue_depth(self, model: str, operation: str, depth: Callable[[], float]) -> None:
        """Report ``depth()`` as the queue depth of ``model``'s ``operation`` at every scrape (shared: also after
        each of its batches, so that other workers' scrapes see it)."""
        gauge = self.queue_depth.labels(model=model, operation=operation)
        if self.shared_dir is None:
            gauge.set_function(depth)
        else:
            self._depths.append((gauge, depth))

    def refresh_depths(self) -> None:
        """Write this worker's queue depths to the shared files (no-op for one process)."""
        for gauge, depth in self._depths:
            gauge.set(depth())

    def listener(self, model: str, operation: str) -> BatchMetrics:
        """A batcher listener that records into this app's histograms under ``model`` and ``operation``."""
        return BatchMetrics(self, model, operation, self.refresh_depths if self.shared_dir else None)

    def exposition(self) -> bytes:
        """The Prometheus text exposition of every collector (of every worker, when shared)."""
        if self.shared_dir is None:
            return generate_latest(self.registry) + generate_latest(self.local)
        self.refresh_depths()
        merged = CollectorRegistry()
        MultiProcessCollector(merged, self.shared_dir)
        return generate_latest(merged) + generate_latest(self.local)


class BatchMetrics:
    """The :class:`service.batcher.BatchListener` of one operation."""

    def __init__(self, metrics: Metrics, model: str, operation: str, after_batch: Callable[[], None] | None) -> None:
        self._after_batch = after_batch
        self._queue_wait = metrics.queue_wait.labels(model=model, operation=operation)
        self._batch_size = metrics.batch_size.labels(model=model, operation=operation)
        self._batch_latency = metrics.batch_latency.labels(model=model, operation=operation)

    def queue_wait(self, seconds: float) -> None:
        self._queue_wait.observe(seconds)

    def batch_done(self, size: int, seconds: float) -> None:
        self._batch_size.observe(size)
        self._batch_latency.observe(seconds)
        if self._after_batch is not None:
            self._after_batch()
