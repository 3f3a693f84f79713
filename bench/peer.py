"""The benchmark's peer: the same Glow built from ``nflows`` (an optional benchmark dependency).

As the original tutorial did: a ``MultiscaleCompositeTransform`` with one transform per
level, each ``SqueezeTransform`` followed by K steps of ``ActNorm``, ``OneByOneConvolution``
and ``AffineCouplingTransform``; a standard-normal base. The coupling network is ours
(conv3x3 -> ReLU -> conv1x1 -> ReLU -> conv3x3 with ``hidden`` channels, the last conv
zero-initialised), so both models do the same convolutions and the comparison is of the
code around them. nflows has no learned conditional prior at the splits (it scores the
factored-out half under N(0, I)); that is one small 3x3 conv per split fewer for the peer.

Everything here takes and returns what ``model.glow.Glow`` does (uint8 images in, nats of
the discrete image out), so one timing loop serves both models.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from model.glow import GlowConfig


def nflows_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("nflows") is not None


class CouplingNet(nn.Sequential):
    """nn.Sequential that takes (and ignores) the ``context`` nflows passes to its networks."""

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:  # type: ignore[override]
        return super().forward(x)


def coupling_net(hidden: int, perturb_std: float, generator: torch.Generator):
    """nflows' ``transform_net_create_fn``: our coupling network, in -> hidden -> hidden -> out."""

    def create(in_channels: int, out_channels: int) -> nn.Module:
        net = CouplingNet(
            nn.Conv2d(in_channels, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 1),
            nn.ReLU(),
            nn.Conv2d(hidden, out_channels, 3, padding=1),
        )
        with torch.no_grad():
            for index in (0, 2):
                net[index].weight.normal_(0, 0.05, generator=generator)
                net[index].bias.zero_()
            # zero-initialised last layer (as Glow); perturbed so the step is not the identity
            net[4].weight.normal_(0, perturb_std, generator=generator)
            net[4].bias.normal_(0, perturb_std, generator=generator)
        return net

    return create


class NflowsGlow(nn.Module):
    """An nflows Glow with the interface of ``model.glow.Glow`` (log_prob, encode, decode, sample)."""

    def __init__(self, config: GlowConfig, seed: int = 0, perturb_std: float = 0.01) -> None:
        super().__init__()
        from nflows.distributions.normal import StandardNormal
        from nflows.flows.base import Flow
        from nflows.transforms import (
            ActNorm,
            AffineCouplingTransform,
            CompositeTransform,
            MultiscaleCompositeTransform,
            OneByOneConvolution,
            SqueezeTransform,
        )

        self.config = config
        generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng():  # nflows draws its permutations from the global generator
            torch.manual_seed(seed)
            c, h, w = config.image_shape
            transform = MultiscaleCompositeTransform(num_transforms=config.levels)
            self.steps_per_level: list[int] = []
            for _ in range(config.levels):
                squeeze = SqueezeTransform()
                c, h, w = squeeze.get_output_shape(c, h, w)
                mask = torch.ones(c)
                mask[: c // 2] = -1  # first half passes through, as in model.layers.AffineCoupling
                steps: list[nn.Module] = []
                for _ in range(config.steps_per_level):
                    steps += [
                        ActNorm(c),
                        OneByOneConvolution(c),
                        AffineCouplingTransform(mask, coupling_net(config.hidden_channels, perturb_std, generator)),
                    ]
                self.steps_per_level.append(len(steps) // 3)
                next_shape = transform.add_transform(CompositeTransform([squeeze, *steps]), (c, h, w))
                if next_shape is not None:
                    c, h, w = next_shape
        self.flow = Flow(transform, StandardNormal([config.dims]))

    @property
    def transform(self):
        return self.flow._transform

    @property
    def latent_dim(self) -> int:
        return self.config.dims

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """nflows' own data-dependent ActNorm initialisation: one forward pass in training mode."""
        self.train()
        self.transform(self.to_continuous(x, torch.rand(x.shape, generator=torch.Generator().manual_seed(1))))
        self.eval()

    # the same pixel <-> continuous maps as model.glow.Glow
    def to_continuous(self, x: Tensor, noise: Tensor | None = None) -> Tensor:
        bins = 2**self.config.n_bits
        k = torch.div(x, 2 ** (8 - self.config.n_bits), rounding_mode="floor").to(torch.float32)
        return (k + (0.5 if noise is None else noise)) / bins - 0.5

    def to_pixels(self, y: Tensor) -> Tensor:
        bins = 2**self.config.n_bits
        y = torch.nan_to_num(y, nan=0.0, posinf=0.5, neginf=-0.5)
        k = torch.floor((y + 0.5) * bins).clamp(0, bins - 1)
        return (k * 2 ** (8 - self.config.n_bits)).to(torch.uint8)

    def log_prob(self, x: Tensor) -> Tensor:
        """Nats of the discrete images (bin centres), as ``Glow.log_prob``."""
        constant = self.config.dims * self.config.n_bits * math.log(2)
        return self.flow.log_prob(self.to_continuous(x)) - constant

    def encode(self, x: Tensor) -> Tensor:
        return self.transform(self.to_continuous(x))[0]

    def decode(self, z: Tensor) -> Tensor:
        device = next(self.parameters()).device
        return self.to_pixels(self.transform.inverse(z.to(device=device, dtype=torch.float32))[0])

    def sample(self, n: int, temperature: float = 0.7, seed: int | None = 0) -> Tensor:
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
        z = torch.randn(n, self.latent_dim, generator=generator, dtype=torch.float64)
        return self.decode(z * temperature)


def count_steps(peer: NflowsGlow) -> dict[str, int]:
    """How many of each nflows layer the peer holds (for the 'same architecture' check)."""
    from nflows.transforms import ActNorm, AffineCouplingTransform, OneByOneConvolution, SqueezeTransform

    kinds = {
        "squeeze": SqueezeTransform,
        "actnorm": ActNorm,
        "one_by_one": OneByOneConvolution,
        "coupling": AffineCouplingTransform,
    }
    return {name: sum(isinstance(m, kind) for m in peer.modules()) for name, kind in kinds.items()}
