"""Anomaly heatmaps: where in an image a Glow finds it atypical, from the pass that scores it.

Every level l of a multi-scale Glow ends in a latent eps_l of shape (C_l, H_l, W_l),
H_l = H / 2^l, standard normal under the model. Its energy at a position,

    e_l(i, j) = sum_c eps_l(c, i, j)^2,

is the part of -log p the prior charges there (up to the log-dets); under the model it
is chi-square with C_l degrees of freedom, but a trained flow leaves it uneven over the
grid (backgrounds cost less than edges). So each position is standardised against
held-out in-distribution images (calibration: the first half of the checkpoint's
validation split, as for ``model.anomaly``):

    z_l(i, j) = (e_l(i, j) - mean_l(i, j)) / std_l(i, j),

clamped at 0 (only more energy than typical marks a place), weighted by
w_l = 2^(l - L) (each coarser level counts double: its positions see more of the
image), brought back to the image grid by bilinear interpolation and summed over the
levels. Higher = more anomalous there. The latents come from the same pass that
computes the likelihood (:class:`LatentTap`), so a map costs a few tensor operations.

Chosen by ``python -m model.evaluate_heatmap`` on Fashion-MNIST images with pasted
patches (half of the generated set chooses, the other half reports; README,
"Heatmaps"), among the energy or its log, clamped or signed, and equal or coarse-heavy
level weights. Measured and not kept: the per-position nats including each coupling's
and prior's log-scale (needs the layers' internals, hence the eager model, several
times the served pass), a conditional z-score of each position given the others
(Ledoit-Wolf precision of the maps), and |d(-log p)/dx| (a backward pass; it marks
every edge, pixel AUROC 0.14-0.56).

The calibration is JSON (a few hundred numbers) kept in the checkpoint's sidecar under
``"heatmap"``; ``python -m model.heatmap --weights DIR --train PATH`` computes it.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

METHOD = ("sum over levels l of 2^(l-L) * max(0, z-score of the latent energy sum_c eps_l^2 per position),"
          " bilinearly upsampled to the image grid")
SIDECAR_KEY = "heatmap"
HEAT_CAP = 1e6  # maps of images the model cannot score at all (overflow) are capped, not NaN
OVERLAY_QUANTILE = 0.99  # the overlay's full colour: this quantile of the reference images' map maxima


class LevelsForm(Protocol):
    """What a map needs of a model: its per-level pass (``Glow`` and every ``model.inference`` form)."""

    def log_prob_and_levels(self, x: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]: ...


class LatentTap:
    """An inference form that keeps the latents of its last pass, so a map reuses the scoring pass.

    Hand it to ``model.anomaly.features`` in place of the form it wraps; afterwards
    :attr:`latents` holds that pass's eps of every level (its first rows are the images
    given, with ``orientation=True`` followed by their flips).
    """

    def __init__(self, form: Any) -> None:
        self.form = form
        self.latents: list[Tensor] = []

    def log_prob_and_levels(self, x: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        log_prob, latents, level_logdets = self.form.log_prob_and_levels(x)
        self.latents = latents
        return log_prob, latents, level_logdets

    def __getattr__(self, name: str) -> Any:  # bits_per_dim, config, device, ...: the wrapped form's
        return getattr(self.form, name)


def energies(latents: list[Tensor]) -> list[Tensor]:
    """eps of every level (B, C_l, H_l, W_l) -> energy maps sum_c eps^2 (B, H_l, W_l), float64 on the CPU."""
    return [eps.detach().double().square().sum(1).cpu() for eps in latents]


def level_weights(levels: int) -> list[float]:
    """w_l = 2^(l - L) for l = 1..L: the top level 1, each finer level half the next coarser's."""
    return [2.0 ** (index + 1 - levels) for index in range(levels)]


