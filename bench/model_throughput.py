"""In-process model throughput: ``python -m bench.model_throughput [--weights DIR] [--quick]``.

Prints, in one run and on the same inputs and thread count:

1. forward FLOPs per image (torch.utils.flop_counter) of our Glow and of its nflows peer;
2. the conv ceiling at each batch size (``bench/ceiling.py``): every convolution of one
   log-likelihood pass timed alone on its exact shape, summed: the speed the model would
   have if everything but its convolutions were free;
3. images/s of log-likelihood, encode, decode and sampling (and the service's anomaly
   scoring and its fast forms) at each batch size, as GFLOP/s and as a share of that
   ceiling, beside the nflows peer (same levels, steps, width and input size;
   ``bench/peer.py``) and the our/peer ratio;
4. exactness knobs (``bench/knobs.py``): speed, the max relative deviation of
   log-likelihoods from the plain fp32 path, and whether decode(encode(x)) gives back x;
5. GIL contention and 6. the thread sweep (``bench/threads.py``): the model beside a busy
   Python thread, and at each intra-op thread count (where the batch-1 ratio at the
   service's thread count is read);
7. the allocator (``bench/allocator.py``): the service's batch function in fresh processes
   under glibc's default malloc and a tuned one.

Each figure is the median of timed calls after a warm-up call (``--min-time`` seconds
and at least ``--min-repeats`` calls per figure), with torch's intra-op threads set by
``--threads``. The full run takes a few minutes on 2 cores; ``--quick`` is a smoke run.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bench.allocator import run_allocator
from bench.ceiling import Ceiling, conv_ceiling, count_flops, record_convs, reference_conv_gflops
from bench.knobs import CUDA_KNOBS, KNOBS, run_knobs
from bench.models import (add_model_arguments, build_model, checked, checkpoint_exists, folded_model, load_images,
                          traced_model)
from bench.threads import run_contention, run_thread_sweep
from bench.timing import Timing, measure, write_results
from model.glow import Glow

TEMPERATURE = 0.7
OPERATIONS = ("log-likelihood", "encode", "decode", "sample")
EXTRA_OPERATIONS = ("anomaly-score", "folded-log-likelihood", "folded-decode", "traced-log-likelihood", "traced-decode")
# flop_counter cannot see into a TorchScript graph: those ops get the eager op's count
# (the anomaly score adds only the detectors' small matrix products to a log-likelihood)
EAGER_TWIN = {"traced-log-likelihood": "log-likelihood", "traced-decode": "decode", "anomaly-score": "log-likelihood"}

Operation = Callable[[Tensor, Tensor, int], Callable[[], object]]
"""(images, their latents, batch size) -> the call to time."""


def build_peer(model: Glow, images: Tensor, args: argparse.Namespace) -> tuple[nn.Module | None, str]:
    """The nflows peer of the model's architecture (None when skipped or not installed), and a line about it."""
    if args.no_peer:
        return None, "skipped (--no-peer)"
    from bench.peer import NflowsGlow, count_steps, nflows_available

    if not nflows_available():
        return None, "nflows not installed (pip install nflows --no-deps): peer skipped"
    peer = NflowsGlow(model.config, seed=args.seed)
    peer.initialize(images[:256])
    peer = peer.to(args.device).eval()
    if args.peer_cache:
        for module in peer.modules():
            if hasattr(module, "use_cache"):
                module.use_cache(True)
    counts = count_steps(peer)
    return peer, (f"nflows {nflows_version()}: {counts['squeeze']} squeezes, "
                  f"{counts['coupling']} x [ActNorm, OneByOneConvolution, AffineCouplingTransform]"
                  f"{', 1x1 cache on' if args.peer_cache else ''}")


