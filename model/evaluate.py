"""Bits per dimension of a model on a set of images, both ways papers and the API use.

- dequantised: mean of (-log p(x + u) + D log 2^n) / (D log 2), u ~ U[0, 2^-n)^D, one
  draw per image from a seeded generator (the figure papers report: a code length bound);
- bin centre: the deterministic score ``/log-likelihood`` returns (u = 1/2).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from model.glow import Glow


@dataclass(frozen=True)
class BitsPerDim:
    dequantized: float  # mean over the images, uniform noise drawn with ``seed``
    bin_centre: float  # mean over the images, deterministic
    seed: int
    images: int


@torch.no_grad()
def score_bin_centre(model: Glow, images: np.ndarray | torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Bits/dim of every image (uint8 (N, C, H, W)) at its bin centres, on the CPU as float64."""
    data = torch.as_tensor(images)
    out = [
        model.bits_per_dim(model.log_prob(data[i : i + batch_size].to(model.device))).double().cpu()
        for i in range(0, len(data), batch_size)
    ]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.float64)


@torch.no_grad()
def bits_per_dim(model: Glow, images: np.ndarray | torch.Tensor, batch_size: int = 256, seed: int = 0) -> BitsPerDim:
    """Mean dequantised and bin-centre bits/dim of ``model`` (in eval mode) over ``images``."""
    data = torch.as_tensor(images)
    generator = torch.Generator().manual_seed(seed)
    noisy = []
    for i in range(0, len(data), batch_size):
        batch = data[i : i + batch_size]
        noise = torch.rand(batch.shape, generator=generator, dtype=model.dtype)
        noisy.append(model.bits_per_dim(model.log_prob(batch.to(model.device), noise.to(model.device))).double().cpu())
    centre = score_bin_centre(model, data, batch_size)
    return BitsPerDim(
        dequantized=float(torch.cat(noisy).mean()),
        bin_centre=float(centre.mean()),
        seed=seed,
        images=len(data),
    )
