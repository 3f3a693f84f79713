"""A folded inference form of a trained ``model.glow.Glow``: the optimisation the benchmark proposes.

Not used by the service: ``bench/model_throughput.py`` times it beside the model (knob
``fused``) and checks that it keeps log-likelihoods within 1e-4 relative of the plain fp32
path and decode(encode(x)) pixel-exact, so the change can be moved into ``model/`` on
evidence. What it folds, once, in float64, from the model's parameters:

- ActNorm and the invertible 1x1 conv of each step into one 1x1 conv with a bias:
  W((x + b) * s) = (W diag(s)) x + W (b * s); inverse: (diag(1/s) W^-1) y - b.
- The output scale exp(3 * logs) of every zero-initialised conv into its weight and bias,
  and the coupling's ``raw + 2`` into the bias of its scale half.
- Every input-independent log-determinant (ActNorm, 1x1 convs, the top prior) into one
  constant per model.

and per call it updates the coupled half in place (no ``torch.cat`` per step), applies the
ReLUs in place and sums each level's coupling log-scales once per level instead of once
per step. The arithmetic is otherwise the model's: same convolutions, sigmoid scale, log.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.glow import Glow
from model.layers import LOG_SCALE_FACTOR, ConditionalPrior, TopPrior


def _zero_conv(module: nn.Module) -> tuple[Tensor, Tensor]:
    """(weight, bias) of a ZeroConv2d with its exp(3 * logs) output scale folded in, float64."""
    scale = torch.exp(module.logs.detach().double() * LOG_SCALE_FACTOR).flatten()
    weight = module.conv.weight.detach().double() * scale[:, None, None, None]
    return weight, module.conv.bias.detach().double() * scale


class FusedGlow(nn.Module):
    """Inference-only Glow with the same log_prob / encode / decode / sample as the model it folds."""

    def __init__(self, model: Glow) -> None:
        super().__init__()
        self.config = model.config
        self.latent_shapes = model.latent_shapes
        self.latent_dim = model.latent_dim
        dtype = model.dtype
        constant = 0.0  # every input-independent log|det|, float64
        self.split_at: list[int] = []
        self.levels = len(model.levels)
        self.steps = [len(level.steps) for level in model.levels]
        for li, level in enumerate(model.levels):
            _, h, w = self._level_shape(li)
            for si, step in enumerate(level.steps):
                log_scale = step.actnorm.log_scale.detach().double().flatten()
                bias = step.actnorm.bias.detach().double().flatten()
                inv = step.invconv
                weight = inv._compose().detach().double()
                s = torch.exp(log_scale)
                forward_w = weight * s[None, :]
                forward_b = weight @ (bias * s)
                inverse_w = torch.linalg.inv(weight) * torch.exp(-log_scale)[:, None]
                inverse_b = -bias
                constant += h * w * float(log_scale.sum() + inv.log_s.detach().double().sum())
                net = step.coupling.net
                w3, b3 = _zero_conv(net[4])
                out = w3.shape[0] // 2
                b3 = b3.clone()
                b3[:out] += 2.0  # sigmoid(raw + 2)
                tensors = {
                    "fw": forward_w[:, :, None, None], "fb": forward_b,
                    "iw": inverse_w[:, :, None, None], "ib": inverse_b,
                    "w1": net[0].weight.detach().double(), "b1": net[0].bias.detach().double(),
                    "w2": net[2].weight.detach().double(), "b2": net[2].bias.detach().double(),
                    "w3": w3, "b3": b3,
                }
                for name, tensor in tensors.items():
                    self.register_buffer(f"l{li}s{si}{name}", tensor.to(dtype).contiguous())
            self.split_at.append(level.steps[0].coupling.split_at)
            if isinstance(level.prior, ConditionalPrior):
                pw, pb = _zero_conv(level.prior.prior)
                self.register_buffer(f"l{li}pw", pw.to(dtype))
                self.register_buffer(f"l{li}pb", pb.to(dtype))
            else:
                assert isinstance(level.prior, TopPrior)
                log_sigma = level.prior.log_sigma.detach().double()
                mean = level.prior.mean.detach().double()
                self.register_buffer(f"l{li}inv_sigma", torch.exp(-log_sigma).to(dtype))
                self.register_buffer(f"l{li}sigma", torch.exp(log_sigma).to(dtype))
                self.register_buffer(f"l{li}mean", mean.to(dtype))
                self.register_buffer(f"l{li}shift", (-mean * torch.exp(-log_sigma)).to(dtype))
                constant += -float(log_sigma.sum())
        d = self.config.dims
        self.constant = constant - d * self.config.n_bits * math.log(2) - 0.5 * d * math.log(2 * math.pi)
        self.prior_split = [level.prior.split_at if isinstance(level.prior, ConditionalPrior) else 0
                            for level in model.levels]

    def _level_shape(self, index: int) -> tuple[int, int, int]:
        c, h, w = self.config.image_shape
        for _ in range(index):
            c, h, w = 2 * c, h // 2, w // 2  # squeeze (x4 channels) then split (half kept)
        return 4 * c, h // 2, w // 2

    def _b(self, name: str) -> Tensor:
        return getattr(self, name)

    # ------------------------------------------------------------- forward
    def _net(self, prefix: str, x_a: Tensor) -> Tensor:
        h = F.conv2d(x_a, self._b(prefix + "w1"), self._b(prefix + "b1"), padding=1).relu_()
        h = F.conv2d(h, self._b(prefix + "w2"), self._b(prefix + "b2")).relu_()
        return F.conv2d(h, self._b(prefix + "w3"), self._b(prefix + "b3"), padding=1)

    def _squeeze(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)

    def _unsqueeze(self, y: Tensor) -> Tensor:
        b, c, h, w = y.shape
        return y.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, 2 * h, 2 * w)

    def flow_forward(self, y: Tensor) -> tuple[list[Tensor], Tensor]:
        """Continuous y -> (eps of every level, the input-dependent part of log|det|)."""
        logdet = y.new_zeros(y.shape[0])
        latents = []
        x = y
        for li in range(self.levels):
            x = self._squeeze(x)
            a = self.split_at[li]
            log_scales: Tensor | None = None
            for si in range(self.steps[li]):
                p = f"l{li}s{si}"
                x = F.conv2d(x, self._b(p + "fw"), self._b(p + "fb"))  # ActNorm + 1x1 conv
                raw, shift = self._net(p, x[:, :a]).chunk(2, dim=1)
                scale = torch.sigmoid(raw)
                x[:, a:].add_(shift).mul_(scale)  # the coupled half, in place
                log_scale = scale.log_()
                log_scales = log_scale if log_scales is None else log_scales.add_(log_scale)
            if log_scales is not None:
                logdet = logdet + log_scales.flatten(1).sum(1)
            if li < self.levels - 1:
                k = self.prior_split[li]
                z_a, z_b = x[:, :k], x[:, k:]
                mean, log_sigma = F.conv2d(z_a, self._b(f"l{li}pw"), self._b(f"l{li}pb"), padding=1).chunk(2, dim=1)
                latents.append((z_b - mean).mul_(torch.exp(-log_sigma)))
                logdet = logdet - log_sigma.flatten(1).sum(1)
                x = z_a
            else:
                latents.append(torch.addcmul(self._b(f"l{li}shift"), x, self._b(f"l{li}inv_sigma")))
        return latents, logdet

    def to_continuous(self, x: Tensor) -> Tensor:
        if x.dtype != torch.uint8:
            raise TypeError(f"images must be uint8 pixels, got {x.dtype}")
        bins = 2**self.config.n_bits
        k = torch.div(x, 2 ** (8 - self.config.n_bits), rounding_mode="floor") if self.config.n_bits < 8 else x
        dtype = self._b("l0s0fw").dtype
        return (k.to(dtype) + 0.5) / bins - 0.5

    def log_prob_and_latents(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        latents, logdet = self.flow_forward(self.to_continuous(x))
        squares = sum(eps.square().flatten(1).sum(1) for eps in latents)
        return logdet - 0.5 * squares + self.constant, latents

    def log_prob(self, x: Tensor) -> Tensor:
        return self.log_prob_and_latents(x)[0]

    def encode(self, x: Tensor) -> Tensor:
        latents, _ = self.flow_forward(self.to_continuous(x))
        return torch.cat([eps.flatten(1) for eps in latents], dim=1)

    # ------------------------------------------------------------- inverse
    def decode(self, z: Tensor) -> Tensor:
        dtype = self._b("l0s0fw").dtype
        z = z.to(dtype)
        sizes = [math.prod(shape) for shape in self.latent_shapes]
        parts = [p.reshape(-1, *shape) for p, shape in zip(z.split(sizes, dim=1), self.latent_shapes)]
        x: Tensor | None = None
        for li in reversed(range(self.levels)):
            eps = parts[li]
            if li == self.levels - 1:
                y = torch.addcmul(self._b(f"l{li}mean"), eps, self._b(f"l{li}sigma"))
            else:
                assert x is not None
                mean, log_sigma = F.conv2d(x, self._b(f"l{li}pw"), self._b(f"l{li}pb"), padding=1).chunk(2, dim=1)
                y = torch.cat([x, torch.addcmul(mean, eps, torch.exp(log_sigma))], dim=1)
            a = self.split_at[li]
            for si in reversed(range(self.steps[li])):
                p = f"l{li}s{si}"
                raw, shift = self._net(p, y[:, :a]).chunk(2, dim=1)
                y[:, a:].div_(torch.sigmoid(raw)).sub_(shift)
                y = F.conv2d(y, self._b(p + "iw"), self._b(p + "ib"))  # 1x1 conv^-1 + ActNorm^-1
            x = self._unsqueeze(y)
        assert x is not None
        bins = 2**self.config.n_bits
        x = torch.nan_to_num(x, nan=0.0, posinf=0.5, neginf=-0.5)
        k = torch.floor((x + 0.5) * bins).clamp(0, bins - 1)
        return (k * 2 ** (8 - self.config.n_bits)).to(torch.uint8)

    def sample(self, n: int, temperature: float = 0.7, seed: int | None = 0) -> Tensor:
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
        z = torch.randn(n, self.latent_dim, generator=generator, dtype=torch.float64)
        return self.decode((z * temperature).to(self._b("l0s0fw").device))


class _Method(nn.Module):
    """One method of a FusedGlow as a module's forward, for torch.jit.trace."""

    def __init__(self, fused: FusedGlow, method: str) -> None:
        super().__init__()
        self.fused = fused
        self.method = method

    def forward(self, x: Tensor):  # type: ignore[no-untyped-def]
        return getattr(self.fused, self.method)(x)


