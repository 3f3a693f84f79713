"""Prometheus collectors of one app, in a registry of its own (so apps in one process never collide).

Every collector carries a ``model`` label: the name a model is served under (empty for
requests that reach no model, such as ``/healthz``).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def batch_size_buckets(max_batch_size: int) -> tuple[float, ...]:
    """Powers of two up to ``max_batch_size``, and ``max_batch_size`` itself."""
    sizes = {2**k for k in range(max_batch_size.bit_length()) if 2**k <= max_batch_size} | {max_batch_size}
    return tuple(float(size) for size in sorted(sizes))


class Metrics:
    """Request, queue, batch and model collectors of one app."""

    def __init__(self, max_batch_size: int) -> None:
        self.registry = CollectorRegistry()
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
            registry=self.registry
        )
        self.model = Info("glow_model", "each checkpoint being served", ["model"], registry=self.registry)

    def observe_request(self, endpoint: str, status: int, seconds: float, model: str = "") -> None:
        self.requests.labels(model=model, endpoint=endpoint, status=str(status)).inc()
        self.latency.labels(model=model, endpoint=endpoint).observe(seconds)

    def track_queue_depth(self, model: str, operation: str, depth: Callable[[], float]) -> None:
        """Report ``depth()`` as the queue depth of ``model``'s ``operation`` at every scrape."""
        self.queue_depth.labels(model=model, operation=operation).set_function(depth)

    def listener(self, model: str, operation: str) -> BatchMetrics:
        """A batcher listener that records into this app's histograms under ``model`` and ``operation``."""
        return BatchMetrics(self, model, operation)

    def exposition(self) -> bytes:
        """The Prometheus text exposition of every collector."""
        return generate_latest(self.registry)


class BatchMetrics:
    """The :class:`service.batcher.BatchListener` of one operation."""

    def __init__(self, metrics: Metrics, model: str, operation: str) -> None:
        self._queue_wait = metrics.queue_wait.labels(model=model, operation=operation)
        self._batch_size = metrics.batch_size.labels(model=model, operation=operation)
        self._batch_latency = metrics.batch_latency.labels(model=model, operation=operation)

    def queue_wait(self, seconds: float) -> None:
        self._queue_wait.observe(seconds)

    def batch_done(self, size: int, seconds: float) -> None:
        self._batch_size.observe(size)
        self._batch_latency.observe(seconds)
