"""In-process model throughput: ``python -m bench.model_throughput [--weights DIR]``.

Prints forward FLOPs per image (torch.utils.flop_counter) and images/s for
log-likelihood (bin centre) at several batch sizes, and for sampling, on this
machine's CPU (or --device). Each figure is the median of --repeats timed calls
after a warm-up call, with torch's intra-op threads set by --threads.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from model.checkpoint import load_checkpoint
from model.glow import Glow, GlowConfig

DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "fashion-mnist"


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``repeats`` calls of fn after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_flops(model: Glow) -> int:
    x = torch.zeros(1, *model.config.image_shape, dtype=torch.uint8, device=model.device)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model.log_prob(x)
    return counter.get_total_flops()


def build_model(args: argparse.Namespace) -> tuple[Glow, str]:
    if args.weights is not None and args.weights.exists():
        checkpoint = load_checkpoint(args.weights, args.device)
        return checkpoint.model, str(args.weights)
    torch.manual_seed(0)
    config = GlowConfig(levels=args.levels, steps_per_level=args.steps, hidden_channels=args.hidden)
    model = Glow(config).to(args.device)
    model.initialize(torch.randint(0, 256, (64, *config.image_shape), dtype=torch.uint8, device=args.device))
    return model.eval(), "random weights"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.model_throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="checkpoint (falls back to random weights)")
    p.add_argument("--levels", type=int, default=2)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, source = build_model(args)
    cfg = model.config
    flops = forward_flops(model)
    print(f"model: {cfg.levels} levels x {cfg.steps_per_level} steps, width {cfg.hidden_channels}, "
          f"{'x'.join(map(str, cfg.image_shape))} ({source})")
    print(f"machine: {platform.machine()} {platform.processor()}, torch {torch.__version__}, "
          f"{args.threads} threads, device {args.device}")
    print(f"forward FLOPs per image: {flops / 1e6:.1f} MFLOP")
    print(f"{'operation':<16}{'batch':>6}{'images/s':>12}{'ms/batch':>10}{'GFLOP/s':>9}")
    generator = torch.Generator().manual_seed(0)
    for batch in args.batches:
        x = torch.randint(0, 256, (batch, *cfg.image_shape), generator=generator, dtype=torch.uint8).to(args.device)
        operations: dict[str, Callable[[], object]] = {
            "log-likelihood": lambda: model.log_prob(x),
            "sample": lambda: model.sample(batch, 0.7, seed=0),
        }
        for name, fn in operations.items():
            with torch.inference_mode():
                seconds = timed(fn, args.repeats)
            print(f"{name:<16}{batch:>6}{batch / seconds:>12.1f}{seconds * 1e3:>10.1f}{flops * batch / seconds / 1e9:>9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
