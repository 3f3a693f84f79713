"""The allocator: the service's batch function in fresh processes, under glibc's default malloc and a tuned one.

``python -m bench.allocator`` (a child of ``bench.model_throughput``'s allocator section)
loads the checkpoint with the service's own ``ModelRunner``, warms it up as ``python -m
service`` does, and prints log-likelihood and ``score_batch`` seconds per call at each
batch size as one ``JSON:`` line. Fresh processes and random pixels, so that no data set
load shapes the allocator's history.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench.models import REPO, checkpoint_exists, random_checkpoint
from bench.timing import MALLOC_TUNED, measure


def time_runner(args: argparse.Namespace) -> dict[str, dict[int, float]]:
    """(in the child) seconds per call of the service's log-likelihood and ``score_batch`` at ascending batches."""
    import numpy as np

    from service.runner import ModelRunner

    torch.set_num_threads(args.threads)
    runner = ModelRunner(args.weights, args.device)
    runner.load()
    runner.warm_up(64)
    rng = np.random.default_rng(args.seed)
    out: dict[str, dict[int, float]] = {"log-likelihood": {}, "score_batch": {}}
    with torch.inference_mode():
        for batch in sorted(args.batches):
            images = [rng.integers(0, 256, runner.image_shape, dtype=np.uint8) for _ in range(batch)]
            x = torch.from_numpy(np.stack(images)).to(args.device)
            out["log-likelihood"][batch] = measure(lambda: runner.model.log_prob(x), min_time=args.min_time,
                                                   min_repeats=args.min_repeats).median
            items = runner.scorable(images)  # the compression runs in the request's thread when served
            out["score_batch"][batch] = measure(lambda: runner.score_batch(items), min_time=args.min_time,
                                                min_repeats=args.min_repeats).median
    return out


def run_allocator(args: argparse.Namespace) -> dict[str, Any]:
    """The service's batch function in fresh processes under glibc's default malloc and a tuned one.

    ``args``: those of ``bench.model_throughput`` (weights, device, threads, seed, batches, min_time,
    min_repeats; levels, steps, hidden and images for a random checkpoint when there is none)."""
    print(f"\nallocator: the service's ModelRunner in fresh processes (loaded and warmed up as python -m service "
          f"does), ms/call under glibc malloc as is and with GLIBC_TUNABLES={MALLOC_TUNED}")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="glow-bench-") as tmp:
        weights = args.weights
        if not checkpoint_exists(weights):
            try:
                weights = random_checkpoint(Path(tmp) / "random", args)
            except Exception as exc:  # e.g. scikit-learn missing for the calibration
                print(f"  skipped: no checkpoint and none could be made ({type(exc).__name__}: {exc})")
                return results
        command = [sys.executable, "-m", "bench.allocator", "--weights", str(weights),
                   "--device", str(args.device), "--seed", str(args.seed), "--batches", *map(str, args.batches),
                   "--min-time", str(args.min_time), "--min-repeats", str(args.min_repeats),
                   "--threads", str(args.threads)]
        for name, tunables in (("default", os.environ.get("GLIBC_TUNABLES")), ("tuned", MALLOC_TUNED)):
            env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
            if tunables:
                env["GLIBC_TUNABLES"] = tunables
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
            try:
                done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
            except subprocess.TimeoutExpired:
                print(f"  {name}: timed out")
                return results
            line = next((l for l in done.stdout.splitlines() if l.startswith("JSON:")), None)
            if line is None:
                print(f"  {name}: failed (rc {done.returncode}): {done.stderr.strip()[-300:]}")
                return results
            results[name] = {op: {int(k): v for k, v in d.items()} for op, d in json.loads(line[5:]).items()}
    print(f"{'operation':<16}{'batch':>6}{'default ms':>12}{'tuned ms':>10}{'speedup':>9}")
    for op in results["default"]:
        for batch in sorted(results["default"][op]):
            d, t = results["default"][op][batch], results["tuned"][op][batch]
            print(f"{op:<16}{batch:>6}{d * 1e3:>12.2f}{t * 1e3:>10.2f}{d / t:>8.2f}x")
    return results


def main(argv: list[str] | None = None) -> int:
    """The child: time the runner and print the figures as one ``JSON:`` line."""
    p = argparse.ArgumentParser(prog="python -m bench.allocator", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    p.add_argument("--min-time", type=float, default=1.0)
    p.add_argument("--min-repeats", type=int, default=3)
    print("JSON:" + json.dumps(time_runner(p.parse_args(argv))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
