"""``python -m bench.serve_variant --variant traced [--switch-interval 0.0005] -- <python -m service flags>``.

The real service (``service.__main__.main``, unchanged) with the proposed optimisations
applied from outside, so that ``bench/served.py --variant ...`` can measure them over HTTP
before anyone edits ``model/`` or ``service/``:

- ``--variant fused``: the checkpoint's model is served through the folded inference form
  of ``bench/fused.py`` (channels_last); ``traced``: the same as frozen TorchScript graphs,
  which run each batch without re-taking the GIL per tensor op; ``plain``: unchanged.
  Both check themselves against the loaded model at start-up (log-likelihoods within 1e-4
  relative, decode(encode(x)) pixel-exact) and refuse to serve otherwise.
- ``--switch-interval S``: ``sys.setswitchinterval(S)`` before serving (Python's default is
  0.005 s), so the model thread waits less for the GIL while the event loop is busy.

Every other attribute (config, parameters, device, ...) is the loaded model's own.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

import torch
from torch import Tensor

VARIANTS = ("plain", "fused", "traced")
TOLERANCE = 1e-4


class FastModel:
    """The loaded Glow, with log_prob / encode / decode routed through a faster equivalent form."""

    def __init__(self, model: Any, fast: Any) -> None:
        self._model = model
        self._fast = fast

    def __getattr__(self, name: str) -> Any:  # everything not overridden: the model's own
        return getattr(self._model, name)

    def log_prob_and_latents(self, x: Tensor, noise: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        if noise is not None:
            return self._model.log_prob_and_latents(x, noise)
        return self._fast.log_prob_and_latents(x)

    def log_prob(self, x: Tensor, noise: Tensor | None = None) -> Tensor:
        return self.log_prob_and_latents(x, noise)[0]

    def encode(self, x: Tensor) -> Tensor:
        return self._fast.encode(x)

    def encode_with_log_prob(self, x: Tensor) -> tuple[Tensor, Tensor]:
        log_prob, latents = self._fast.log_prob_and_latents(x)
        return torch.cat([eps.flatten(1) for eps in latents], dim=1), log_prob

    def decode(self, z: Tensor) -> Tensor:
        return self._fast.decode(z)

    def sample(self, n: int, temperature: float = 0.7, seed: int | None = None) -> Tensor:
        return self._fast.sample(n, temperature, seed)


def check(model: Any, fast: Any, batches: tuple[int, ...] = (1, 7, 64)) -> float:
    """Max relative log-likelihood deviation of ``fast`` from ``model``; raises if it breaks exactness."""
    worst = 0.0
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for batch in batches:
            x = torch.randint(0, 256, (batch, *model.config.image_shape), generator=generator,
                              dtype=torch.uint8).to(model.device)
            for _ in range(2):  # TorchScript optimises on its first calls: check what it serves afterwards
                reference, values = model.log_prob(x), fast.log_prob(x)
                deviation = float(((values.double() - reference.double()).abs() / reference.double().abs()).max())
                worst = max(worst, deviation)
                if not deviation <= TOLERANCE:
                    raise RuntimeError(f"fast form deviates {deviation:.2e} relative at batch {batch}")
                if not bool((fast.decode(fast.encode(x)) == x).all()):
                    raise RuntimeError(f"fast form: decode(encode(x)) != x at batch {batch}")
    return worst


def install(variant: str) -> None:
    """Make the service's checkpoint loader return the model in the given variant."""
    if variant == "plain":
        return
    import service.runner as runner

    from bench.fused import FusedGlow, TracedGlow

    original = runner.load_checkpoint

    def load_checkpoint(*args: Any, **kwargs: Any) -> Any:
        checkpoint = original(*args, **kwargs)
        model = checkpoint.model.eval()
        fused = FusedGlow(model)
        fast: Any = fused.to(memory_format=torch.channels_last) if variant == "fused" else TracedGlow(fused)
        deviation = check(model, fast)
        print(f"bench.serve_variant: serving the {variant} form (max rel dev {deviation:.1e})", file=sys.stderr)
        return dataclasses.replace(checkpoint, model=FastModel(model, fast))

    runner.load_checkpoint = load_checkpoint


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve_variant", description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", choices=VARIANTS, default="plain")
    p.add_argument("--switch-interval", type=float, default=None, help="sys.setswitchinterval (default: Python's)")
    args, rest = p.parse_known_args(argv)
    if rest and rest[0] == "--":
        rest = rest[1:]
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    install(args.variant)
    from service.__main__ import main as serve

    return serve(rest)


if __name__ == "__main__":
    raise SystemExit(main())
