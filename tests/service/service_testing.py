"""Helpers of the service tests: tiny checkpoints and image files (a module of its own, so tests import it)."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

import numpy as np
import torch
from PIL import Image

from model.anomaly import calibrate
from model.checkpoint import save_checkpoint
from model.glow import Glow, GlowConfig
from model.heatmap import calibrate as calibrate_heatmap

SHAPE = (1, 28, 28)
REPO = Path(__file__).resolve().parents[2]


def make_checkpoint(directory: Path, seed: int = 0, labels: Sequence[str] = ()) -> Path:
    """A tiny initialised (untrained) Glow on 1x28x28 images, with its calibration, saved to ``directory``;
    with ``labels``, class-conditional, each class's top Gaussian drawn at random (so the classes differ)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Glow(GlowConfig(image_shape=SHAPE, levels=2, steps_per_level=1, hidden_channels=8,
                                labels=tuple(labels)))
        x = torch.randint(0, 256, (16, *SHAPE), dtype=torch.uint8)
        model.initialize(x)
        if model.class_prior is not None:
            with torch.no_grad():
                model.class_prior.mean.normal_(0.0, 0.5)
                model.class_prior.log_sigma.uniform_(-0.2, 0.2)
    model.eval()
    meta = {"name": "tiny", "dataset": {"name": "synthetic"}, "metrics": {},
            "heatmap": calibrate_heatmap(model, x, SHAPE[1:]).to_json()}
    save_checkpoint(model, directory, meta, calibrate(model, x))
    return directory


def random_pixels(count: int, seed: int, shape: tuple[int, ...] = SHAPE) -> list[np.ndarray]:
    """``count`` distinct random uint8 images (C, H, W)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(count)]


def to_png(pixels: np.ndarray, format: str = "PNG", mode: str | None = None) -> bytes:
    """uint8 (C, H, W) -> image file bytes, optionally converted to another Pillow mode first."""
    hwc = pixels.transpose(1, 2, 0)
    image = Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc)
    if mode is not None:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def from_png(data: bytes) -> np.ndarray:
    """PNG bytes -> uint8 (C, H, W)."""
    array = np.asarray(Image.open(io.BytesIO(data)))
    return (array[None] if array.ndim == 2 else array.transpose(2, 0, 1)).copy()


def files(blobs: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    """httpx ``files=`` for multipart ``images`` parts."""
    return [("images", (f"image{i}.png", blob, "image/png")) for i, blob in enumerate(blobs)]


async def eventually(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait until ``condition()`` holds (checked at every turn of the event loop), or fail."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.001)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """A PNG header declaring ``width`` x ``height`` 8-bit gray pixels, with a few bytes of IDAT (a bomb when large)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(bytes(64)))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + idat + chunk(b"IEND", b"")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ServerProcess:
    """``python -m service ARGS`` on 127.0.0.1 in a subprocess (no shutdown grace unless ARGS set one), its
    stderr collected line by line."""

    def __init__(self, args: Sequence[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("GLOW_")} | {"PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(self.port),
             "--shutdown-grace-s", "0", *args],  # no grace unless a test asks for one
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.listening = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))
            if "Uvicorn running on" in line:
                self.listening.set()

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_listening(self, timeout_s: float = 120) -> None:
        assert self.listening.wait(timeout_s), f"the server did not start:\n{self.output()}"

    def finish(self, timeout_s: float = 60) -> int:
        """Its exit code, once it has exited and its output is read."""
        code = self.process.wait(timeout_s)
        self._reader.join(timeout_s)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def wait_until(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Poll ``condition`` (of another process) until it holds, or fail."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def queue_depths(url: str) -> dict[str, float]:
    """The glow_queue_depth gauge of each operation, scraped from a server's /metrics."""
    text = httpx.get(f"{url}/metrics").text
    return {
        sample.labels["operation"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "glow_queue_depth"
        for sample in family.samples
    }
