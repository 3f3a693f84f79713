"""The served form of a Glow: its folded model (``Glow.fold``) run as frozen TorchScript graphs.

:class:`TracedGlow` is a :class:`model.glow.Glow` whose three batch computations,
``log_prob_and_levels`` (bin centres), ``encode_with_log_prob`` and ``decode_and_finite``,
run as graphs traced from the folded model's own methods and frozen (``torch.jit.freeze``
folds what the parameters fix: exp of log-scales, constant log-dets). A graph runs a
whole batch in C++ and takes the GIL once per call instead of once per tensor op, so a
busy event loop in the same process (the service's) cannot stall the model between ops.
Everything else (``log_prob``, ``encode``, ``decode``, ``bits_per_dim``, the layout) is
the inherited Glow code. The graphs take any batch size: nothing in the flow branches on
values or on the batch size. Their constants are inference tensors (``torch.inference_mode``):
a view or copy of an ordinary tensor in inference mode still goes through the autograd
view-tracking kernel, which cost 3-6% of a batch-1 call (``bench/README.md``).

Exactness (``tests/model/test_inference.py``, ``bench/fold_compare.py``): log-likelihoods
within 1e-4 relative of the plain fp32 model, the same latents, and decode(encode(x)) == x
wherever the plain model gives that (images like the training data; for uniform noise
the inverse amplifies float rounding in every form, float64 included).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from model.glow import Glow, split_latents

TRACED_METHODS = ("log_prob_and_levels", "encode_with_log_prob", "decode_and_finite")


class _Method(nn.Module):
    """One of Glow's batch methods, as written in Glow, as a module's forward (what torch.jit.trace takes)."""

    def __init__(self, glow: Glow, method: str) -> None:
        super().__init__()
        self.glow, self.method = glow, method

    def forward(self, x: Tensor) -> Any:
        return getattr(Glow, self.method)(self.glow, x)


class TracedGlow(Glow):
    """A folded Glow whose batch methods run as frozen TorchScript graphs (traced once at ``trace_batch``).

    torch.jit.trace and torch.jit.freeze are deprecated in torch 2.x but supported in the 2.13
    this project pins.
    """

    def __init__(self, folded: Glow, trace_batch: int = 8) -> None:
        super().__init__(folded.config, list(folded.levels), folded.class_prior)
        images = torch.randint(0, 256, (trace_batch, *folded.config.image_shape), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(0)).to(folded.device)
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # decode's shape check: constant here
            source = copy.deepcopy(folded)  # its tensors made here are inference tensors: the graphs' constants
            examples = {"log_prob_and_levels": images, "encode_with_log_prob": images,
                        "decode_and_finite": Glow.encode(source, images)}
            self._graphs = {
                method: torch.jit.freeze(torch.jit.trace(_Method(source, method).eval(), examples[method],
                                                         check_trace=False, strict=False))  # strict: list outputs
                for method in TRACED_METHODS
            }

    def log_prob_and_levels(self, x: Tensor, noise: Tensor | None = None,
                            labels: Tensor | None = None) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """As :meth:`Glow.log_prob_and_levels` at the bin centres, of the mixture on a class-conditional
        model (the graph has no dequantisation noise and no labels)."""
        if noise is not None or labels is not None:
            raise ValueError("the traced form scores bin centres only, of p(x): use the plain Glow for dequantised "
                             "or class-conditional scores")
        self._check_pixels(x)  # here: a traced graph runs no Python checks
        log_prob, latents, level_logdets = self._graphs["log_prob_and_levels"](x)
        return log_prob, list(latents), list(level_logdets)

    @torch.no_grad()
    def encode_with_log_prob(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check_pixels(x)
        z, log_prob = self._graphs["encode_with_log_prob"](x)
        return z, log_prob

    @torch.no_grad()
    def decode_and_finite(self, z: Tensor) -> tuple[Tensor, Tensor]:
        split_latents(z, self.latent_shapes)  # the shape check, before the graph
        return self._graphs["decode_and_finite"](z.to(self.dtype))

    @staticmethod
    def _check_pixels(x: Tensor) -> None:
        if x.dtype != torch.uint8:
            raise TypeError(f"images must be uint8 pixels, got {x.dtype}")
