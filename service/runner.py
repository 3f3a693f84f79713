"""The model on its device: loads the checkpoint and runs batches in one worker thread.

Batches run through the checkpoint's Glow folded for inference (``Glow.fold``: the same
log-likelihoods to ~4e-6 relative, the same latents, decode(encode(x)) == x),
channels_last on the CPU where it measured faster, as frozen TorchScript graphs
(``model.inference.TracedGlow``) unless ``torchscript=False``. The graphs are checked
against the eager fold at load; should they differ or fail to build, the runner logs why
and serves the eager fold.

Overflow (``model.anomaly``'s policy): an image whose float32 results are not finite is
scored as the most anomalous (capped score, floor log-likelihood); ``encode_batch`` marks
one whose latents are not finite (``Encoded.latent`` None) so the route can refuse it.
No number this module returns is NaN or infinite.

The batch functions take and return numpy arrays and plain numbers, so nothing above
this module touches a tensor. They run in a single worker thread under
``torch.inference_mode`` (:meth:`ModelRunner.call`), which keeps the event loop free
to answer ``/healthz`` and ``/metrics`` while a batch computes, and runs one batch at
a time on the device.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from model.anomaly import LOG_LIKELIHOOD_FLOOR, AnomalyScorer, compressed_bits_per_dim
from model.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from model.device import resolve_device
from model.glow import Glow
from model.heatmap import SIDECAR_KEY, HeatmapCalibration, LatentTap, overlay
from model.inference import TracedGlow

T = TypeVar("T")
log = logging.getLogger("service.runner")
GRAPH_TOLERANCE = 1e-5  # relative log-likelihood deviation of the graphs from the eager form they trace


@dataclass(frozen=True)
class Scorable:
    """An image to score, with its length under the generic lossless compressor (bits/dim).

    Made by :meth:`ModelRunner.scorable` in the thread that decodes the request, so the
    compression (a tenth of a batch's scoring time) runs beside the model, not in its thread.
    """

    pixels: np.ndarray  # (C, H, W) uint8
    complexity: float
    heatmap: bool = False  # also its anomaly heatmap (model.heatmap)


@dataclass(frozen=True)
class Score:
    """The log-likelihood endpoint's numbers for one image."""

    log_likelihood: float  # nats of the discrete image
    bits_per_dim: float
    anomaly_score: float  # higher = more anomalous
    percentile: float  # 0..100, share of the reference set scoring lower
    is_anomaly: bool
    heatmap: np.ndarray | None = None  # (H, W) float64, higher = more anomalous there; when asked for
    label_probabilities: np.ndarray | None = None  # (K,) p(k | x), on a class-conditional model


@dataclass(frozen=True)
class Encoded:
    """One image's flat latent and its log-likelihood."""

    latent: np.ndarray | None  # (latent_dim,) float32; None: not finite in float32 (the image overflows)
    log_likelihood: float  # LOG_LIKELIHOOD_FLOOR where it overflowed


def check_graphs(folded: Glow, traced: TracedGlow, batches: tuple[int, ...] = (1, 5)) -> None:
    """Raise unless the graphs give the eager form's log-likelihoods and images on the model's own samples."""
    with torch.inference_mode():
        for batch in batches:
            z = torch.randn(batch, folded.latent_dim, generator=torch.Generator().manual_seed(batch)).to(folded.device)
            x = folded.decode(0.7 * z)
            for _ in range(2):  # a TorchScript graph is optimised on its first calls: check what runs afterwards
                expected, got = folded.log_prob(x).double(), traced.log_prob(x).double()
                deviation = float(((got - expected).abs() / expected.abs()).max())
                if not deviation <= GRAPH_TOLERANCE:
                    raise RuntimeError(f"log-likelihoods deviate {deviation:.1e} relative at batch {batch}")
                if not torch.equal(traced.decode(traced.encode(x)), folded.decode(folded.encode(x))):
                    raise RuntimeError(f"decode(encode(x)) differs from the eager form's at batch {batch}")


class ModelRunner:
    """A checkpoint loaded on a device, with batch functions over numpy arrays."""

    def __init__(
        self, weights: Path, device: str = "auto", anomaly_fpr: float = 0.01, torchscript: bool = True,
        anomaly_orientation: bool = False,
    ) -> None:
        self.weights = weights
        self.requested_device = device
        self.anomaly_fpr = anomaly_fpr
        self.anomaly_orientation = anomaly_orientation
        self.torchscript = torchscript
        self._checkpoint: Checkpoint | None = None
        self._scorer: AnomalyScorer | None = None
        self._inference: Glow | None = None
        self._heatmap: HeatmapCalibration | None = None
        self._tap: LatentTap | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="glow-model")

    # ------------------------------------------------------------- loading
    def load(self) -> None:
        """Load and verify the checkpoint (once); CheckpointError or DeviceUnavailable, one line."""
        if self._checkpoint is not None:
            return
        checkpoint = load_checkpoint(self.weights, resolve_device(self.requested_device))
        model = checkpoint.model.eval()
        folded = model.fold(channels_last=model.device.type == "cpu")  # NHWC: faster on CPU (bench/)
        inference = folded
        if self.torchscript:
            try:
                traced = TracedGlow(folded)
                check_graphs(folded, traced)
                inference = traced
            except Exception as exc:  # any failure to build or match: the eager fold is exact and serves
                log.warning("TorchScript form unusable (%s: %s); serving the eager form", type(exc).__name__, exc)
        tap = LatentTap(inference)  # keeps each scoring pass's latents (a reference) for the heatmaps
        try:
            scorer = AnomalyScorer(model, checkpoint.calibration, fpr=self.anomaly_fpr,
                                   inference=tap, orientation=self.anomaly_orientation)  # type: ignore[arg-type]
        except ValueError as exc:
            raise CheckpointError(f"{checkpoint.weights_path}: unusable anomaly calibration: {exc}") from None
        heatmap = None
        if SIDECAR_KEY in checkpoint.meta:
            try:
                heatmap = HeatmapCalibration.from_json(checkpoint.meta[SIDECAR_KEY], model.latent_shapes)
            except ValueError as exc:
                raise CheckpointError(f"{checkpoint.weights_path}: unusable heatmap calibration: {exc}") from None
        self._checkpoint, self._scorer, self._inference = checkpoint, scorer, inference
        self._heatmap, self._tap = heatmap, tap

    @property
    def loaded(self) -> bool:
        return self._checkpoint is not None

    @property
    def checkpoint(self) -> Checkpoint:
        if self._checkpoint is None:
            raise RuntimeError("the checkpoint is not loaded")
        return self._checkpoint

    @property
    def model(self) -> Glow:
        return self.checkpoint.model

    @property
    def inference(self) -> Glow:
        """The folded form of the model (traced or eager) that every batch runs through."""
        if self._inference is None:
            raise RuntimeError("the checkpoint is not loaded")
        return self._inference

    @property
    def form(self) -> str:
        """Which form serves: "torchscript" or "eager" (the folded model without graphs)."""
        return "torchscript" if isinstance(self.inference, TracedGlow) else "eager"

    @property
    def scorer(self) -> AnomalyScorer:
        if self._scorer is None:
            raise RuntimeError("the checkpoint is not loaded")
        return self._scorer

    @property
    def heatmaps(self) -> bool:
        """Whether the checkpoint has a heatmap calibration (``python -m model.heatmap`` adds one)."""
        return self._heatmap is not None

    def overlay_png_pixels(self, pixels: np.ndarray, heat: np.ndarray) -> np.ndarray:
        """An image (C, H, W) and its heatmap -> RGB (3, H, W) uint8, the heat drawn in red (any thread)."""
        if self._heatmap is None:
            raise RuntimeError("the checkpoint has no heatmap calibration")
        return overlay(pixels, heat, self._heatmap.overlay_max)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.model.config.image_shape

    @property
    def labels(self) -> list[str]:
        """Class names of a class-conditional checkpoint (index = class number); [] for an unconditional one."""
        return list(self.model.config.labels)

    @property
    def latent_dim(self) -> int:
        return self.model.latent_dim

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def device(self) -> str:
        return str(self.model.device)

    @property
    def dtype(self) -> str:
        return str(self.model.dtype).removeprefix("torch.")

    # ------------------------------------------------------------- running
    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in the worker thread under inference mode, without blocking the loop."""

        def run() -> T:
            with torch.inference_mode():
                return fn(*args)

        return await asyncio.get_running_loop().run_in_executor(self._executor, run)

    def close(self) -> None:
        """Finish the running batch and stop the worker thread."""
        self._executor.shutdown(wait=True)

    def warm_up(self, max_batch_size: int) -> None:
        """Run batch 1 and the largest batch through every operation (allocators, kernels, caches)."""
        for size in sorted({1, max_batch_size}):
            images = [np.zeros(self.image_shape, dtype=np.uint8)] * size
            self.score_batch(self.scorable(images))
            self.encode_batch(images)
            self.decode_batch(list(self.sample_noise(size, 1.0, seed=0)))

    # ---------------------------------------------- batch functions (worker thread)
    def _pixels(self, images: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(images)).to(self.model.device)  # (B, C, H, W) uint8

    @staticmethod
    def scorable(images: list[np.ndarray], heatmap: bool = False) -> list[Scorable]:
        """uint8 images (C, H, W) -> what :meth:`score_batch` takes (any thread); ``heatmap``: with their maps."""
        if not images:
            return []
        complexity = compressed_bits_per_dim(torch.from_numpy(np.stack(images))).tolist()
        return [Scorable(image, c, heatmap) for image, c in zip(images, complexity)]

    def score_batch(self, items: list[Scorable]) -> list[Score]:
        """Images with their complexity -> their log-likelihoods and anomaly scores."""
        complexity = torch.tensor([item.complexity for item in items], dtype=torch.float64)
        scores = self.scorer.score(self._pixels([item.pixels for item in items]), complexity)
        maps = self._heatmaps(items)
        posteriors = self._class_probabilities(len(items))
        return [
            Score(float(ll), float(bpd), float(score), float(pct), bool(flag), heat, probabilities)
            for ll, bpd, score, pct, flag, heat, probabilities in zip(
                scores.log_likelihood.tolist(),
                scores.bits_per_dim.tolist(),
                scores.anomaly_score.tolist(),
                scores.percentile.tolist(),
                scores.is_anomaly.tolist(),
                maps,
                posteriors,
            )
        ]

    def _class_probabilities(self, count: int) -> list[np.ndarray | None]:
        """p(k | x) of the images just scored (a class-conditional model), from that pass's top latents.

        An image whose top latent overflowed (not finite) gets the class frequencies: its
        likelihoods say nothing about its class, so the answer is the prior's."""
        if not self.inference.conditional or self._tap is None:
            return [None] * count
        posterior = torch.softmax(self.inference.class_log_posterior(self._tap.latents[-1][:count]).double(), dim=1)
        posterior = posterior.cpu()
        fallback = torch.softmax(self.inference.class_prior.log_weights.double(), dim=0).cpu()  # type: ignore[union-attr]
        ok = torch.isfinite(posterior).all(1)
        return [row.numpy() if good else fallback.numpy() for row, good in zip(posterior, ok.tolist())]

    def _heatmaps(self, items: list[Scorable]) -> list[np.ndarray | None]:
        """The maps of the items that asked for one, from the latents of the pass that just scored them."""
        rows = [index for index, item in enumerate(items) if item.heatmap]
        out: list[np.ndarray | None] = [None] * len(items)
        if not rows or self._heatmap is None or self._tap is None:
            return out
        latents = [eps[rows] for eps in self._tap.latents]  # rows of the images (with orientation, flips follow)
        _, height, width = self.image_shape
        for row, heat in zip(rows, self._heatmap.maps(latents, (height, width)).numpy()):
            out[row] = heat
        return out

    def encode_batch(self, images: list[np.ndarray]) -> list[Encoded]:
        """uint8 images (C, H, W) -> flat latents (the layout of ``Glow.encode``) and log-likelihoods."""
        z, log_prob = self.inference.encode_with_log_prob(self._pixels(images))
        finite = torch.isfinite(z).all(1).tolist()
        log_likelihood = torch.where(torch.isfinite(log_prob), log_prob.double(), LOG_LIKELIHOOD_FLOOR).tolist()
        return [Encoded(latent if ok else None, ll) for latent, ok, ll in zip(z.float().cpu().numpy(), finite, log_likelihood)]

    def decode_batch(self, latents: list[np.ndarray]) -> list[np.ndarray | None]:
        """Flat latents (latent_dim,) -> uint8 images (C, H, W); None for a latent whose inverse overflows
        (``Glow.decode_and_finite``: it has no image)."""
        z = torch.from_numpy(np.stack(latents)).to(self.model.device)
        pixels, finite = self.inference.decode_and_finite(z)
        return [image if ok else None for image, ok in zip(pixels.cpu().numpy(), finite.tolist())]

    def sample_noise(self, n: int, temperature: float, seed: int, label: int | None = None) -> np.ndarray:
        """The latents ``Glow.sample(n, temperature, seed, label)`` decodes: (n, latent_dim) float64.

        Drawn per request, so a seed gives the same images whatever else shares the batch.
        """
        return self.model.sample_latents(n, temperature, seed, label).numpy()
