"""The served form in process, without HTTP: the ceiling a server's throughput is read against.

``python -m bench.inprocess --weights DIR --batch 64 --seconds 6`` loads the service's runner
(``service.runner.ModelRunner``: the folded TorchScript form and the anomaly scorer) in a process
tuned as the service tunes its own (``service.tuning``: the switch interval, glibc's malloc
thresholds, ``--threads`` intra-op threads, by default what the service would pick), and times
two figures over PNG bytes of test images, each for ``--seconds`` after a warm-up:

- ``model``: ``score_batch`` on batches of ``--batch`` images already decoded, with their
  complexity feature: what the service's model thread does per batch (the issue's "served
  form's in-process throughput");
- ``pipeline``: the same batches from PNG bytes, decode (``service.imaging.decode_images``) and
  the complexity feature (``ModelRunner.scorable``, lossless WebP) included, in one thread:
  everything the service does per image but HTTP.

It prints one JSON line, ``{"batch": B, "threads": T, "model": images/s, "pipeline": images/s}``.
``bench.compare --in-process`` runs it in its rotation beside the servers, so that the ratio
served / in-process comes from runs made side by side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.models import DEFAULT_IMAGES, DEFAULT_WEIGHTS, REPO, pngs_of

SERVED_BATCH = 64  # the service's default --max-batch-size: the batch a busy server runs


def images_per_second(fn: Callable[[], object], batch: int, seconds: float) -> float:
    """Images/s of ``fn`` (one batch per call) over at least ``seconds`` and two calls."""
    calls, started = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - started < seconds:
        fn()
        calls += 1
    return calls * batch / (time.perf_counter() - started)


def measure(weights: Path, blobs: list[bytes], batch: int, seconds: float, threads: int) -> dict[str, Any]:
    """The two figures of the module docstring, for the first ``batch`` of ``blobs``."""
    import torch

    from service import imaging
    from service.runner import ModelRunner
    from service.settings import Settings
    from service.tuning import tune_process

    tuning = tune_process(Settings.from_args(["--device", "cpu", "--threads", str(threads)]))
    runner = ModelRunner(weights, "cpu")
    runner.load()
    runner.warm_up(batch)
    pngs = (blobs * (batch // len(blobs) + 1))[:batch]
    items = runner.scorable(imaging.decode_images(pngs, runner.image_shape))

    def model() -> object:
        with torch.inference_mode():
            return runner.score_batch(items)

    def pipeline() -> object:
        decoded = runner.scorable(imaging.decode_images(pngs, runner.image_shape))
        with torch.inference_mode():
            return runner.score_batch(decoded)

    return {"batch": batch, "threads": tuning.threads, "model": images_per_second(model, batch, seconds),
            "pipeline": images_per_second(pipeline, batch, seconds)}


def run(weights: Path, images: Path, batch: int, seconds: float, threads: int = 0) -> dict[str, Any]:
    """:func:`measure` in a fresh interpreter (its own threads and allocator), as ``bench.compare`` runs it."""
    command = [sys.executable, "-m", "bench.inprocess", "--weights", str(weights), "--images", str(images),
               "--batch", str(batch), "--seconds", str(seconds), "--threads", str(threads)]
    out = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_ratios(rows: list[dict[str, Any]], ceilings: list[dict[str, Any]], servers: list[str]) -> None:
    """Each server's images/s (``bench.compare``'s summary rows) over the in-process figures of the same level
    (medians over rounds)."""
    print("\nServed images/s over the served form's in-process images/s (model: score_batch alone; pipeline: with"
          " PNG decode and the complexity feature), medians over rounds:")
    for row in rows:
        mine = [c for c in ceilings if (c["images"], c["concurrency"]) == (row["images"], row["concurrency"])]
        if not mine:
            continue
        model = statistics.median(c["model"] for c in mine)
        pipeline = statistics.median(c["pipeline"] for c in mine)
        ratios = "  ".join(f"{server} {row[server]['requests_per_s'] * row['images'] / model:.2f}x /"
                           f" {row[server]['requests_per_s'] * row['images'] / pipeline:.2f}x"
                           for server in servers if server in row)
        print(f"{row['images']} img, c={row['concurrency']}: in-process (batch {mine[0]['batch']}, {mine[0]['threads']}"
              f" thread(s)) model {model:.1f}, pipeline {pipeline:.1f} img/s; {ratios}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.inprocess", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="IDX/.npz/folder whose first images are used")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seconds", type=float, default=6.0, help="per figure")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: what the service picks)")
    args = p.parse_args(argv)
    blobs, _ = pngs_of(args.images, args.batch)
    print(json.dumps(measure(args.weights, blobs, args.batch, args.seconds, args.threads)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
