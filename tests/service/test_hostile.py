"""Hostile requests against a real ``python -m service``: each refused with its status, cheaply.

One server on the tiny checkpoint, with short deadlines and a small in-flight limit. Every
case is measured on the server process: its status, peak RSS growth (VmHWM, reset through
``/proc/<pid>/clear_refs`` before each case) under ``RSS_GROWTH``, CPU (utime + stime)
under ``CPU_S``, and ``/healthz`` polled from another thread throughout (and once before
and after): nine in ten answers within ``HEALTHZ_S`` and every one within ``HEALTHZ_MAX_S``.
The allowance for one answer in ten is for the machine, not the server: the suite runs on
shared cores (load averages near 10 on 2 cores were seen), where any process can be
descheduled for longer than 100 ms while the server's CPU time stays in milliseconds.
"""

from __future__ import annotations

import io
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from PIL import Image
from service_testing import ServerProcess, b64, chunk, files, png_declaring, random_pixels, to_png

RSS_GROWTH = 100 * 2**20
CPU_S = 1.0
HEALTHZ_S = 0.1
HEALTHZ_MAX_S = 1.0
MAX_IN_FLIGHT = 8
BODY_TIMEOUT_S = 2.0
HEADER_TIMEOUT_S = 1.0
FLAGS = ("--max-in-flight", str(MAX_IN_FLIGHT), "--body-timeout-s", str(BODY_TIMEOUT_S),
         "--header-timeout-s", str(HEADER_TIMEOUT_S), "--keep-alive-s", "1")  # fmt: skip
PNG = to_png(random_pixels(1, 0)[0])
TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def black_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def padded_png(extra_bytes: int) -> bytes:
    """A valid 28x28 PNG carrying ``extra_bytes`` in a private ancillary chunk."""
    return PNG[:33] + chunk(b"prVt", bytes(extra_bytes)) + PNG[33:]


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(["--weights", str(tiny_checkpoint), "--device", "cpu", *FLAGS])
    try:
        process.wait_listening()
        with httpx.Client(base_url=process.url) as http:  # warm every path once: later growth is the case's own
            assert http.post("/log-likelihood", files=files([PNG])).status_code == 200
            assert http.post("/encode", json={"images": [b64(PNG)]}).status_code == 200
            assert http.get("/sample", params={"n": 2}).status_code == 200
            limits = http.get("/model").json()["limits"]
            assert limits["max_in_flight"] == MAX_IN_FLIGHT
        yield process
    finally:
        process.kill()
    assert "Traceback" not in process.output()


@pytest.fixture(scope="module")
def limits(server: ServerProcess) -> dict:
    return httpx.get(f"{server.url}/model").json()["limits"]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * TICK_S  # utime, stime


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@dataclass
class Cost:
    cpu_s: float = 0.0
    rss_growth: int = 0
    healthz_s: list[float] = field(default_factory=list)


@contextmanager
def measured(server: ServerProcess) -> Iterator[Cost]:
    """The server's CPU, peak RSS growth and /healthz latencies while the block runs; asserts the bounds."""
    pid = server.process.pid
    with open(f"/proc/{pid}/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current RSS
    cost = Cost()
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=server.url, timeout=5) as http:
            while True:
                started = time.perf_counter()
                assert http.get("/healthz").status_code == 200
                cost.healthz_s.append(time.perf_counter() - started)
                if stop.wait(0.02):
                    break

    rss, cpu = peak_rss(pid), cpu_seconds(pid)
    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        yield cost
    finally:
        time.sleep(0.05)  # a last poll after the case
        stop.set()
        poller.join(10)
    cost.cpu_s = cpu_seconds(pid) - cpu
    cost.rss_growth = peak_rss(pid) - rss
    assert cost.rss_growth < RSS_GROWTH, f"peak RSS grew {cost.rss_growth / 2**20:.0f} MiB"
    assert cost.cpu_s < CPU_S, f"the server used {cost.cpu_s:.2f} s of CPU"
    ordered = sorted(cost.healthz_s)
    assert ordered[int(0.9 * (len(ordered) - 1))] < HEALTHZ_S, f"/healthz took {[round(s * 1000) for s in ordered]} ms"
    assert ordered[-1] < HEALTHZ_MAX_S, f"/healthz took {ordered[-1] * 1000:.0f} ms"


