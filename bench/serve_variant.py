"""``python -m bench.serve_variant --variant unfolded [--switch-interval 0.0005] -- <python -m service flags>``.

The real service (``service.__main__.main``, unchanged) with its model form swapped from
outside, so that ``bench/served.py --variant ...`` can compare forms over HTTP:

- ``--variant served``: unchanged (the service runs ``model.inference``'s folded model as
  TorchScript graphs; ``--server-arg=--torchscript --server-arg=false`` gives it eager);
- ``unfolded``: the checkpoint's ``Glow`` itself, layer by layer and eager (``--torchscript
  false`` is added): what the folding and the graphs save together;
- ``--switch-interval S``: the GIL switch interval ``service.tuning.tune_process`` sets
  (the service's is 0.0005 s; Python's default is 0.005 s).
"""

from __future__ import annotations

import argparse
from typing import Any

VARIANTS = ("served", "unfolded")


def install(variant: str) -> None:
    """Make the service's runner serve the given form of the loaded model."""
    if variant == "unfolded":
        from model.glow import Glow

        def unfolded(model: Any, channels_last: bool = False) -> Any:
            return model  # the Glow itself, layer by layer

        Glow.fold = unfolded  # type: ignore[method-assign]


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
    import service.tuning as tuning

    if args.switch_interval is not None:
        tuning.SWITCH_INTERVAL_S = args.switch_interval  # what tune_process sets
    return service_main.main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
