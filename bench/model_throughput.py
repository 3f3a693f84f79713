"""In-process model throughput: ``python -m bench.model_throughput [--weights DIR] [--quick]``.

Prints, in one run and on the same inputs and thread count:

1. forward FLOPs per image (torch.utils.flop_counter) of our Glow and of its nflows peer;
2. the conv ceiling at each batch size: every convolution the model runs in one
   log-likelihood pass (recorded with a dispatch mode: 3x3 hidden, 1x1 hidden, zero-convs,
   invertible 1x1s, priors), each timed alone with ``F.conv2d`` on its exact shape, summed:
   the speed the model would have if everything but its convolutions were free;
3. images/s of log-likelihood, encode, decode and sampling (and the service's anomaly
   scoring) at each batch size, as GFLOP/s and as a share of that ceiling, beside the
   nflows peer (same levels, steps, width and input size; ``bench/peer.py``) and the
   our/peer ratio;
4. exactness knobs (inference_mode, channels_last, the folded form of ``model/inference.py``,
   TorchScript, torch.compile, float64) at a few batch sizes: speed, the max relative
   deviation of log-likelihoods from the plain fp32 path, and whether decode(encode(x))
   gives back x pixel for pixel;
5. GIL contention: log-likelihood beside a busy pure-Python thread (what the service's
   event loop is while a batch computes), at Python's default switch interval and a
   shorter one: how much a model that takes the GIL back after every tensor op loses;
6. thread sweep: log-likelihood of the plain model, the served form and the peer at batch 1
   and 8 for each intra-op thread count, in interleaved rounds, with the range over rounds:
   at batch 1 a second thread can cost more than it gives, and by how much varies from
   minute to minute, so this is where the batch-1 ratio at the service's thread count is read.

Each figure is the median of timed calls after a warm-up call (``--min-time`` seconds
and at least ``--min-repeats`` calls per figure), with torch's intra-op threads set by
``--threads``. The full run takes a few minutes on 2 cores; ``--quick`` is a smoke run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import platform
import statistics
import sys
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from bench.timing import MALLOC_TUNED, Timing, checkpoint_exists, measure
from model.glow import Glow, GlowConfig
from model.inference import TracedGlow

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WEIGHTS = REPO / "weights" / "fashion-mnist"
DEFAULT_IMAGES = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
TEMPERATURE = 0.7
OPERATIONS = ("log-likelihood", "encode", "decode", "sample")
EXTRA_OPERATIONS = ("anomaly-score", "folded-log-likelihood", "folded-decode", "traced-log-likelihood", "traced-decode")


# ------------------------------------------------------------------ models
def perturb_zero_convs(model: nn.Module, std: float, seed: int) -> None:
    """Give the zero-initialised convs small random weights, so that random-weight flows are not the identity."""
    from model.layers import ZeroConv2d

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ZeroConv2d):
                module.conv.weight.normal_(0, std, generator=generator)
                module.conv.bias.normal_(0, std, generator=generator)


def build_model(args: argparse.Namespace, init_images: Tensor) -> tuple[Glow, str, dict[str, Tensor] | None]:
    """The shipped checkpoint when it exists, else random weights with the flags' config."""
    if checkpoint_exists(args.weights):
        from model.checkpoint import load_checkpoint

        checkpoint = load_checkpoint(args.weights, args.device)
        return checkpoint.model.eval(), str(args.weights), checkpoint.calibration
    config = GlowConfig(levels=args.levels, steps_per_level=args.steps, hidden_channels=args.hidden)
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        model = Glow(config)
    perturb_zero_convs(model, 0.01, args.seed)
    model.initialize(init_images[:256], generator=torch.Generator().manual_seed(args.seed))
    return model.to(args.device).eval(), "random weights (no checkpoint found)", None


def load_images(args: argparse.Namespace, shape: tuple[int, int, int], count: int) -> tuple[Tensor, str]:
    """``count`` uint8 images: the first of --images when readable and of the right shape, else random pixels."""
    path = Path(args.images) if args.images else None
    if path is not None and path.exists():
        try:
            from model.data import load_images as read

            images = torch.from_numpy(read(path))
            if tuple(images.shape[1:]) == shape and len(images) >= 1:
                reps = math.ceil(count / len(images))
                return images.repeat(reps, 1, 1, 1)[:count].contiguous(), str(path)
        except Exception as exc:  # any unreadable file: fall back to random pixels
            print(f"note: could not read {path} ({exc}); using random pixels", file=sys.stderr)
    generator = torch.Generator().manual_seed(args.seed)
    return torch.randint(0, 256, (count, *shape), generator=generator, dtype=torch.uint8), "random pixels"