@dataclass(frozen=True)
class HeatmapCalibration:
    """Per-position energy statistics of each level, and the overlay's scale."""

    mean: tuple[Tensor, ...]  # (H_l, W_l) float64 per level
    std: tuple[Tensor, ...]  # (H_l, W_l) float64 per level, > 0
    overlay_max: float  # heat drawn at full colour in overlays

    def maps(self, latents: list[Tensor], size: tuple[int, int]) -> Tensor:
        """Heatmaps (B, H, W) float64 on the CPU of the images whose eps of every level are ``latents``."""
        if len(latents) != len(self.mean):
            raise ValueError(f"the calibration has {len(self.mean)} levels, the latents {len(latents)}")
        heat = torch.zeros(latents[0].shape[0], *size, dtype=torch.float64)
        for weight, energy, mean, std in zip(level_weights(len(latents)), energies(latents), self.mean, self.std):
            z = ((energy - mean) / std).clamp(min=0)
            heat += weight * F.interpolate(z[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        return torch.nan_to_num(heat, nan=HEAT_CAP, posinf=HEAT_CAP).clamp(max=HEAT_CAP)

    def to_json(self) -> dict[str, Any]:
        return {
            "method": METHOD,
            "energy_mean": [m.tolist() for m in self.mean],
            "energy_std": [s.tolist() for s in self.std],
            "overlay_max": self.overlay_max,
            "reference": "validation split: first half fits the per-position statistics, second half sets"
            f" overlay_max (the {OVERLAY_QUANTILE:.0%} quantile of its maps' maxima)",
        }

    @classmethod
    def from_json(cls, data: Any, latent_shapes: list[tuple[int, int, int]]) -> HeatmapCalibration:
        """The calibration stored in a sidecar, checked against the model's latent shapes; ValueError if unusable."""
        try:
            mean = tuple(torch.tensor(m, dtype=torch.float64) for m in data["energy_mean"])
            std = tuple(torch.tensor(s, dtype=torch.float64) for s in data["energy_std"])
            overlay_max = float(data["overlay_max"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed heatmap calibration: {exc!r}") from None
        grids = [tuple(shape[1:]) for shape in latent_shapes]
        if [tuple(m.shape) for m in mean] != grids or [tuple(s.shape) for s in std] != grids:
            raise ValueError(f"heatmap calibration grids do not match the model's latent grids {grids}")
        if not all(torch.isfinite(m).all() for m in mean):
            raise ValueError("heatmap calibration energy_mean holds NaN or infinite values")
        if not all((torch.isfinite(s) & (s > 0)).all() for s in std):
            raise ValueError("heatmap calibration energy_std must be finite and positive")
        if not (math.isfinite(overlay_max) and overlay_max > 0):
            raise ValueError("heatmap calibration overlay_max must be finite and positive")
        return cls(mean, std, overlay_max)


@torch.no_grad()
def calibrate(model: LevelsForm, images: Tensor, size: tuple[int, int], batch_size: int = 256) -> HeatmapCalibration:
    """Per-position statistics from the first half of validation images, the overlay scale from the second."""
    if len(images) < 8:
        raise ValueError(f"heatmap calibration needs at least 8 validation images, got {len(images)}")
    parts = [model.log_prob_and_levels(images[i : i + batch_size])[1] for i in range(0, len(images), batch_size)]
    return calibrate_from_latents([torch.cat(level) for level in zip(*parts)], size)


def calibrate_from_latents(latents: list[Tensor], size: tuple[int, int]) -> HeatmapCalibration:
    """:func:`calibrate` from the eps of every level of the validation images."""
    half = latents[0].shape[0] // 2
    fit = energies([eps[:half] for eps in latents])
    provisional = HeatmapCalibration(tuple(e.mean(0) for e in fit), tuple(e.std(0).clamp(min=1e-12) for e in fit), 1.0)
    maxima = provisional.maps([eps[half:] for eps in latents], size).flatten(1).max(1).values
    overlay_max = max(float(torch.quantile(maxima, OVERLAY_QUANTILE)), 1e-6)
    return HeatmapCalibration(provisional.mean, provisional.std, overlay_max)


def overlay(pixels: np.ndarray, heat: np.ndarray, overlay_max: float) -> np.ndarray:
    """An image (C, H, W) uint8 and its map (H, W) -> RGB (3, H, W) uint8: grey image, heat in red.

    The red's opacity is heat / overlay_max, clipped to [0, 0.8]: 0 leaves the image as it
    is, overlay_max and beyond paint it mostly red.
    """
    grey = pixels.astype(np.float64).mean(0) if pixels.shape[0] != 3 else pixels.astype(np.float64).transpose(1, 2, 0)
    rgb = np.repeat(grey[..., None], 3, axis=2) if grey.ndim == 2 else grey
    alpha = np.clip(np.nan_to_num(heat / overlay_max, nan=1.0), 0.0, 1.0)[..., None] * 0.8
    red = np.array([255.0, 32.0, 0.0])
    return np.clip(np.rint((1 - alpha) * rgb + alpha * red), 0, 255).astype(np.uint8).transpose(2, 0, 1)


def main(argv: list[str] | None = None) -> int:
    """``python -m model.heatmap --weights DIR --train PATH``: write the sidecar's heatmap calibration."""
    from model.calibrate import ProvenanceError, held_out_indices
    from model.checkpoint import CheckpointError, load_checkpoint, resolve_paths, write_json
    from model.data import DataError, load_dataset, reopen

    p = argparse.ArgumentParser(prog="python -m model.heatmap", description=main.__doc__)
    p.add_argument("--weights", type=Path, required=True, help="checkpoint folder")
    p.add_argument("--train", type=Path, required=True, help="the training images the checkpoint was trained on")
    p.add_argument("--val-count", type=int, default=None, help="default: the checkpoint's recorded split")
    args = p.parse_args(argv)
    try:
        checkpoint = load_checkpoint(args.weights)
        record = checkpoint.meta["dataset"].get("data")
        data = reopen(record, args.train)[0] if record else load_dataset(args.train)  # read as at training
        held_out = held_out_indices(checkpoint.meta["dataset"], args.train, len(data.images))
        val = data.images[held_out[-args.val_count:] if args.val_count else held_out]
    except (CheckpointError, DataError, ProvenanceError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    size = checkpoint.model.config.image_shape[1:]
    calibration = calibrate(checkpoint.model, torch.as_tensor(val), (size[0], size[1]))
    _, sidecar = resolve_paths(checkpoint.weights_path)
    write_json(sidecar, {**checkpoint.meta, SIDECAR_KEY: calibration.to_json()})
    print(f"heatmap calibration written to {sidecar} (overlay_max {calibration.overlay_max:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
