"""Anomaly heatmaps: where in an image a Glow finds it atypical, from the pass that scores it.

Every level l of a multi-scale Glow ends in a latent eps_l of shape (C_l, H_l, W_l),
H_l = H / 2^l, standard normal under the model. Its energy at a position,

    e_l(i, j) = sum_c eps_l(c, i, j)^2,

is the part of -log p the prior charges there (up to the log-dets); under the model it
is chi-square with C_l degrees of freedom, but a trained flow leaves it uneven over the
grid (backgrounds cost less than edges). So each position is standardised against
held-out in-distribution images (calibration: the first half of the checkpoint's
validation split, as for ``model.anomaly``):

    z_l(i, j) = max(0, (e_l(i, j) - mean_l(i, j)) / std_l(i, j))

(only more energy than typical marks a place). The map (:class:`MapMethod`, version 2):

    m      = sum_l w_l * up(z_l),                w_l = 2^(l - L)
    heat   = max(0, G_sigma * m - a * mean(m)),  sigma = 4 px, a = 0.8

up() bilinear interpolation to the image grid (each coarser level counts double: its
positions see more of the image), G_sigma a Gaussian filter (zero padding,
renormalised at the borders) and mean(m) the map's own average over the image: a
place counts by how much it stands out of the rest of its image. :class:`MapMethod`
also offers a mean filter P on each level's grid and log(1 + P z_l) in place of z_l
(not shipped: no better on the choice half). Higher = more anomalous there; 0 =
nothing unusual. The latents come from the same pass that computes the likelihood
(:class:`LatentTap`), so a map costs a few tensor operations on the image grid.

Chosen by ``python -m model.evaluate_heatmap`` on Fashion-MNIST images with pasted
patches (half of the generated set chooses, the other half reports; README,
"Heatmaps") among 180 combinations of level weights (2^ or 4^(l-L), or equal), the
3x3 mean filter or none, log(1 + z) or z, sigma (0-4 px) and a (0, 0.5, 0.8); the
best ten lie within 0.003 of each other in mean pixel AUROC. Version 1 (w_l
= 2^(l-L), no filter, no log, no smoothing, a = 0) is still read from older sidecars.
Measured on the choice half and not kept: per-position per-channel standardisation
of eps and a per-position Mahalanobis energy (full C_l x C_l covariance), raw (0.79
mean pixel AUROC against 0.83 for the energy) or z-scored per position (no better
than the energy); max- instead of mean-filtering; a difference of Gaussians (surround
sigma 3-8 px) in place of the image mean. How far these latents go: a logistic
regression over 25 per-pixel features of them, fitted on the choice half, reached
0.835 (garment crops) to 0.922 (white squares) on the report half; not shipped, as
it learns the four patch kinds. Earlier, on an exploratory draw: the
per-position nats including each coupling's and prior's log-scale (needs the layers'
internals, hence the eager model, several times the served pass), a conditional
z-score of each position given the others (Ledoit-Wolf precision of the maps), and
|d(-log p)/dx| (a backward pass; it marks every edge, pixel AUROC 0.14-0.56).

The calibration is JSON (a few hundred numbers and the method's five parameters) kept
in the checkpoint's sidecar under ``"heatmap"``; ``python -m model.heatmap --weights
DIR --train PATH`` computes it.
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

SIDECAR_KEY = "heatmap"
VERSION = 2  # of the sidecar entry; an entry without "version" is version 1
HEAT_CAP = 1e6  # maps of images the model cannot score at all (overflow) are capped, not NaN
OVERLAY_QUANTILE = 0.99  # the overlay's full colour: this quantile of the reference images' map maxima


@dataclass(frozen=True)
class MapMethod:
    """How the per-position z-scores of the levels become one map (the formula in the module docstring)."""

    level_ratio: float  # w_l = level_ratio^(l - L): each coarser level counts level_ratio times the next finer
    pool: int  # side of the mean filter P on each level's grid (odd; 1: none)
    log: bool  # log(1 + P z) instead of P z
    sigma: float  # the Gaussian filter's standard deviation, pixels (0: none)
    image_mean_weight: float  # a: the share of the map's own mean subtracted

    def __post_init__(self) -> None:
        if not (math.isfinite(self.level_ratio) and self.level_ratio > 0):
            raise ValueError(f"level_ratio must be finite and positive, got {self.level_ratio}")
        if self.pool < 1 or self.pool % 2 == 0:
            raise ValueError(f"pool must be an odd number >= 1, got {self.pool}")
        if not (math.isfinite(self.sigma) and 0 <= self.sigma <= 64):
            raise ValueError(f"sigma must be in [0, 64] pixels, got {self.sigma}")
        if not (math.isfinite(self.image_mean_weight) and 0 <= self.image_mean_weight <= 1):
            raise ValueError(f"image_mean_weight must be in [0, 1], got {self.image_mean_weight}")

    def describe(self) -> str:
        level = "log(1 + z)" if self.log else "z"
        if self.pool > 1:
            level = level.replace("z", f"{self.pool}x{self.pool} mean of z")
        text = f"sum over levels l of {self.level_ratio:g}^(l-L) * {level}, bilinearly upsampled"
        if self.sigma:
            text = f"Gaussian (sigma {self.sigma:g} px) of the {text}"
        if self.image_mean_weight:
            text = f"max(0, {text} - {self.image_mean_weight:g} * its image mean)"
        return f"{text}; z = max(0, z-score of the latent energy sum_c eps_l^2 per position)"

    def to_json(self) -> dict[str, Any]:
        return {"level_ratio": self.level_ratio, "pool": self.pool, "log": self.log, "sigma": self.sigma,
                "image_mean_weight": self.image_mean_weight}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MapMethod:
        """The method of a sidecar entry (version 2); KeyError, TypeError or ValueError if malformed."""
        if not isinstance(data["log"], bool) or isinstance(data["pool"], bool) or not isinstance(data["pool"], int):
            raise TypeError("log must be a boolean and pool an integer")
        return cls(float(data["level_ratio"]), data["pool"], data["log"], float(data["sigma"]),
                   float(data["image_mean_weight"]))


VERSION_1 = MapMethod(level_ratio=2.0, pool=1, log=False, sigma=0.0, image_mean_weight=0.0)
SHIPPED = MapMethod(level_ratio=2.0, pool=1, log=False, sigma=4.0, image_mean_weight=0.8)


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


def level_weights(levels: int, ratio: float) -> list[float]:
    """w_l = ratio^(l - L) for l = 1..L: the top level 1, each finer level 1/ratio of the next coarser's."""
    return [ratio ** (index + 1 - levels) for index in range(levels)]


