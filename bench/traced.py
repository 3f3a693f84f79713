"""The service's folded model (``model.inference.FoldedGlow``) as frozen TorchScript graphs.

A traced graph runs a whole batch in C++: the calling thread takes the GIL once per call
instead of once per tensor op, so a busy event loop in the same process (the service's)
cannot stall the model between ops. ``bench/model_throughput.py`` (knob ``folded+traced``)
and ``bench/serve_variant.py --variant traced`` measure it; both check it against the
model first (log-likelihoods within 1e-4 relative, decode(encode(x)) pixel-exact).
torch.jit.trace and torch.jit.freeze are deprecated in torch 2.x (DeprecationWarning) but
still supported in 2.13.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from model.inference import FoldedGlow


class _Method(nn.Module):
    """One method of a FoldedGlow as a module's forward, for torch.jit.trace."""

    def __init__(self, folded: FoldedGlow, method: str) -> None:
        super().__init__()
        self.method = getattr(folded, method)

    def forward(self, x: Tensor) -> Any:
        return self.method(x)


class TracedGlow:
    """log_prob_and_latents, encode_with_log_prob and decode of a FoldedGlow as frozen graphs.

    Traced at batch ``trace_batch``; the graphs take any batch size.
    """

    def __init__(self, folded: FoldedGlow, trace_batch: int = 8) -> None:
        self.folded = folded
        self.config, self.latent_dim, self.latent_shapes = folded.config, folded.latent_dim, folded.latent_shapes
        self.device, self.dtype = folded.device, folded.dtype
        images = torch.randint(0, 256, (trace_batch, *folded.config.image_shape), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(0)).to(folded.device)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the shape check in decode, constant here
            latents = folded.encode(images)
            self._graphs = {
                method: torch.jit.freeze(torch.jit.trace(_Method(folded, method).eval(), example, check_trace=False,
                                                         strict=False))
                for method, example in (("log_prob_and_latents", images), ("encode_with_log_prob", images),
                                        ("decode", latents))
            }

    def log_prob_and_latents(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        log_prob, latents = self._graphs["log_prob_and_latents"](x)
        return log_prob, list(latents)

    def log_prob(self, x: Tensor) -> Tensor:
        return self.log_prob_and_latents(x)[0]

    def encode_with_log_prob(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z, log_prob = self._graphs["encode_with_log_prob"](x)
        return z, log_prob

    def encode(self, x: Tensor) -> Tensor:
        return self.encode_with_log_prob(x)[0]

    def decode(self, z: Tensor) -> Tensor:
        return self._graphs["decode"](z.to(self.dtype))

    def bits_per_dim(self, log_prob: Tensor) -> Tensor:
        return self.folded.bits_per_dim(log_prob)