def flow_operations(flow: Any) -> dict[str, Operation]:
    """log-likelihood, encode, decode and sample of a model with Glow's methods (ours or the peer)."""
    return {
        "log-likelihood": lambda x, z, b: (lambda: flow.log_prob(x)),
        "encode": lambda x, z, b: (lambda: flow.encode(x)),
        "decode": lambda x, z, b: (lambda: flow.decode(z)),
        "sample": lambda x, z, b: (lambda: flow.sample(b, TEMPERATURE, seed=0)),
    }


def our_operations(model: Glow, images: Tensor, calibration: dict[str, Tensor] | None,
                   args: argparse.Namespace) -> dict[str, Operation]:
    """The model's operations, and the asked-for extras: the service's anomaly scoring and its fast forms."""
    ops = flow_operations(model)
    if "anomaly-score" in args.operations:
        from model.anomaly import AnomalyScorer, calibrate

        try:
            calibration = calibration or calibrate(model, images[:256].to(args.device))
            scorer = AnomalyScorer(model, calibration, inference=traced_model(model))  # as the service scores
            ops["anomaly-score"] = lambda x, z, b: (lambda: scorer.score(x))
        except Exception as exc:  # e.g. scikit-learn missing for calibration
            print(f"note: anomaly-score skipped ({type(exc).__name__}: {exc})")
    forms = (("folded", lambda: folded_model(model, channels_last=True)), ("traced", lambda: traced_model(model)))
    for name, build in forms:
        if any(op.startswith(f"{name}-") for op in args.operations):
            fast = checked(build, model, images, name)
            if fast is not None:
                fast_ops = flow_operations(fast)
                ops[f"{name}-log-likelihood"] = fast_ops["log-likelihood"]
                ops[f"{name}-decode"] = fast_ops["decode"]
    return ops


def flops_per_image(ops: dict[str, Operation], names: list[str], flow: Any, one: Tensor) -> dict[str, int]:
    """Forward FLOPs of each operation at batch 1 (a TorchScript one gets its eager twin's count)."""
    z = flow.encode(one)
    flops = {op: count_flops(ops[op](one, z, 1)) for op in names if op not in EAGER_TWIN}
    for op in names:
        if op in EAGER_TWIN:
            twin = EAGER_TWIN[op]
            flops[op] = flops.get(twin) or count_flops(ops[twin](one, z, 1))
    return flops


def ceilings(model: Glow, images: Tensor, args: argparse.Namespace,
             sync: Callable[[], None] | None) -> dict[int, Ceiling]:
    """The conv ceiling at each batch size, printed as a table."""
    print(f"\nconv ceiling: every convolution of one log-likelihood pass, each timed alone (F.conv2d, "
          f"same shapes, {args.threads} threads), summed")
    print(f"{'batch':>6}{'convs':>7}{'MFLOP/img':>11}{'conv ms':>9}{'GFLOP/s':>9}{'ceiling img/s':>15}")
    out: dict[int, Ceiling] = {}
    for batch in args.batches:
        x = images[:batch].to(args.device)
        c = conv_ceiling(record_convs(lambda: model.log_prob(x)), batch, args.device, args.conv_min_time, sync)
        out[batch] = c
        print(f"{batch:>6}{c.calls:>7}{c.conv_flops / batch / 1e6:>11.1f}{c.conv_seconds * 1e3:>9.2f}"
              f"{c.gflops:>9.1f}{c.images_per_s:>15.1f}")
    return out


