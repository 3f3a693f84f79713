"""SIGTERM under load, repeated: does every request that reached the server get an answer?

``python -m bench.sigterm [--rounds 10] [--weights DIR] [--grace-s 1]``

Each round starts ``python -m service``, runs ``--clients`` closed-loop clients (each its
own keep-alive connection, ``--images`` images per request, the operations in turn),
sends SIGTERM once every client has had an answer, and lets the clients keep sending
until each gets its refusal. A client stops at a 503 (refused: safe) or a refused
connection (the listener closed: safe); anything else without a response (a connection
closed or reset after the request was sent, a timeout) is an unanswered request. The
round passes with zero unanswered requests, only 200s and 503s, and exit code 0.
Prints one JSON line per round and a summary; exits 1 if any round failed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 120


@dataclass
class Round:
    statuses: Counter[int] = field(default_factory=Counter)
    refused_connections: int = 0
    unanswered: list[str] = field(default_factory=list)
    exit_code: int | None = None
    drain_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.unanswered and self.exit_code == 0 and set(self.statuses) <= {200, 503}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def png_of(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def start_server(weights: Path, port: int, grace_s: float, extra: list[str]) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLOW_")} | {"PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port), "--weights", str(weights),
         "--device", "cpu", "--shutdown-grace-s", str(grace_s), "--log-level", "warning", *extra],
        cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


async def wait_ready(url: str, process: subprocess.Popen[bytes]) -> dict:
    deadline = time.monotonic() + START_TIMEOUT_S
    async with httpx.AsyncClient(base_url=url, timeout=5) as http:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode} before it was ready")
            try:
                if (await http.get("/readyz")).status_code == 200:
                    return (await http.get("/model")).json()
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("the server did not become ready")


def requests_for(model: dict, images: int) -> list[tuple[str, str, dict]]:
    """One request per operation, ``images`` images (or latents) each."""
    channels, height, width = model["image_shape"]
    rng = np.random.default_rng(0)
    shape = (height, width) if channels == 1 else (height, width, channels)
    pngs = [png_of(rng.integers(0, 256, shape, dtype=np.uint8)) for _ in range(images)]
    latents = rng.standard_normal((images, model["latent_dim"])).clip(-3, 3).round(4).tolist()
    parts = [("images", (f"{i}.png", png, "image/png")) for i, png in enumerate(pngs)]
    return [
        ("POST", "/log-likelihood", {"files": parts}),
        ("POST", "/encode", {"json": {"images": [base64.b64encode(png).decode() for png in pngs]}}),
        ("POST", "/decode", {"json": {"latents": latents}}),
        ("GET", "/sample", {"params": {"n": images, "seed": 0}}),
    ]


async def client(url: str, requests: list[tuple[str, str, dict]], offset: int, result: Round,
                 first_answer: asyncio.Event, answered: list[int], stopping: asyncio.Event) -> None:
    """Closed loop on one connection until a refusal; records every outcome in ``result``."""
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        index = offset
        while True:
            method, path, kwargs = requests[index % len(requests)]
            index += 1
            try:
                response = await http.request(method, path, **kwargs)
            except httpx.ConnectError:
                result.refused_connections += 1  # the listener is closed: nothing was sent
                return
            except httpx.TransportError as exc:
                result.unanswered.append(f"{path}: {type(exc).__name__}: {exc}")
                return
            result.statuses[response.status_code] += 1
            if not first_answer.is_set():
                answered[0] += 1
                if answered[0] >= answered[1]:
                    first_answer.set()
            if response.status_code == 503 and stopping.is_set():
                return


async def one_round(weights: Path, clients: int, images: int, grace_s: float, extra: list[str]) -> Round:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_server(weights, port, grace_s, extra)
    result = Round()
    try:
        model = await wait_ready(url, process)
        requests = requests_for(model, images)
        everyone, stopping = asyncio.Event(), asyncio.Event()
        answered = [0, clients]  # answers so far, answers before the signal
        tasks = [asyncio.ensure_future(client(url, requests, i, result, everyone, answered, stopping))
                 for i in range(clients)]
        await asyncio.wait_for(everyone.wait(), 120)  # every connection open and busy
        stopping.set()
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
        result.exit_code = await asyncio.to_thread(process.wait, 120)
        result.drain_s = round(time.monotonic() - started, 2)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sigterm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--images", type=int, default=4, help="images (or latents) per request")
    parser.add_argument("--grace-s", type=float, default=1.0, help="the server's --shutdown-grace-s")
    parser.add_argument("--weights", type=Path, default=REPO / "weights" / "fashion-mnist")
    parser.add_argument("server_flags", nargs="*", help="more flags for python -m service (after --)")
    args = parser.parse_args(argv)
    failed = 0
    for number in range(args.rounds):
        result = asyncio.run(one_round(args.weights, args.clients, args.images, args.grace_s, args.server_flags))
        failed += not result.ok
        print(json.dumps({"round": number, "ok": result.ok, **asdict(result), "statuses": dict(result.statuses)}))
    print(json.dumps({"rounds": args.rounds, "failed": failed}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
