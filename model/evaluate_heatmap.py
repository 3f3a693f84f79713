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
maps (a grid of :class:`model.heatmap.MapMethod`: level weights, mean filter, log,
Gaussian smoothing, image-mean subtraction; ``model.heatmap`` ships the winner as
``SHIPPED``), the second reports. Calibration comes from the checkpoint's validation
split, as ``python -m model.heatmap`` computes it; the latents from the folded model,
the form the service runs.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from model.anomaly import AnomalyScorer
from model.calibrate import held_out_images
from model.checkpoint import load_checkpoint
from model.data import load_images
from model.heatmap import SHIPPED, VERSION_1, HeatmapCalibration, MapMethod, calibrate_from_latents

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


CANDIDATES = [
    MapMethod(level_ratio=ratio, pool=pool, log=log, sigma=sigma, image_mean_weight=a)
    for ratio in (1.0, 2.0, 4.0)
    for pool in (1, 3)
    for log in (False, True)
    for sigma in (0.0, 1.0, 2.0, 3.0, 4.0)
    for a in (0.0, 0.5, 0.8)
]
SHOWN = 10  # candidates printed, best first (and version 1, the earlier map)


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
    model = checkpoint.model.eval().fold()  # as served (service.runner); the same latents to float precision
    size = (model.config.image_shape[1], model.config.image_shape[2])
    val = held_out_images(checkpoint.meta["dataset"], args.train)
    val_latents = latents_of(model, torch.as_tensor(val))
    calibration = calibrate_from_latents(val_latents, size)
    scorer = AnomalyScorer(checkpoint.model, checkpoint.calibration)
    test, digits = load_images(args.test), load_images(args.digits)
    rng = np.random.default_rng(args.seed)

    halves: dict[str, list[tuple[str, PatchedSet]]] = {"choice": [], "report": []}
    for kind in KINDS:
        for sets in halves.values():
            base = test[rng.choice(len(test), args.per_kind, replace=False)]
            sets.append((kind, paste_patches(base, kind, digits, rng)))

    print(f"# choice half ({args.per_kind} images per kind): pixel AUROC of {len(CANDIDATES)} candidates, best {SHOWN}")
    print("| candidate | " + " | ".join(KINDS) + " | mean |\n" + "|---" * (len(KINDS) + 2) + "|")
    choice = [(s.masks, latents_of(model, s.images)) for _, s in halves["choice"]]
    table: dict[MapMethod, list[float]] = {}
    for candidate in CANDIDATES:
        maps = HeatmapCalibration(calibration.mean, calibration.std, 1.0, candidate)
        table[candidate] = [auroc(masks, maps.maps(lat, size).numpy()) for masks, lat in choice]
    ranked = sorted(table, key=lambda c: -float(np.mean(table[c])))
    for candidate in ranked[:SHOWN] + [VERSION_1]:
        values = table[candidate]
        print(f"| {candidate.describe().split(';')[0]} | " + " | ".join(f"{v:.4f}" for v in values)
              + f" | {np.mean(values):.4f} |")
    print(f"\nchosen: {ranked[0]}\nshipped (model.heatmap.SHIPPED): {SHIPPED}")

    print(f"\n# report half ({args.per_kind} images per kind), shipped heatmap, calibrated as served")
    print("| patch | pixel AUROC | pixel AUROC, changed pixels | image AUROC, anomaly_score | image AUROC, map max"
          " | pixel AUROC, version 1 |")
    print("|---|---|---|---|---|---|")
    version_1 = HeatmapCalibration(calibration.mean, calibration.std, 1.0, VERSION_1)
    for kind, s in halves["report"]:
        latents = latents_of(model, s.images)
        heat = calibration.maps(latents, size).numpy()
        keep = ~s.masks | s.changed
        clean = calibration.maps(latents_of(model, s.originals), size).numpy()
        scores = [scorer.score(x).anomaly_score.numpy() for x in (s.originals, s.images)]
        labels = np.r_[np.zeros(len(s.images)), np.ones(len(s.images))]
        maxima = np.r_[clean.reshape(len(clean), -1).max(1), heat.reshape(len(heat), -1).max(1)]
        print(f"| {kind} | {auroc(s.masks, heat):.4f} | {auroc(s.masks[keep], heat[keep]):.4f}"
              f" | {auroc(labels, np.concatenate(scores)):.4f} | {auroc(labels, maxima):.4f}"
              f" | {auroc(s.masks, version_1.maps(latents, size).numpy()):.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
