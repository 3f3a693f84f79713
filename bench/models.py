"""The models and inputs the benchmarks run.

The shipped checkpoint when there is one, else a Glow of the flags' architecture with
seeded random weights (its zero-initialised convs perturbed, so that it is not the
identity); test images when readable, else seeded random pixels; and the service's fast
forms of a model (``model/inference.py``), checked against the model before they are timed.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from model.glow import Glow, GlowConfig
from model.inference import TracedGlow

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WEIGHTS = REPO / "weights" / "fashion-mnist"
DEFAULT_IMAGES = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
INIT_IMAGES = 256  # images the random model's ActNorm is initialised from
MAX_DEVIATION = 1e-4  # most relative deviation of a fast form's log-likelihoods from the model's


def add_model_arguments(parser: argparse.ArgumentParser, weights_help: str, images_help: str) -> None:
    """The flags this module reads: --weights, the random model's --levels/--steps/--hidden, --images, --seed."""
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help=weights_help)
    parser.add_argument("--levels", type=int, default=2, help="random weights: levels (default 2)")
    parser.add_argument("--steps", type=int, default=16, help="random weights: steps per level (default 16)")
    parser.add_argument("--hidden", type=int, default=64, help="random weights: coupling width (default 64)")
    parser.add_argument("--images", default=str(DEFAULT_IMAGES), help=images_help)
    parser.add_argument("--seed", type=int, default=0, help="random seed: weights, pixels and arrivals (default 0)")


def checkpoint_exists(path: object) -> bool:
    """Whether ``path`` (a checkpoint folder or its .safetensors file) holds a checkpoint: weights and sidecar."""
    if path is None:
        return False
    from model.checkpoint import resolve_paths

    weights, sidecar = resolve_paths(str(path))
    return weights.is_file() and sidecar.is_file()


def perturb_zero_convs(model: nn.Module, std: float, seed: int) -> None:
    """Give the zero-initialised convs small random weights, so that random-weight flows are not the identity."""
    from model.layers import ZeroConv2d

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ZeroConv2d):
                module.conv.weight.normal_(0, std, generator=generator)
                module.conv.bias.normal_(0, std, generator=generator)


def random_glow(config: GlowConfig, images: Tensor, seed: int) -> Glow:
    """A Glow of ``config`` with weights drawn from ``seed``, ActNorm initialised from the first images; eval mode."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Glow(config)
    perturb_zero_convs(model, 0.01, seed)
    model.initialize(images[:INIT_IMAGES], generator=torch.Generator().manual_seed(seed))
    return model.eval()


def random_config(args: argparse.Namespace) -> GlowConfig:
    """The architecture of ``--levels``, ``--steps`` and ``--hidden`` on 28x28 grey images."""
    return GlowConfig(levels=args.levels, steps_per_level=args.steps, hidden_channels=args.hidden)


def build_model(args: argparse.Namespace, init_images: Tensor) -> tuple[Glow, str, dict[str, Tensor] | None]:
    """(model, where it came from, its anomaly calibration): the checkpoint when it exists, else random weights."""
    if checkpoint_exists(args.weights):
        from model.checkpoint import load_checkpoint

        checkpoint = load_checkpoint(args.weights, args.device)
        return checkpoint.model.eval(), str(args.weights), checkpoint.calibration
    model = random_glow(random_config(args), init_images, args.seed)
    return model.to(args.device), "random weights (no checkpoint found)", None


def random_checkpoint(directory: Path, args: argparse.Namespace) -> Path:
    """A random-weight checkpoint of the flags' architecture, with its anomaly calibration (needs scikit-learn)."""
    from model.anomaly import calibrate
    from model.checkpoint import save_checkpoint

    config = random_config(args)
    images, _ = load_images(args, config.image_shape, 2 * INIT_IMAGES)
    model = random_glow(config, images, args.seed)
    meta = {"name": "random-bench", "dataset": {"name": "none (random weights)"}, "metrics": {}}
    with torch.no_grad():
        save_checkpoint(model, directory, meta, calibrate(model, images))
    return directory


