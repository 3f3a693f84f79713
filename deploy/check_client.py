"""The HTTP side of deploy/check-image.sh: score, drain and replica checks against containers.

Standard library only, so that it runs with any host ``python3`` (no virtualenv, no
project install): images are read from the datasets' IDX files and sent as PNG, encoded
here with zlib.

    python3 deploy/check_client.py score URL IDX_GZ --dataset NAME
    python3 deploy/check_client.py drain URL --idx IDX_GZ --clients 12 -- docker stop -t 40 NAME
    python3 deploy/check_client.py replicas URL STATS_URL --idx IDX_GZ --replica glow-r2 -- docker stop glow-r2

Each prints what it saw and exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import math
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TIMEOUT_S = 60.0
REPLICA_HEADER = "X-Glow-Replica"  # set by deploy/haproxy.cfg: the server that answered


# ------------------------------------------------------------------------------ images


def idx_images(path: Path, count: int, start: int = 0) -> list[bytes]:
    """``count`` 8-bit grayscale images from an IDX3 file (gzip or not), row-major bytes each."""
    raw = path.read_bytes()
    data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    magic, n, rows, cols = struct.unpack(">IIII", data[:16])
    if magic != 0x803:
        raise ValueError(f"{path}: not an IDX3 image file (magic {magic:#x})")
    size = rows * cols
    return [data[16 + i * size : 16 + (i + 1) * size] for i in range(start, min(n, start + count))]


def png_gray(pixels: bytes, width: int = 28, height: int = 28) -> bytes:
    """A minimal 8-bit grayscale PNG (filter 0 on every row)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = b"".join(b"\x00" + pixels[y * width : (y + 1) * width] for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def images_body(images: list[bytes]) -> bytes:
    return json.dumps({"images": [base64.b64encode(png_gray(p)).decode() for p in images]}).encode()


# ------------------------------------------------------------------------------ HTTP


@dataclass
class Answer:
    started: float  # time.monotonic() when the request was sent
    finished: float
    status: int  # 0: no HTTP answer (connection refused, reset, timed out)
    replica: str
    body: Any
    error: str = ""


def post(url: str, body: bytes, timeout: float = TIMEOUT_S) -> Answer:
    started = time.monotonic()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = json.loads(response.read())
            return Answer(started, time.monotonic(), response.status, response.headers.get(REPLICA_HEADER, ""), payload)
    except urllib.error.HTTPError as exc:
        return Answer(started, time.monotonic(), exc.code, exc.headers.get(REPLICA_HEADER, ""), exc.read()[:200])
    except (OSError, ValueError) as exc:
        return Answer(started, time.monotonic(), 0, "", None, f"{type(exc).__name__}: {exc}")


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
        return json.loads(response.read())


def valid_results(answer: Answer, count: int) -> bool:
    """200 with ``count`` results whose numbers are all finite."""
    if answer.status != 200 or not isinstance(answer.body, dict):
        return False
    results = answer.body.get("results", [])
    numbers = [r[k] for r in results for k in ("log_likelihood", "bits_per_dim", "anomaly_score", "percentile")]
    return len(results) == count and all(isinstance(x, (int, float)) and math.isfinite(x) for x in numbers)


def background(command: list[str]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``command`` in a thread; the dict gets its start time, return code and end time."""
    record: dict[str, Any] = {}

    def target() -> None:
        record["started"] = time.monotonic()
        record["returncode"] = subprocess.run(command, capture_output=True, check=False).returncode
        record["finished"] = time.monotonic()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, record


# ------------------------------------------------------------------------------ checks


def score(args: argparse.Namespace) -> bool:
    """One image of the dataset the served model was trained on: 200, finite numbers, in-distribution."""
    model = get_json(f"{args.url}/model")
    answer = post(f"{args.url}/log-likelihood", images_body(idx_images(args.idx, 1, args.index)))
    ok = model.get("dataset") == args.dataset and valid_results(answer, 1)
    result = answer.body["results"][0] if ok else answer.body
    print(f"score: model {model.get('name')} ({model.get('dataset')}), device {model.get('device')}, "
          f"{args.idx.name}[{args.index}] -> HTTP {answer.status} {json.dumps(result)}")
    return ok


def refused_while_draining(answer: Answer) -> bool:
    """503 "shutting down": a request the server did not admit, answered so (API.md: SIGTERM)."""
    return answer.status == 503 and b"shutting down" in (answer.body or b"")


def drain(args: argparse.Namespace) -> bool:
    """SIGTERM with requests in flight: each gets an answer, and every admitted one its results.

    ``--clients`` closed-loop clients keep requests queued or running until the stop command
    starts, so some are in flight at SIGTERM however fast the host. A request the server had
    admitted before the signal must come back 200 with valid results; one that reached it
    after may be refused with 503 "shutting down"; one sent before the stop command started
    must get an HTTP answer.
    """
    body = images_body(idx_images(args.idx, args.images))
    answers: list[Answer] = []
    lock = threading.Lock()
    stopping = threading.Event()

    def client() -> None:
        while not stopping.is_set():
            answer = post(f"{args.url}/log-likelihood", body)
            with lock:
                answers.append(answer)

    clients = [threading.Thread(target=client) for _ in range(args.clients)]
    for thread in clients:
        thread.start()
    time.sleep(args.delay)
    stopping.set()
    stopper, stop = background(args.command)
    for thread in clients:
        thread.join(TIMEOUT_S)
    stopper.join(TIMEOUT_S)
    sigterm = stop["started"]
    good = [a for a in answers if valid_results(a, args.images)]
    answered_after = [a for a in good if a.finished > sigterm]
    refused = [a for a in answers if refused_while_draining(a)]
    # sent in the instant between the flag and the stop command: the listener may be closed
    late_unanswered = [a for a in answers if a.status == 0 and a.started >= sigterm]
    failed = [(a.status, a.error or a.body) for a in answers
              if a not in good and a not in refused and a not in late_unanswered]
    print(f"drain: {args.clients} clients sent {len(answers)} requests of {args.images} images for "
          f"{args.delay:.1f} s, then SIGTERM: {len(good)} answered 200 with valid results "
          f"({len(answered_after)} of them after SIGTERM), {len(refused)} refused with 503 'shutting down' "
          f"(not yet admitted), {len(late_unanswered)} sent as the stop began and not answered, "
          f"{len(failed)} other; stop command exit {stop.get('returncode')}, "
          f"took {stop.get('finished', math.nan) - sigterm:.1f} s")
    for failure in failed[:5]:
        print(f"  not answered: {failure}")
    return not failed and len(answered_after) > 0 and stop.get("returncode") == 0


def server_rows(stats_url: str) -> dict[str, dict[str, str]]:
    """HAProxy's CSV statistics, one row per backend server by name."""
    with urllib.request.urlopen(f"{stats_url};csv", timeout=5) as response:
        lines = response.read().decode().splitlines()
    header = lines[0].lstrip("# ").split(",")
    rows = [dict(zip(header, line.split(","))) for line in lines[1:] if line]
    return {r["svname"]: r for r in rows if r["svname"] not in ("FRONTEND", "BACKEND")}


def server_states(stats_url: str) -> dict[str, str]:
    """Each backend server's status (UP, DOWN, NOLB, MAINT, ...)."""
    return {name: row["status"] for name, row in server_rows(stats_url).items()}


def replicas(args: argparse.Namespace) -> bool:
    """Load through the balancer; SIGTERM one replica mid-load; every request answered, none sent to it after."""
    body = images_body(idx_images(args.idx, args.images))
    answers: list[Answer] = []
    states: list[tuple[float, dict[str, str]]] = []
    lock = threading.Lock()
    start = time.monotonic()
    deadline = start + args.duration

    def client() -> None:
        while time.monotonic() < deadline:
            answer = post(f"{args.url}/log-likelihood", body)
            with lock:
                answers.append(answer)

    def watch() -> None:
        while time.monotonic() < deadline + 1:
            try:
                states.append((time.monotonic(), server_states(args.stats_url)))
            except OSError:
                pass
            time.sleep(0.1)

    threads = [threading.Thread(target=client) for _ in range(args.clients)] + [threading.Thread(target=watch)]
    for thread in threads:
        thread.start()
    time.sleep(args.duration * args.stop_at)
    stopper, stop = background(args.command)
    for thread in threads:
        thread.join(args.duration + TIMEOUT_S)
    stopper.join(TIMEOUT_S)

    sigterm = stop["started"]
    down = next((t for t, s in states if t > sigterm and s.get(args.replica, "UP") != "UP"), math.inf)
    good = [a for a in answers if valid_results(a, args.images)]
    failed = [a for a in answers if a not in good]
    per_replica: dict[str, list[int]] = {}
    for a in good:
        per_replica.setdefault(a.replica, [0, 0])[a.started > sigterm] += 1
    # sent by the client after the balancer marked it down, yet answered by it: what must not happen
    late = [a for a in good if a.replica == args.replica and a.started > down]
    last = max((a.finished for a in good if a.replica == args.replica), default=math.nan)
    print(f"replicas: {len(answers)} requests in {args.duration:.0f} s from {args.clients} clients through the "
          f"balancer; {len(good)} answered 200 with valid results, {len(failed)} not")
    print(f"  per replica (before SIGTERM, after): {json.dumps(per_replica, sort_keys=True)}")
    print(f"  SIGTERM to {args.replica} at t={sigterm - start:.1f} s; balancer marked it "
          f"{'down at t=%.1f s' % (down - start) if math.isfinite(down) else 'never down'}; its last answer at "
          f"t={last - start:.1f} s; stop command exit {stop.get('returncode')}; "
          f"requests it got after being marked down: {len(late)}")
    try:  # what the balancer did on the clients' behalf: retries and redispatches per server
        rows = server_rows(args.stats_url)
        print("  balancer, per replica: " + ", ".join(
            f"{name}: {row.get('status')}, {row.get('hrsp_2xx')} 2xx, {row.get('hrsp_5xx')} 5xx, "
            f"{row.get('wretr')} retried, {row.get('wredis')} redispatched" for name, row in sorted(rows.items())))
    except OSError as exc:
        print(f"  balancer statistics unavailable: {exc}")
    for a in failed[:5]:
        print(f"  not answered: HTTP {a.status} {a.error or a.body}")
    return not failed and not late and math.isfinite(down) and stop.get("returncode") == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="check", required=True)
    one = sub.add_parser("score")
    one.add_argument("url")
    one.add_argument("idx", type=Path)
    one.add_argument("--dataset", required=True, help="the dataset the served model must report")
    one.add_argument("--index", type=int, default=0)
    many = sub.add_parser("drain")
    many.add_argument("url")
    many.add_argument("--clients", type=int, default=12, help="closed-loop clients, each one request at a time")
    lb = sub.add_parser("replicas")
    lb.add_argument("url")
    lb.add_argument("stats_url")
    lb.add_argument("--replica", required=True, help="the balancer's name of the replica the command stops")
    lb.add_argument("--clients", type=int, default=8)
    lb.add_argument("--duration", type=float, default=20.0)
    lb.add_argument("--stop-at", type=float, default=0.35, help="share of the duration before the stop command")
    for p in (many, lb):
        p.add_argument("--idx", type=Path, required=True)
        p.add_argument("--images", type=int, default=16, help="images per request")
        p.add_argument("--delay", type=float, default=1.0, help="seconds between sending and the stop command")
        p.add_argument("command", nargs="+", help="the stop command (sends SIGTERM), after --")
    args = parser.parse_args(argv)
    ok = {"score": score, "drain": drain, "replicas": replicas}[args.check](args)
    print(f"{args.check}: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
