"""Which torch device a command runs on: ``auto`` (CUDA when present), ``cpu`` or ``cuda[:N]``."""

from __future__ import annotations

import torch


class DeviceUnavailable(RuntimeError):
    """The requested device is not present on this machine."""


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else the CPU; ``cuda`` without CUDA -> DeviceUnavailable."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceUnavailable(f"--device {name}: CUDA is not available on this machine (use --device auto or cpu)")
    return torch.device(name)