def gaussian_filter(maps: Tensor, sigma: float) -> Tensor:
    """(B, H, W) maps smoothed by a Gaussian of ``sigma`` pixels (radius 3 sigma), zero-padded and
    renormalised by the kernel mass inside the image, so borders are not darkened and any size works."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=maps.dtype)
    kernel = torch.exp(-offsets.square() / (2 * sigma**2))
    kernel = kernel / kernel.sum()

    def separable(x: Tensor) -> Tensor:
        x = F.conv2d(x, kernel.view(1, 1, 1, -1), padding=(0, radius))
        return F.conv2d(x, kernel.view(1, 1, -1, 1), padding=(radius, 0))

    mass = separable(torch.ones(1, 1, *maps.shape[1:], dtype=maps.dtype))
    return (separable(maps[:, None]) / mass)[:, 0]


@dataclass(frozen=True)
class HeatmapCalibration:
    """Per-position energy statistics of each level, the map's method, and the overlay's scale."""

    mean: tuple[Tensor, ...]  # (H_l, W_l) float64 per level
    std: tuple[Tensor, ...]  # (H_l, W_l) float64 per level, > 0
    overlay_max: float  # heat drawn at full colour in overlays
    method: MapMethod = SHIPPED

    def maps(self, latents: list[Tensor], size: tuple[int, int]) -> Tensor:
        """Heatmaps (B, H, W) float64 on the CPU, finite and >= 0, of the images whose eps per level are ``latents``."""
        if len(latents) != len(self.mean):
            raise ValueError(f"the calibration has {len(self.mean)} levels, the latents {len(latents)}")
        method = self.method
        heat = torch.zeros(latents[0].shape[0], *size, dtype=torch.float64)
        weights = level_weights(len(latents), method.level_ratio)
        for weight, energy, mean, std in zip(weights, energies(latents), self.mean, self.std):
            z = torch.nan_to_num((energy - mean) / std, nan=HEAT_CAP, posinf=HEAT_CAP).clamp(0, HEAT_CAP)
            if method.pool > 1:
                z = F.avg_pool2d(z[:, None], method.pool, 1, method.pool // 2, count_include_pad=False)[:, 0]
            z = torch.log1p(z) if method.log else z
            heat += weight * F.interpolate(z[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        surround = method.image_mean_weight * heat.mean((1, 2), keepdim=True)
        if method.sigma:
            heat = gaussian_filter(heat, method.sigma)
        return (heat - surround).clamp(0, HEAT_CAP)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "method": self.method.describe(),
            **self.method.to_json(),
            "energy_mean": [m.tolist() for m in self.mean],
            "energy_std": [s.tolist() for s in self.std],
            "overlay_max": self.overlay_max,
            "reference": "validation split: first half fits the per-position statistics, second half sets"
            f" overlay_max (the {OVERLAY_QUANTILE:.0%} quantile of its maps' maxima)",
        }

    @classmethod
    def from_json(cls, data: Any, latent_shapes: list[tuple[int, int, int]]) -> HeatmapCalibration:
        """The calibration stored in a sidecar, checked against the model's latent shapes; ValueError if unusable.

        An entry without ``"version"`` is version 1 (its method :data:`VERSION_1`)."""
        try:
            version = data.get("version", 1)
            if version not in (1, VERSION):
                raise ValueError(f"unknown heatmap calibration version {version!r} (known: 1, {VERSION})")
            method = VERSION_1 if version == 1 else MapMethod.from_json(data)
            mean = tuple(torch.tensor(m, dtype=torch.float64) for m in data["energy_mean"])
            std = tuple(torch.tensor(s, dtype=torch.float64) for s in data["energy_std"])
            overlay_max = float(data["overlay_max"])
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
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
        return cls(mean, std, overlay_max, method)


@torch.no_grad()
def calibrate(
    model: LevelsForm, images: Tensor, size: tuple[int, int], batch_size: int = 256, method: MapMethod = SHIPPED
) -> HeatmapCalibration:
    """Per-position statistics from the first half of validation images, the overlay scale from the second."""
    if len(images) < 8:
        raise ValueError(f"heatmap calibration needs at least 8 validation images, got {len(images)}")
    parts = [model.log_prob_and_levels(images[i : i + batch_size])[1] for i in range(0, len(images), batch_size)]
    return calibrate_from_latents([torch.cat(level) for level in zip(*parts)], size, method)


def calibrate_from_latents(
    latents: list[Tensor], size: tuple[int, int], method: MapMethod = SHIPPED
) -> HeatmapCalibration:
    """:func:`calibrate` from the eps of every level of the validation images."""
    half = latents[0].shape[0] // 2
    fit = energies([eps[:half] for eps in latents])
    provisional = HeatmapCalibration(
        tuple(e.mean(0) for e in fit), tuple(e.std(0).clamp(min=1e-12) for e in fit), 1.0, method
    )
    maxima = provisional.maps([eps[half:] for eps in latents], size).flatten(1).max(1).values
    overlay_max = max(float(torch.quantile(maxima, OVERLAY_QUANTILE)), 1e-6)
    return HeatmapCalibration(provisional.mean, provisional.std, overlay_max, method)


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
    from model.calibrate import ProvenanceError, held_out_images
    from model.checkpoint import CheckpointError, load_checkpoint, resolve_paths, write_json
    from model.data import DataError

    p = argparse.ArgumentParser(prog="python -m model.heatmap", description=main.__doc__)
    p.add_argument("--weights", type=Path, required=True, help="checkpoint folder")
    p.add_argument("--train", type=Path, default=None, help="the training images the checkpoint was trained on"
                   " (default: where they were at training, for a checkpoint that records its data)")
    p.add_argument("--val-count", type=int, default=None, help="default: the checkpoint's recorded split")
    args = p.parse_args(argv)
    try:
        checkpoint = load_checkpoint(args.weights)
        val = held_out_images(checkpoint.meta["dataset"], args.train, args.val_count)
    except (CheckpointError, DataError, ProvenanceError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    size = checkpoint.model.config.image_shape[1:]
    served = checkpoint.model.eval().fold()  # the form the service runs: the same latents to float precision
    calibration = calibrate(served, torch.as_tensor(val), (size[0], size[1]))
    _, sidecar = resolve_paths(checkpoint.weights_path)
    write_json(sidecar, {**checkpoint.meta, SIDECAR_KEY: calibration.to_json()})
    print(f"heatmap calibration written to {sidecar} (overlay_max {calibration.overlay_max:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
