"""HTTP load generators for ``bench/served.py``: a lean asyncio client and a ``wrk`` driver.

The Python generator speaks just enough HTTP/1.1 over ``asyncio`` streams (pre-built request
bytes, keep-alive, Content-Length or chunked responses): no client library per request,
which is what made ``httpx.AsyncClient`` top out far below the server. Two modes:

- closed loop: ``concurrency`` connections, each sending its next request when the last
  answer is in; latency from send to last byte;
- open loop: Poisson arrivals at ``rate`` per second, each taking an idle connection (or
  opening one, up to ``max_connections``; beyond that the arrival is counted ``dropped``);
  latency from the *scheduled* arrival, so a generator or server that falls behind shows up
  in the latencies instead of hiding it (no coordinated omission).

Every loop is bounded in count (``max_requests``) and time (``duration`` plus a drain
``timeout``). ``wrk`` (closed loop only) runs with ``bench/wrk_post.lua``, which posts the
same body and reports percentiles and status counts as one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import shutil
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.timing import percentile

WRK_SCRIPT = Path(__file__).resolve().parent / "wrk_post.lua"


# ------------------------------------------------------------------ requests
def multipart_body(blob: bytes, field_name: str = "images", filename: str = "image.png") -> tuple[bytes, str]:
    """(body, content type) of a multipart/form-data request with one file part."""
    boundary = "glowbench" + uuid.UUID(int=0x5EED).hex
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field_name}\"; filename=\"{filename}\"\r\n"
        f"Content-Type: image/png\r\n\r\n"
    ).encode() + blob + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def json_body(blob: bytes) -> tuple[bytes, str]:
    import base64

    return json.dumps({"images": [base64.b64encode(blob).decode("ascii")]}).encode(), "application/json"


def build_request(method: str, path: str, host: str, port: int, body: bytes = b"", content_type: str | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "User-Agent: glow-bench"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# --------------------------------------------------------------- connection
class ConnectionClosed(Exception):
    pass


class Connection:
    """One keep-alive HTTP/1.1 connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.alive = True

    @classmethod
    async def open(cls, host: str, port: int, timeout: float = 10.0) -> Connection:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, limit=2**20), timeout)
        return cls(reader, writer)

    async def request(self, data: bytes) -> tuple[int, bytes]:
        """Send pre-built request bytes; (status, body). Marks the connection dead if the server closes it."""
        self.writer.write(data)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = -1
        chunked = close = False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"connection" and b"close" in value.lower():
                close = True
        if chunked:
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")
                    break
                parts.append(await self.reader.readexactly(size + 2))
            body = b"".join(p[:-2] for p in parts)
        elif length >= 0:
            body = await self.reader.readexactly(length)
        else:
            body = await self.reader.read()
            close = True
        if close:
            self.close()
        return status, body

    def close(self) -> None:
        self.alive = False
        try:
            self.writer.close()
        except Exception:  # already gone
            pass


# ----------------------------------------------------------------- results
@dataclass
class LoadResult:
    """What one load run saw. Latencies in seconds, of answered requests (any status)."""

    mode: str  # closed / open / wrk
    target: float  # concurrency (closed) or offered rate per second (open)
    duration: float  # seconds from the first send to the last answer (or wrk's own)
    statuses: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # of 2xx answers
    errors: int = 0  # connection errors, timeouts
    dropped: int = 0  # open loop: arrivals with no connection to go on
    unfinished: int = 0  # open loop: still in flight at the drain timeout
    sent: int = 0
    lag_p99: float = math.nan  # open loop: p99 of (actual send - scheduled arrival)
    precomputed: dict[str, float] | None = None  # wrk: its own percentiles

    @property
    def ok(self) -> int:
        return sum(v for k, v in self.statuses.items() if 200 <= int(k) < 300)

    @property
    def throughput(self) -> float:
        """2xx answers per second."""
        return self.ok / self.duration if self.duration > 0 else math.nan

    def latency(self, q: float) -> float:
        if self.precomputed is not None:
            return self.precomputed.get(f"p{q:g}", math.nan)
        return percentile(self.latencies, q)

    def summary(self) -> dict[str, Any]:
        return {
            "mode": self.mode, "target": self.target, "duration_s": self.duration, "sent": self.sent,
            "ok": self.ok, "throughput": self.throughput, "statuses": {str(k): v for k, v in self.statuses.items()},
            "p50_ms": self.latency(50) * 1e3, "p95_ms": self.latency(95) * 1e3, "p99_ms": self.latency(99) * 1e3,
            "errors": self.errors, "dropped": self.dropped, "unfinished": self.unfinished,
            "lag_p99_ms": self.lag_p99 * 1e3,
        }


