"""Which torch device a command runs on: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.

On CUDA, :func:`exact_float32` turns TF32 off for serving and evaluation: TF32 rounds
the inputs of convolutions and matrix products to a 10-bit mantissa on Ampere and
newer GPUs, while the calibration and the ``decode(encode(x)) == x`` guarantee are
measured in full float32.
"""

from __future__ import annotations

import re

import torch

DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d{1,3})?")


class DeviceUnavailable(RuntimeError):
    """The requested device is not present on this machine."""


def check_device_name(name: str) -> str:
    """``name`` if it reads ``auto``, ``cpu``, ``cuda`` or ``cuda:N``, else ValueError."""
    if not DEVICE_NAME.fullmatch(name):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return name


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else the CPU; a CUDA device this machine lacks -> DeviceUnavailable."""
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceUnavailable(
                f"--device {name}: CUDA is not available on this machine (use --device auto or cpu)"
            )
        device = torch.device(name)
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceUnavailable(
                f"--device {name}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}"
            )
        return device
    return torch.device(name)


def exact_float32(device: torch.device) -> None:
    """On CUDA, full float32 for convolutions and matrix products (TF32 off); nothing on the CPU."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
