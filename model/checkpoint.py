"""Checkpoints: weights as ``.safetensors`` plus a JSON sidecar that describes them.

A checkpoint folder holds ``glow.safetensors`` and ``glow.json``:

- the safetensors file holds the model's state dict under ``model.*`` and the
  anomaly-calibration tensors under ``calibration.*``; its metadata repeats the
  architecture config, so the file describes itself;
- the sidecar holds the config, the sha256 of the weights file, the data set and its
  sha256s, the measured bits/dim, and how the weights were trained.

Loading verifies all of it (file present, sha256, config, names, shapes, finite
values, ActNorm initialised) and raises :class:`CheckpointError` with one line
saying what is wrong. No pickle is ever read: safetensors and JSON only.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model.data import sha256_file
from model.device import exact_float32
from model.glow import Glow, GlowConfig

WEIGHTS_FILE = "glow.safetensors"
FORMAT = "glow-checkpoint/1"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt or does not match its description."""


@dataclass
class Checkpoint:
    """A loaded, verified checkpoint."""

    model: Glow
    meta: dict[str, Any]  # the sidecar, as written at export
    calibration: dict[str, torch.Tensor] = field(default_factory=dict)
    weights_path: Path = Path()


def resolve_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """A checkpoint folder or its ``.safetensors`` file -> (weights file, sidecar)."""
    path = Path(path)
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    return weights, weights.with_suffix(".json")


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _atomic_write(path: Path, write: Any) -> None:
    """Write through a temporary file in the same folder, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; checkpoints are read by other users (containers)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """Atomically write a safetensors file; returns its sha256."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _atomic_write(path, lambda tmp: save_file(cpu, str(tmp), metadata=metadata))
    return sha256_file(path)


def write_json(path: Path, data: dict[str, Any]) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def save_checkpoint(
    model: Glow,
    directory: str | os.PathLike[str],
    meta: dict[str, Any],
    calibration: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Export ``model`` to ``directory``/glow.safetensors + glow.json; returns the weights path.

    ``meta`` is any JSON-serialisable description (data set, metrics, training run);
    the config, parameter count and sha256 are filled in here.
    """
    weights, sidecar = resolve_paths(Path(directory) / WEIGHTS_FILE)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"calibration.{k}": v for k, v in (calibration or {}).items()})
    config = model.config.to_dict()
    sha = save_tensors(weights, tensors, {"format": FORMAT, "config": json.dumps(config, sort_keys=True)})
    write_json(
        sidecar,
        {
            **meta,
            "format": FORMAT,
            "weights_file": weights.name,
            "weights_sha256": sha,
            "config": config,
            "image_shape": list(model.config.image_shape),
            "n_bits": model.config.n_bits,
            "parameters": parameter_count(model),
        },
    )
    return weights


def _refuse_non_finite(constant: str) -> float:
    """``json.loads``' hook for NaN and +-Infinity, which JSON does not have: a sidecar holding one is corrupt."""
    raise ValueError(f"{constant} is not a JSON number")


def read_sidecar(sidecar: Path) -> dict[str, Any]:
    if not sidecar.is_file():
        raise CheckpointError(f"{sidecar}: checkpoint sidecar not found")
    try:
        meta = json.loads(sidecar.read_text(), parse_constant=_refuse_non_finite)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: JSON, digits, NaN
        raise CheckpointError(f"{sidecar}: unreadable checkpoint sidecar: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{sidecar}: not a {FORMAT} sidecar")
    for key in ("weights_sha256", "config"):
        if key not in meta:
            raise CheckpointError(f"{sidecar}: sidecar lacks {key!r}")
    return meta


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file, or CheckpointError."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors file: {exc}") from None
    return tensors, metadata


def load_checkpoint(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> Checkpoint:
    """Load and verify a checkpoint folder (or its .safetensors file) onto ``device``, in eval mode."""
    weights, sidecar = resolve_paths(path)
    if not weights.is_file():
        raise CheckpointError(f"{weights}: weights file not found")
    meta = read_sidecar(sidecar)
    sha = sha256_file(weights)
    if sha != meta["weights_sha256"]:
        raise CheckpointError(
            f"{weights}: sha256 {sha[:12]}... does not match the sidecar's {str(meta['weights_sha256'])[:12]}...:"
            " the weights file was modified or corrupted"
        )
    tensors, metadata = read_tensors(weights)
    try:
        config = GlowConfig.from_dict(dict(meta["config"]))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{sidecar}: invalid config: {exc}") from None
    try:  # compared as configs, so fields added since with their defaults compare equal
        matches = GlowConfig.from_dict(json.loads(metadata.get("config", "null"))) == config
    except (TypeError, ValueError, AttributeError):
        matches = False
    if not matches:
        raise CheckpointError(f"{weights}: config in the weights file does not match the sidecar's")

    model = Glow(config)
    state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{weights}: tensors do not match the config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{weights}: {name} has shape {tuple(tensor.shape)}, the config needs {tuple(expected[name].shape)}"
            )
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{weights}: {name} holds NaN or infinite values")
    model.load_state_dict(state)
    if not model.is_initialized:
        raise CheckpointError(f"{weights}: ActNorm layers were never initialised: not a trained checkpoint")
    calibration = {k.removeprefix("calibration."): v for k, v in tensors.items() if k.startswith("calibration.")}
    for name, tensor in calibration.items():
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{weights}: calibration.{name} holds NaN or infinite values")
    model.to(device).eval()
    exact_float32(torch.device(device))
    return Checkpoint(model=model, meta=meta, calibration=calibration, weights_path=weights)
