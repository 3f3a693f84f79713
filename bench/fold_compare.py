"""Today's served form against a previous commit's, side by side in one process.

``python -m bench.fold_compare --old PATH`` with PATH a checkout of an earlier commit (for
example ``git worktree add ../old a1150d0``). It loads the same checkpoint into both trees'
code, two instances of each form, then, for each thread count and batch size, times the served scoring
pass (``log_prob_and_levels``) and ``decode`` of every instance in alternating rounds (so machine noise
hits both alike), and prints each form's median images/s and the ratio new/old. It also prints what
the issue asks of the new form: log-likelihoods within 1e-4 relative of the plain fp32 model,
decode(encode(x)) == x on test images, the batch-size invariance of log-likelihoods, and how
many images of a few synthetic sets float32 cannot score (non-finite results).

The old tree's form is built by its own code (``model.inference.FoldedGlow`` + ``TracedGlow``
at a1150d0); its package is imported first and set aside, so both ``model`` packages live in
one interpreter. Each form is built as its tree's service builds it (outside inference mode) and timed
in inference mode, in a process tuned as the service tunes its own (``service.tuning``: glibc's malloc
thresholds pinned), as the service runs it.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from service.settings import Settings
from service.tuning import tune_process

ROOT = Path(__file__).resolve().parents[1]


def import_old_model(old_root: Path) -> dict[str, ModuleType]:
    """The old tree's ``model.glow`` and ``model.inference``, imported from ``old_root`` and then set aside."""
    saved = {name: module for name, module in sys.modules.items() if name == "model" or name.startswith("model.")}
    for name in saved:
        del sys.modules[name]
    sys.path.insert(0, str(old_root))
    try:
        old = {name: importlib.import_module(f"model.{name}") for name in ("glow", "inference")}
    finally:
        sys.path.remove(str(old_root))
        for name in [n for n in sys.modules if n == "model" or n.startswith("model.")]:
            del sys.modules[name]
        sys.modules.update(saved)
    return old


def images_per_second(fns: dict[str, list[Callable[[], Any]]], batch: int, rounds: int,
                      seconds: float) -> dict[str, float]:
    """Median images/s of each name's fns (instances of one form) over ``rounds`` alternating rounds of about
    ``seconds`` per fn; the order of the forms is reversed every other round, so that neither always runs first."""
    rates: dict[str, list[float]] = {name: [] for name in fns}
    for fn in (fn for instances in fns.values() for fn in instances):
        fn()  # warm-up: first calls of a graph optimise it
        fn()
    for index in range(rounds):
        order = list(fns) if index % 2 == 0 else list(reversed(fns))
        for name in order:
            for fn in fns[name]:
                calls, started = 0, time.perf_counter()
                while calls < 2 or time.perf_counter() - started < seconds:
                    fn()
                    calls += 1
                rates[name].append(calls * batch / (time.perf_counter() - started))
    return {name: statistics.median(r) for name, r in rates.items()}