def throughput(model: Glow, peer: nn.Module | None, images: Tensor, ops: tuple[dict[str, Operation], ...],
               flops: tuple[dict[str, int], ...], ceiling: dict[int, Ceiling], args: argparse.Namespace,
               sync: Callable[[], None] | None) -> list[dict[str, Any]]:
    """images/s of each operation at each batch, ours (``ops[0]``, ``flops[0]``) beside the peer's (``[1]``)."""
    (ops_ours, ops_peer), (flops_ours, flops_peer) = ops, flops
    print(f"\nthroughput (images/s, median of >= {args.min_repeats} calls and {args.min_time:g} s; "
          f"inference_mode; %ceil = achieved GFLOP/s / ceiling GFLOP/s at that batch)")
    header = f"{'operation':<22}{'batch':>6}{'ours img/s':>12}{'ms/call':>9}{'GFLOP/s':>9}{'%ceil':>7}"
    if peer is not None:
        header += f"{'peer img/s':>12}{'%ceil':>7}{'ours/peer':>11}"
    print(header)
    rows = []
    peer_timings: dict[tuple[str, int], Timing] = {}
    for op in [op for op in args.operations if op in ops_ours]:
        for batch in args.batches:
            x = images[:batch].to(args.device)
            with torch.inference_mode():
                t = measure(ops_ours[op](x, model.encode(x), batch), min_time=args.min_time,
                            min_repeats=args.min_repeats, sync=sync)
            limit, ours = ceiling[batch].gflops, t.per_second(batch)
            gflops = flops_ours[op] * ours / 1e9
            row: dict[str, Any] = {"operation": op, "batch": batch, "ours_images_per_s": ours,
                                   "ours_ms_per_call": t.median * 1e3, "ours_gflops": gflops,
                                   "ours_fraction_of_ceiling": gflops / limit}
            line = f"{op:<22}{batch:>6}{ours:>12.1f}{t.median * 1e3:>9.2f}{gflops:>9.1f}{100 * gflops / limit:>6.0f}%"
            peer_op = op.removeprefix("folded-").removeprefix("traced-")
            if peer is not None and peer_op in ops_peer:
                if (peer_op, batch) not in peer_timings:  # each peer figure is measured once, shared by fused rows
                    with torch.inference_mode():
                        peer_timings[peer_op, batch] = measure(
                            ops_peer[peer_op](x, peer.encode(x), batch), min_time=args.min_time,
                            min_repeats=args.min_repeats, sync=sync,
                        )
                tp = peer_timings[peer_op, batch]
                theirs = tp.per_second(batch)
                peer_gflops = flops_peer.get(peer_op, 0) * theirs / 1e9
                row.update({"peer_images_per_s": theirs, "peer_ms_per_call": tp.median * 1e3,
                            "peer_fraction_of_ceiling": peer_gflops / limit, "ratio": ours / theirs})
                line += f"{theirs:>12.1f}{100 * peer_gflops / limit:>6.0f}%{ours / theirs:>10.2f}x"
            print(line)
            rows.append(row)
    return rows


def summarize(rows: list[dict[str, Any]], batches: list[int], with_peer: bool) -> dict[str, Any]:
    """Print the figures the issues set targets for; returns the peer's best log-likelihood when there is a peer."""
    by = {(r["operation"], r["batch"]): r for r in rows}
    out: dict[str, Any] = {}
    print("\nsummary")
    if ("log-likelihood", 64) in by:
        print(f"  log-likelihood at batch 64: {100 * by['log-likelihood', 64]['ours_fraction_of_ceiling']:.0f}% "
              f"of the conv ceiling (target >= 50%)"
              + (f"; folded: {100 * by['folded-log-likelihood', 64]['ours_fraction_of_ceiling']:.0f}%"
                 if ("folded-log-likelihood", 64) in by else ""))
    if with_peer and ("log-likelihood", 1) in by:
        print(f"  log-likelihood at batch 1: {by['log-likelihood', 1]['ratio']:.2f}x the peer (target >= 3x)"
              + (f"; folded (model/inference.py): {by['folded-log-likelihood', 1]['ratio']:.2f}x"
                 if ("folded-log-likelihood", 1) in by else "")
              + (f"; traced (what the service runs): {by['traced-log-likelihood', 1]['ratio']:.2f}x"
                 if ("traced-log-likelihood", 1) in by else ""))
        peak, at = max(((r["peer_images_per_s"], r["batch"]) for r in rows
                        if r["operation"] == "log-likelihood" and "peer_images_per_s" in r), default=(math.nan, 0))
        print(f"  peer's best log-likelihood: {peak:.1f} img/s at batch {at}; the served target at concurrency 64 "
              f"is >= 1.5x that: {1.5 * peak:.0f} req/s (see bench/served.py)")
        out["peer_best_log_likelihood"] = {"images_per_s": peak, "batch": at}
    for op in ("decode", "sample"):
        if (op, max(batches)) in by and ("log-likelihood", max(batches)) in by:
            costs = [by[op, b]["ours_ms_per_call"] / by["log-likelihood", b]["ours_ms_per_call"]
                     for b in batches if (op, b) in by]
            print(f"  {op} cost per image / log-likelihood's: {min(costs):.2f}x .. {max(costs):.2f}x "
                  f"over batches {batches} (target <= 1.5x)")
    return out


