"""What a heatmap costs: ``python -m bench.heatmap_cost [--weights DIR] [--rounds N]``.

Times, side by side in interleaved rounds on the service's own runner (``service.runner``,
the served TorchScript form, its thread count), one batch of Fashion-MNIST test images
scored (a) as ``POST /log-likelihood`` does without the option and (b) with
``heatmap=true``, each including the JSON of its results; and (c) the PNG overlays of
``heatmap_overlay=true``, which the route draws outside the model's thread. Prints the
median milliseconds per batch [range] and the ratio (b)/(a).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from model.data import load_images
from service import imaging
from service.runner import ModelRunner, Score
from service.schemas import ImageScore


def _json(scores: list[Score]) -> int:
    """Bytes of the results' JSON, as the route builds it."""
    return sum(
        len(ImageScore(log_likelihood=s.log_likelihood, bits_per_dim=s.bits_per_dim, anomaly_score=s.anomaly_score,
                       percentile=s.percentile, is_anomaly=s.is_anomaly,
                       heatmap=None if s.heatmap is None else s.heatmap.tolist()).model_dump_json(exclude_none=True))
        for s in scores
    )


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.heatmap_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, default=Path("weights/fashion-mnist"))
    p.add_argument("--images", type=Path, default=Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the service's default on 2 cores: 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    runner = ModelRunner(args.weights, "cpu")
    runner.load()
    images = list(load_images(args.images)[: max(args.batches)])
    print("| batch | plain score, ms | with heatmap, ms | ratio | overlays, ms (outside the model thread) |")
    print("|---|---|---|---|---|")
    with torch.inference_mode():
        for batch in args.batches:
            plain, mapped = runner.scorable(images[:batch]), runner.scorable(images[:batch], heatmap=True)
            runs: dict[str, list[float]] = {"plain": [], "heatmap": [], "overlay": []}
            scores = runner.score_batch(mapped)
            for _ in range(args.rounds):  # interleaved, so that load changes hit both alike
                runs["plain"].append(_time(lambda plain=plain: _json(runner.score_batch(plain))))
                runs["heatmap"].append(_time(lambda mapped=mapped: _json(runner.score_batch(mapped))))
                runs["overlay"].append(_time(lambda mapped=mapped, scores=scores: [
                    imaging.encode_png(runner.overlay_png_pixels(item.pixels, s.heatmap))
                    for item, s in zip(mapped, scores) if s.heatmap is not None]))
            med = {k: statistics.median(v) for k, v in runs.items()}
            span = {k: f"{min(v):.2f}-{max(v):.2f}" for k, v in runs.items()}
            print(f"| {batch} | {med['plain']:.2f} [{span['plain']}] | {med['heatmap']:.2f} [{span['heatmap']}]"
                  f" | {med['heatmap'] / med['plain']:.2f}x | {med['overlay']:.2f} [{span['overlay']}] |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
