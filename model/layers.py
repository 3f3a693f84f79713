"""The invertible layers of Glow (Kingma & Dhariwal, 2018, arXiv:1807.03039).

Every layer is a bijection with the same two-way signature::

    forward(x) -> (y, logdet)      logdet = log|det dy/dx|, one value per batch row
    inverse(y) -> (x, logdet)      logdet = log|det dx/dy| = -forward's logdet

so both directions can be tested against each other and against a brute-force
Jacobian. Tensors are (B, C, H, W) throughout.

Every layer with parameters also offers ``fold()``: an equivalent bijection for
inference, with what does not depend on the input computed once (call it on a
float64 copy; ``Glow.fold`` does). ActNorm and the 1x1 convolution fold to a
:class:`Conv1x1` with a bias, and the two of a flow step compose into one; a
:class:`ZeroConv2d` folds its output scale into its weights. The folded layers keep
the signatures above; ``model.glow.FoldedLevel`` sequences them with fewer tensor ops (the
coupling updating the conv's output in place, constant log-dets added once per level).

The multi-scale "split" of the paper is written here as a bijection too
(:class:`ConditionalPrior`): instead of scoring the factored-out half z_b under
N(mu(z_a), sigma(z_a)) it standardises it, eps = (z_b - mu) / sigma, with
log|det| = -sum(log sigma). The model then scores every eps under N(0, I), which
is the same density, and sampling at temperature T draws eps ~ N(0, T^2 I), which
scales every prior's standard deviation by T as in the paper.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOG_SCALE_FACTOR = 3.0
"""Zero-initialised convolutions scale their output by exp(3 * logs) (as in the
reference implementation), so the learned per-channel output scale moves quickly."""


def _batch_logdet(value: Tensor, batch: int) -> Tensor:
    """Broadcast a log-det that does not depend on the input to one value per row."""
    return value.expand(batch)


class Conv1x1(nn.Module):
    """A fixed invertible 1x1 convolution with a bias, y = W x + c; the folded form of ActNorm and
    :class:`InvertibleConv1x1` (and of the two in sequence: :meth:`then`).

    Built from float64 W, c and log|det W|; stores W^-1 and -W^-1 c for the inverse,
    x = W^-1 y - W^-1 c. log|det| = H * W_img * log|det W|, computed once when the
    input's H * W_img is fixed (``pixels``; then other sizes are refused).
    """

    def __init__(self, weight: Tensor, bias: Tensor, log_abs_det: Tensor, pixels: int | None = None) -> None:
        super().__init__()
        inverse = torch.linalg.inv(weight)
        self.pixels = pixels
        self.register_buffer("weight", weight[:, :, None, None].clone())  # (C_out, C_in, 1, 1)
        self.register_buffer("bias", bias.clone())
        self.register_buffer("inverse_weight", inverse[:, :, None, None].clone())
        self.register_buffer("inverse_bias", -(inverse @ bias))
        self.register_buffer("log_abs_det", log_abs_det.clone() * (pixels or 1))  # per image if pixels, else per pixel

    def then(self, other: Conv1x1, pixels: int | None = None) -> Conv1x1:
        """The composition ``other(self(x))``: W2 (W1 x + c1) + c2 = (W2 W1) x + (W2 c1 + c2), for inputs of
        ``pixels`` pixels (both parts per pixel)."""
        first, second = self.weight[:, :, 0, 0], other.weight[:, :, 0, 0]
        return Conv1x1(second @ first, second @ self.bias + other.bias, self.log_abs_det + other.log_abs_det, pixels)

    def _logdet(self, x: Tensor) -> Tensor:
        if self.pixels is None:
            return _batch_logdet(self.log_abs_det * (x.shape[2] * x.shape[3]), x.shape[0])
        if x.shape[2] * x.shape[3] != self.pixels:
            raise ValueError(f"this folded 1x1 conv takes inputs of {self.pixels} pixels, got {tuple(x.shape[2:])}")
        return _batch_logdet(self.log_abs_det, x.shape[0])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return F.conv2d(x, self.weight, self.bias), self._logdet(x)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return F.conv2d(y, self.inverse_weight, self.inverse_bias), -self._logdet(y)


class ActNorm(nn.Module):
    """Per-channel affine normalisation, y = (x + b) * exp(log_s) (paper, section 3.1).

    log|det| = H * W * sum_c log_s[c].

    Data-dependent initialisation is explicit: :meth:`initialize` sets b and log_s so
    that a given batch has zero mean and unit variance per channel, and marks the
    layer initialised in a buffer that is saved with the weights. It is called once,
    on the first training batch (see ``Glow.initialize``), never from ``forward``, so
    loading weights or serving requests can never re-initialise the layer.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def initialize(self, x: Tensor, eps: float = 1e-6) -> None:
        """Set b = -mean(x), log_s = -log(std(x) + eps) per channel, from batch x."""
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.std(dim=(0, 2, 3), keepdim=True, unbiased=False)
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + eps))
        self.initialized.fill_(True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = (x + self.bias) * torch.exp(self.log_scale)
        logdet = self.log_scale.sum() * (x.shape[2] * x.shape[3])
        return y, _batch_logdet(logdet, x.shape[0])

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        x = y * torch.exp(-self.log_scale) - self.bias
        logdet = -self.log_scale.sum() * (y.shape[2] * y.shape[3])
        return x, _batch_logdet(logdet, y.shape[0])

    @torch.no_grad()
    def fold(self) -> Conv1x1:
        """y = diag(s) x + b * s, s = exp(log_s)."""
        log_s, b = self.log_scale.flatten(), self.bias.flatten()
        return Conv1x1(torch.diag(torch.exp(log_s)), b * torch.exp(log_s), log_s.sum())


class InvertibleConv1x1(nn.Module):
    """Invertible 1x1 convolution with an LU-decomposed weight (paper, section 3.2).

    W = P L (U + diag(sign(s) * exp(log|s|))), with P a fixed permutation, L unit
    lower-triangular and U strictly upper-triangular, so that
    log|det| = H * W * sum(log|s|) costs O(C) instead of O(C^3).

    Initialised from a random rotation, as in the paper. W is composed on every call
    (C x C, C <= 16 here: microseconds) and inverted in float64 for :meth:`inverse`;
    :meth:`fold` computes both once for inference.
    """

    def __init__(self, channels: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        rotation, _ = torch.linalg.qr(torch.randn(channels, channels, generator=generator))
        permutation, lower, upper = torch.linalg.lu(rotation)
        diagonal = torch.diagonal(upper)
        self.register_buffer("permutation", permutation)
        self.register_buffer("sign_s", torch.sign(diagonal))
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.lower = nn.Parameter(lower)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(torch.abs(diagonal)))

    def weight(self) -> Tensor:
        """The (C_out, C_in) weight W."""
        eye = torch.eye(self.lower.shape[0], dtype=self.lower.dtype, device=self.lower.device)
        lower = self.lower * self.lower_mask + eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.permutation @ lower @ upper

    def _logdet(self, x: Tensor) -> Tensor:
        return _batch_logdet(self.log_s.sum() * (x.shape[2] * x.shape[3]), x.shape[0])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return F.conv2d(x, self.weight()[:, :, None, None]), self._logdet(x)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        weight = self.weight()
        inverse = torch.linalg.inv(weight.double()).to(weight.dtype)
        return F.conv2d(y, inverse[:, :, None, None]), -self._logdet(y)

    @torch.no_grad()
    def fold(self) -> Conv1x1:
        weight = self.weight()
        return Conv1x1(weight, weight.new_zeros(weight.shape[0]), self.log_s.sum())


class ZeroConv2d(nn.Module):
    """3x3 convolution initialised to output zero, times a learned exp(3 * logs).

    Used as the last layer of every coupling network and prior, so that each flow
    step starts as the identity and each prior as N(0, I) (paper, section 3.3).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.logs = nn.Parameter(torch.zeros(1, out_channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) * torch.exp(self.logs * LOG_SCALE_FACTOR)

    @torch.no_grad()
    def fold(self) -> nn.Conv2d:
        """The convolution with the output scale in its weight and bias."""
        scale = torch.exp(self.logs * LOG_SCALE_FACTOR).flatten()
        conv = copy.deepcopy(self.conv)
        conv.weight.mul_(scale[:, None, None, None])
        conv.bias.mul_(scale)
        return conv


class AffineCoupling(nn.Module):
    """Affine coupling layer (paper, section 3.3; Dinh et al., 2017).

    x = [x_a, x_b] split along channels; (raw, t) = NN(x_a);
    s = sigmoid(raw + 2); y_b = (x_b + t) * s; y = [x_a, y_b].
    log|det| = sum log s. Inverse: x_b = y_b / s - t.

    NN is conv3x3 -> ReLU -> conv1x1 -> ReLU -> ZeroConv3x3 with ``hidden`` channels.
    The sigmoid keeps the scale in (0, 1), which the reference implementation found
    more stable than exp; with the zero-initialised last layer the step starts as
    y_b = sigmoid(2) * x_b, a fixed scale that the next ActNorm absorbs.
    """

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.split_at = channels // 2
        self.scale_offset = 2.0  # s = sigmoid(raw + 2)
        out = channels - self.split_at
        self.net = nn.Sequential(
            nn.Conv2d(self.split_at, hidden, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 1),
            nn.ReLU(inplace=True),
            ZeroConv2d(hidden, 2 * out),
        )
        nn.init.normal_(self.net[0].weight, std=0.05)
        nn.init.zeros_(self.net[0].bias)
        nn.init.normal_(self.net[2].weight, std=0.05)
        nn.init.zeros_(self.net[2].bias)

    def _log_scale_shift(self, x_a: Tensor) -> tuple[Tensor, Tensor]:
        raw, shift = self.net(x_a).chunk(2, dim=1)
        if self.scale_offset:  # 0 once folded into the last layer's bias
            raw = raw + self.scale_offset
        # log sigmoid(a) = -softplus(-a): finite where sigmoid(a) underflows to 0 in float32
        return F.logsigmoid(raw), shift

    def couple(self, x: Tensor, in_place: bool = False) -> tuple[Tensor, Tensor]:
        """(y, log s): log|det| is the sum of the map log s over (C, H, W). ``in_place`` writes y_b into x's
        second half and returns x (for a caller that owns x: the folded level's own activations)."""
        x_a, x_b = x[:, : self.split_at], x[:, self.split_at :]
        log_scale, shift = self._log_scale_shift(x_a)
        out = x_b if in_place else None
        y_b = torch.mul(torch.add(x_b, shift, out=out), torch.exp(log_scale), out=out)  # (x_b + t) * s
        return (x if in_place else torch.cat([x_a, y_b], dim=1)), log_scale

    def uncouple(self, y: Tensor, in_place: bool = False) -> tuple[Tensor, Tensor]:
        """(x, log s) of :meth:`couple`'s output y (log|det| of the inverse: minus the map's sum)."""
        y_a, y_b = y[:, : self.split_at], y[:, self.split_at :]
        log_scale, shift = self._log_scale_shift(y_a)
        out = y_b if in_place else None
        x_b = torch.sub(torch.div(y_b, torch.exp(log_scale), out=out), shift, out=out)  # y_b / s - t
        return (y if in_place else torch.cat([y_a, x_b], dim=1)), log_scale

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y, log_scale = self.couple(x)
        return y, log_scale.sum((1, 2, 3))

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        x, log_scale = self.uncouple(y)
        return x, -log_scale.sum((1, 2, 3))

    @torch.no_grad()
    def fold(self) -> AffineCoupling:
        """The same coupling with its last layer's output scale, and the +2 of s, folded into its weights."""
        folded = copy.deepcopy(self)
        last = self.net[-1].fold()
        last.bias[: last.bias.numel() // 2] += self.scale_offset
        folded.net[-1], folded.scale_offset = last, 0.0
        return folded


class Chain(nn.Module):
    """Bijections in sequence: forward applies them in order and sums their log-dets, inverse
    undoes them in reverse order (log|det| of a composition is the sum of its parts')."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        for index, layer in enumerate(layers):
            self.add_module(str(index), layer)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        layers = list(self.children())
        x, logdet = layers[0](x)
        for layer in layers[1:]:
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        layers = list(self.children())[::-1]
        y, logdet = layers[0].inverse(y)
        for layer in layers[1:]:
            y, ld = layer.inverse(y)
            logdet = logdet + ld
        return y, logdet


class FlowStep(Chain):
    """One step of flow: ActNorm -> invertible 1x1 conv -> affine coupling (paper, fig. 2a)."""

    def __init__(self, channels: int, hidden: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.actnorm = ActNorm(channels)
        self.invconv = InvertibleConv1x1(channels, generator)
        self.coupling = AffineCoupling(channels, hidden)

    def fold(self, pixels: int | None = None) -> Chain:
        """One 1x1 convolution with a bias (ActNorm then the 1x1 conv), then the folded coupling;
        ``pixels``: H * W of the inputs, when fixed (the constant log-det is then computed once)."""
        return Chain(self.actnorm.fold().then(self.invconv.fold(), pixels), self.coupling.fold())


class Squeeze(nn.Module):
    """Space-to-depth: (B, C, H, W) -> (B, 4C, H/2, W/2), a permutation (log|det| = 0).

    Each 2x2 spatial block becomes 4 channels, ordered (c, dy, dx) as in the
    reference implementation.
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, c, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"squeeze needs even height and width, got {h}x{w}")
        y = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        return y.reshape(b, 4 * c, h // 2, w // 2), x.new_zeros(b)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        b, c, h, w = y.shape
        x = y.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
        return x.reshape(b, c // 4, 2 * h, 2 * w), y.new_zeros(b)


class ConditionalPrior(nn.Module):
    """The multi-scale split with a learned conditional Gaussian prior (paper, section 3; Dinh et al., 2017).

    x = [z_a, z_b]; (mu, log_sigma) = ZeroConv3x3(z_a);
    y = [z_a, eps] with eps = (z_b - mu) * exp(-log_sigma).
    log|det| = -sum log_sigma, so log N(z_b; mu, sigma) = log N(eps; 0, I) + log|det|.
    z_a continues to the next level; eps is a latent scored under N(0, I).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.split_at = channels // 2
        self.prior = ZeroConv2d(self.split_at, 2 * (channels - self.split_at))

    def _mean_log_sigma(self, z_a: Tensor) -> tuple[Tensor, Tensor]:
        mean, log_sigma = self.prior(z_a).chunk(2, dim=1)
        return mean, log_sigma

    def split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x -> (z_a, eps, log|det|): :meth:`forward` with the halves apart (z_a goes on, eps is a latent)."""
        z_a, z_b = x[:, : self.split_at], x[:, self.split_at :]
        mean, log_sigma = self._mean_log_sigma(z_a)
        eps = (z_b - mean) * torch.exp(-log_sigma)
        return z_a, eps, -log_sigma.flatten(1).sum(1)

    def merge(self, z_a: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
        """(z_a, eps) -> (x, log|det|): :meth:`inverse` of the halves."""
        mean, log_sigma = self._mean_log_sigma(z_a)
        z_b = eps * torch.exp(log_sigma) + mean
        return torch.cat([z_a, z_b], dim=1), log_sigma.flatten(1).sum(1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z_a, eps, logdet = self.split(x)
        return torch.cat([z_a, eps], dim=1), logdet

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self.merge(y[:, : self.split_at], y[:, self.split_at :])

    @torch.no_grad()
    def fold(self) -> ConditionalPrior:
        """The same prior with its zero conv's output scale folded into its weights."""
        folded = copy.deepcopy(self)
        folded.prior = self.prior.fold()
        return folded


class TopPrior(nn.Module):
    """The learned prior of the last level: N(mu, sigma) with learned mu, log_sigma of shape (C, H, W).

    Written as the bijection eps = (z - mu) * exp(-log_sigma), log|det| = -sum log_sigma
    (paper's "learntop"); zero-initialised, so it starts as N(0, I).
    """

    def __init__(self, channels: int, height: int, width: int) -> None:
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(1, channels, height, width))
        self.log_sigma = nn.Parameter(torch.zeros(1, channels, height, width))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        eps = (x - self.mean) * torch.exp(-self.log_sigma)
        return eps, _batch_logdet(-self.log_sigma.sum(), x.shape[0])

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        z = y * torch.exp(self.log_sigma) + self.mean
        return z, _batch_logdet(self.log_sigma.sum(), y.shape[0])

    def split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """As :meth:`ConditionalPrior.split`: nothing goes on from the top level, all of x is the latent."""
        eps, logdet = self(x)
        return x[:, :0], eps, logdet

    def merge(self, z_a: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
        """As :meth:`ConditionalPrior.merge`; z_a is empty."""
        return self.inverse(eps)

    def fold(self) -> TopPrior:
        """Nothing depends on the input but mu and sigma: a copy (``torch.jit.freeze`` folds exp(log_sigma))."""
        return copy.deepcopy(self)
