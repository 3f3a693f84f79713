"""Anomaly scores of images under a Glow, calibrated on held-out in-distribution data.

The score is the image's bits/dim at its bin centres (higher = less likely = more
anomalous). A checkpoint carries the scores of its validation split
(``calibration.val_anomaly_score``, never the test set); an image's ``percentile``
is the share of those reference scores strictly below its own, and it is flagged
``is_anomaly`` when its score exceeds the (1 - fpr) quantile of the reference, so
that about ``fpr`` of in-distribution images are flagged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from model.glow import Glow

METHOD = "bits_per_dim"
REFERENCE_KEY = "val_anomaly_score"


@dataclass(frozen=True)
class Scores:
    """Per-image results of :meth:`AnomalyScorer.score`, each of shape (B,), float64 on the CPU."""

    log_likelihood: Tensor  # nats of the discrete image
    bits_per_dim: Tensor
    anomaly_score: Tensor
    percentile: Tensor  # 0..100
    is_anomaly: Tensor  # bool


def anomaly_score(model: Glow, x: Tensor) -> tuple[Tensor, Tensor]:
    """(log-likelihood in nats, anomaly score) of uint8 images x, as float64 on the CPU."""
    log_likelihood = model.log_prob(x).double().cpu()
    return log_likelihood, model.bits_per_dim(log_likelihood)


def threshold_at(reference: Tensor, fpr: float) -> float:
    """The score above which a share ``fpr`` of the reference scores lie."""
    if not 0 < fpr < 1:
        raise ValueError(f"false-positive rate must be in (0, 1), got {fpr}")
    return float(torch.quantile(reference.double(), 1 - fpr, interpolation="higher"))


class AnomalyScorer:
    """Scores images with a model and turns scores into percentiles and decisions."""

    method = METHOD

    def __init__(self, model: Glow, reference: Tensor, fpr: float = 0.01) -> None:
        if reference.ndim != 1 or reference.numel() < 2:
            raise ValueError("the calibration reference must hold at least 2 scores")
        self.model = model
        self.reference = torch.sort(reference.double().cpu()).values
        self.fpr = fpr
        self.threshold = threshold_at(self.reference, fpr)

    def percentile(self, scores: Tensor) -> Tensor:
        below = torch.searchsorted(self.reference, scores.double(), right=False)
        return 100.0 * below.double() / self.reference.numel()

    @torch.no_grad()
    def score(self, x: Tensor) -> Scores:
        log_likelihood, score = anomaly_score(self.model, x)
        return Scores(
            log_likelihood=log_likelihood,
            bits_per_dim=self.model.bits_per_dim(log_likelihood),
            anomaly_score=score,
            percentile=self.percentile(score),
            is_anomaly=score > self.threshold,
        )
