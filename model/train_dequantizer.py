"""``python -m model.train_dequantizer``: fit q(u | x) (``model.dequantize``) to a frozen checkpoint.

Maximises the variational bound with Adam on the checkpoint's own training images (its
held-out images excluded), one eps draw per image per step from (seed, step); the flow's
weights do not change. ``--output`` holds the run: ``state.safetensors`` + ``state.json``
every ``--checkpoint-minutes`` (``--resume`` continues it exactly), ``log.jsonl``, and at
the end ``dequantizer.safetensors`` + ``dequantizer.json``: q's weights (an EMA of them)
and its test figures beside the uniform bound, measured on ``--test``:

- ``uniform``: the dequantised bits/dim of ``model.evaluate`` (u ~ U[0, 1), seed 0);
- ``variational``: one draw of u ~ q per image;
- ``importance_weighted``: ``--samples`` draws per image (Burda et al., 2016).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.calibrate import ProvenanceError, checkpoint_data
from model.checkpoint import CheckpointError, load_checkpoint, save_tensors, write_json
from model.data import DataError, load_dataset
from model.dequantize import Dequantizer, variational_bits_per_dim, variational_log_prob
from model.evaluate import bits_per_dim
from model.glow import Glow
from model.train import EMA, TrainSettings, batch_indices, learning_rate, load_state, save_state

STATE = "state.safetensors"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m model.train_dequantizer", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, required=True, help="checkpoint folder (its flow stays frozen)")
    p.add_argument("--train", type=Path, default=None, help="its training data (default: where it was recorded)")
    p.add_argument("--test", type=Path, required=True, help="images for the final figures")
    p.add_argument("--output", type=Path, required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --output")
    p.add_argument("--max-steps", type=int, default=3000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--couplings", type=int, default=4)
    p.add_argument("--samples", type=int, default=8, help="draws per test image of the importance-weighted bound")
    p.add_argument("--test-limit", type=int, default=None, help="the first N test images only")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-minutes", type=float, default=5.0)
    return p.parse_args(argv)


def training_images(flow_meta: dict[str, Any], train: Path | None) -> np.ndarray:
    """The images the checkpoint trained on: its data without those it held out (``model.calibrate``'s split,
    checked against the recorded manifest or sha256)."""
    images, held_out = checkpoint_data(flow_meta.get("dataset") or {}, train)
    return np.delete(images, held_out, axis=0)


def step_eps(shape: torch.Size, step: int, seed: int) -> torch.Tensor:
    """eps ~ N(0, I) for one step, reproducible from (seed, step)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed((seed << 32) + step))


def final_figures(flow: Glow, dequantizer: Dequantizer, test: torch.Tensor, samples: int) -> dict[str, float]:
    """Test bits/dim under the three bounds of the module docstring."""
    return {
        "test_images": len(test),
        "uniform": bits_per_dim(flow, test).dequantized,
        "variational": variational_bits_per_dim(flow, dequantizer, test),
        "importance_weighted": variational_bits_per_dim(flow, dequantizer, test, samples=samples),
        "importance_samples": samples,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        checkpoint = load_checkpoint(args.weights)
        images = torch.from_numpy(training_images(checkpoint.meta, args.train))
        test = torch.from_numpy(load_dataset(args.test, checkpoint.model.config.image_shape[0]).images)
    except (CheckpointError, DataError, ProvenanceError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    test = test[: args.test_limit]
    flow = checkpoint.model.eval().requires_grad_(False)
    dequantizer = Dequantizer(flow.config.image_shape, args.hidden, args.couplings)
    settings = TrainSettings(batch_size=args.batch_size, lr=args.lr, warmup_steps=min(200, args.max_steps // 10),
                             schedule="cosine", max_steps=args.max_steps, seed=args.seed)
    optimizer = torch.optim.Adam(dequantizer.parameters(), lr=args.lr)
    ema = EMA(dequantizer, settings.ema_decay)
    args.output.mkdir(parents=True, exist_ok=True)
    step, elapsed = 0, 0.0
    if args.resume:
        info = load_state(args.output / STATE, dequantizer, ema, optimizer)
        step, elapsed = info["step"], info["wall_time_s"]
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    started, saved = time.monotonic() - elapsed, time.monotonic()
    with (args.output / "log.jsonl").open("a") as log:
        while step < args.max_steps and not stop["now"]:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, settings)
            x = images[batch_indices(len(images), args.batch_size, step, args.seed, 0, 1)]
            loss = flow.bits_per_dim(variational_log_prob(flow, dequantizer, x, step_eps(x.shape, step, args.seed)))
            optimizer.zero_grad(set_to_none=True)
            loss.mean().backward()
            torch.nn.utils.clip_grad_norm_(dequantizer.parameters(), settings.grad_clip)
            optimizer.step()
            ema.update(dequantizer, step)
            step += 1
            if step % 50 == 0:
                log.write(json.dumps({"step": step, "wall_time_s": round(time.monotonic() - started, 1),
                                      "bpd": round(float(loss.detach().mean()), 5)}) + "\n")
                log.flush()
            if time.monotonic() - saved > args.checkpoint_minutes * 60 or stop["now"] or step == args.max_steps:
                save_state(args.output / STATE, dequantizer, ema, optimizer,
                           {"step": step, "wall_time_s": time.monotonic() - started, "argv": sys.argv[1:]})
                saved = time.monotonic()
    if step < args.max_steps:
        print(f"stopped at step {step}; --resume continues", file=sys.stderr)
        return 0
    dequantizer.load_state_dict(ema.shadow)
    dequantizer.eval()
    figures = final_figures(flow, dequantizer, test, args.samples)
    sha = save_tensors(args.output / "dequantizer.safetensors", dequantizer.state_dict(),
                       {"format": "glow-dequantizer/1", "config": json.dumps(dequantizer.config())})
    write_json(args.output / "dequantizer.json", {
        "format": "glow-dequantizer/1", "config": dequantizer.config(), "flow_sha256": checkpoint.meta["weights_sha256"],
        "weights_sha256": sha, "steps": step, "wall_time_s": round(time.monotonic() - started, 1),
        "command": "python -m model.train_dequantizer " + " ".join(sys.argv[1:]), "test_bits_per_dim": figures})
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
