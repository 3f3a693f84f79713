"""The inference form of a trained Glow: the same density and bijection, folded for speed.

Built once from a :class:`model.glow.Glow` (eval mode, parameters frozen), it computes
``log_prob_and_levels``, ``encode_with_log_prob`` and ``decode`` with the model's
arithmetic, minus what does not depend on the input. Folded once, in float64, then cast
to the model's dtype:

- ActNorm then the invertible 1x1 conv of each step (paper, sections 3.1-3.2) are one
  1x1 conv with a bias:  W((x + b) * s) = (W diag(s)) x + W (b * s);
  inverse: x = (diag(1/s) W^-1) y - b.
- Every ZeroConv2d's output scale exp(3 * logs) goes into its weight and bias, and the
  coupling's ``raw + 2`` (s = sigmoid(raw + 2), section 3.3) into the bias of its
  scale half.
- Every log-determinant that does not depend on the input (ActNorm: H W sum log s;
  1x1 conv: H W sum log|s_LU|; the top prior: -sum log sigma) and the constants of
  log N(eps; 0, I) and of the discretisation (-D n log 2) add up to one number (the
  log-dets are kept per level too, for ``log_prob_and_levels``).

Per call, the coupled half is updated in place (y_b = (x_b + t) * s, no ``cat`` per step)
and each level's log s maps are summed once per level. Tensors stay on the device and
are kept in plain tuples, so a call does no module or attribute look-ups per layer: at
batch 1 that per-op overhead, not arithmetic, is most of the cost.

:class:`TracedGlow` runs the same three functions as frozen TorchScript graphs: a graph
runs a whole batch in C++ and takes the GIL once per call instead of once per tensor op,
so a busy event loop in the same process (the service's) cannot stall the model between
ops (measured: 1.4x the served throughput of the eager form on 2 cores, bench/README.md).

:class:`Float64Fallback` wraps either form (or the plain Glow): images whose float32 results
are not finite are recomputed by the plain model in float64.

Exactness (``tests/model/test_inference.py``): log-likelihoods within 1e-4 relative of
the plain fp32 model (measured: <= 2.2e-6), the same latents, and decode(encode(x)) == x
wherever the plain model gives that (images of the training distribution; for uniform
noise the inverse amplifies float rounding in every form, float64 included).
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.glow import Glow, GlowConfig, flatten_latents, split_latents
from model.layers import LOG_SCALE_FACTOR, ConditionalPrior, TopPrior, ZeroConv2d


@dataclass(frozen=True)
class _Step:
    """One flow step, folded: mixing 1x1 conv (forward, inverse) and the coupling network."""

    mix_weight: Tensor  # (C, C, 1, 1): W diag(s)
    mix_bias: Tensor  # (C,): W (b * s)
    unmix_weight: Tensor  # (C, C, 1, 1): diag(1/s) W^-1
    unmix_bias: Tensor  # (C,): -b
    weights: tuple[Tensor, Tensor, Tensor]  # conv3x3, conv1x1, zero conv3x3 (scale folded in)
    biases: tuple[Tensor, Tensor, Tensor]  # the last one's scale half includes the +2


@dataclass(frozen=True)
class _Level:
    steps: tuple[_Step, ...]
    split_at: int  # channels x_a that condition each coupling
    prior_weight: Tensor | None  # ConditionalPrior: zero conv (scale folded in); None for the top level
    prior_bias: Tensor | None
    prior_split: int  # ConditionalPrior: channels z_a kept for the next level
    top_mean: Tensor | None  # TopPrior: mu, sigma, 1/sigma and -mu/sigma, (1, C, H, W)
    top_sigma: Tensor | None
    top_inv_sigma: Tensor | None
    top_shift: Tensor | None


def _zero_conv(module: ZeroConv2d) -> tuple[Tensor, Tensor]:
    """(weight, bias) of a ZeroConv2d with its exp(3 * logs) output scale folded in, float64."""
    scale = torch.exp(module.logs.detach().double() * LOG_SCALE_FACTOR).flatten()
    return module.conv.weight.detach().double() * scale[:, None, None, None], module.conv.bias.detach().double() * scale


class _InferenceForm:
    """What both inference forms derive from their three computations (log_prob_and_levels,
    encode_with_log_prob, decode), and the input checks a traced graph cannot run."""

    config: GlowConfig
    latent_dim: int
    latent_shapes: list[tuple[int, int, int]]
    device: torch.device
    dtype: torch.dtype

    def log_prob_and_levels(self, x: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        raise NotImplementedError

    def encode_with_log_prob(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def log_prob_and_latents(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """log P(x) in nats (bin centres) and the eps of every level, as ``Glow.log_prob_and_latents``."""
        log_prob, latents, _ = self.log_prob_and_levels(x)
        return log_prob, latents

    def log_prob(self, x: Tensor) -> Tensor:
        return self.log_prob_and_latents(x)[0]

    def encode(self, x: Tensor) -> Tensor:
        return self.encode_with_log_prob(x)[0]

    def bits_per_dim(self, log_prob: Tensor) -> Tensor:
        return -log_prob / (self.config.dims * math.log(2))

    @staticmethod
    def _check_pixels(x: Tensor) -> None:
        if x.dtype != torch.uint8:
            raise TypeError(f"images must be uint8 pixels, got {x.dtype}")


class FoldedGlow(_InferenceForm):
    """A Glow's log_prob / encode / decode for inference, from its current parameters.

    ``channels_last`` stores weights and runs activations in NHWC, which oneDNN's CPU
    convolutions prefer at some shapes (see ``bench/model_throughput.py``).
    """

    def __init__(self, model: Glow, channels_last: bool = False) -> None:
        self.config = model.config
        self.latent_shapes = model.latent_shapes
        self.latent_dim = model.latent_dim
        self.dtype = model.dtype
        self.device = model.device
        self.channels_last = channels_last
        self._to_continuous, self._to_pixels = model.to_continuous, model.to_pixels  # uint8 <-> bin centres
        level_constants = []  # each level's input-independent log|det|, float64
        levels = []
        for level in model.levels:
            h, w = level.latent_shape[1:]
            constant = 0.0
            steps = []
            for step in level.steps:
                log_s = step.actnorm.log_scale.detach().double().flatten()
                b = step.actnorm.bias.detach().double().flatten()
                weight = step.invconv._compose().detach().double()
                constant += h * w * float(log_s.sum() + step.invconv.log_s.detach().double().sum())
                net = step.coupling.net
                last_weight, last_bias = _zero_conv(net[4])
                last_bias[: last_bias.numel() // 2] += 2.0  # s = sigmoid(raw + 2)
                steps.append(_Step(
                    mix_weight=self._weight(weight * torch.exp(log_s)[None, :]),
                    mix_bias=self._vector(weight @ (b * torch.exp(log_s))),
                    unmix_weight=self._weight(torch.linalg.inv(weight) * torch.exp(-log_s)[:, None]),
                    unmix_bias=self._vector(-b),
                    weights=(self._weight(net[0].weight), self._weight(net[2].weight), self._weight(last_weight)),
                    biases=(self._vector(net[0].bias), self._vector(net[2].bias), self._vector(last_bias)),
                ))
            prior = level.prior
            if isinstance(prior, ConditionalPrior):
                prior_weight, prior_bias = _zero_conv(prior.prior)
                levels.append(_Level(tuple(steps), level.steps[0].coupling.split_at, self._weight(prior_weight),
                                     self._vector(prior_bias), prior.split_at, None, None, None, None))
            else:
                assert isinstance(prior, TopPrior)
                log_sigma, mean = prior.log_sigma.detach().double(), prior.mean.detach().double()
                constant -= float(log_sigma.sum())
                levels.append(_Level(
                    tuple(steps), level.steps[0].coupling.split_at, None, None, 0,
                    self._map(mean), self._map(torch.exp(log_sigma)), self._map(torch.exp(-log_sigma)),
                    self._map(-mean * torch.exp(-log_sigma)),
                ))
            level_constants.append(constant)
        self.levels = tuple(levels)
        self.level_constants = level_constants
        d, n = self.config.dims, self.config.n_bits
        self.constant = sum(level_constants) - d * n * math.log(2) - 0.5 * d * math.log(2 * math.pi)

    # --------------------------------------------------------------- set-up
    def _cast(self, t: Tensor) -> Tensor:
        return t.detach().to(device=self.device, dtype=self.dtype, copy=True)  # a snapshot, not a view

    def _weight(self, t: Tensor) -> Tensor:
        """A conv weight (O, I, kh, kw), or a (O, I) matrix as a 1x1 conv weight."""
        t = self._cast(t if t.ndim == 4 else t[:, :, None, None])
        return t.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def _vector(self, t: Tensor) -> Tensor:
        return self._cast(t).contiguous()

    def _map(self, t: Tensor) -> Tensor:
        return self._weight(t)  # (1, C, H, W) in the activations' layout

    # --------------------------------------------------------------- layers
    @staticmethod
    def _coupling_net(step: _Step, x_a: Tensor) -> tuple[Tensor, Tensor]:
        """(raw + 2, t) of the coupling network NN(x_a)."""
        (w1, w2, w3), (b1, b2, b3) = step.weights, step.biases
        h = F.conv2d(x_a, w1, b1, padding=1).relu_()
        h = F.conv2d(h, w2, b2).relu_()
        return F.conv2d(h, w3, b3, padding=1).chunk(2, dim=1)

    @staticmethod
    def _squeeze(x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)

    @staticmethod
    def _unsqueeze(y: Tensor) -> Tensor:
        b, c, h, w = y.shape
        return y.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, 2 * h, 2 * w)

    def _layout(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    # ------------------------------------------------------------ the flow
    def _forward(self, y: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Continuous y -> (eps of every level, the input-dependent part of each level's log|det|)."""
        latents, level_logdets = [], []
        x = y
        for level in self.levels:
            x = self._layout(self._squeeze(x))
            a = level.split_at
            log_scales: Tensor | None = None
            for step in level.steps:
                x = F.conv2d(x, step.mix_weight, step.mix_bias)  # ActNorm + 1x1 conv
                raw, shift = self._coupling_net(step, x[:, :a])
                log_scale = F.logsigmoid(raw)
                x[:, a:].add_(shift).mul_(torch.exp(log_scale))  # y_b = (x_b + t) * s, in place
                log_scales = log_scale if log_scales is None else log_scales.add_(log_scale)
            logdet = y.new_zeros(y.shape[0]) if log_scales is None else log_scales.flatten(1).sum(1)
            if level.prior_weight is not None:
                k = level.prior_split
                z_a, z_b = x[:, :k], x[:, k:]
                mean, log_sigma = F.conv2d(z_a, level.prior_weight, level.prior_bias, padding=1).chunk(2, dim=1)
                latents.append((z_b - mean).mul_(torch.exp(-log_sigma)))
                logdet = logdet - log_sigma.flatten(1).sum(1)
                x = z_a
            else:
                latents.append(torch.addcmul(level.top_shift, x, level.top_inv_sigma))
            level_logdets.append(logdet)
        return latents, level_logdets

    def _inverse(self, latents: list[Tensor]) -> Tensor:
        x: Tensor | None = None
        for level, eps in zip(reversed(self.levels), reversed(latents)):
            eps = self._layout(eps)
            if level.prior_weight is None:
                y = torch.addcmul(level.top_mean, eps, level.top_sigma)
            else:
                assert x is not None
                mean, log_sigma = F.conv2d(x, level.prior_weight, level.prior_bias, padding=1).chunk(2, dim=1)
                y = self._layout(torch.cat([x, torch.addcmul(mean, eps, torch.exp(log_sigma))], dim=1))
            a = level.split_at
            for step in reversed(level.steps):
                raw, shift = self._coupling_net(step, y[:, :a])
                y[:, a:].mul_(F.logsigmoid(raw).neg_().exp_()).sub_(shift)  # x_b = y_b / s - t, in place
                y = F.conv2d(y, step.unmix_weight, step.unmix_bias)  # 1x1 conv^-1, then ActNorm^-1
            x = self._unsqueeze(y).contiguous()
        assert x is not None
        return x

    # ------------------------------------------------------- the model's API
    def log_prob_and_levels(self, x: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """log P(x) in nats (bin centres), the eps of every level and each level's log|det|,
        as ``Glow.log_prob_and_levels`` (the folded constants put back into the levels')."""
        latents, level_logdets = self._forward(self._to_continuous(x))
        logdet = level_logdets[0]
        for ld in level_logdets[1:]:
            logdet = logdet + ld
        squares = sum(eps.square().flatten(1).sum(1) for eps in latents)
        log_prob = logdet - 0.5 * squares + self.constant
        return log_prob, latents, [ld + c for ld, c in zip(level_logdets, self.level_constants)]

    def encode_with_log_prob(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(flat latents in ``Glow.encode``'s layout, log P(x)) of uint8 images."""
        log_prob, latents = self.log_prob_and_latents(x)
        return flatten_latents(latents), log_prob

    def decode(self, z: Tensor) -> Tensor:
        """Flat latents (B, latent_dim) -> uint8 images, as ``Glow.decode``."""
        return self._to_pixels(self._inverse(split_latents(z.to(self.dtype), self.latent_shapes)))


class _Method(nn.Module):
    """One method of a FoldedGlow as a module's forward, for torch.jit.trace."""

    def __init__(self, folded: FoldedGlow, method: str) -> None:
        super().__init__()
        self.method = getattr(folded, method)

    def forward(self, x: Tensor) -> Any:
        return self.method(x)


class TracedGlow(_InferenceForm):
    """A FoldedGlow's log_prob_and_levels, encode_with_log_prob and decode as frozen TorchScript graphs.

    Traced once at batch ``trace_batch``; the graphs take any batch size (nothing in the
    flow branches on values or batch size). torch.jit.trace and torch.jit.freeze are
    deprecated in torch 2.x but supported in the 2.13 this project pins.
    """

    def __init__(self, folded: FoldedGlow, trace_batch: int = 8) -> None:
        self.config, self.latent_dim, self.latent_shapes = folded.config, folded.latent_dim, folded.latent_shapes
        self.device, self.dtype = folded.device, folded.dtype
        images = torch.randint(0, 256, (trace_batch, *folded.config.image_shape), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(0)).to(folded.device)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # decode's shape check: constant here
            latents = folded.encode(images)
            self._graphs = {
                method: torch.jit.freeze(torch.jit.trace(_Method(folded, method).eval(), example, check_trace=False,
                                                         strict=False))  # strict: no list outputs
                for method, example in (("log_prob_and_levels", images), ("encode_with_log_prob", images),
                                        ("decode", latents))
            }

    def log_prob_and_levels(self, x: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        self._check_pixels(x)  # here: a traced graph runs no Python checks
        log_prob, latents, level_logdets = self._graphs["log_prob_and_levels"](x)
        return log_prob, list(latents), list(level_logdets)

    def encode_with_log_prob(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check_pixels(x)
        z, log_prob = self._graphs["encode_with_log_prob"](x)
        return z, log_prob

    def decode(self, z: Tensor) -> Tensor:
        split_latents(z, self.latent_shapes)  # the shape check, before the graph
        return self._graphs["decode"](z.to(self.dtype))


def _finite_rows(tensors: list[Tensor]) -> Tensor:
    """(B,) whether every value of each row is finite, over tensors whose first dimension is the batch."""
    finite = torch.ones(tensors[0].shape[0], dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        finite &= torch.isfinite(t).flatten(1).all(1) if t.ndim > 1 else torch.isfinite(t)  # flatten: 0 rows too
    return finite


def _merged(fast: Tensor, exact: Tensor, bad: Tensor) -> Tensor:
    """``fast`` in float64 with its ``bad`` rows replaced by ``exact`` (whose values may not fit float32)."""
    out = fast.to(torch.float64, copy=True)  # a float64 fast form's own output stays as it was
    out[bad] = exact.double()
    return out


class Float64Fallback(_InferenceForm):
    """An inference form whose non-finite rows are recomputed by the plain model in float64.

    Float32 overflows on the rare image far from the training data (latents beyond ~1e19, a
    log-det past the float32 range); the same image in float64 scores. Batches without
    such an image come back from the fast form untouched; a batch with one comes back in
    float64 (its values may not fit float32). The float64 copy is made on first use.
    """

    def __init__(self, fast: Glow | FoldedGlow | TracedGlow, model: Glow) -> None:
        self.fast, self.model = fast, model
        self.config, self.latent_dim, self.latent_shapes = model.config, model.latent_dim, model.latent_shapes
        self.device, self.dtype = model.device, model.dtype
        self._exact: Glow | None = None

    def exact_model(self) -> Glow:
        """The plain model in float64."""
        if self._exact is None:
            with torch.inference_mode(False):  # made on first use, often in inference mode: keep real parameters
                self._exact = copy.deepcopy(self.model).double().eval()
        return self._exact

    def log_prob_and_levels(self, x: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        log_prob, latents, level_logdets = self.fast.log_prob_and_levels(x)
        bad = ~_finite_rows([log_prob, *latents, *level_logdets])
        if not bad.any():
            return log_prob, latents, level_logdets
        exact_log_prob, exact_latents, exact_logdets = self.exact_model().log_prob_and_levels(x[bad])
        return (_merged(log_prob, exact_log_prob, bad), [_merged(*p, bad) for p in zip(latents, exact_latents)],
                [_merged(*p, bad) for p in zip(level_logdets, exact_logdets)])

    def encode_with_log_prob(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z, log_prob = self.fast.encode_with_log_prob(x)
        bad = ~_finite_rows([z, log_prob])
        if not bad.any():
            return z, log_prob
        exact_z, exact_log_prob = self.exact_model().encode_with_log_prob(x[bad])
        return _merged(z, exact_z, bad), _merged(log_prob, exact_log_prob, bad)

    def decode(self, z: Tensor) -> Tensor:
        return self.fast.decode(z)