# ------------------------------------------------------------- closed loop
async def closed_loop(
    host: str, port: int, request: bytes, concurrency: int, duration: float, max_requests: int = 1_000_000,
    request_timeout: float = 60.0,
) -> LoadResult:
    """``concurrency`` connections, each re-sending as soon as it has its answer, for ``duration`` seconds."""
    result = LoadResult("closed", concurrency, 0.0)
    connections = await asyncio.gather(*(Connection.open(host, port) for _ in range(concurrency)))
    budget = [max_requests]
    started = time.perf_counter()
    deadline = started + duration
    last = [started]

    async def worker(connection: Connection) -> None:
        while budget[0] > 0 and time.perf_counter() < deadline:
            budget[0] -= 1
            t0 = time.perf_counter()
            result.sent += 1
            try:
                if not connection.alive:
                    connection = await Connection.open(host, port)
                status, _ = await asyncio.wait_for(connection.request(request), request_timeout)
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError):
                result.errors += 1
                connection.close()
                continue
            t1 = time.perf_counter()
            result.statuses[status] += 1
            if 200 <= status < 300:
                result.latencies.append(t1 - t0)
            last[0] = max(last[0], t1)
        connection.close()

    await asyncio.gather(*(worker(c) for c in connections))
    result.duration = last[0] - started
    return result


# --------------------------------------------------------------- open loop
def poisson_arrivals(rate: float, duration: float, seed: int, max_requests: int) -> list[float]:
    """Arrival offsets (seconds) of a Poisson process of ``rate`` per second over ``duration``."""
    rng = random.Random(seed)
    times, t = [], 0.0
    while len(times) < max_requests:
        t += rng.expovariate(rate)
        if t >= duration:
            break
        times.append(t)
    return times


async def open_loop(
    host: str, port: int, request: bytes, rate: float, duration: float, *, seed: int = 0,
    max_requests: int = 100_000, max_connections: int = 1536, prewarm: int = 64, drain_timeout: float = 40.0,
    request_timeout: float = 60.0,
) -> LoadResult:
    """Poisson arrivals at ``rate``/s for ``duration`` s; see the module docstring."""
    result = LoadResult("open", rate, 0.0)
    arrivals = poisson_arrivals(rate, duration, seed, max_requests)
    idle: list[Connection] = list(await asyncio.gather(*(Connection.open(host, port) for _ in range(prewarm))))
    in_flight = [0]
    lags: list[float] = []
    tasks: set[asyncio.Task[None]] = set()
    last = [0.0]

    async def fire(connection: Connection | None, scheduled: float) -> None:
        try:
            if connection is None or not connection.alive:
                connection = await Connection.open(host, port)
            status, _ = await asyncio.wait_for(connection.request(request), request_timeout)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError):
            result.errors += 1
            if connection is not None:
                connection.close()
            return
        finally:
            in_flight[0] -= 1
        now = time.perf_counter()
        last[0] = max(last[0], now)
        result.statuses[status] += 1
        if 200 <= status < 300:
            result.latencies.append(now - scheduled)
        if connection.alive:
            idle.append(connection)

    started = time.perf_counter()
    for offset in arrivals:
        scheduled = started + offset
        delay = scheduled - time.perf_counter()
        await asyncio.sleep(delay if delay > 0 else 0)
        lags.append(time.perf_counter() - scheduled)
        if in_flight[0] >= max_connections:
            result.dropped += 1
            continue
        in_flight[0] += 1
        result.sent += 1
        task = asyncio.ensure_future(fire(idle.pop() if idle else None, scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        done, pending = await asyncio.wait(set(tasks), timeout=drain_timeout)
        result.unfinished = len(pending)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
    for connection in idle:
        connection.close()
    result.duration = max(last[0], started + (arrivals[-1] if arrivals else 0.0)) - started
    result.lag_p99 = percentile(lags, 99)
    return result


# --------------------------------------------------------------------- wrk
def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(
    url: str, body: bytes, content_type: str, concurrency: int, duration: float, threads: int = 1,
    timeout_s: float = 30.0,
) -> LoadResult:
    """wrk closed loop with ``bench/wrk_post.lua``; its percentiles come from wrk's own histogram."""
    threads = max(1, min(threads, concurrency))
    with tempfile.NamedTemporaryFile(prefix="glow-bench-body-", delete=False) as handle:
        handle.write(body)
        body_path = handle.name
    try:
        env = {**os.environ, "WRK_BODY_FILE": body_path, "WRK_CONTENT_TYPE": content_type}
        command = ["wrk", f"-t{threads}", f"-c{concurrency}", f"-d{max(1, round(duration))}s",
                   f"--timeout={max(1, round(timeout_s))}s", "-s", str(WRK_SCRIPT), url]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=duration + timeout_s + 30)
    finally:
        os.unlink(body_path)
    line = next((l for l in done.stdout.splitlines() if l.startswith("JSON:")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed (rc {done.returncode}): {done.stderr.strip() or done.stdout.strip()}"[:400])
    data = json.loads(line[5:])
    result = LoadResult("wrk", concurrency, data["duration_us"] / 1e6)
    result.statuses = Counter({int(k): v for k, v in data["statuses"].items()})
    errors = data["errors"]
    result.errors = errors["connect"] + errors["read"] + errors["write"] + errors["timeout"]
    result.sent = data["requests"]
    result.precomputed = {f"p{q}": data["latency_us"][f"p{q}"] / 1e6 for q in (50, 95, 99)}
    return result
