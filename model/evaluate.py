"""Evaluation: bits/dim of a model on a set of images, and out-of-distribution detection.

``python -m model.evaluate --weights DIR --in-dist TEST --ood NAME=PATH ...`` prints, for
each OOD set, AUROC, AUPR and FPR at 95% TPR of raw bits/dim, of the anomaly score and of
the score with the optional orientation detector (when the checkpoint's calibration has
it), and the false-positive rate the calibrated threshold gives on the in-distribution set.
Every set is brought to the checkpoint's images: its channels converted (grey -> RGB by
repetition, RGB -> grey by luma) and, when its size differs, fitted by ``--fit`` (default
``resize``, what the service's ``resize=true`` does), as :func:`model.data.load_dataset` does.

Bits/dim, both ways papers and the API use them:

- dequantised: mean of (-log p(x + u) + D log 2^n) / (D log 2), u ~ U[0, 2^-n)^D, one
  draw per image from a seeded generator (the figure papers report: a code length bound);
- bin centre: the deterministic score ``/log-likelihood`` returns (u = 1/2).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from model.anomaly import AnomalyScorer, reference_key, rows_for
from model.checkpoint import CheckpointError, load_checkpoint
from model.data import FITS, DataError, load_dataset
from model.glow import Glow


@dataclass(frozen=True)
class BitsPerDim:
    dequantized: float  # mean over the images, uniform noise drawn with ``seed``
    bin_centre: float  # mean over the images, deterministic
    seed: int
    images: int


def _labels_of(labels: np.ndarray | torch.Tensor | None, start: int, size: int, model: Glow) -> torch.Tensor | None:
    return None if labels is None else torch.as_tensor(labels)[start : start + size].to(model.device)


@torch.no_grad()
def score_bin_centre(model: Glow, images: np.ndarray | torch.Tensor, batch_size: int = 256,
                     labels: np.ndarray | torch.Tensor | None = None) -> torch.Tensor:
    """Bits/dim of every image (uint8 (N, C, H, W)) at its bin centres, on the CPU as float64; with ``labels``
    (a class-conditional model) of p(x | label) instead of p(x)."""
    data = torch.as_tensor(images)
    out = [
        model.bits_per_dim(model.log_prob(data[i : i + batch_size].to(model.device), None,
                                          _labels_of(labels, i, batch_size, model))).double().cpu()
        for i in range(0, len(data), batch_size)
    ]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.float64)


@torch.no_grad()
def bits_per_dim(model: Glow, images: np.ndarray | torch.Tensor, batch_size: int = 256, seed: int = 0,
                 labels: np.ndarray | torch.Tensor | None = None) -> BitsPerDim:
    """Mean dequantised and bin-centre bits/dim of ``model`` (in eval mode) over ``images``; with ``labels``
    (a class-conditional model) of p(x | label) instead of p(x)."""
    data = torch.as_tensor(images)
    generator = torch.Generator().manual_seed(seed)
    noisy = []
    for i in range(0, len(data), batch_size):
        batch = data[i : i + batch_size]
        noise = torch.rand(batch.shape, generator=generator, dtype=model.dtype)
        log_prob = model.log_prob(batch.to(model.device), noise.to(model.device), _labels_of(labels, i, batch_size, model))
        noisy.append(model.bits_per_dim(log_prob).double().cpu())
    centre = score_bin_centre(model, data, batch_size, labels)
    return BitsPerDim(
        dequantized=float(torch.cat(noisy).mean()),
        bin_centre=float(centre.mean()),
        seed=seed,
        images=len(data),
    )


@torch.no_grad()
def classification_accuracy(model: Glow, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
                            batch_size: int = 256) -> float:
    """Share of images whose most probable class under a class-conditional model, argmax_k p(k | x) at the bin
    centres (``model.class_prior``), is their label."""
    data, truth = torch.as_tensor(images), torch.as_tensor(labels)
    correct = 0
    for i in range(0, len(data), batch_size):
        _, latents, _ = model.log_prob_and_levels(data[i : i + batch_size].to(model.device))
        predicted = model.class_log_posterior(latents[-1]).argmax(1).cpu()
        correct += int((predicted == truth[i : i + batch_size]).sum())
    return correct / max(1, len(data))


# ------------------------------------------------------------------ OOD evaluation
SYNTHETIC = ("uniform", "gaussian", "constant", "flipped", "rotated", "mirrored",
             "inverted", "binary", "blobs", "stripes")
"""Noise, constant images, and the in-distribution images upside down, turned 90 degrees (square images
only) and mirrored left-right. Mirrored is a control, not an outlier set, where the training images come
both ways (Fashion-MNIST's clothes do, its shoes face one way): a score should not flag much of it.
The last four (:data:`HELD_OUT`) were added after the anomaly score's rows and weights were chosen, so
they measure it on sets it was not tuned to: the in-distribution images in negative, salt-and-pepper noise
(each pixel 0 or 255), smooth random blobs (uniform noise on a grid a quarter the size, upsampled
bilinearly) and sinusoidal gratings of random orientation, frequency and phase."""
HELD_OUT = ("inverted", "binary", "blobs", "stripes")


def _blobs(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Uniform noise on a grid a quarter of the image's size, upsampled bilinearly: smooth random shapes."""
    count, channels, height, width = shape
    coarse = rng.integers(0, 256, (count, channels, max(1, height // 4), max(1, width // 4)), dtype=np.uint8)
    return np.stack([np.stack([np.asarray(Image.fromarray(plane).resize((width, height), Image.BILINEAR))
                               for plane in image]) for image in coarse])


def _stripes(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Sinusoidal gratings: 127.5 (1 + sin(f (x cos a + y sin a) + p)), random a, f and p per image."""
    count, channels, height, width = shape
    y, x = np.mgrid[0:height, 0:width]
    angle, phase = rng.uniform(0, np.pi, count), rng.uniform(0, 2 * np.pi, count)
    frequency = rng.uniform(0.3, 1.5, count)
    waves = np.sin(frequency[:, None, None] * (x * np.cos(angle)[:, None, None] + y * np.sin(angle)[:, None, None])
                   + phase[:, None, None])
    grey = np.round(127.5 * (1 + waves)).astype(np.uint8)
    return np.broadcast_to(grey[:, None], shape).copy()


def synthetic_set(name: str, reference: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """uint8 images shaped like ``reference`` (N, C, H, W): noise, constants, or transforms of the reference."""
    rng = np.random.default_rng(seed)
    shape = (count, *reference.shape[1:])
    if name == "uniform":
        return rng.integers(0, 256, shape, dtype=np.uint8)
    if name == "gaussian":
        return np.clip(rng.normal(127.5, 64.0, shape), 0, 255).round().astype(np.uint8)
    if name == "constant":
        return np.broadcast_to(rng.integers(0, 256, (count, 1, 1, 1), dtype=np.uint8), shape).copy()
    if name == "flipped":
        return np.ascontiguousarray(reference[:count, :, ::-1, :])
    if name == "mirrored":
        return np.ascontiguousarray(reference[:count, :, :, ::-1])
    if name == "inverted":
        return np.ascontiguousarray(255 - reference[:count])
    if name == "binary":
        return (rng.integers(0, 2, shape, dtype=np.uint8) * 255).astype(np.uint8)
    if name == "blobs":
        return _blobs(rng, shape)
    if name == "stripes":
        return _stripes(rng, shape)
    if name == "rotated":
        if reference.shape[2] != reference.shape[3]:
            raise ValueError(f"rotated: needs square images, got {reference.shape[2]}x{reference.shape[3]}")
        return np.ascontiguousarray(np.rot90(reference[:count], 1, axes=(2, 3)))
    raise ValueError(f"unknown synthetic set {name!r}; choose from {SYNTHETIC}")


@dataclass(frozen=True)
class Detection:
    auroc: float
    aupr: float  # OOD as the positive class
    fpr_at_95_tpr: float


def detection(in_scores: np.ndarray, out_scores: np.ndarray) -> Detection:
    """How well higher scores single out the OOD images."""
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    labels = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
    scores = np.r_[in_scores, out_scores]
    fpr, tpr, _ = roc_curve(labels, scores)
    return Detection(
        auroc=float(roc_auc_score(labels, scores)),
        aupr=float(average_precision_score(labels, scores)),
        fpr_at_95_tpr=float(fpr[np.searchsorted(tpr, 0.95)]),
    )


@dataclass(frozen=True)
class ImageScores:
    """Per image: raw bits/dim, then (anomaly score, is_anomaly) for each scorer given to :func:`score_images`."""

    bits_per_dim: np.ndarray
    scores: list[tuple[np.ndarray, np.ndarray]]


def score_images(scorers: list[AnomalyScorer], images: np.ndarray, batch_size: int) -> ImageScores:
    """Every image under each scorer, from one pass (scorers of one model and inference form; the last one's
    features, which must hold what every scorer needs); each image's score is independent of its batch."""
    data = torch.as_tensor(images)
    bits, scores = [], [([], []) for _ in scorers]
    for i in range(0, len(data), batch_size):
        f = scorers[-1].features(data[i : i + batch_size].to(scorers[-1].model.device))
        bits.append(f.bits_per_dim)
        for scorer, (score, flag) in zip(scorers, scores):
            score.append(scorer.anomaly_score(f))
            flag.append(score[-1] > scorer.threshold)
    return ImageScores(torch.cat(bits).numpy(), [(torch.cat(s).numpy(), torch.cat(f).numpy()) for s, f in scores])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.evaluate",
                                description="AUROC, AUPR and FPR at 95% TPR of raw bits/dim and of the anomaly score")
    p.add_argument("--weights", required=True, help="checkpoint folder or .safetensors file")
    p.add_argument("--in-dist", required=True, help="in-distribution test images (IDX, .npz or image folder)")
    p.add_argument("--ood", action="append", default=[], metavar="NAME=PATH[,PATH...]",
                   help="an out-of-distribution set (several files are concatenated); repeatable")
    p.add_argument("--synthetic", nargs="*", default=list(SYNTHETIC), choices=SYNTHETIC,
                   help="synthetic OOD sets built from the in-distribution images' shape (default: all)")
    p.add_argument("--synthetic-count", type=int, default=2000)
    p.add_argument("--fit", choices=FITS, default="resize",
                   help="how a set of another size is brought to the checkpoint's (default: resize)")
    p.add_argument("--fpr", type=float, default=0.01, help="target false-positive rate of the threshold")
    p.add_argument("--limit", type=int, default=None, help="use at most N images of each set")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    try:
        checkpoint = load_checkpoint(args.weights, args.device)
        model = checkpoint.model
        inference = model.fold(channels_last=model.device.type == "cpu")  # what the service runs, untraced
        scorer = AnomalyScorer(model, checkpoint.calibration, fpr=args.fpr, inference=inference)
        scorers = [scorer]
        if reference_key(rows_for(orientation=True)) in checkpoint.calibration:  # one pass for both
            scorers.append(AnomalyScorer(model, checkpoint.calibration, fpr=args.fpr, inference=inference,
                                         orientation=True))
        channels, height, width = model.config.image_shape

        def read(path: str) -> np.ndarray:
            return load_dataset(path, channels, (height, width), args.fit).images[: args.limit]

        in_images = read(args.in_dist)
        sets = {}
        for spec in args.ood:
            name, _, paths = spec.partition("=")
            if not paths:
                raise DataError(f"--ood {spec!r}: expected NAME=PATH[,PATH...]")
            sets[name] = np.concatenate([read(path) for path in paths.split(",")])[: args.limit]
        for name in args.synthetic:
            sets[name] = synthetic_set(name, in_images, min(args.synthetic_count, args.limit or args.synthetic_count))
    except (CheckpointError, DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    inside = score_images(scorers, in_images, args.batch_size)
    print(f"checkpoint: {checkpoint.weights_path} ({checkpoint.meta.get('name')}); anomaly score: {scorer.method}")
    print(f"in-distribution: {args.in_dist} ({len(in_images)} images), mean {inside.bits_per_dim.mean():.4f} "
          f"bits/dim; calibrated threshold at FPR {args.fpr:.2%} flags {inside.scores[0][1].mean():.2%} of them")
    header = "| OOD set | images | raw bits/dim AUROC | AUPR | FPR@95%TPR | anomaly score AUROC | AUPR | FPR@95%TPR | flagged |"
    if len(scorers) == 1:
        print("(the calibration has no orientation detector: python -m model.calibrate adds it)")
    else:
        print(f"with orientation (--anomaly-orientation): the threshold flags {inside.scores[1][1].mean():.2%} of them")
        header += " + orientation AUROC | AUPR | FPR@95%TPR | flagged |"
    print()
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for name, images in sets.items():
        outside = score_images(scorers, images, args.batch_size)
        raw = detection(inside.bits_per_dim, outside.bits_per_dim)
        line = f"| {name} | {len(images)} | {raw.auroc:.4f} | {raw.aupr:.4f} | {raw.fpr_at_95_tpr:.4f} |"
        for (in_score, _), (out_score, out_flag) in zip(inside.scores, outside.scores):
            d = detection(in_score, out_score)
            line += f" {d.auroc:.4f} | {d.aupr:.4f} | {d.fpr_at_95_tpr:.4f} | {out_flag.mean():.2%} |"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
