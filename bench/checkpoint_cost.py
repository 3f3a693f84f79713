"""Served scoring cost of checkpoints side by side: the service's runner on each, the same images.

``python -m bench.checkpoint_cost weights/fashion-mnist weights/fashion-mnist-classes [--batch 64]``

Each checkpoint is loaded as the service loads it (``service.runner.ModelRunner``: folded,
TorchScript, the anomaly scorer, the class posterior of a class-conditional checkpoint), and
``score_batch`` times the same test images at one batch size, the checkpoints alternating
round by round so that the host's drift falls on both alike. Prints images/s per checkpoint
(median over rounds) and each one's cost per image relative to the first.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from bench.timing import measure
from model.data import load_images
from service.runner import ModelRunner

DEFAULT_IMAGES = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.checkpoint_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("weights", nargs="+", type=Path, help="checkpoints; the first is the baseline")
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="IDX or .npz test images")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the service's default: 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    images = list(load_images(args.images)[: args.batch])
    runners = []
    for path in args.weights:
        runner = ModelRunner(path, device="cpu")
        runner.load()
        runner.warm_up(args.batch)
        runners.append(runner)
    items = [runner.scorable(images) for runner in runners]
    rates: list[list[float]] = [[] for _ in runners]
    for _ in range(args.rounds):
        for index, runner in enumerate(runners):
            with torch.inference_mode():
                timing = measure(lambda: runner.score_batch(items[index]), min_time=1.0)
            rates[index].append(timing.per_second(args.batch))
    base = statistics.median(rates[0])
    print(f"score_batch at batch {args.batch}, {args.threads} thread(s), {args.rounds} alternating rounds, "
          f"torch {torch.__version__}")
    print("| checkpoint | images/s (median) | rounds' range | cost per image vs the first |")
    print("|---|---|---|---|")
    for path, runner, rate in zip(args.weights, runners, rates):
        kind = f"{len(runner.labels)} classes" if runner.labels else "unconditional"
        median = statistics.median(rate)
        print(f"| `{path}` ({kind}) | {median:.0f} | {min(rate):.0f}-{max(rate):.0f} | {base / median:.2f}x |")
    for runner in runners:
        runner.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
