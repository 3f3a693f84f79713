"""GET /metrics: requests by endpoint and status, latencies, queue waits, batch sizes, queue depths, model info."""

from __future__ import annotations

from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from service_testing import files, random_pixels, to_png

from service.metrics import Metrics, batch_size_buckets


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_count_what_happened(client: httpx.AsyncClient, tiny_checkpoint: Path) -> None:
    pngs = [to_png(image) for image in random_pixels(3, 0)]
    await client.get("/healthz")  # reaches no model
    await client.post("/log-likelihood", files=files(pngs))
    await client.post("/log-likelihood", files=files([b"junk"]))
    response = await client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    seen = samples(response.text)

    model = tiny_checkpoint.name  # the name a plain --weights PATH is served under

    def value(name: str, **labels: str) -> float:
        return seen[(name, tuple(sorted({"model": model, **labels}.items())))]

    assert value("glow_requests_total", endpoint="/log-likelihood", status="200") == 1
    assert value("glow_requests_total", endpoint="/log-likelihood", status="400") == 1
    assert value("glow_request_latency_seconds_count", endpoint="/log-likelihood") == 2
    assert value("glow_queue_wait_seconds_count", operation="log_likelihood") == 1
    assert value("glow_batch_size_sum", operation="log_likelihood") == 3  # warm-up is not counted
    assert value("glow_batch_size_bucket", operation="log_likelihood", le="2.0") == 0
    assert value("glow_batch_size_bucket", operation="log_likelihood", le="4.0") == 1
    assert value("glow_batch_latency_seconds_count", operation="log_likelihood") == 1
    for operation in ("log_likelihood", "encode", "decode", "sample"):
        assert value("glow_queue_depth", operation=operation) == 0
    assert seen[("glow_requests_total", (("endpoint", "/healthz"), ("model", ""), ("status", "200")))] == 1
    info = next(labels for (name, labels) in seen if name == "glow_model_info")
    assert dict(info)["model"] == model
    assert dict(info)["name"] == "tiny" and dict(info)["device"] == "cpu" and dict(info)["image_shape"] == "1x28x28"
    assert dict(info)["form"] == "torchscript"


def test_batch_size_buckets_end_at_the_largest_batch() -> None:
    assert batch_size_buckets(1) == (1.0,)
    assert batch_size_buckets(64) == (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
    assert batch_size_buckets(48) == (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 48.0)


def test_each_app_has_its_own_registry() -> None:
    first, second = Metrics(4), Metrics(4)
    first.observe_request("/healthz", 200, 0.01)
    labels = {"model": "", "endpoint": "/healthz", "status": "200"}
    assert first.registry.get_sample_value("glow_requests_total", labels) == 1
    assert second.registry.get_sample_value("glow_requests_total", labels) is None