# ------------------------------------------------------------------- FLOPs
def count_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        fn()
    return int(counter.get_total_flops())


# ------------------------------------------------------------ conv ceiling
@dataclass(frozen=True)
class ConvShape:
    """One F.conv2d call as the model makes it."""

    input: tuple[int, ...]
    weight: tuple[int, ...]
    bias: bool
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    channels_last: bool

    @property
    def flops(self) -> int:
        """2 x multiply-adds, as torch.utils.flop_counter counts a convolution (bias not counted)."""
        b, _, h, w = self.input
        c_out, c_in, kh, kw = self.weight
        h_out = (h + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        w_out = (w + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        return 2 * b * c_out * h_out * w_out * c_in * kh * kw

    def describe(self) -> str:
        c_out, c_in, kh, kw = self.weight
        return f"{kh}x{kw} {c_in}->{c_out} @{self.input[2]}x{self.input[3]}"


class ConvRecorder(TorchDispatchMode):
    """Records every aten.convolution call (its shapes and parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[ConvShape] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        conv = None
        if func is torch.ops.aten.convolution.default:  # what F.conv2d reaches with autograd on
            x, weight, bias, stride, padding, dilation, _transposed, _output_padding, groups = args
            conv = x, weight, bias, stride, padding, dilation, groups
        elif func is torch.ops.aten.conv2d.default:  # what it reaches under inference_mode
            merged = dict(zip(("bias", "stride", "padding", "dilation", "groups"), args[2:]), **(kwargs or {}))
            conv = (args[0], args[1], merged.get("bias"), merged.get("stride", (1, 1)), merged.get("padding", (0, 0)),
                    merged.get("dilation", (1, 1)), merged.get("groups", 1))
        if conv is not None:
            x, weight, bias, stride, padding, dilation, groups = conv
            stride, padding, dilation = (tuple(v) if isinstance(v, (list, tuple)) else (v, v)
                                         for v in (stride, padding, dilation))
            self.calls.append(
                ConvShape(
                    tuple(x.shape), tuple(weight.shape), bias is not None, tuple(stride), tuple(padding),
                    tuple(dilation), int(groups), x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1,
                )
            )
        return func(*args, **(kwargs or {}))


def record_convs(fn: Callable[[], object]) -> list[ConvShape]:
    recorder = ConvRecorder()
    with torch.inference_mode(), recorder:
        fn()
    return recorder.calls


@dataclass
class Ceiling:
    batch: int
    calls: int
    conv_flops: int  # per call of the model at this batch
    conv_seconds: float  # sum of the calls' F.conv2d times
    shapes: list[dict[str, Any]]

    @property
    def gflops(self) -> float:
        return self.conv_flops / self.conv_seconds / 1e9

    @property
    def images_per_s(self) -> float:
        return self.batch / self.conv_seconds


def time_conv(shape: ConvShape, device: str, min_time: float, sync: Callable[[], None] | None) -> Timing:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape.input, generator=generator).to(device)
    w = (torch.randn(shape.weight, generator=generator) * 0.05).to(device)
    b = torch.zeros(shape.weight[0], device=device) if shape.bias else None
    if shape.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        w = w.contiguous(memory_format=torch.channels_last)

    def call() -> Tensor:
        return F.conv2d(x, w, b, shape.stride, shape.padding, shape.dilation, shape.groups)

    with torch.inference_mode():
        return measure(call, min_time=min_time, min_repeats=5, max_repeats=100_000, warmup=3, sync=sync)


def conv_ceiling(
    calls: list[ConvShape], batch: int, device: str, min_time: float, sync: Callable[[], None] | None
) -> Ceiling:
    counts = Counter(calls)
    seconds, flops, shapes = 0.0, 0, []
    for shape, count in sorted(counts.items(), key=lambda item: -item[0].flops * item[1]):
        t = time_conv(shape, device, min_time, sync)
        seconds += count * t.median
        flops += count * shape.flops
        shapes.append(
            {"conv": shape.describe(), "calls": count, "us_per_call": t.median * 1e6,
             "gflops": shape.flops / t.median / 1e9}
        )
    return Ceiling(batch, len(calls), flops, seconds, shapes)


def reference_conv_gflops(device: str, min_time: float, sync: Callable[[], None] | None) -> float:
    """GFLOP/s of one large 64->64 3x3 convolution (batch 256, 14x14): the machine's conv peak for scale."""
    shape = ConvShape((256, 64, 14, 14), (64, 64, 3, 3), True, (1, 1), (1, 1), (1, 1), 1, False)
    return shape.flops / time_conv(shape, device, min_time, sync).median / 1e9


# ---------------------------------------------------------------- knobs
def max_relative_deviation(values: Tensor, reference: Tensor) -> float:
    values, reference = values.double().cpu(), reference.double().cpu()
    if not torch.isfinite(values).all():
        return math.inf
    return float(((values - reference).abs() / reference.abs().clamp_min(1e-30)).max())


def folded_model(model: Glow, channels_last: bool = False) -> Glow:
    return model.fold(channels_last=channels_last)


def traced_model(model: Glow) -> TracedGlow:
    return TracedGlow(folded_model(model, channels_last=True))


def checked(build: Callable[[], Any], model: Glow, images: Tensor, name: str) -> Any:
    """``build()``, if it builds and matches the model (log-likelihoods within 1e-4, exact round trip); else None."""
    try:
        fast = build()
        x = images[:8].to(model.device)
        with torch.inference_mode():
            deviation = max(max_relative_deviation(fast.log_prob(x), model.log_prob(x)) for _ in range(2))
            exact = bool((fast.decode(fast.encode(x)) == x).all())
    except Exception as exc:  # the model's layers changed under model/inference.py
        print(f"WARNING: the {name} form does not build ({type(exc).__name__}: {exc}); its rows are skipped")
        return None
    if not (deviation <= 1e-4 and exact):
        print(f"WARNING: the {name} form deviates from the model (max rel dev {deviation:.2e}, round trip "
              f"{'exact' if exact else 'NOT exact'}); its rows are skipped: model/inference.py needs updating")
        return None
    return fast


KNOBS = ("inference_mode", "channels_last", "folded", "folded+channels_last", "folded+traced", "compile", "folded+compile",
         "float64")


CUDA_KNOBS = ("tf32", "bf16")


@contextlib.contextmanager
def precision(tf32: bool = False, bf16: bool = False, grad: Callable[[], Any] = torch.inference_mode) -> Iterator[None]:
    """Strict fp32 (TF32 off for cuDNN convs and matmuls, which only matters on CUDA), or TF32, or bf16 autocast."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        with grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def knob_variants(model: Glow, names: list[str]) -> list[tuple[str, Callable[[], Any]]]:
    """(name, factory) pairs; each factory returns (log_prob fn, encode fn or None, decode fn or None, context)."""

    def plain() -> Any:
        return model.log_prob, model.encode, model.decode, lambda: precision(grad=torch.no_grad)

    def tf32() -> Any:  # CUDA: TF32 tensor-core convs (cuDNN's own default)
        return model.log_prob, model.encode, model.decode, lambda: precision(tf32=True)

    def bf16() -> Any:  # CUDA: bf16 autocast
        return model.log_prob, model.encode, model.decode, lambda: precision(bf16=True)

    def inference_mode() -> Any:
        return model.log_prob, model.encode, model.decode, torch.inference_mode

    def channels_last() -> Any:
        clone = copy.deepcopy(model).to(memory_format=torch.channels_last)
        return clone.log_prob, clone.encode, clone.decode, torch.inference_mode

    def folded() -> Any:
        f = folded_model(model)
        return f.log_prob, f.encode, f.decode, torch.inference_mode

    def folded_channels_last() -> Any:
        f = folded_model(model, channels_last=True)
        return f.log_prob, f.encode, f.decode, torch.inference_mode

    def folded_traced() -> Any:
        t = traced_model(model)
        return t.log_prob, t.encode, t.decode, torch.inference_mode

    def compiled() -> Any:
        # the model's cached-weight check (InvertibleConv1x1._cached) guards on tensor versions: dynamo
        # recompiles until its limit and runs the rest eagerly; its warnings say so at length
        logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
        torch._dynamo.reset()
        return torch.compile(model.log_prob, dynamic=False), None, None, torch.inference_mode

    def folded_compiled() -> Any:
        torch._dynamo.reset()
        f = folded_model(model)
        return torch.compile(f.log_prob, dynamic=False), None, None, torch.inference_mode

    def float64() -> Any:
        clone = copy.deepcopy(model).double()
        return clone.log_prob, clone.encode, clone.decode, torch.inference_mode

    table = {
        "inference_mode": inference_mode,
        "channels_last": channels_last,
        "folded": folded,
        "folded+channels_last": folded_channels_last,
        "folded+traced": folded_traced,
        "compile": compiled,
        "folded+compile": folded_compiled,
        "float64": float64,
        "tf32": tf32,
        "bf16": bf16,
    }
    variants: list[tuple[str, Callable[[], Any]]] = [("plain fp32 (no_grad)", plain)]
    for name in names:
        if name not in table:
            raise SystemExit(f"unknown knob {name!r}; choose from {sorted(table)}")
        variants.append((name, table[name]))
    return variants


def run_knobs(
    model: Glow, images: Tensor, batches: list[int], names: list[str], args: argparse.Namespace,
    sync: Callable[[], None] | None,
) -> list[dict[str, Any]]:
    rows = []
    print("\nexactness knobs (log-likelihood; reference: the plain fp32 path under no_grad; "
          "target: max rel dev <= 1e-4, decode(encode(x)) == x)")
    print(f"{'knob':<22}{'batch':>6}{'ms/call':>10}{'images/s':>10}{'speedup':>9}{'max rel dev':>13}"
          f"{'roundtrip':>11}{'setup s':>9}")
    for batch in batches:
        x = images[:batch].to(args.device)
        reference: Tensor | None = None
        plain_seconds = math.nan
        for name, factory in knob_variants(model, names):
            started = time.perf_counter()
            try:
                log_prob, encode, decode, context = factory()
                with context():
                    values = log_prob(x)  # first call: compiles where it compiles
                    setup = time.perf_counter() - started
                    t = measure(lambda: log_prob(x), min_time=args.min_time, min_repeats=args.min_repeats, sync=sync)
                    roundtrip = None if encode is None else bool((decode(encode(x)) == x).all())
            except Exception as exc:  # a knob that does not work here is reported, not fatal
                text = str(exc).strip().splitlines()
                message = f"{type(exc).__name__}: {text[0] if text else ''}"[:90]
                print(f"{name:<22}{batch:>6}  failed: {message}")
                rows.append({"knob": name, "batch": batch, "error": message})
                continue
            if reference is None:
                reference, plain_seconds = values, t.median
            deviation = max_relative_deviation(values, reference)
            speedup = plain_seconds / t.median
            rt = "n/a" if roundtrip is None else ("exact" if roundtrip else "NOT EXACT")
            print(f"{name:<22}{batch:>6}{t.median * 1e3:>10.2f}{t.per_second(batch):>10.1f}{speedup:>8.2f}x"
                  f"{deviation:>13.2e}{rt:>11}{setup:>9.1f}")
            rows.append({"knob": name, "batch": batch, "ms_per_call": t.median * 1e3,
                         "images_per_s": t.per_second(batch), "speedup": speedup,
                         "max_rel_dev": deviation, "roundtrip": roundtrip, "setup_s": setup})
    return rows


# ----------------------------------------------------------- contention
class BusyThread:
    """A thread running pure Python (as the service's event loop does while a batch computes)."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, name="busy-python", daemon=True)

    def _spin(self) -> None:
        total = 0
        while not self._stop.is_set():
            for i in range(2000):
                total += i * i

    def __enter__(self) -> BusyThread:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def run_contention(
    model: Glow, images: Tensor, batches: list[int], intervals: list[float], args: argparse.Namespace,
    sync: Callable[[], None] | None,
) -> list[dict[str, Any]]:
    """log-likelihood with a busy Python thread in the process, at several GIL switch intervals."""
    variants: list[tuple[str, Callable[[Tensor], Tensor]]] = [("model", model.log_prob)]
    try:
        folded = folded_model(model, channels_last=True)
        variants.append(("folded+channels_last", folded.log_prob))
        traced = traced_model(model)
        variants.append(("folded+traced", traced.log_prob))
    except Exception as exc:  # keep the section even if a variant does not build here
        print(f"note: contention variants skipped ({type(exc).__name__}: {exc})")
    print("\nGIL contention: log-likelihood ms/call, alone and beside a busy pure-Python thread (the service's "
          "event loop, simulated), by sys.setswitchinterval")
    header = f"{'variant':<22}{'batch':>6}{'alone':>9}"
    for interval in intervals:
        header += f"{f'busy@{interval * 1e3:g}ms':>14}"
    print(header)
    rows = []
    default_interval = sys.getswitchinterval()
    try:
        for batch in batches:
            x = images[:batch].to(args.device)
            for name, fn in variants:
                with torch.inference_mode():
                    alone = measure(lambda: fn(x), min_time=args.min_time, min_repeats=args.min_repeats, sync=sync)
                    line = f"{name:<22}{batch:>6}{alone.median * 1e3:>9.2f}"
                    row: dict[str, Any] = {"variant": name, "batch": batch, "alone_ms": alone.median * 1e3}
                    for interval in intervals:
                        sys.setswitchinterval(interval)
                        with BusyThread():
                            busy = measure(lambda: fn(x), min_time=args.min_time, min_repeats=args.min_repeats,
                                           sync=sync)
                        sys.setswitchinterval(default_interval)
                        line += f"{busy.median * 1e3:>9.2f} ({busy.median / alone.median:.1f}x)"
                        row[f"busy_ms@{interval}"] = busy.median * 1e3
                print(line)
                rows.append(row)
    finally:
        sys.setswitchinterval(default_interval)
    return rows


# --------------------------------------------------------- thread sweep
def run_thread_sweep(
    model: Glow, peer: nn.Module | None, images: Tensor, batches: list[int], thread_counts: list[int],
    rounds: int, args: argparse.Namespace, sync: Callable[[], None] | None,
) -> list[dict[str, Any]]:
    """log-likelihood of the plain model, the served form and the peer at each (threads, batch), in
    ``rounds`` interleaved rounds (every variant once per round): median and range over the rounds.

    At batch 1 every op is tiny, so intra-op threads cost a wake-up per op more than they save, and
    that cost moves with what else the cores are doing: one figure per variant hides it."""
    variants: list[tuple[str, Callable[[Tensor], Tensor]]] = [("plain", model.log_prob)]
    try:
        variants.append(("served (traced)", traced_model(model).log_prob))
    except Exception as exc:
        print(f"note: the served form does not build here ({type(exc).__name__}: {exc})")
    if peer is not None:
        variants.append(("peer", peer.log_prob))
    print(f"\nthread sweep: log-likelihood img/s by intra-op threads, median [min-max] of {rounds} interleaved "
          f"rounds of {args.min_time:g} s; the service runs its model on {service_threads()} thread(s) here")
    header = f"{'threads':>7}{'batch':>6}" + "".join(f"{name:>26}" for name, _ in variants)
    if peer is not None:
        header += f"{'served/peer':>13}"
    print(header)
    saved = torch.get_num_threads()
    rows = []
    try:
        for threads in thread_counts:
            torch.set_num_threads(threads)
            for batch in batches:
                x = images[:batch].to(args.device)
                rates: dict[str, list[float]] = {name: [] for name, _ in variants}
                with torch.inference_mode():
                    for _ in range(rounds):
                        for name, fn in variants:
                            t = measure(lambda: fn(x), min_time=args.min_time, min_repeats=args.min_repeats, sync=sync)
                            rates[name].append(t.per_second(batch))
                row: dict[str, Any] = {"threads": threads, "batch": batch, "images_per_s": rates}
                line = f"{threads:>7}{batch:>6}"
                for name, _ in variants:
                    r = rates[name]
                    line += f"{statistics.median(r):>12.1f} [{min(r):.0f}-{max(r):.0f}]".rjust(26)
                if peer is not None and "served (traced)" in rates:
                    ratio = statistics.median(rates["served (traced)"]) / statistics.median(rates["peer"])
                    row["served_over_peer"] = ratio
                    line += f"{ratio:>12.2f}x"
                print(line)
                rows.append(row)
    finally:
        torch.set_num_threads(saved)
    at = next((r for r in rows if r["threads"] == service_threads() and r["batch"] == 1 and "served_over_peer" in r),
              None)
    if at is not None:
        print(f"  batch 1 at the service's {at['threads']} thread(s): served form {at['served_over_peer']:.2f}x "
              f"the peer (target >= 3x)")
    return rows


def service_threads() -> int:
    """The intra-op threads ``python -m service`` gives its model on this machine by default."""
    from service.__main__ import model_threads

    return model_threads(0)


# ------------------------------------------------------------ allocator
def allocator_child(args: argparse.Namespace) -> int:
    """(child process) the service's own batch function in a fresh process: ``ModelRunner`` loads the checkpoint
    and warms up as ``python -m service`` does, then log-likelihood and score_batch ms/call at ascending batch
    sizes, as JSON on stdout. Random pixels, so that no data set load shapes the allocator's history."""
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
    print("JSON:" + json.dumps(out))
    return 0


def run_allocator(args: argparse.Namespace) -> dict[str, Any]:
    """The service's batch function in fresh processes under glibc's default malloc and a tuned one."""
    import subprocess
    import tempfile

    print(f"\nallocator: the service's ModelRunner in fresh processes (loaded and warmed up as python -m service "
          f"does), ms/call under glibc malloc as is and with GLIBC_TUNABLES={MALLOC_TUNED}")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="glow-bench-") as tmp:
        weights = args.weights
        if not checkpoint_exists(weights):
            try:
                from bench.served import random_checkpoint

                weights = random_checkpoint(Path(tmp) / "random", args)
            except Exception as exc:  # e.g. scikit-learn missing for the calibration
                print(f"  skipped: no checkpoint and none could be made ({type(exc).__name__}: {exc})")
                return results
        command = [sys.executable, "-m", "bench.model_throughput", "--allocator-child", "--weights", str(weights),
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


# ------------------------------------------------------------------ main
def nflows_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nflows")
    except PackageNotFoundError:
        return "?"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.model_throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS,
                   help="checkpoint folder (default weights/fashion-mnist; random weights when absent)")
    p.add_argument("--levels", type=int, default=2, help="random weights: levels (default 2)")
    p.add_argument("--steps", type=int, default=16, help="random weights: steps per level (default 16)")
    p.add_argument("--hidden", type=int, default=64, help="random weights: coupling width (default 64)")
    p.add_argument("--images", default=str(DEFAULT_IMAGES),
                   help="IDX/npz/folder of input images (default Fashion-MNIST test set; random pixels when absent)")
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
    p.add_argument("--allocator-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0)
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.allocator_child:
        return allocator_child(args)
    warnings.filterwarnings("ignore", message=".*triangular_solve.*")  # nflows' inverse 1x1 conv
    torch.set_num_threads(args.threads)
    cuda = str(args.device).startswith("cuda")
    sync = torch.cuda.synchronize if cuda else None
    if cuda:  # every table in strict fp32; TF32 and bf16 are knobs, with their accuracy cost
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        if args.knobs_default:
            args.knobs = [*args.knobs, *CUDA_KNOBS]
    shape_for_images = (1, 28, 28)
    if checkpoint_exists(args.weights):
        from model.checkpoint import read_sidecar, resolve_paths

        shape_for_images = tuple(read_sidecar(resolve_paths(args.weights)[1])["image_shape"])  # type: ignore[assignment]
    largest = max([*args.batches, *args.knob_batches, *args.sweep_batches, 256])
    images, image_source = load_images(args, shape_for_images, largest)
    model, source, calibration = build_model(args, images)
    cfg = model.config
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}

    peer = None
    peer_note = "skipped (--no-peer)"
    if not args.no_peer:
        from bench.peer import NflowsGlow, count_steps, nflows_available

        if nflows_available():
            peer = NflowsGlow(cfg, seed=args.seed)
            peer.initialize(images[:256])
            peer = peer.to(args.device).eval()
            if args.peer_cache:
                for module in peer.modules():
                    if hasattr(module, "use_cache"):
                        module.use_cache(True)
            counts = count_steps(peer)
            peer_note = (f"nflows {nflows_version()}: {counts['squeeze']} squeezes, "
                         f"{counts['coupling']} x [ActNorm, OneByOneConvolution, AffineCouplingTransform]"
                         f"{', 1x1 cache on' if args.peer_cache else ''}")
        else:
            peer_note = "nflows not installed (pip install nflows --no-deps): peer skipped"

    print(f"model: {cfg.levels} levels x {cfg.steps_per_level} steps, width {cfg.hidden_channels}, "
          f"{'x'.join(map(str, cfg.image_shape))}, {sum(p.numel() for p in model.parameters())} parameters ({source})")
    print(f"peer: {peer_note}")
    print(f"inputs: {image_source}")
    print(f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}, torch {torch.__version__}, {args.threads} intra-op threads, "
          f"device {args.device}, GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}")

    # FLOPs per image (batch 1), per operation
    one = images[:1].to(args.device)
    z_one = model.encode(one)
    ops_ours: dict[str, Callable[[Tensor, Tensor, int], Callable[[], object]]] = {
        "log-likelihood": lambda x, z, b: (lambda: model.log_prob(x)),
        "encode": lambda x, z, b: (lambda: model.encode(x)),
        "decode": lambda x, z, b: (lambda: model.decode(z)),
        "sample": lambda x, z, b: (lambda: model.sample(b, TEMPERATURE, seed=0)),
    }
    if "anomaly-score" in args.operations:
        from model.anomaly import AnomalyScorer, calibrate

        try:
            if not calibration:
                calibration = calibrate(model, images[:256].to(args.device))
            scorer = AnomalyScorer(model, calibration, inference=traced_model(model))  # as the service scores
            ops_ours["anomaly-score"] = lambda x, z, b: (lambda: scorer.score(x))
        except Exception as exc:  # e.g. scikit-learn missing for calibration
            print(f"note: anomaly-score skipped ({type(exc).__name__}: {exc})")
    if any(op.startswith("folded-") for op in args.operations):
        folded = checked(lambda: folded_model(model, channels_last=True), model, images, "folded")
        if folded is not None:
            ops_ours["folded-log-likelihood"] = lambda x, z, b: (lambda: folded.log_prob(x))
            ops_ours["folded-decode"] = lambda x, z, b: (lambda: folded.decode(z))
    if any(op.startswith("traced-") for op in args.operations):
        traced = checked(lambda: traced_model(model), model, images, "traced")
        if traced is not None:
            ops_ours["traced-log-likelihood"] = lambda x, z, b: (lambda: traced.log_prob(x))
            ops_ours["traced-decode"] = lambda x, z, b: (lambda: traced.decode(z))
    ops_peer: dict[str, Callable[[Tensor, Tensor, int], Callable[[], object]]] = {}
    if peer is not None:
        ops_peer = {
            "log-likelihood": lambda x, z, b: (lambda: peer.log_prob(x)),
            "encode": lambda x, z, b: (lambda: peer.encode(x)),
            "decode": lambda x, z, b: (lambda: peer.decode(z)),
            "sample": lambda x, z, b: (lambda: peer.sample(b, TEMPERATURE, seed=0)),
        }
    operations = [op for op in args.operations if op in ops_ours]
    # flop_counter cannot see into a TorchScript graph: those ops get the eager op's count
    # (the anomaly score adds only the detectors' small matrix products to a log-likelihood)
    eager_twin = {"traced-log-likelihood": "log-likelihood", "traced-decode": "decode", "anomaly-score": "log-likelihood"}
    flops_ours = {op: count_flops(ops_ours[op](one, z_one, 1)) for op in operations if op not in eager_twin}
    for op in operations:
        if op in eager_twin:
            twin = eager_twin[op]
            flops_ours[op] = flops_ours.get(twin) or count_flops(ops_ours[twin](one, z_one, 1))
    flops_peer = {}
    if peer is not None:
        z_peer_one = peer.encode(one)
        flops_peer = {op: count_flops(ops_peer[op](one, z_peer_one, 1)) for op in OPERATIONS if op in ops_peer}
    results["flops_per_image"] = {"ours": flops_ours, "peer": flops_peer}
    print("forward FLOPs per image (torch.utils.flop_counter; convolutions and matmuls): "
          + ", ".join(f"{op} {flops_ours[op] / 1e6:.1f} MFLOP" for op in operations if op in OPERATIONS))
    if flops_peer:
        print("peer FLOPs per image: " + ", ".join(f"{op} {flops_peer[op] / 1e6:.1f} MFLOP" for op in flops_peer)
              + " (flop_counter does not count the peer's triangular solves)")

    # conv ceiling per batch
    print(f"\nconv ceiling: every convolution of one log-likelihood pass, each timed alone (F.conv2d, "
          f"same shapes, {args.threads} threads), summed")
    print(f"{'batch':>6}{'convs':>7}{'MFLOP/img':>11}{'conv ms':>9}{'GFLOP/s':>9}{'ceiling img/s':>15}")
    ceilings: dict[int, Ceiling] = {}
    for batch in args.batches:
        x = images[:batch].to(args.device)
        calls = record_convs(lambda: model.log_prob(x))
        c = conv_ceiling(calls, batch, args.device, args.conv_min_time, sync)
        ceilings[batch] = c
        print(f"{batch:>6}{c.calls:>7}{c.conv_flops / batch / 1e6:>11.1f}{c.conv_seconds * 1e3:>9.2f}"
              f"{c.gflops:>9.1f}{c.images_per_s:>15.1f}")
    big = reference_conv_gflops(args.device, args.conv_min_time, sync)
    print(f"for scale: one 64->64 3x3 conv, batch 256 at 14x14: {big:.1f} GFLOP/s")
    results["ceiling"] = {b: {**asdict(c), "gflops": c.gflops, "images_per_s": c.images_per_s}
                          for b, c in ceilings.items()}
    results["reference_conv_gflops"] = big

    # throughput
    print(f"\nthroughput (images/s, median of >= {args.min_repeats} calls and {args.min_time:g} s; "
          f"inference_mode; %ceil = achieved GFLOP/s / ceiling GFLOP/s at that batch)")
    header = f"{'operation':<22}{'batch':>6}{'ours img/s':>12}{'ms/call':>9}{'GFLOP/s':>9}{'%ceil':>7}"
    if peer is not None:
        header += f"{'peer img/s':>12}{'%ceil':>7}{'ours/peer':>11}"
    print(header)
    rows = []
    peer_timings: dict[tuple[str, int], Timing] = {}
    for op in operations:
        for batch in args.batches:
            x = images[:batch].to(args.device)
            with torch.inference_mode():
                z = model.encode(x)
                t = measure(ops_ours[op](x, z, batch), min_time=args.min_time, min_repeats=args.min_repeats, sync=sync)
            ceiling = ceilings[batch]
            ours = t.per_second(batch)
            gflops = flops_ours[op] * ours / 1e9
            row: dict[str, Any] = {"operation": op, "batch": batch, "ours_images_per_s": ours,
                                   "ours_ms_per_call": t.median * 1e3, "ours_gflops": gflops,
                                   "ours_fraction_of_ceiling": gflops / ceiling.gflops}
            line = (f"{op:<22}{batch:>6}{ours:>12.1f}{t.median * 1e3:>9.2f}{gflops:>9.1f}"
                    f"{100 * gflops / ceiling.gflops:>6.0f}%")
            peer_op = op.removeprefix("folded-").removeprefix("traced-")
            if peer is not None and peer_op in ops_peer:
                if (peer_op, batch) not in peer_timings:  # each peer figure is measured once, shared by fused rows
                    with torch.inference_mode():
                        zp = peer.encode(x)
                        peer_timings[peer_op, batch] = measure(
                            ops_peer[peer_op](x, zp, batch), min_time=args.min_time, min_repeats=args.min_repeats,
                            sync=sync,
                        )
                tp = peer_timings[peer_op, batch]
                theirs = tp.per_second(batch)
                peer_gflops = flops_peer.get(peer_op, 0) * theirs / 1e9
                row.update({"peer_images_per_s": theirs, "peer_ms_per_call": tp.median * 1e3,
                            "peer_fraction_of_ceiling": peer_gflops / ceiling.gflops, "ratio": ours / theirs})
                line += f"{theirs:>12.1f}{100 * peer_gflops / ceiling.gflops:>6.0f}%{ours / theirs:>10.2f}x"
            print(line)
            rows.append(row)
    results["throughput"] = rows

    # summary against the targets
    def best(key: str, op: str = "log-likelihood") -> tuple[float, int]:
        cands = [(r[key], r["batch"]) for r in rows if r["operation"] == op and key in r]
        return max(cands) if cands else (math.nan, 0)

    by = {(r["operation"], r["batch"]): r for r in rows}
    print("\nsummary")
    if ("log-likelihood", 64) in by:
        print(f"  log-likelihood at batch 64: {100 * by['log-likelihood', 64]['ours_fraction_of_ceiling']:.0f}% "
              f"of the conv ceiling (target >= 50%)"
              + (f"; folded: {100 * by['folded-log-likelihood', 64]['ours_fraction_of_ceiling']:.0f}%"
                 if ("folded-log-likelihood", 64) in by else ""))
    if peer is not None and ("log-likelihood", 1) in by:
        print(f"  log-likelihood at batch 1: {by['log-likelihood', 1]['ratio']:.2f}x the peer (target >= 3x)"
              + (f"; folded (model/inference.py): {by['folded-log-likelihood', 1]['ratio']:.2f}x"
                 if ("folded-log-likelihood", 1) in by else "")
              + (f"; traced (what the service runs): {by['traced-log-likelihood', 1]['ratio']:.2f}x"
                 if ("traced-log-likelihood", 1) in by else ""))
        peak, at = best("peer_images_per_s")
        print(f"  peer's best log-likelihood: {peak:.1f} img/s at batch {at}; the served target at concurrency 64 "
              f"is >= 1.5x that: {1.5 * peak:.0f} req/s (see bench/served.py)")
        results["peer_best_log_likelihood"] = {"images_per_s": peak, "batch": at}
    for op in ("decode", "sample"):
        if (op, max(args.batches)) in by and ("log-likelihood", max(args.batches)) in by:
            costs = [by[op, b]["ours_ms_per_call"] / by["log-likelihood", b]["ours_ms_per_call"]
                     for b in args.batches if (op, b) in by]
            print(f"  {op} cost per image / log-likelihood's: {min(costs):.2f}x .. {max(costs):.2f}x "
                  f"over batches {args.batches} (target <= 1.5x)")

    if args.knobs:
        results["knobs"] = run_knobs(model, images, args.knob_batches, args.knobs, args, sync)
    if not args.no_contention:
        results["contention"] = run_contention(model, images, args.knob_batches, args.switch_intervals, args, sync)
    if args.sweep_threads:
        results["thread_sweep"] = run_thread_sweep(model, peer, images, args.sweep_batches, args.sweep_threads,
                                                   args.sweep_rounds, args, sync)
    if not args.no_allocator and not cuda:
        results["allocator"] = run_allocator(args)

    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