def nflows_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nflows")
    except PackageNotFoundError:
        return "?"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.model_throughput", description=__doc__.split("\n\n")[0])
    add_model_arguments(p, "checkpoint folder (default weights/fashion-mnist; random weights when absent)",
                        "IDX/npz/folder of input images (default Fashion-MNIST test set; random pixels when absent)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    p.add_argument("--operations", nargs="+", default=[*OPERATIONS, *EXTRA_OPERATIONS],
                   choices=[*OPERATIONS, *EXTRA_OPERATIONS],
                   help="anomaly-score: the service's scoring (likelihood + WebP + detectors); folded-*: the folded "
                        "inference form of model/inference.py with channels_last; traced-*: "
                        "the folded form as frozen TorchScript")
    p.add_argument("--min-time", type=float, default=1.0, help="seconds of timed calls per figure (default 1)")
    p.add_argument("--min-repeats", type=int, default=3, help="timed calls per figure, at least (default 3)")
    p.add_argument("--conv-min-time", type=float, default=0.2, help="seconds per conv shape in the ceiling")
    p.add_argument("--no-peer", action="store_true", help="skip the nflows peer")
    p.add_argument("--peer-cache", action="store_true",
                   help="let the peer cache its 1x1 weights and inverses (nflows using_cache=True; the tutorial did not)")
    p.add_argument("--knobs", nargs="*", default=list(KNOBS),
                   help=f"exactness knobs to try ({' '.join(KNOBS)}; on CUDA also {' '.join(CUDA_KNOBS)}; "
                        "none: skip)")
    p.add_argument("--knob-batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--no-contention", action="store_true", help="skip the GIL-contention section")
    p.add_argument("--sweep-threads", type=int, nargs="*", default=None,
                   help="thread counts of the thread sweep (default 1 .. --threads; the flag alone: skip it)")
    p.add_argument("--sweep-batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--sweep-rounds", type=int, default=3, help="interleaved rounds per thread sweep figure")
    p.add_argument("--switch-intervals", type=float, nargs="+", default=[0.005, 0.0005],
                   help="sys.setswitchinterval values for the contention section (default 0.005 = Python's, 0.0005)")
    p.add_argument("--no-allocator", action="store_true",
                   help="skip the allocator section (fresh processes with and without tuned glibc malloc)")
    p.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: batches 1 8 64, 0.3 s per figure, knobs at batch 8 without compile")
    args = p.parse_args(argv)
    args.knobs_default = args.knobs == list(KNOBS)
    if args.knobs == ["none"]:
        args.knobs = []
    if args.quick:
        args.batches = [b for b in args.batches if b <= 64] or [1]
        args.min_time, args.min_repeats, args.conv_min_time = 0.3, 2, 0.05
        args.knobs = [k for k in args.knobs if "compile" not in k]
        args.knob_batches = [8]
        args.sweep_rounds = 2
    if args.sweep_threads is None:
        args.sweep_threads = list(range(1, args.threads + 1))
    if any(n < 1 for n in args.sweep_threads) or any(b < 1 for b in args.sweep_batches) or args.sweep_rounds < 1:
        p.error("--sweep-threads, --sweep-batches and --sweep-rounds take values >= 1")
    return args


