"""``python -m bench.serve_variant --variant traced [--switch-interval 0.0005] -- <python -m service flags>``.

The real service (``service.__main__.main``, unchanged) with its model form swapped from
outside, so that ``bench/served.py --variant ...`` can compare forms over HTTP:

- ``--variant served``: unchanged (the service runs ``model.inference.FoldedGlow``,
  channels_last on the CPU);
- ``unfolded``: the checkpoint's ``Glow`` itself, layer by layer and eager (``--torchscript
  false`` is added): what the folding and the graphs save together;
- ``traced``: the folded form as frozen TorchScript graphs (``bench/traced.py``), which run
  each batch without re-taking the GIL per tensor op. It checks itself against the model
  at start-up (log-likelihoods within 1e-4 relative, decode(encode(x)) pixel-exact) and
  refuses to serve otherwise.
- ``--switch-interval S``: ``sys.setswitchinterval(S)`` after the service's own set-up
  (it sets 0.0005 s; Python's default is 0.005 s).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

VARIANTS = ("served", "unfolded", "traced")
TOLERANCE = 1e-4


def check(model: Any, fast: Any, batches: tuple[int, ...] = (1, 7, 64)) -> float:
    """Max relative log-likelihood deviation of ``fast`` from ``model``; raises if it breaks exactness."""
    worst = 0.0
    with torch.inference_mode():
        for batch in batches:
            # the model's own samples: uniform noise images are too far out for even the float64 model
            # to invert exactly (latents of ~1e3), whatever the form
            x = model.sample(batch, temperature=0.7, seed=batch)
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
    """Make the service's runner build the given form of the loaded model."""
    if variant == "served":
        return
    import service.runner as runner
    from bench.traced import TracedGlow

    folded_glow = runner.FoldedGlow

    def build(model: Any, channels_last: bool = False) -> Any:
        if variant == "unfolded":
            return model
        fast = TracedGlow(folded_glow(model, channels_last=channels_last))
        deviation = check(model, fast)
        print(f"bench.serve_variant: serving the {variant} form (max rel dev {deviation:.1e})", file=sys.stderr)
        return fast

    runner.FoldedGlow = build  # type: ignore[misc, assignment]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve_variant", description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", choices=VARIANTS, default="served")
    p.add_argument("--switch-interval", type=float, default=None, help="sys.setswitchinterval (default: the service's)")
    args, rest = p.parse_known_args(argv)
    if rest and rest[0] == "--":
        rest = rest[1:]
    install(args.variant)
    if args.variant == "unfolded":
        rest = [*rest, "--torchscript", "false"]
    import service.__main__ as service_main

    if args.switch_interval is not None:
        service_main.SWITCH_INTERVAL_S = args.switch_interval  # what tune_process sets at start
    return service_main.main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
