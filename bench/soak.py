"""A soak: Poisson load at a share of measured capacity for minutes; RSS drift, 5xx and p99 per minute.

``python -m bench.soak [--minutes 10] [--load 0.7] [--weights DIR] [--images 1] [--window-s 60]``

Starts ``python -m service`` on 127.0.0.1, measures its capacity (closed loop, ``--calibrate-s``
seconds at ``--concurrency`` connections, 2xx per second of ``POST /log-likelihood`` with
``--images`` PNGs), then offers ``--load`` times that rate as open-loop Poisson arrivals
(``bench.loadgen.open_loop``), one window per minute. After each minute it prints one JSON
line: requests, statuses, 5xx, connection errors, p50/p99 (from the scheduled arrival, so
a server falling behind shows), and the server's RSS. The summary line gives the RSS drift
(last minute against the first), the total 5xx and the spread of the per-minute p99.
The load generator runs on the same machine and its CPU competes with the server's.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from bench.loadgen import build_request, closed_loop, open_loop

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def request_bytes(port: int, images: int, shape: tuple[int, int], seed: int = 0) -> bytes:
    """POST /log-likelihood with ``images`` random PNGs as multipart parts."""
    rng = np.random.default_rng(seed)
    boundary = "soakboundary"
    parts = []
    for index in range(images):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buffer, format="PNG")
        parts.append(
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"{index}.png\"\r\n"
            "Content-Type: image/png\r\n\r\n".encode() + buffer.getvalue() + b"\r\n"
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return build_request("POST", "/log-likelihood", HOST, port, body, f"multipart/form-data; boundary={boundary}")


def wait_ready(port: int, process: subprocess.Popen[bytes], timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            if httpx.get(f"http://{HOST}:{port}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not become ready")


def spread(values: list[float]) -> float:
    return (max(values) - min(values)) / min(values) if values and min(values) > 0 else float("nan")


async def soak(args: argparse.Namespace, port: int, pid: int) -> dict:
    request = request_bytes(port, args.images, (28, 28))
    calibration = await closed_loop(HOST, port, request, args.concurrency, args.calibrate_s)
    capacity = calibration.throughput
    rate = args.load * capacity
    print(json.dumps({"capacity_rps": round(capacity, 1), "offered_rps": round(rate, 1),
                      "calibration_p99_ms": round(calibration.latency(99) * 1e3, 1)}), flush=True)
    minutes = []
    for minute in range(args.minutes):
        result = await open_loop(HOST, port, request, rate, args.window_s, seed=minute, max_requests=10**7)
        statuses = {str(k): v for k, v in result.statuses.items()}
        row = {
            "minute": minute + 1, "sent": result.sent, "ok": result.ok, "statuses": statuses,
            "5xx": sum(v for k, v in result.statuses.items() if int(k) >= 500),
            "errors": result.errors, "dropped": result.dropped, "unfinished": result.unfinished,
            "p50_ms": round(result.latency(50) * 1e3, 1), "p99_ms": round(result.latency(99) * 1e3, 1),
            "rss_mib": round(rss_mib(pid), 1), "loadavg_1m": round(os.getloadavg()[0], 2),
        }
        minutes.append(row)
        print(json.dumps(row), flush=True)
    first, last = minutes[0]["rss_mib"], minutes[-1]["rss_mib"]
    return {
        "minutes": args.minutes, "capacity_rps": round(capacity, 1), "offered_rps": round(rate, 1),
        "rss_first_mib": first, "rss_last_mib": last, "rss_drift_pct": round(100 * (last - first) / first, 2),
        "total_5xx": sum(row["5xx"] for row in minutes), "total_errors": sum(row["errors"] for row in minutes),
        "p99_ms_per_minute": [row["p99_ms"] for row in minutes],
        "p99_spread": round(spread([row["p99_ms"] for row in minutes]), 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=int, default=10)
    parser.add_argument("--load", type=float, default=0.7, help="share of the measured capacity offered")
    parser.add_argument("--images", type=int, default=1, help="PNGs per request")
    parser.add_argument("--concurrency", type=int, default=32, help="connections of the capacity measurement")
    parser.add_argument("--calibrate-s", type=float, default=20.0)
    parser.add_argument("--window-s", type=float, default=60.0, help="length of each reported window ('minute')")
    parser.add_argument("--weights", type=Path, default=REPO / "weights" / "fashion-mnist")
    parser.add_argument(
        "--idle-s", type=float, default=120.0,
        help="the server's --keep-alive-s and --header-timeout-s: longer than the generator's idle connections "
        "wait (bench.loadgen reuses a connection without noticing the server's FIN, so a shorter server idle "
        "timeout shows up as connection errors, not as the server's behaviour under load)",
    )
    args = parser.parse_args(argv)
    if args.minutes < 1 or not 0 < args.load <= 1:
        parser.error("need --minutes >= 1 and 0 < --load <= 1")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLOW_")} | {"PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "--host", HOST, "--port", str(port), "--weights", str(args.weights),
         "--device", "cpu", "--log-level", "warning", "--keep-alive-s", str(args.idle_s),
         "--header-timeout-s", str(args.idle_s)],
        cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_ready(port, process)
        summary = asyncio.run(soak(args, port, process.pid))
    finally:
        process.terminate()
        code = process.wait(60)
    summary["exit_code"] = code
    print(json.dumps(summary), flush=True)
    return 0 if summary["total_5xx"] == 0 and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
