"""The load generator's own arithmetic and HTTP handling (no service, no model; well under a second)."""

from __future__ import annotations

import asyncio
import math
import random

import numpy as np
import pytest

from bench import loadgen
from bench.served import batch_stats
from bench.timing import percentile


@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 95, 99, 99.9, 100])
@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001])
def test_percentile_matches_numpy_linear(q: float, n: int) -> None:
    values = [random.Random(n).expovariate(1.0) for _ in range(n)]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)


def test_percentile_edge_cases() -> None:
    assert math.isnan(percentile([], 50))
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0  # unsorted input
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_poisson_arrivals_are_bounded_and_have_the_rate() -> None:
    arrivals = loadgen.poisson_arrivals(rate=2000, duration=5.0, seed=1, max_requests=1_000_000)
    assert all(0 < t < 5.0 for t in arrivals) and arrivals == sorted(arrivals)
    assert len(arrivals) == pytest.approx(10_000, rel=0.05)
    assert len(loadgen.poisson_arrivals(rate=2000, duration=5.0, seed=1, max_requests=100)) == 100
    assert loadgen.poisson_arrivals(2000, 5.0, 1, 10**6) == arrivals  # seeded


def test_request_bytes_and_multipart_body() -> None:
    body, content_type = loadgen.multipart_body(b"\x89PNG-bytes")
    boundary = content_type.split("boundary=")[1]
    assert body.startswith(f"--{boundary}\r\n".encode()) and body.endswith(f"\r\n--{boundary}--\r\n".encode())
    assert b'name="images"' in body and b"\x89PNG-bytes" in body
    request = loadgen.build_request("POST", "/log-likelihood", "127.0.0.1", 8000, body, content_type)
    head, _, rest = request.partition(b"\r\n\r\n")
    assert rest == body and f"Content-Length: {len(body)}".encode() in head


def test_batch_stats_diff_the_histogram() -> None:
    inf = math.inf
    before = {"buckets": {1.0: 2, 2.0: 2, 4.0: 3, inf: 3}, "count": 3, "sum": 5, "statuses": {}}
    after = {"buckets": {1.0: 2, 2.0: 3, 4.0: 5, inf: 7}, "count": 7, "sum": 5 + 2 + 3 + 4 + 8, "statuses": {}}
    stats = batch_stats(before, after)  # four new batches: 2, 3, 4, 8
    assert stats["batches"] == 4 and stats["mean"] == pytest.approx(17 / 4)
    assert stats["median_le"] == 4.0 and stats["max_le"] == inf


async def _serve(statuses: list[int], chunked_every: int = 3) -> tuple[asyncio.AbstractServer, int]:
    """A minimal keep-alive HTTP server answering the given statuses in turn (some responses chunked)."""
    count = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")), 0)
                await reader.readexactly(length)
                status = statuses[count % len(statuses)]
                if count % chunked_every == 0:
                    writer.write(f"HTTP/1.1 {status} X\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n".encode())
                else:
                    writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 2\r\n\r\nok".encode())
                count += 1
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_closed_and_open_loop_against_a_local_server() -> None:
    async def run() -> tuple[loadgen.LoadResult, loadgen.LoadResult]:
        server, port = await _serve([200, 200, 503])
        request = loadgen.build_request("POST", "/x", "127.0.0.1", port, b"body", "text/plain")
        async with server:
            closed = await loadgen.closed_loop("127.0.0.1", port, request, concurrency=4, duration=0.3,
                                               max_requests=300)
            opened = await loadgen.open_loop("127.0.0.1", port, request, rate=500, duration=0.3, seed=0,
                                             prewarm=2, max_connections=8, drain_timeout=2)
        return closed, opened

    closed, opened = asyncio.run(run())
    for result in (closed, opened):
        assert result.errors == 0 and result.unfinished == 0
        assert sum(result.statuses.values()) == result.sent > 0
        assert result.statuses[503] > 0 and result.ok == len(result.latencies)
        assert result.throughput > 0 and result.latency(50) <= result.latency(99)
    assert closed.sent <= 300
    assert opened.sent + opened.dropped == len(loadgen.poisson_arrivals(500, 0.3, 0, 100_000))