def load_images(args: argparse.Namespace, shape: tuple[int, ...], count: int) -> tuple[Tensor, str]:
    """``count`` uint8 images: the first of --images when readable and of the right shape, else random pixels."""
    path = Path(args.images) if args.images else None
    if path is not None and path.exists():
        try:
            from model.data import load_images as read

            images = torch.from_numpy(read(path))
            if tuple(images.shape[1:]) == shape and len(images) >= 1:
                reps = math.ceil(count / len(images))
                return images.repeat(reps, 1, 1, 1)[:count].contiguous(), str(path)
        except Exception as exc:  # any unreadable file: fall back to random pixels
            print(f"note: could not read {path} ({exc}); using random pixels", file=sys.stderr)
    generator = torch.Generator().manual_seed(args.seed)
    return torch.randint(0, 256, (count, *shape), generator=generator, dtype=torch.uint8), "random pixels"


def sample_png(path: Path | None, seed: int) -> tuple[bytes, str]:
    """PNG bytes of one image (the first of ``path``), else of random 28x28 grey pixels; and where it came from."""
    import numpy as np
    from PIL import Image

    pixels = None
    source = "random pixels"
    if path is not None and path.exists():
        try:
            from model.data import load_images as read

            pixels = read(path)[0]
            source = f"{path} [0]"
        except Exception:  # unreadable: fall back
            pixels = None
    if pixels is None:
        pixels = np.random.default_rng(seed).integers(0, 256, (1, 28, 28), dtype=np.uint8)
    image = pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    return buffer.getvalue(), source


def folded_model(model: Glow, channels_last: bool = False) -> Glow:
    """The folded inference form of ``model`` (``Glow.fold``)."""
    return model.fold(channels_last=channels_last)


def traced_model(model: Glow) -> TracedGlow:
    """What the service runs: the folded form with channels_last, as frozen TorchScript graphs."""
    return TracedGlow(folded_model(model, channels_last=True))


def max_relative_deviation(values: Tensor, reference: Tensor) -> float:
    values, reference = values.double().cpu(), reference.double().cpu()
    if not torch.isfinite(values).all():
        return math.inf
    return float(((values - reference).abs() / reference.abs().clamp_min(1e-30)).max())


def checked(build: Callable[[], Any], model: Glow, images: Tensor, name: str) -> Any:
    """``build()``, if it builds and matches the model (log-likelihoods within 1e-4, exact round trip); else None."""
    try:
        fast = build()
        x = images[:8].to(model.device)
        with torch.inference_mode():
            deviation = max(max_relative_deviation(fast.log_prob(x), model.log_prob(x)) for _ in range(2))
            exact = bool((fast.decode(fast.encode(x)) == x).all())
    except Exception as exc:  # the model's layers changed under model/inference.py
        print(f"WARNING: the {name} form does not build ({type(exc).__name__}: {exc}); its rows are skipped")
        return None
    if not (deviation <= MAX_DEVIATION and exact):
        print(f"WARNING: the {name} form deviates from the model (max rel dev {deviation:.2e}, round trip "
              f"{'exact' if exact else 'NOT exact'}); its rows are skipped: model/inference.py needs updating")
        return None
    return fast


def pngs_of(path: Path, count: int) -> tuple[list[bytes], str]:
    """The first ``count`` images of ``path`` as PNG bytes, or random 28x28 pixels where it cannot be read."""
    try:
        from model.data import load_images as read
        from service.imaging import encode_png

        return [encode_png(image) for image in read(path)[:count]], f"{path} [:{count}]"
    except (OSError, ValueError):  # absent or unreadable (DataError is a ValueError): random pixels
        return [sample_png(None, seed)[0] for seed in range(count)], "random pixels"
