"""Variational dequantisation: a learned noise distribution q(u | x) that tightens the bound.

Ho et al., "Flow++: Improving Flow-Based Generative Models with Variational
Dequantization and Architecture Design", ICML 2019 (arXiv:1902.00275), section 3.1.
For any density q(u | x) on the unit cube (in bin units, as ``model.glow``),

    log P(x) >= E_{u ~ q(. | x)}[log p((k + u) / 2^n - 0.5) - log q(u | x)] - D n log 2,

which is the uniform bound of ``model.glow`` when q is U[0, 1)^D (log q = 0), and equals
log P(x) when q(u | x) is p's own density inside x's bin. So training q alone, with the
flow p frozen, measures how loose the uniform bound is for that flow: the served model
and its scores are unchanged, only the reported code length tightens.

q here: eps ~ N(0, I) of the image's shape; v = mu(x) + sigma(x) * eps, then checkerboard
affine couplings (Dinh et al., 2017) whose shift and log-scale read the fixed half of v and
features of x; u = sigmoid(v). Its log density is the change of variables:

    log q(u | x) = log N(eps) - sum log sigma(x) - sum_couplings sum log s - sum log sigmoid'(v),
    log sigmoid'(v) = log sigmoid(v) + log sigmoid(-v).

The final convolution of every conditioner starts at zero, so an untrained q is the
logit-normal u = sigmoid(eps).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.glow import Glow


def checkerboard(height: int, width: int, parity: int) -> Tensor:
    """(1, 1, H, W) float mask, 1 where (row + column) % 2 == parity."""
    rows = torch.arange(height).view(-1, 1)
    cols = torch.arange(width).view(1, -1)
    return ((rows + cols) % 2 == parity).float().view(1, 1, height, width)


def _zero_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class Coupling(nn.Module):
    """v -> v on the mask's zeros: v * exp(log s) + t, with (t, log s) from v on the ones and x's features."""

    def __init__(self, channels: int, hidden: int, mask: Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)
        self.net = nn.Sequential(
            nn.Conv2d(channels + hidden, hidden, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 1), nn.ReLU(),
            _zero_conv(hidden, 2 * channels),
        )

    def forward(self, v: Tensor, features: Tensor) -> tuple[Tensor, Tensor]:
        """(coupled v, log|det| per image (B,))."""
        shift, raw = self.net(torch.cat([v * self.mask, features], 1)).chunk(2, 1)
        free = 1 - self.mask
        log_s = 2 * torch.tanh(raw / 2) * free  # |log s| < 2: bounded, as the Glow coupling's sigmoid scale
        return v * torch.exp(log_s) + shift * free, log_s.flatten(1).sum(1)


class Dequantizer(nn.Module):
    """q(u | x) for uint8 images of ``image_shape``; see the module docstring."""

    def __init__(self, image_shape: tuple[int, int, int], hidden: int = 32, couplings: int = 4) -> None:
        super().__init__()
        channels, height, width = image_shape
        self.image_shape = tuple(image_shape)
        self.hidden = hidden
        self.features = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(),
        )
        self.base = _zero_conv(hidden, 2 * channels)
        self.couplings = nn.ModuleList(
            Coupling(channels, hidden, checkerboard(height, width, i % 2)) for i in range(couplings))

    @property
    def device(self) -> torch.device:
        return self.base.weight.device

    def config(self) -> dict[str, object]:
        return {"image_shape": list(self.image_shape), "hidden": self.hidden, "couplings": len(self.couplings)}

    def forward(self, x: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
        """uint8 images x (B, C, H, W) and eps ~ N(0, I) of their shape -> (u in (0, 1), log q(u | x) (B,))."""
        features = self.features(x.to(self.base.weight.dtype) / 255 - 0.5)
        mu, log_sigma = self.base(features).chunk(2, 1)
        v = mu + torch.exp(log_sigma) * eps
        log_det = log_sigma.flatten(1).sum(1)
        for coupling in self.couplings:
            v, ld = coupling(v, features)
            log_det = log_det + ld
        log_normal = -0.5 * (eps**2 + math.log(2 * math.pi))
        log_sigmoid_grad = F.logsigmoid(v) + F.logsigmoid(-v)
        log_q = log_normal.flatten(1).sum(1) - log_det - log_sigmoid_grad.flatten(1).sum(1)
        return torch.sigmoid(v), log_q


def variational_log_prob(flow: Glow, dequantizer: Dequantizer, x: Tensor, eps: Tensor) -> Tensor:
    """One draw of the variational bound on log P(x) in nats, (B,): log p(x + u) - log q(u | x), u from eps."""
    u, log_q = dequantizer(x, eps)
    return flow.log_prob(x, u.to(flow.dtype)) - log_q.to(flow.dtype)


@torch.no_grad()
def variational_bits_per_dim(flow: Glow, dequantizer: Dequantizer, images: Tensor, samples: int = 1,
                             batch_size: int = 256, seed: int = 0) -> float:
    """Mean bits/dim bound over uint8 ``images`` (N, C, H, W). ``samples`` = 1: the variational bound (one draw
    per image); K > 1: the importance-weighted bound log (1/K) sum_k p(x + u_k) / q(u_k | x) (Burda et al., 2016),
    tighter as K grows and still a bound in expectation."""
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(flow.device)
        draws = []
        for _ in range(samples):
            eps = torch.randn(x.shape, generator=generator).to(flow.device)
            draws.append(variational_log_prob(flow, dequantizer, x, eps))
        log_p = torch.logsumexp(torch.stack(draws), 0) - math.log(samples)
        total += float(flow.bits_per_dim(log_p).double().sum())
    return total / max(1, len(images))
