"""Anomaly scores of images under a Glow: a table of detectors, calibrated on held-out data.

Raw likelihood is a poor anomaly score: a flow trained on Fashion-MNIST gives MNIST
digits *higher* likelihood than its own test images (Nalisnick et al., ICLR 2019),
because likelihood is dominated by how simple an image is. The score is a weighted
sum over rows of a table (:class:`Detector`): each row is a feature of the image, its
z-score against held-out in-distribution images, and how it counts: a one-sided row
adds w * max(z, 0) (only "more than typical" is evidence), a two-sided row w * |z|.
Every term is >= 0, so no detector can cancel another's evidence.

Rows (:data:`DETECTORS`, all from the one forward pass that gives the likelihood, plus
one WebP encoding of the image):

- ``complexity``: complexity-corrected likelihood (Serra et al., ICLR 2020),
  bits/dim(x) - L(x), with L(x) the image's length in bits/dim under lossless WebP.
  High when the model needs many more bits than a generic compressor. One-sided.
- ``energy``: for each level l, the map of eps_l^2 averaged over channels and pooled
  to the top level's grid; the squared Mahalanobis distance of the log maps from their
  held-out mean (covariance shrunk by Ledoit-Wolf). Under the model every eps is
  N(0, 1), so the maps say *where* an image is atypical. One-sided.
- ``level``: the mean of those log maps: a typicality test (Nalisnick et al., 2019,
  arXiv:1906.02994) in latent space. Two-sided.
- ``global``: the top level's nats, n_L = sum(eps_L^2)/2 - log|det_L| (a class-conditional
  model: -log of its class mixture at eps_L, less log|det_L|), less a linear fit of them on
  the lower levels' n_l. A multi-scale flow's lower levels model local
  texture, its top level the global layout (Schirrmeister et al., NeurIPS 2020,
  arXiv:2006.10848): a layout costlier than its texture predicts is out of place.
  One-sided, weight 0.5.

Optional row (:data:`ORIENTATION`; the service's ``--anomaly-orientation``), from a
second pass of the image upside down in the same batch (1.75x the scoring cost):

- ``orientation``: -log p(x) - (-log p(x upside down)): an image of the training
  distribution is far likelier the right way up. The image against its own transform
  under the same model, the idea of geometric-transformation detectors (Golan &
  El-Yaniv, NeurIPS 2018) with the flow's exact likelihood as the classifier. One-sided.

A method is a set of rows; its name (:func:`method_name`, the row names joined by "+")
is the stable ``anomaly_method`` of the service's responses.

Calibration (:func:`calibrate`), from the checkpoint's held-out validation split only,
cross-fitted: the first half fits the rows' parameters (Ledoit-Wolf, least squares);
the second half gives each row's z-score mean and standard deviation and the reference
scores, from which ``percentile`` and the threshold at a target false-positive rate are
read. The stored calibration lists the rows it fitted: ``anomaly.<row>.<parameter>``,
``anomaly.<row>.z`` (mean, std), ``anomaly.<row>.row`` (weight, two-sided), and
``anomaly.reference.<method>`` for each method.

Overflow: an image whose float32 log-likelihood, latents or log-dets are not finite
(its latents pass float32's ~3.4e38: images far from anything the model has seen, such
as a one-pixel checkerboard) gets ``log_likelihood`` = :data:`LOG_LIKELIHOOD_FLOOR`
(float32's lowest value: its true value lies below what the model's arithmetic
represents), the bits/dim of that floor, the score :data:`SCORE_CAP` (the highest any
image gets), percentile 100 and ``is_anomaly`` true.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from model.glow import Glow

ENERGY_FLOOR = 1e-6  # keeps log(energy) finite for an all-zero latent patch
SCORE_CAP = 1e6  # the highest score: images the model cannot score (overflow), and the limit of every score
LOG_LIKELIHOOD_FLOOR = float(torch.finfo(torch.float32).min)  # nats given to an image whose float32 pass overflows


@dataclass(frozen=True)
class Scores:
    """Per-image results of :meth:`AnomalyScorer.score`, each of shape (B,), float64 on the CPU."""

    log_likelihood: Tensor  # nats of the discrete image (LOG_LIKELIHOOD_FLOOR where it overflowed)
    bits_per_dim: Tensor
    anomaly_score: Tensor
    percentile: Tensor  # 0..100
    is_anomaly: Tensor  # bool


@dataclass(frozen=True)
class Features:
    """What the detectors need, from one forward pass; float64 on the CPU."""

    log_likelihood: Tensor  # (B,) nats; LOG_LIKELIHOOD_FLOOR where overflowed
    bits_per_dim: Tensor  # (B,)
    complexity: Tensor  # (B,) bits/dim of the WebP-lossless encoding
    log_energy: Tensor  # (B, F) log latent-energy maps of every level, concatenated
    level_nats: Tensor  # (B, L) each level's sum(eps^2)/2 - log|det| (its share of -log p, less constants)
    overflow: Tensor  # (B,) bool: float32 could not represent the image's results
    upside_down_log_likelihood: Tensor | None = None  # (B,) nats of x.flip(-2), when asked for


Parameters = dict[str, Tensor]


@dataclass(frozen=True)
class Detector:
    """One row of the anomaly score: a feature of the image, and how its z-score counts."""

    name: str  # stable key: the calibration's tensors are stored under anomaly.<name>.*
    description: str  # what the feature is, in words (GET /model)
    feature: Callable[[Features, Parameters], Tensor]  # (features, fitted parameters) -> (B,)
    two_sided: bool  # |z| counts; otherwise max(z, 0)
    weight: float
    fit: Callable[[Features], Parameters] | None = field(default=None)  # parameters from the fitting half
    needs_upside_down: bool = False  # the feature needs the second pass (x upside down)


def compressed_bits_per_dim(x: Tensor) -> Tensor:
    """Length of each uint8 image (B, C, H, W) under lossless WebP, in bits per pixel value."""
    images = x.cpu().numpy()
    dims = math.prod(images.shape[1:])
    lengths = []
    for image in images:
        pixels = image[0] if image.shape[0] == 1 else np.transpose(image, (1, 2, 0))
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="WEBP", lossless=True, quality=100, method=2)
        lengths.append(8 * len(buffer.getvalue()) / dims)
    return torch.tensor(lengths, dtype=torch.float64)


def _finite_rows(tensors: list[Tensor]) -> Tensor:
    """(B,) whether every value of each row is finite, over tensors whose first dimension is the batch."""
    return torch.stack([torch.isfinite((t if t.ndim > 1 else t[:, None]).flatten(1)).all(1) for t in tensors]).all(0)


def _top_prior_nats(model: Glow, top: Tensor) -> Tensor | None:
    """-log of a class-conditional model's top prior (the mixture over classes) at the top latent, in float64
    (squares of float32 latents past ~1e19 overflow float32); None
    for an unconditional model, whose top prior is N(0, I) (0.5 |eps|^2 up to a constant)."""
    prior = model.class_prior
    if prior is None:
        return None
    return -prior.log_mixture(top.double())


@torch.no_grad()
def features(model: Glow, x: Tensor, complexity: Tensor | None = None, upside_down: bool = False) -> Features:
    """Likelihood and detector inputs of uint8 images x, from one pass through ``model`` (any form of the Glow).

    ``complexity``: :func:`compressed_bits_per_dim` of x, when it was computed elsewhere
    (the service does it while decoding the request, off the model's thread).
    ``upside_down``: also the log-likelihood of each image upside down, in the same batch.
    """
    n = len(x)
    log_likelihood, latents, level_logdets = model.log_prob_and_levels(torch.cat([x, x.flip(-2)]) if upside_down else x)
    flipped = None
    if upside_down:  # one batch of both: cheaper per image than two calls
        flipped = log_likelihood[n:].double().cpu()
        flipped = torch.where(torch.isfinite(flipped), flipped, LOG_LIKELIHOOD_FLOOR)
        log_likelihood, latents, level_logdets = log_likelihood[:n], [t[:n] for t in latents], [t[:n] for t in level_logdets]
    overflow = ~_finite_rows([log_likelihood, *latents, *level_logdets]).cpu()
    grid = latents[-1].shape[-2:]
    top_prior = _top_prior_nats(model, latents[-1])
    latents = [eps.double() for eps in latents]  # squares of float32 latents past ~1e19 overflow float32
    maps = [F.adaptive_avg_pool2d(eps.square().mean(1, keepdim=True), grid).flatten(1) for eps in latents]
    nats = [0.5 * eps.square().flatten(1).sum(1) - ld.double() for eps, ld in zip(latents, level_logdets)]
    if top_prior is not None:
        nats[-1] = top_prior - level_logdets[-1].double()
    log_likelihood = torch.where(overflow, LOG_LIKELIHOOD_FLOOR, log_likelihood.double().cpu())
    return Features(
        log_likelihood=log_likelihood,
        bits_per_dim=model.bits_per_dim(log_likelihood),
        complexity=compressed_bits_per_dim(x) if complexity is None else complexity.double().cpu(),
        log_energy=torch.log(torch.cat(maps, 1).cpu() + ENERGY_FLOOR),
        level_nats=torch.stack(nats, 1).cpu(),
        overflow=overflow,
        upside_down_log_likelihood=flipped,
    )


# ------------------------------------------------------------------ the rows
def _fit_energy(f: Features) -> Parameters:
    from sklearn.covariance import LedoitWolf  # calibration only: the service needs just mean and precision

    shrunk = LedoitWolf().fit(f.log_energy.numpy())
    return {"mean": torch.from_numpy(shrunk.location_).double(), "precision": torch.from_numpy(shrunk.precision_).double()}


def _energy_distance(f: Features, p: Parameters) -> Tensor:
    centred = f.log_energy - p["mean"]
    return ((centred @ p["precision"]) * centred).sum(1)


def _lower_levels(level_nats: Tensor) -> Tensor:
    """(B, L): the lower levels' nats and a column of ones, the regressors of the top level's."""
    return torch.cat([level_nats[:, :-1], torch.ones_like(level_nats[:, :1])], 1)


def _fit_global(f: Features) -> Parameters:
    return {"coef": torch.linalg.lstsq(_lower_levels(f.level_nats), f.level_nats[:, -1:]).solution.flatten()}


def _global_surprise(f: Features, p: Parameters) -> Tensor:
    return f.level_nats[:, -1] - _lower_levels(f.level_nats) @ p["coef"]


def _orientation(f: Features, p: Parameters) -> Tensor:
    if f.upside_down_log_likelihood is None:
        raise ValueError("the orientation detector needs features computed with upside_down=True")
    return f.upside_down_log_likelihood - f.log_likelihood


DETECTORS = (
    Detector("complexity", "bits/dim less the image's lossless-WebP bits/dim (Serra et al., 2020)",
             lambda f, p: f.bits_per_dim - f.complexity, two_sided=False, weight=1.0),
    Detector("energy", "Ledoit-Wolf Mahalanobis distance of the per-level log latent-energy maps",
             _energy_distance, two_sided=False, weight=1.0, fit=_fit_energy),
    Detector("level", "mean log latent energy (either way)", lambda f, p: f.log_energy.mean(1), two_sided=True,
             weight=1.0),
    Detector("global", "nats of the top level beyond a linear fit on the lower levels' (Schirrmeister et al., 2020)",
             _global_surprise, two_sided=False, weight=0.5, fit=_fit_global),
)
"""The default rows."""
ORIENTATION = Detector("orientation", "nats of the image less nats of it upside down", _orientation,
                       two_sided=False, weight=1.0, needs_upside_down=True)
"""The optional row (a second pass per image)."""


def method_name(rows: tuple[Detector, ...]) -> str:
    """The short, stable name of a set of rows: their names joined by "+"."""
    return "+".join(row.name for row in rows)


def describe(rows: tuple[Detector, ...]) -> str:
    """A set of rows in words."""
    terms = [f"{row.weight:g} x {'|z|' if row.two_sided else 'max(z, 0)'} of {row.description}" for row in rows]
    return ("sum of " + "; ".join(terms) + ". Each z is standardised on held-out in-distribution images; "
            "images whose float32 results overflow score the cap, " + f"{SCORE_CAP:g}")


def rows_for(orientation: bool) -> tuple[Detector, ...]:
    return DETECTORS + ((ORIENTATION,) if orientation else ())


def reference_key(rows: tuple[Detector, ...]) -> str:
    return f"anomaly.reference.{method_name(rows)}"


def _combine(rows: tuple[Detector, ...], f: Features, c: dict[str, Tensor]) -> Tensor:
    """sum over rows of weight * (|z| or max(z, 0)); SCORE_CAP for overflowed images and at most SCORE_CAP."""
    score = torch.zeros(len(f.log_likelihood), dtype=torch.float64)
    for row in rows:
        parameters = {k.removeprefix(f"anomaly.{row.name}."): v for k, v in c.items()
                      if k.startswith(f"anomaly.{row.name}.")}
        mean, std = parameters["z"].tolist()
        z = (row.feature(f, parameters) - mean) / std
        score = score + row.weight * (z.abs() if row.two_sided else z.clamp(min=0))
    score = torch.where(f.overflow, SCORE_CAP, score)
    return torch.nan_to_num(score, nan=SCORE_CAP, posinf=SCORE_CAP).clamp(max=SCORE_CAP)


def _concatenated(parts: list[Features]) -> Features:
    return Features(*(torch.cat([getattr(p, name) for p in parts]) for name in Features.__dataclass_fields__))


def _subset(f: Features, rows: slice) -> Features:
    return Features(*(getattr(f, name)[rows] for name in Features.__dataclass_fields__))


@torch.no_grad()
def calibrate(model: Glow, images: Tensor, batch_size: int = 256,
              rows: tuple[Detector, ...] = DETECTORS + (ORIENTATION,)) -> dict[str, Tensor]:
    """Cross-fit ``rows`` on held-out images: parameters on the first half, z-scores and the reference
    scores (of the default rows, and of all of them) on the second half."""
    if len(images) < 8:
        raise ValueError(f"calibration needs at least 8 validation images, got {len(images)}")
    upside_down = any(row.needs_upside_down for row in rows)
    f = _concatenated([features(model, images[i : i + batch_size].to(model.device), upside_down=upside_down)
                       for i in range(0, len(images), batch_size)])
    half = len(images) // 2
    fitting, scoring = _subset(f, slice(None, half)), _subset(f, slice(half, None))
    calibration: dict[str, Tensor] = {}
    for row in rows:
        parameters = row.fit(fitting) if row.fit is not None else {}
        values = row.feature(scoring, parameters)
        parameters["z"] = torch.stack([values.mean(), values.std()])
        parameters["row"] = torch.tensor([row.weight, float(row.two_sided)], dtype=torch.float64)
        calibration.update({f"anomaly.{row.name}.{k}": v for k, v in parameters.items()})
    for method in {tuple(r for r in DETECTORS if r in rows), rows}:
        calibration[reference_key(method)] = _combine(method, scoring, calibration)
    return calibration


def threshold_at(reference: Tensor, fpr: float) -> float:
    """The score above which a share ``fpr`` of the reference scores lie."""
    if not 0 < fpr < 1:
        raise ValueError(f"false-positive rate must be in (0, 1), got {fpr}")
    return float(torch.quantile(reference.double(), 1 - fpr, interpolation="higher"))


def _check(rows: tuple[Detector, ...], calibration: dict[str, Tensor]) -> None:
    """ValueError naming what the calibration lacks or holds for other rows than the code's."""
    missing = [row.name for row in rows if f"anomaly.{row.name}.z" not in calibration]
    if missing or reference_key(rows) not in calibration:
        raise ValueError(f"the checkpoint's calibration lacks the rows {missing or [method_name(rows)]} "
                         "(python -m model.calibrate fits them)")
    for row in rows:
        z, stored = calibration[f"anomaly.{row.name}.z"], calibration.get(f"anomaly.{row.name}.row")
        if z.shape != (2,) or not (torch.isfinite(z).all() and z[1] > 0):
            raise ValueError(f"anomaly.{row.name}.z must hold a finite mean and a positive standard deviation")
        if stored is None or stored.tolist() != [row.weight, float(row.two_sided)]:
            raise ValueError(f"anomaly.{row.name}: fitted for another weight or sidedness than this code's "
                             "(python -m model.calibrate refits it)")
    reference = calibration[reference_key(rows)]
    if reference.ndim != 1 or reference.numel() < 2:
        raise ValueError("the calibration reference must hold at least 2 scores")


class AnomalyScorer:
    """Scores images with a model and turns scores into percentiles and decisions."""

    def __init__(self, model: Glow, calibration: dict[str, Tensor], fpr: float = 0.01,
                 inference: Glow | None = None, orientation: bool = False) -> None:
        """``inference``: the form of ``model`` to run (its fold or traced fold; default ``model``);
        ``orientation``: add the orientation row (a second pass per image)."""
        self.rows = rows_for(orientation)
        _check(self.rows, calibration)
        self.model = model
        self.inference = inference or model
        self.orientation = orientation
        self.method = method_name(self.rows)
        self.description = describe(self.rows)
        names = tuple(f"anomaly.{row.name}." for row in self.rows)
        self.calibration = {k: v.double().cpu() for k, v in calibration.items() if k.startswith(names)}
        self.reference = torch.sort(calibration[reference_key(self.rows)].double().cpu()).values
        self.fpr = fpr
        self.threshold = threshold_at(self.reference, fpr)
        if not self.threshold < SCORE_CAP:
            raise ValueError(f"the calibrated threshold {self.threshold:g} reaches the score cap {SCORE_CAP:g}")

    def percentile(self, scores: Tensor) -> Tensor:
        below = torch.searchsorted(self.reference, scores.double(), right=False)
        return 100.0 * below.double() / self.reference.numel()

    def features(self, x: Tensor, complexity: Tensor | None = None) -> Features:
        """:func:`features` of x through the inference form, with the second pass if the rows need it."""
        return features(self.inference, x, complexity, self.orientation)

    def anomaly_score(self, f: Features) -> Tensor:
        return _combine(self.rows, f, self.calibration)

    @torch.no_grad()
    def score(self, x: Tensor, complexity: Tensor | None = None) -> Scores:
        """Scores of uint8 images x; ``complexity`` as in :func:`features`."""
        f = self.features(x, complexity)
        score = self.anomaly_score(f)
        return Scores(
            log_likelihood=f.log_likelihood,
            bits_per_dim=f.bits_per_dim,
            anomaly_score=score,
            percentile=self.percentile(score),
            is_anomaly=score > self.threshold,
        )
