"""``python -m service``: exit codes and one-line errors, and a real server on 127.0.0.1 end to end."""

from __future__ import annotations

import base64
import json
import re
import shutil
import signal
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from service_testing import ServerProcess, from_png, queue_depths, random_pixels, to_png, wait_until

from service.__main__ import main
from service.client import GlowClient


@pytest.fixture
def tampered(tmp_path: Path, tiny_checkpoint: Path) -> Path:
    copy = tmp_path / "tampered"
    shutil.copytree(tiny_checkpoint, copy)
    weights = copy / "glow.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    return copy


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_a_tampered_checkpoint_exits_1_with_one_line(tampered: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--weights", str(tampered), "--device", "cpu"]) == 1
    assert "sha256" in one_line(capsys.readouterr().err)


def test_a_corrupt_sidecar_exits_1_with_one_line(tampered: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tampered / "glow.json").write_text("{not json")
    assert main(["--weights", str(tampered / "glow.safetensors"), "--device", "cpu"]) == 1
    assert "unreadable checkpoint sidecar" in one_line(capsys.readouterr().err)


def test_a_missing_checkpoint_ends_the_process_with_one_line(tmp_path: Path) -> None:
    server = ServerProcess(["--weights", str(tmp_path / "nowhere"), "--device", "cpu"])
    try:
        assert server.finish() == 1
    finally:
        server.kill()
    assert server.lines == [f"python -m service: {tmp_path / 'nowhere'}: weights file not found"]


def call(url: str, method: str, *args: Any) -> Any:
    with GlowClient(url, timeout=60) as glow:
        return getattr(glow, method)(*args)


def abandon_a_request(url: str, port: int, png: bytes) -> None:
    """Queue a one-image request from a raw socket, hang up, and see it dropped before its batch runs."""
    body = json.dumps({"images": [base64.b64encode(png).decode()]}).encode()
    head = (
        "POST /log-likelihood HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port)) as raw:
        raw.sendall(head.encode() + body)
        wait_until(lambda: queue_depths(url)["log_likelihood"] == 1)
    wait_until(lambda: queue_depths(url)["log_likelihood"] == 0)
    metrics = httpx.get(f"{url}/metrics").text
    assert re.search(r'glow_requests_total\{endpoint="/log-likelihood",model="[^"]+",status="499"\} 1.0', metrics)
    assert re.search(r'glow_batch_size_count\{model="[^"]+",operation="log_likelihood"\} 1.0', metrics)  # only the earlier batch ran


def test_a_real_server_serves_and_drains_on_sigterm(tiny_checkpoint: Path) -> None:
    """Batches of 2 that wait up to a minute: a lone image stays queued until SIGTERM drains it."""
    server = ServerProcess(
        ["--weights", str(tiny_checkpoint), "--device", "cpu", "--max-batch-size", "2", "--max-wait-ms", "60000",
         "--request-timeout-s", "120"]
    )  # fmt: skip
    try:
        server.wait_listening()
        images = random_pixels(2, 0)
        pngs = [to_png(image) for image in images]
        with GlowClient(server.url, timeout=60) as glow:
            assert glow.healthy() and glow.ready()
            assert glow.model_info().name == "tiny"
            assert len(glow.score(pngs)) == 2  # two images: a full batch, no waiting
            encoded = glow.encode(pngs)
            samples = glow.sample(n=2, temperature=0.7, seed=1)
            assert samples.seed == 1 and all(from_png(png).shape == (1, 28, 28) for png in samples.images)
        abandon_a_request(server.url, server.port, pngs[0])

        with ThreadPoolExecutor(3) as pool:
            in_flight = [
                pool.submit(call, server.url, "score", [pngs[0]]),
                pool.submit(call, server.url, "encode", [pngs[1]]),
                pool.submit(call, server.url, "decode", [encoded.latents[0]]),
            ]
            wait_until(lambda: queue_depths(server.url) == {"log_likelihood": 1, "encode": 1, "decode": 1, "sample": 0})
            server.process.send_signal(signal.SIGTERM)
            scores, encoding, decoded = (future.result(timeout=30) for future in in_flight)  # < the 60 s wait
        assert len(scores) == 1 and encoding.latent_dim == 784
        assert np.array_equal(from_png(decoded[0]), images[0])
        assert server.finish() == 0
        assert "Traceback" not in server.output()
    finally:
        server.kill()
