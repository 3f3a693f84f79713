"""Exactness knobs: speed against accuracy for each way of running the same model.

Each knob (inference_mode, channels_last, the folded form of ``model/inference.py``,
TorchScript, torch.compile, float64; on CUDA TF32 and bf16) is timed on log-likelihood
beside the plain fp32 path under ``no_grad``, with the max relative deviation of its
log-likelihoods from that path and whether decode(encode(x)) gives back x pixel for pixel.
The bar is 1e-4 and exact; float64 shows fp32's own error.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from bench.models import folded_model, max_relative_deviation, traced_model
from bench.timing import measure
from model.glow import Glow


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
        # dynamo's warnings about recompiling the eager model (and running eagerly past its recompile
        # limit) are long: keep them out of the table
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