def image_shape(weights: Path) -> tuple[int, int, int]:
    """The checkpoint's image shape, or the random model's (28x28 grey) when there is no checkpoint."""
    if not checkpoint_exists(weights):
        return (1, 28, 28)
    from model.checkpoint import read_sidecar, resolve_paths

    return tuple(read_sidecar(resolve_paths(weights)[1])["image_shape"])  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*triangular_solve.*")  # nflows' inverse 1x1 conv
    torch.set_num_threads(args.threads)
    cuda = str(args.device).startswith("cuda")
    sync = torch.cuda.synchronize if cuda else None
    if cuda:  # every table in strict fp32; TF32 and bf16 are knobs, with their accuracy cost
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        if args.knobs_default:
            args.knobs = [*args.knobs, *CUDA_KNOBS]
    largest = max([*args.batches, *args.knob_batches, *args.sweep_batches, 256])
    images, image_source = load_images(args, image_shape(args.weights), largest)
    model, source, calibration = build_model(args, images)
    peer, peer_note = build_peer(model, images, args)
    cfg = model.config
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    print(f"model: {cfg.levels} levels x {cfg.steps_per_level} steps, width {cfg.hidden_channels}, "
          f"{'x'.join(map(str, cfg.image_shape))}, {sum(p.numel() for p in model.parameters())} parameters ({source})")
    print(f"peer: {peer_note}")
    print(f"inputs: {image_source}")
    print(f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}, torch {torch.__version__}, {args.threads} intra-op threads, "
          f"device {args.device}, GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}")

    one = images[:1].to(args.device)
    ops_ours = our_operations(model, images, calibration, args)
    ops_peer = flow_operations(peer) if peer is not None else {}
    flops_ours = flops_per_image(ops_ours, [op for op in args.operations if op in ops_ours], model, one)
    flops_peer = flops_per_image(ops_peer, list(ops_peer), peer, one) if peer is not None else {}
    results["flops_per_image"] = {"ours": flops_ours, "peer": flops_peer}
    print("forward FLOPs per image (torch.utils.flop_counter; convolutions and matmuls): "
          + ", ".join(f"{op} {flops_ours[op] / 1e6:.1f} MFLOP" for op in flops_ours if op in OPERATIONS))
    if flops_peer:
        print("peer FLOPs per image: " + ", ".join(f"{op} {flops_peer[op] / 1e6:.1f} MFLOP" for op in flops_peer)
              + " (flop_counter does not count the peer's triangular solves)")

    ceiling = ceilings(model, images, args, sync)
    big = reference_conv_gflops(args.device, args.conv_min_time, sync)
    print(f"for scale: one 64->64 3x3 conv, batch 256 at 14x14: {big:.1f} GFLOP/s")
    results["ceiling"] = {b: {**asdict(c), "gflops": c.gflops, "images_per_s": c.images_per_s}
                          for b, c in ceiling.items()}
    results["reference_conv_gflops"] = big
    rows = throughput(model, peer, images, (ops_ours, ops_peer), (flops_ours, flops_peer), ceiling, args, sync)
    results["throughput"] = rows
    results.update(summarize(rows, args.batches, peer is not None))

    if args.knobs:
        results["knobs"] = run_knobs(model, images, args.knob_batches, args.knobs, args, sync)
    if not args.no_contention:
        results["contention"] = run_contention(model, images, args.knob_batches, args.switch_intervals, args, sync)
    if args.sweep_threads:
        results["thread_sweep"] = run_thread_sweep(model, peer, images, args.sweep_batches, args.sweep_threads,
                                                   args.sweep_rounds, args, sync)
    if not args.no_allocator and not cuda:
        results["allocator"] = run_allocator(args)
    write_results(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
