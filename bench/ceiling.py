"""The conv ceiling: what the model would run at if everything but its convolutions were free.

Every convolution of one log-likelihood pass is recorded with a dispatch mode (3x3 and 1x1
hidden convs, zero-convs, invertible 1x1s, priors), each is timed alone with ``F.conv2d``
on its exact shape and memory layout, and the times are summed. FLOPs count 2 x
multiply-adds, as ``torch.utils.flop_counter`` does.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from bench.timing import Timing, measure


def count_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        fn()
    return int(counter.get_total_flops())


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
