"""Glow: a multi-scale flow of ActNorm, invertible 1x1 convolutions and affine couplings.

Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions",
NeurIPS 2018 (arXiv:1807.03039). The multi-scale architecture is that of RealNVP
(Dinh et al., ICLR 2017).

Images are discrete: a pixel k in [0, 2^n) (n = n_bits) stands for the bin
[k, k+1) / 2^n, shifted to [-0.5, 0.5). With a continuous density p on that cube,

    log P(k) >= E_u[log p((k + u) / 2^n - 0.5)] - D * n * log 2,   u ~ U[0, 1)^D

(the dequantisation bound, Theis et al., 2016). Training maximises the right-hand
side with one noise draw per image; inference scores the bin centre, u = 1/2, so the
same image always gets the same score. Bits per dimension: -log P / (D * log 2).

The latent of an image is one flat vector per image: the standardised latents eps of
every level (see ``layers.ConditionalPrior``), level 1's split first, then level 2's,
..., the top level's last, each flattened in (C, H, W) order. Under an unconditional
model every entry is N(0, 1), so ``decode(T * randn(n, latent_dim))`` samples at
temperature T. A class-conditional model (``GlowConfig.labels``) puts a Gaussian per class
on the top level's eps instead (``model.class_prior``): its log p(x) is the mixture over
the classes, and :meth:`Glow.sample` draws the top eps from the chosen or a drawn class.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from model.class_prior import ClassPrior
from model.layers import ActNorm, AffineCoupling, ConditionalPrior, Conv1x1, FlowStep, Squeeze, TopPrior


@dataclass(frozen=True)
class GlowConfig:
    """Everything that fixes a Glow's architecture; stored with its weights."""

    image_shape: tuple[int, int, int] = (1, 28, 28)  # (C, H, W) of the input images
    levels: int = 2  # L: number of squeeze -> K steps -> split/prior scales
    steps_per_level: int = 16  # K: flow steps (ActNorm, 1x1 conv, coupling) per level
    hidden_channels: int = 64  # width of every coupling network
    n_bits: int = 8  # bits per pixel the model sees (8: all 256 grey levels)
    labels: tuple[str, ...] = ()  # class names, index = class number: a class-conditional top prior; () none

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_shape", tuple(int(v) for v in self.image_shape))
        object.__setattr__(self, "labels", tuple(str(v) for v in self.labels))
        if len(self.labels) == 1 or len(set(self.labels)) != len(self.labels) or not all(self.labels):
            raise ValueError(f"labels must be 2 or more distinct non-empty names (or none), got {list(self.labels)}")
        c, h, w = self.image_shape
        if len(self.image_shape) != 3 or min(self.image_shape) < 1:
            raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {self.image_shape}")
        if self.levels < 1 or self.steps_per_level < 1 or self.hidden_channels < 1:
            raise ValueError("levels, steps_per_level and hidden_channels must be >= 1")
        if not 1 <= self.n_bits <= 8:
            raise ValueError(f"n_bits must be in 1..8, got {self.n_bits}")
        scale = 2**self.levels
        if h % scale or w % scale:
            raise ValueError(f"{self.levels} levels need height and width divisible by {scale}, got {h}x{w}")

    @property
    def dims(self) -> int:
        """D, the number of pixel values per image."""
        return math.prod(self.image_shape)

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["image_shape"] = list(self.image_shape)
        data["labels"] = list(self.labels)
        if not self.labels:  # an unconditional config reads as it did before classes existed
            del data["labels"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> GlowConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown config fields: {sorted(unknown)}")
        return cls(**data)  # type: ignore[arg-type]


def flatten_latents(latents: list[Tensor]) -> Tensor:
    """eps of every level -> one flat latent per image (the layout in the module docstring)."""
    return torch.cat([eps.flatten(1) for eps in latents], dim=1)


def split_latents(z: Tensor, shapes: list[tuple[int, int, int]]) -> list[Tensor]:
    """Flat latents (B, sum of the shapes' sizes) -> eps of every level; ValueError for another shape."""
    sizes = [math.prod(shape) for shape in shapes]
    if z.ndim != 2 or z.shape[1] != sum(sizes):
        raise ValueError(f"latents must have shape (B, {sum(sizes)}), got {tuple(z.shape)}")
    return [p.reshape(-1, *shape) for p, shape in zip(z.split(sizes, dim=1), shapes)]


def _log_standard_normal(eps: Tensor) -> Tensor:
    """log N(eps; 0, I) summed over each image's latent, shape (B,)."""
    return (-0.5 * (eps**2 + math.log(2 * math.pi))).flatten(1).sum(1)


def _total(level_logdets: list[Tensor], batch: int) -> Tensor:
    """The whole flow's log|det| from the levels', in level order."""
    logdet = level_logdets[0].new_zeros(batch)
    for ld in level_logdets:
        logdet = logdet + ld
    return logdet


class Level(nn.Module):
    """One scale: squeeze, K flow steps, then a split (or, last, the top prior)."""

    def __init__(self, steps: list[nn.Module], prior: nn.Module, latent_shape: tuple[int, int, int],
                 out_channels: int, memory_format: torch.memory_format = torch.contiguous_format) -> None:
        super().__init__()
        self.squeeze = Squeeze()
        self.steps = nn.ModuleList(steps)
        self.prior = prior
        self.out_channels = out_channels  # channels passed to the next level
        self.latent_shape = latent_shape  # shape of this level's eps
        self.memory_format = memory_format  # of the activations inside the level

    @classmethod
    def build(cls, channels: int, height: int, width: int, config: GlowConfig, last: bool) -> Level:
        """A freshly initialised level for inputs (channels, height, width)."""
        c, h, w = 4 * channels, height // 2, width // 2
        steps = [FlowStep(c, config.hidden_channels) for _ in range(config.steps_per_level)]
        prior = TopPrior(c, h, w) if last else ConditionalPrior(c)
        return cls(steps, prior, (c if last else c - c // 2, h, w), c if last else c // 2)

    def fold(self, memory_format: torch.memory_format = torch.contiguous_format) -> FoldedLevel:
        """The same level with every step and the prior folded (``layers``' ``fold``), its activations in
        ``memory_format``."""
        pixels = self.latent_shape[1] * self.latent_shape[2]
        return FoldedLevel([step.fold(pixels) for step in self.steps], self.prior.fold(), self.latent_shape,
                           self.out_channels, memory_format)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x -> (input of the next level, this level's eps, log|det|)."""
        x, logdet = self.squeeze(x)
        x = x.contiguous(memory_format=self.memory_format)
        for step in self.steps:
            x, ld = step(x)
            logdet = logdet + ld
        x_next, eps, ld = self.prior.split(x)
        return x_next, eps, logdet + ld

    def inverse(self, x_next: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
        """(input of the next level, eps) -> (this level's input, log|det|), the log-det minus forward's."""
        y, logdet = self.prior.merge(x_next, eps)
        y = y.contiguous(memory_format=self.memory_format)
        for step in reversed(self.steps):
            y, ld = step.inverse(y)
            logdet = logdet + ld
        x, ld = self.squeeze.inverse(y)
        return x, logdet + ld


class FoldedLevel(Level):
    """A level for inference (:meth:`Level.fold`): the same bijection and log|det|, sequenced for fewer tensor ops.

    Each folded step is a :class:`~model.layers.Conv1x1` then a coupling; the coupling updates the conv's
    output in place (the level owns it), the convs' log-dets, which do not depend on the input, are added
    once per level, and the couplings' log s maps are summed once per level.
    """

    def __init__(self, steps: list[nn.Module], prior: nn.Module, latent_shape: tuple[int, int, int],
                 out_channels: int, memory_format: torch.memory_format = torch.contiguous_format) -> None:
        super().__init__(steps, prior, latent_shape, out_channels, memory_format)
        self.register_buffer("constant_logdet", sum(mix.log_abs_det for mix, _ in self._parts()))  # per image

    def _parts(self) -> list[tuple[Conv1x1, AffineCoupling]]:
        return [tuple(step.children()) for step in self.steps]  # type: ignore[misc]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.squeeze(x)[0].contiguous(memory_format=self.memory_format)
        log_scales = []
        for mix, coupling in self._parts():
            x, log_scale = coupling.couple(mix(x)[0], in_place=True)
            log_scales.append(log_scale)
        x_next, eps, ld = self.prior.split(x)
        return x_next, eps, _sum_maps(log_scales) + self.constant_logdet + ld

    def inverse(self, x_next: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
        y, ld = self.prior.merge(x_next, eps)
        y = y.contiguous(memory_format=self.memory_format)
        log_scales = []
        for mix, coupling in reversed(self._parts()):
            y, log_scale = coupling.uncouple(y, in_place=True)  # y: the merge's or a conv's output
            y = mix.inverse(y)[0]
            log_scales.append(log_scale)
        return self.squeeze.inverse(y)[0], ld - self.constant_logdet - _sum_maps(log_scales)


def _sum_maps(maps: list[Tensor]) -> Tensor:
    """Per row, the sum of every (B, C, H, W) map, shape (B,)."""
    return torch.cat(maps, dim=1).sum((1, 2, 3))


class Glow(nn.Module):
    """The whole flow on discrete images: log_prob, sample, encode, decode.

    ``levels``: the levels to sequence (:meth:`fold` passes folded ones); by default
    freshly initialised ones for ``config``. ``class_prior``: the conditional top prior when
    ``config.labels`` names classes (:meth:`fold` passes a copy); by default a fresh one.
    """

    def __init__(self, config: GlowConfig, levels: list[Level] | None = None,
                 class_prior: ClassPrior | None = None) -> None:
        super().__init__()
        self.config = config
        if levels is None:
            c, h, w = config.image_shape
            levels = []
            for index in range(config.levels):
                level = Level.build(c, h, w, config, last=index == config.levels - 1)
                levels.append(level)
                c, h, w = level.out_channels, h // 2, w // 2
        self.levels = nn.ModuleList(levels)
        if config.labels and class_prior is None:
            class_prior = ClassPrior(len(config.labels), self.levels[-1].latent_shape)
        self.class_prior = class_prior if config.labels else None

    @property
    def conditional(self) -> bool:
        """Whether the top prior is one Gaussian per class (``config.labels``)."""
        return self.class_prior is not None

    def fold(self, channels_last: bool = False) -> Glow:
        """The inference form: the same density and bijection with everything that does not depend
        on the input computed once, in float64, then cast to this model's dtype (``layers``' ``fold``:
        ActNorm and the 1x1 conv of each step as one 1x1 conv with a bias, zero convs' output scales
        in their weights). Frozen (no gradients; a snapshot of the current parameters), in eval mode.
        ``channels_last`` stores the 4-d tensors in NHWC, which oneDNN's CPU convolutions prefer here.
        """
        with torch.inference_mode(False), torch.no_grad():  # real tensors, even when called in inference mode
            exact = copy.deepcopy(self).double()
            layout = torch.channels_last if channels_last else torch.contiguous_format
            folded = Glow(self.config, [level.fold(layout) for level in exact.levels],
                          exact.class_prior).to(self.dtype)
            if channels_last:
                folded = folded.to(memory_format=torch.channels_last)
        return folded.eval().requires_grad_(False)

    # ----------------------------------------------------------------- layout
    @property
    def latent_shapes(self) -> list[tuple[int, int, int]]:
        """(C, H, W) of each level's eps, in the order of the flat latent."""
        return [level.latent_shape for level in self.levels]

    @property
    def latent_dim(self) -> int:
        return sum(math.prod(shape) for shape in self.latent_shapes)

    def actnorms(self) -> Iterator[ActNorm]:
        return (m for m in self.modules() if isinstance(m, ActNorm))

    @property
    def is_initialized(self) -> bool:
        return all(bool(a.initialized) for a in self.actnorms())

    # -------------------------------------------------------------- the flow
    def flow_forward(self, y: Tensor) -> tuple[list[Tensor], Tensor]:
        """Continuous input y in [-0.5, 0.5)^D -> (eps of every level, log|det dz/dy|)."""
        latents, level_logdets = self.flow_forward_levels(y)
        return latents, _total(level_logdets, y.shape[0])

    def flow_forward_levels(self, y: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """:meth:`flow_forward` with log|det| kept per level (squeeze, K steps, split prior), each (B,)."""
        latents, level_logdets = [], []
        x = y
        for level in self.levels:
            x, eps, ld = level(x)
            latents.append(eps)
            level_logdets.append(ld)
        return latents, level_logdets

    def flow_inverse(self, latents: list[Tensor]) -> tuple[Tensor, Tensor]:
        """eps of every level -> (continuous image y, log|det dy/dz|), minus :meth:`flow_forward`'s log-det."""
        x = latents[-1].new_zeros(latents[-1].shape[0], 0, *latents[-1].shape[2:])
        level_logdets = []
        for level, eps in zip(reversed(self.levels), reversed(latents)):
            x, ld = level.inverse(x, eps)
            level_logdets.append(ld)
        return x, _total(level_logdets, x.shape[0])

    # ---------------------------------------------------------------- pixels
    def to_continuous(self, x: Tensor, noise: Tensor | None = None) -> Tensor:
        """uint8 pixels (B, C, H, W) -> y = (k + u) / 2^n - 0.5, u = noise or 1/2 (bin centre)."""
        if x.dtype != torch.uint8:
            raise TypeError(f"images must be uint8 pixels, got {x.dtype}")
        bins = 2**self.config.n_bits
        k = torch.div(x, 2 ** (8 - self.config.n_bits), rounding_mode="floor").to(self.dtype)
        u = 0.5 if noise is None else noise
        return (k + u) / bins - 0.5

    def to_pixels(self, y: Tensor) -> Tensor:
        """Continuous y -> uint8 pixels: the bin that y falls in (clamped to the valid range)."""
        bins = 2**self.config.n_bits
        y = torch.nan_to_num(y, nan=0.0, posinf=0.5, neginf=-0.5)
        k = torch.floor((y + 0.5) * bins).clamp(0, bins - 1)
        return (k * 2 ** (8 - self.config.n_bits)).to(torch.uint8)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ------------------------------------------------------------ densities
    def log_prob(self, x: Tensor, noise: Tensor | None = None, labels: Tensor | None = None) -> Tensor:
        """log P(x) in nats of each discrete image in uint8 batch x, shape (B,).

        noise=None scores the bin centres (deterministic, for inference); pass
        u ~ U[0, 1)^D of x's shape to get the dequantised training objective.
        ``labels`` (B,) on a class-conditional model: log P(x | y) instead of the mixture.
        """
        return self.log_prob_and_levels(x, noise, labels)[0]

    def log_prob_and_latents(self, x: Tensor, noise: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        """:meth:`log_prob` and the eps of every level, from the same pass."""
        log_prob, latents, _ = self.log_prob_and_levels(x, noise)
        return log_prob, latents

    def log_prob_and_levels(
        self, x: Tensor, noise: Tensor | None = None, labels: Tensor | None = None
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """:meth:`log_prob_and_latents` and each level's log|det| (B,), which sum to the whole flow's."""
        latents, level_logdets = self.flow_forward_levels(self.to_continuous(x, noise))
        log_prior = sum(_log_standard_normal(eps) for eps in latents[:-1]) + self._log_top_prior(latents[-1], labels)
        logdet = _total(level_logdets, x.shape[0])
        return log_prior + logdet - self.config.dims * self.config.n_bits * math.log(2), latents, level_logdets

    def _log_top_prior(self, eps: Tensor, labels: Tensor | None) -> Tensor:
        """log density of the top level's eps: N(0, I), the class mixture, or the given classes' Gaussians."""
        if self.class_prior is None:
            if labels is not None:
                raise ValueError("labels given to an unconditional model")
            return _log_standard_normal(eps)
        if labels is None:
            return self.class_prior.log_mixture(eps)
        return self.class_prior.log_likelihood_of(eps, labels)

    def class_log_posterior(self, top_eps: Tensor) -> Tensor:
        """log p(k | x), shape (B, K), from the top level's eps (the last of :meth:`log_prob_and_levels`'s latents)."""
        if self.class_prior is None:
            raise ValueError("an unconditional model has no classes")
        return torch.log_softmax(self.class_prior.log_joint(top_eps), dim=1)

    def forward(self, x: Tensor, noise: Tensor | None = None, labels: Tensor | None = None) -> Tensor:
        """Same as :meth:`log_prob` (so DistributedDataParallel can wrap the training objective)."""
        return self.log_prob(x, noise, labels)

    def bits_per_dim(self, log_prob: Tensor) -> Tensor:
        """-log P / (D log 2): nats of whole images -> bits per pixel value."""
        return -log_prob / (self.config.dims * math.log(2))

    @torch.no_grad()
    def initialize(self, x: Tensor, generator: torch.Generator | None = None) -> None:
        """Data-dependent ActNorm initialisation from one batch of uint8 images (done once).

        Each ActNorm is initialised, in order, from the activations that reach it
        when the (dequantised) batch flows through the already-initialised layers.
        """
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=self.dtype)

        def init_hook(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            module.initialize(inputs[0])

        hooks = [a.register_forward_pre_hook(init_hook) for a in self.actnorms()]
        try:
            self.flow_forward(self.to_continuous(x, noise))
        finally:
            for hook in hooks:
                hook.remove()

    # --------------------------------------------------------------- latents
    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """uint8 images (B, C, H, W) -> flat latents (B, latent_dim), bin centres."""
        return self.encode_with_log_prob(x)[0]

    @torch.no_grad()
    def encode_with_log_prob(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(flat latents, log P(x) in nats) of uint8 images, from one pass through the flow."""
        log_prob, latents = self.log_prob_and_latents(x)
        return flatten_latents(latents), log_prob

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Flat latents (B, latent_dim) -> uint8 images (B, C, H, W)."""
        return self.decode_and_finite(z)[0]

    @torch.no_grad()
    def decode_and_finite(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`decode`, and per image (B,) bool whether its inverse came out finite.

        Far enough from the prior the inverse overflows: a coupling's x_b = y_b / s - t with
        s = sigmoid(raw + 2) rounded to 0 gives inf, and inf meets 0 or inf in a later layer
        as NaN, in float64 as in float32 (sampling at temperature 1.5, or the latents of an
        image whose forward pass rounded some s to 0, so that y_b lost x_b). Such an image has
        no pixels (``to_pixels`` would draw NaN as mid-grey): callers refuse it.
        """
        y = self.flow_inverse(split_latents(z.to(self.dtype), self.latent_shapes))[0]
        return self.to_pixels(y), torch.isfinite(y).flatten(1).all(1)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 0.7, seed: int | None = None, label: int | None = None) -> Tensor:
        """n uint8 images: :meth:`sample_latents` decoded."""
        return self.decode(self.sample_latents(n, temperature, seed, label).to(self.device))

    @torch.no_grad()
    def sample_latents(self, n: int, temperature: float = 0.7, seed: int | None = None,
                       label: int | None = None) -> Tensor:
        """n flat latents (float64, on the CPU) drawn with every prior's std scaled by ``temperature``.

        On a class-conditional model the top level's are of class ``label``, or of a class drawn
        with the training frequencies for each sample when ``label`` is None (the mixture).
        Drawn on the CPU from ``seed``: the same seed gives the same latents on any device.
        """
        if n < 1 or not temperature > 0 or not math.isfinite(temperature):
            raise ValueError(f"need n >= 1 and a finite temperature > 0, got n={n}, T={temperature}")
        if label is not None and not (self.class_prior is not None and 0 <= label < self.class_prior.classes):
            raise ValueError(f"label {label}: the model has {len(self.config.labels)} classes")
        generator = torch.Generator()
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        z = torch.randn(n, self.latent_dim, generator=generator, dtype=torch.float64) * temperature
        if self.class_prior is None:
            return z
        labels = torch.full((n,), label) if label is not None else self.class_prior.draw_labels(n, generator)
        latents = split_latents(z, self.latent_shapes)
        latents[-1] = self.class_prior.place(latents[-1], labels)
        return flatten_latents(latents)