class TracedGlow(nn.Module):
    """A FusedGlow whose log_prob_and_latents, encode and decode run as frozen TorchScript graphs.

    A traced graph runs a whole batch in C++: the calling thread takes the GIL once per
    call instead of once per tensor op, so a busy event loop in the same process (the
    service's) cannot stall the model between ops. Traced at batch ``trace_batch``; the
    graphs take any batch size (checked against the eager fused model by the benchmark).
    torch.jit.trace and torch.jit.freeze are deprecated in torch 2.x (DeprecationWarning) but
    still supported in 2.13.
    """

    def __init__(self, fused: FusedGlow, trace_batch: int = 8) -> None:
        super().__init__()
        self.fused = fused
        self.config = fused.config
        self.latent_dim = fused.latent_dim
        self.latent_shapes = fused.latent_shapes
        device = fused._b("l0s0fw").device
        images = torch.randint(0, 256, (trace_batch, *fused.config.image_shape), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(0)).to(device)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated in 2.x, still supported
            latents = fused.encode(images)
            self._graphs = {
                method: torch.jit.freeze(torch.jit.trace(_Method(fused, method).eval(), example, check_trace=False, strict=False))
                for method, example in (("log_prob_and_latents", images), ("encode", images), ("decode", latents))
            }

    def log_prob_and_latents(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        log_prob, latents = self._graphs["log_prob_and_latents"](x)
        return log_prob, list(latents)

    def log_prob(self, x: Tensor) -> Tensor:
        return self.log_prob_and_latents(x)[0]

    def encode(self, x: Tensor) -> Tensor:
        return self._graphs["encode"](x)

    def decode(self, z: Tensor) -> Tensor:
        return self._graphs["decode"](z.to(self.fused._b("l0s0fw").dtype))

    def sample(self, n: int, temperature: float = 0.7, seed: int | None = 0) -> Tensor:
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
        z = torch.randn(n, self.latent_dim, generator=generator, dtype=torch.float64)
        return self.decode((z * temperature).to(self.fused._b("l0s0fw").device))