def post(server: ServerProcess, path: str, **kwargs: object) -> httpx.Response:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        return http.post(path, **kwargs)  # type: ignore[arg-type]


def latents_body(count: int, dim: int = 784, value: str = "0") -> bytes:
    row = "[" + ",".join([value] * dim) + "]"
    return ('{"latents": [' + ",".join([row] * count) + "]}").encode()


JSON_HEADERS = {"content-type": "application/json"}

# (path, body maker, status, message), the body maker given the server's limits
CASES: dict[str, tuple[str, Callable[[dict], dict], int, str]] = {
    "decode-tiny-values-near-the-cap": (
        "/decode", lambda lim: {"content": b'{"latents": [' + b",".join([b"[0]"] * (lim["body_bytes"]["decode"] // 4 - 16))
                                + b"]}", "headers": JSON_HEADERS}, 413, "JSON values"),
    "decode-past-the-cap": (
        "/decode", lambda lim: {"content": b" " * (lim["body_bytes"]["decode"] + 1), "headers": JSON_HEADERS}, 413,
        "request body exceeds the limit"),
    "decode-65-latents": ("/decode", lambda lim: {"content": latents_body(65), "headers": JSON_HEADERS}, 413,
                          "65 latents in one request; at most 64"),
    "decode-one-long-latent": ("/decode", lambda lim: {"content": latents_body(1, 60_000), "headers": JSON_HEADERS},
                               413, "JSON values"),
    "decode-deep-nesting": ("/decode", lambda lim: {"content": b'{"latents": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
                                                    "headers": JSON_HEADERS}, 400, "not valid JSON"),
    "images-deep-nesting": ("/encode", lambda lim: {"content": b'{"images": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
                                                    "headers": JSON_HEADERS}, 400, "not valid JSON"),
    "images-many-strings": ("/encode", lambda lim: {"content": b'{"images": [' + b",".join([b'""'] * 100_000) + b"]}",
                                                    "headers": JSON_HEADERS}, 413, "JSON values"),
    "64-huge-pngs-resize-multipart": ("/log-likelihood", lambda lim: {
        "files": files([png_declaring(65_000, 65_000)] * 64), "params": {"resize": "true"}}, 413,
        "refused as a decompression bomb"),
    "64-4096px-pngs-resize-json": ("/encode", lambda lim: {
        "json": {"images": [b64(png_declaring(4096, 4096))] * 64, "resize": True}}, 413,
        "pixels in all; at most 4194304 per request"),
    "2-real-2048px-pngs-resize": ("/log-likelihood", lambda lim: {
        "files": files([black_png(2048, 2048)] * 2), "params": {"resize": "true"}}, 413,
        "8388608 pixels in all"),
    "65-images-multipart": ("/log-likelihood", lambda lim: {"files": files([PNG] * 65)}, 413,
                            "more than 64 file parts in one request"),
    "65-images-json": ("/encode", lambda lim: {"json": {"images": [b64(PNG)] * 65}}, 413,
                       "65 images in one request; at most 64"),
    "image-past-its-byte-cap": ("/log-likelihood", lambda lim: {"files": files([padded_png(lim["max_image_bytes"])])},
                                413, "bytes per image are accepted"),
    "images-body-past-the-cap": ("/log-likelihood", lambda lim: {
        "files": files([PNG] * (lim["body_bytes"]["images"] // len(PNG)))}, 413, "request body exceeds the limit"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_a_hostile_request_is_refused_cheaply(server: ServerProcess, limits: dict, name: str) -> None:
    path, make, status, message = CASES[name]
    request = make(limits)
    with measured(server):
        response = post(server, path, **request)
    assert response.status_code == status, response.text[:300]
    assert message in response.json()["detail"], response.text[:300]


def test_the_largest_resize_allowed_is_cheap(server: ServerProcess) -> None:
    """One real 2048x2048 PNG (the whole source-pixel budget) is resized and scored within the bounds."""
    png = black_png(2048, 2048)
    with measured(server):
        response = post(server, "/log-likelihood", files=files([png]), params={"resize": "true"})
    assert response.status_code == 200, response.text[:300]


def test_a_chunked_body_past_the_cap_is_413_while_streaming(server: ServerProcess, limits: dict) -> None:
    cap = limits["body_bytes"]["decode"]

    def chunks() -> Iterator[bytes]:
        for _ in range(cap // 65536 + 2):
            yield b" " * 65536

    with measured(server), httpx.Client(base_url=server.url, timeout=30) as http:
        response = http.post("/decode", content=chunks(), headers=JSON_HEADERS)  # the lingering close lets it read
    assert response.status_code == 413, response.text[:300]
    assert "request body exceeds the limit" in response.json()["detail"]


def raw(server: ServerProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def read_all(connection: socket.socket) -> bytes:
    data = b""
    while chunk_ := connection.recv(65536):
        data += chunk_
    return data


def test_a_slow_body_is_408_and_closed_without_holding_anyone_up(server: ServerProcess) -> None:
    body = json.dumps({"images": [b64(PNG)]}).encode()
    head = (f"POST /log-likelihood HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode()
    with measured(server), raw(server) as connection:
        connection.sendall(head + body[:10])
        started = time.monotonic()
        for byte in body[10:40]:  # one byte every 0.1 s: the body would take minutes
            try:
                connection.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(0.1)
            if time.monotonic() - started > BODY_TIMEOUT_S + 1:
                break
        assert post(server, "/log-likelihood", files=files([PNG])).status_code == 200  # others are served
        answer = read_all(connection)
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"connection: close" in answer.lower() and b"did not arrive within 2 s" in answer
    assert elapsed < BODY_TIMEOUT_S + 3


def test_a_slow_head_is_408_and_closed(server: ServerProcess) -> None:
    with measured(server), raw(server) as connection:
        connection.sendall(b"POST /log-likelihood HTTP/1.1\r\nhost: t\r\n")
        started = time.monotonic()
        answer = read_all(connection)
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert HEADER_TIMEOUT_S - 0.2 < elapsed < HEADER_TIMEOUT_S + 2


def test_an_idle_connection_is_closed(server: ServerProcess) -> None:
    with measured(server), raw(server) as connection:
        started = time.monotonic()
        assert read_all(connection) == b""  # closed by the server, having received nothing
        assert time.monotonic() - started < HEADER_TIMEOUT_S + 2


def test_past_the_in_flight_limit_requests_get_503_before_their_body_is_read(server: ServerProcess) -> None:
    """MAX_IN_FLIGHT requests whose bodies never come hold every slot; the next is 503, probes still answer."""
    head = (b"POST /encode HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n")
    holders = [raw(server) for _ in range(MAX_IN_FLIGHT)]
    try:
        with measured(server):
            for connection in holders:
                connection.sendall(head)
            deadline = time.monotonic() + BODY_TIMEOUT_S
            refused = None
            while time.monotonic() < deadline:
                response = post(server, "/encode", json={"images": [b64(PNG)]})
                if response.status_code == 503:
                    refused = response
                    break
            assert refused is not None, "the in-flight limit never refused a request"
            assert f"at most {MAX_IN_FLIGHT}" in refused.json()["detail"] and refused.headers["retry-after"] == "1"
            assert httpx.get(f"{server.url}/readyz").status_code == 200
            for connection in holders:  # their body deadline frees the slots
                assert read_all(connection).startswith(b"HTTP/1.1 408 ")
        assert post(server, "/encode", json={"images": [b64(PNG)]}).status_code == 200
    finally:
        for connection in holders:
            connection.close()