def relative_deviation(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(((got.double() - want.double()).abs() / want.double().abs()).max())


def synthetic(name: str, n: int, shape: tuple[int, int, int]) -> torch.Tensor:
    rng = np.random.default_rng(0)
    if name == "uniform":
        return torch.from_numpy(rng.integers(0, 256, (n, *shape), dtype=np.uint8))
    if name == "gaussian":
        return torch.from_numpy(np.clip(rng.normal(128, 64, (n, *shape)), 0, 255).astype(np.uint8))
    if name == "constant":
        return torch.from_numpy(np.repeat(rng.integers(0, 256, (n, 1, 1, 1), dtype=np.uint8), np.prod(shape), 1)
                                .reshape(n, *shape))
    cell = int(name.removeprefix("checkerboard"))  # checkerboardK: squares of K pixels, black and white
    rows, cols = np.indices(shape[1:]) // cell
    board = ((rows + cols) % 2 * 255).astype(np.uint8)
    return torch.from_numpy(np.broadcast_to(board, (n, *shape)).copy())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fold_compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--old", type=Path, required=True, help="checkout of the commit to compare against")
    p.add_argument("--weights", type=Path, default=ROOT / "weights" / "fashion-mnist")
    p.add_argument("--data", type=Path, default=Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=0.4, help="per form per round")
    args = p.parse_args(argv)

    old = import_old_model(args.old.resolve())
    tune_process(Settings.from_args(["--device", "cpu"]))  # the loop below sets the thread counts
    from model.checkpoint import load_checkpoint
    from model.data import load_images
    from model.inference import TracedGlow

    model = load_checkpoint(args.weights).model
    old_model = old["glow"].Glow(old["glow"].GlowConfig(**model.config.to_dict()))
    old_model.load_state_dict(model.state_dict())
    old_model.eval()
    test = torch.from_numpy(load_images(args.data)[:256])
    builders = {
        "old": lambda: old["inference"].TracedGlow(old["inference"].FoldedGlow(old_model, channels_last=True)),
        "new": lambda: TracedGlow(model.fold(channels_last=True)),
    }
    # built as each tree's service builds them (``ModelRunner.load``: outside inference mode), run as it runs
    # them (in inference mode); two instances of each, built old, new, new, old: in A/A runs the instance
    # built first ran a few percent faster (where its tensors landed), so each form gets one early and one late
    instances = {name: [builders[name]()] for name in ("old", "new")}
    instances["new"].append(builders["new"]())
    instances["old"].append(builders["old"]())
    forms = {name: built[0] for name, built in instances.items()}
    with torch.inference_mode():
        print(f"checkpoint {args.weights}; old tree {args.old}; torch {torch.__version__}")
        print("\n| threads | batch | operation | old images/s | new images/s | new/old |\n|---|---|---|---|---|---|")
        for threads in args.threads:
            torch.set_num_threads(threads)
            for batch in args.batches:
                x = test[:batch]
                z = forms["old"].encode(x)
                for operation in ("log_prob_and_levels", "decode"):
                    argument = z if operation == "decode" else x
                    fns = {name: [lambda f=f, a=argument, op=operation: getattr(f, op)(a) for f in built]
                           for name, built in instances.items()}
                    rate = images_per_second(fns, batch, args.rounds, args.seconds)
                    print(f"| {threads} | {batch} | {operation} | {rate['old']:.0f} | {rate['new']:.0f} "
                          f"| {rate['new'] / rate['old']:.2f} |", flush=True)

        reference = model.log_prob(test)
        print("\nexactness on", len(test), "test images (plain fp32 Glow as the reference):")
        for name, form in forms.items():
            got = form.log_prob(test)
            round_trip = torch.equal(form.decode(form.encode(test)), test)
            alone = torch.cat([form.log_prob(test[i : i + 1]) for i in range(64)])
            print(f"  {name}: log-likelihood max relative deviation {relative_deviation(got, reference):.2e}; "
                  f"decode(encode(x)) == x: {round_trip}; batch 1 vs batch 256 max relative deviation "
                  f"{relative_deviation(alone, got[:64]):.2e}")
        print("\nimages whose float32 results are not finite (the served form; float64 of the plain model beside):")
        model64 = load_checkpoint(args.weights).model.double()
        for name in ("uniform", "gaussian", "constant", "checkerboard1", "checkerboard2", "checkerboard4"):
            x = synthetic(name, 256 if not name.startswith("checker") else 1, model.config.image_shape)
            log_prob, latents, _ = forms["new"].log_prob_and_levels(x)
            bad = ~torch.isfinite(log_prob) | ~torch.stack([torch.isfinite(e.flatten(1)).all(1) for e in latents]).all(0)
            exact = model64.log_prob(x)
            print(f"  {name}: {int(bad.sum())} of {len(x)}; float32 log-likelihood min {float(log_prob.min()):.4g}, "
                  f"float64 min {float(exact.min()):.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
