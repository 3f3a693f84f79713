"""How well heatmaps find where an image is anomalous: ``python -m model.evaluate_heatmap``.

Localized anomalies are made from in-distribution test images by pasting a square patch
(side 7 to 11 pixels) at a random place, of one of four kinds:

- ``digit``: a crop of an MNIST digit (strokes and their black background);
- ``noise``: uniform random pixels;
- ``white``: a white square;
- ``garment``: a crop of another test image, turned upside down.

The patch's pixels are the ground truth. Pixel-level AUROC (the metric anomalib
reports: every pixel of every image of a kind pooled) is given over the whole patch
and over the patch pixels the paste changed (a black digit background pasted onto black
background changes nothing a detector could see; unchanged patch pixels are then left
out). Image-level AUROC compares the patched images with the same images unpatched,
by the service's ``anomaly_score`` and by the map's maximum.

The generated set has two halves from one seed: the first chooses among candidate
maps (the energy or its log, clamped at 0 or signed, equal or coarse-heavy level
weights: ``model.heatmap`` ships the winner), the second reports. Calibration comes
from the checkpoint's validation split, as ``python -m model.heatmap`` computes it.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from model.anomaly import AnomalyScorer
from model.checkpoint import load_checkpoint
from model.data import load_images, split_validation
from model.heatmap import calibrate_from_latents, energies, level_weights

KINDS = ("digit", "noise", "white", "garment")
PATCH_SIDES = (7, 11)  # inclusive range of a patch's side, pixels


@dataclass(frozen=True)
class PatchedSet:
    """Images with one pasted patch each, the patch masks, and the images before pasting."""

    images: Tensor  # (N, C, H, W) uint8
    masks: np.ndarray  # (N, H, W) bool: the patch's pixels
    changed: np.ndarray  # (N, H, W) bool: pixels the paste changed
    originals: Tensor  # (N, C, H, W) uint8


def paste_patches(base: np.ndarray, kind: str, digits: np.ndarray, rng: np.random.Generator) -> PatchedSet:
    """One patch of ``kind`` pasted at a random place into each image of ``base`` (N, C, H, W) uint8."""
    images, masks = base.copy(), np.zeros((len(base), *base.shape[2:]), dtype=bool)
    height, width = base.shape[2:]
    for index in range(len(base)):
        side = int(rng.integers(PATCH_SIDES[0], PATCH_SIDES[1] + 1))
        top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
        if kind == "digit":  # from the digit's middle (4 pixels in from each side), where its strokes are
            digit = digits[rng.integers(len(digits))][0]
            row, col = (int(v) for v in rng.integers(4, digit.shape[0] - 4 - side + 1, 2))
            patch = digit[row : row + side, col : col + side]
        elif kind == "noise":
            patch = rng.integers(0, 256, (side, side))
        elif kind == "white":
            patch = np.full((side, side), 255)
        elif kind == "garment":
            other = base[rng.integers(len(base))][0]
            row, col = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
            patch = other[row : row + side, col : col + side][::-1, ::-1]
        else:
            raise ValueError(f"unknown patch kind {kind!r}; known: {KINDS}")
        images[index, :, top : top + side, left : left + side] = patch
        masks[index, top : top + side, left : left + side] = True
    changed = (images != base).any(1)
    return PatchedSet(torch.from_numpy(images), masks, changed, torch.from_numpy(base))


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score  # evaluation-time only

    return float(roc_auc_score(labels.ravel(), scores.ravel()))


@dataclass(frozen=True)
class Candidate:
    """A heatmap variant: the energy or its log, clamped at 0 or signed, level weights."""

    log: bool
    clamp: bool
    coarse_heavy: bool

    @property
    def name(self) -> str:
        return (f"{'log energy' if self.log else 'energy'}, {'clamped' if self.clamp else 'signed'},"
                f" {'2^(l-L)' if self.coarse_heavy else 'equal'} weights")

    def maps(self, latents: list[Tensor], fit: list[Tensor], size: tuple[int, int]) -> Tensor:
        """(B, H, W) maps of ``latents``, standardised against the energies ``fit`` of calibration images."""
        weights = level_weights(len(latents)) if self.coarse_heavy else [1.0] * len(latents)
        heat = torch.zeros(latents[0].shape[0], *size, dtype=torch.float64)
        for weight, energy, reference in zip(weights, energies(latents), fit):
            if self.log:
                energy, reference = energy.clamp(min=1e-12).log(), reference.clamp(min=1e-12).log()
            z = (energy - reference.mean(0)) / reference.std(0)
            z = z.clamp(min=0) if self.clamp else z
            heat += weight * F.interpolate(z[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        return heat


SHIPPED = Candidate(log=False, clamp=True, coarse_heavy=True)
CANDIDATES = [Candidate(log, clamp, heavy) for log in (False, True) for clamp in (True, False) for heavy in (True, False)]


@torch.no_grad()
def latents_of(model: torch.nn.Module, images: Tensor, batch_size: int = 250) -> list[Tensor]:
    parts = [model.log_prob_and_levels(images[i : i + batch_size])[1] for i in range(0, len(images), batch_size)]
    return [torch.cat(level).double() for level in zip(*parts)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.evaluate_heatmap", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, default=Path("weights/fashion-mnist"), help="checkpoint folder")
    p.add_argument("--train", type=Path, default=Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"),
                   help="the checkpoint's training images (its validation split calibrates)")
    p.add_argument("--test", type=Path, default=Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"),
                   help="in-distribution images to paste patches into")
    p.add_argument("--digits", type=Path, default=Path("../shared/data/mnist/t10k-images-idx3-ubyte.gz"),
                   help="images of digits for the digit patches")
    p.add_argument("--per-kind", type=int, default=250, help="patched images per kind and half")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    checkpoint = load_checkpoint(args.weights)
    model = checkpoint.model
    size = (model.config.image_shape[1], model.config.image_shape[2])
    _, val = split_validation(load_images(args.train), int(checkpoint.meta["dataset"]["val_count"]))
    val_latents = latents_of(model, torch.as_tensor(val))
    fit = energies([eps[: len(val) // 2] for eps in val_latents])
    calibration = calibrate_from_latents(val_latents, size)
    scorer = AnomalyScorer(model, checkpoint.calibration)
    test, digits = load_images(args.test), load_images(args.digits)
    rng = np.random.default_rng(args.seed)

    halves: dict[str, list[tuple[str, PatchedSet]]] = {"choice": [], "report": []}
    for kind in KINDS:
        for half in halves:
            base = test[rng.choice(len(test), args.per_kind, replace=False)]
            halves[half].append((kind, paste_patches(base, kind, digits, rng)))

    print(f"# choice half ({args.per_kind} images per kind): pixel AUROC of each candidate")
    print("| candidate | " + " | ".join(KINDS) + " | mean |\n" + "|---" * (len(KINDS) + 2) + "|")
    means: dict[Candidate, float] = {}
    choice = [(kind, s, latents_of(model, s.images)) for kind, s in halves["choice"]]
    for candidate in CANDIDATES:
        values = [auroc(s.masks, candidate.maps(lat, fit, size).numpy()) for _, s, lat in choice]
        means[candidate] = float(np.mean(values))
        print(f"| {candidate.name} | " + " | ".join(f"{v:.4f}" for v in values) + f" | {means[candidate]:.4f} |")
    print(f"\nchosen: {max(means, key=means.__getitem__).name}; shipped (model.heatmap): {SHIPPED.name}")

    print(f"\n# report half ({args.per_kind} images per kind), shipped heatmap, calibrated as served")
    print("| patch | pixel AUROC | pixel AUROC, changed pixels | image AUROC, anomaly_score | image AUROC, map max |")
    print("|---|---|---|---|---|")
    for kind, s in halves["report"]:
        heat = calibration.maps(latents_of(model, s.images), size).numpy()
        keep = ~s.masks | s.changed
        clean = calibration.maps(latents_of(model, s.originals), size).numpy()
        scores = [scorer.score(x).anomaly_score.numpy() for x in (s.originals, s.images)]
        labels = np.r_[np.zeros(len(s.images)), np.ones(len(s.images))]
        maxima = np.r_[clean.reshape(len(clean), -1).max(1), heat.reshape(len(heat), -1).max(1)]
        print(f"| {kind} | {auroc(s.masks, heat):.4f} | {auroc(s.masks[keep], heat[keep]):.4f}"
              f" | {auroc(labels, np.concatenate(scores)):.4f} | {auroc(labels, maxima):.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
