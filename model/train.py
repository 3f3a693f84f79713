"""Offline trainer: ``python -m model.train --output runs/fmnist [--resume]``.

Maximises the dequantised log-likelihood (see ``model.glow``) with Adam, linear
learning-rate warm-up, optional cosine decay, gradient-norm clipping and an
exponential moving average (EMA) of the weights, which is what gets evaluated and
exported. ActNorm is initialised once, from the first batch of a fresh run.

The run folder holds ``state.safetensors`` + ``state.json`` (model, EMA, optimiser,
step: everything ``--resume`` needs to continue exactly, since the data order and
the dequantisation noise are derived from (seed, step)) and ``log.jsonl`` (the
training curve). A state is written every ``--checkpoint-minutes``, at the end and
on SIGINT/SIGTERM. A non-finite loss skips its step with a message.

Several processes (``torchrun --nproc-per-node N -m model.train ...``) train with
DistributedDataParallel: each rank takes every N-th batch of the shared order; only
rank 0 writes. The ranks agree every step on whether to skip it (a non-finite loss
on any rank) and whether to stop (a signal on any rank), so no rank is left alone
in a collective, and they meet at a barrier before tearing the process group down.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from model.checkpoint import CheckpointError, read_tensors, save_tensors, write_json
from model.architecture import default_architecture
from model.data import (
    FASHION_MNIST_DIR, FITS, DataError, data_record, fingerprint, load_dataset, load_images, reopen, split_indices,
    split_validation,
)
from model.device import DeviceUnavailable, resolve_device
from model.evaluate import bits_per_dim
from model.glow import Glow, GlowConfig

STATE_FILE = "state.safetensors"
LOG_FILE = "log.jsonl"
MAX_BAD_STEPS = 20  # consecutive non-finite losses before the run stops


@dataclass
class TrainSettings:
    """Optimisation settings; may change on --resume (the architecture may not)."""

    batch_size: int = 64  # images per step and process
    lr: float = 1e-3  # peak Adam learning rate
    warmup_steps: int = 500  # linear warm-up from 0 to lr
    schedule: str = "constant"  # "constant" or "cosine" (to min_lr_ratio * lr at max_steps)
    min_lr_ratio: float = 0.05
    decay_start: int = 0  # cosine decay begins here (or after warm-up, if later): lets a resumed run anneal
    max_steps: int = 100_000  # stop after this many optimiser steps
    grad_clip: float = 50.0  # max global gradient norm (0: off)
    ema_decay: float = 0.999  # weight EMA used for evaluation/export (0: off, the live weights)
    seed: int = 0
    eval_minutes: float = 10.0  # validation bits/dim every this many minutes
    checkpoint_minutes: float = 5.0


def learning_rate(step: int, s: TrainSettings) -> float:
    """Warm-up then constant or cosine learning rate for optimiser step ``step`` (0-based)."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    start = max(s.warmup_steps, s.decay_start)
    if s.schedule == "cosine" and step >= start:
        progress = min(1.0, (step - start) / max(1, s.max_steps - start))
        return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    return s.lr


def any_rank(*flags: bool, device: torch.device, world: int) -> list[bool]:
    """For each flag, whether it is true on any rank (one all-reduce; no-op for one process)."""
    if world == 1:
        return list(flags)
    votes = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(votes, op=dist.ReduceOp.MAX)
    return [bool(v) for v in votes.tolist()]


def batch_indices(n_train: int, batch_size: int, step: int, seed: int, rank: int, world: int) -> torch.Tensor:
    """Indices of the batch this rank trains on at ``step``: an epoch-wise permutation seeded by (seed, epoch)."""
    per_epoch = n_train // (batch_size * world)
    if per_epoch < 1:
        raise SystemExit(f"{n_train} training images are fewer than one batch of {batch_size * world}")
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    start = (position * world + rank) * batch_size
    return order[start : start + batch_size]


def step_noise(shape: torch.Size, step: int, seed: int, rank: int) -> torch.Tensor:
    """Dequantisation noise u ~ U[0, 1) for one step, reproducible from (seed, step, rank)."""
    generator = torch.Generator().manual_seed(((seed * 7_919 + rank) << 32) + step)
    return torch.rand(shape, generator=generator)


class EMA:
    """Exponential moving average of a model's floating-point state (parameters and buffers).

    The decay at update t is min(decay, (1 + t) / (10 + t)), so early averages are not
    dominated by the initial weights.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for name, value in model.state_dict().items():
            if value.is_floating_point() and decay > 0:
                self.shadow[name].lerp_(value, 1 - decay)
            else:
                self.shadow[name].copy_(value)


def save_state(path: Path, model: Glow, ema: EMA, optimizer: torch.optim.Optimizer, info: dict[str, Any]) -> None:
    """Write the whole training state as safetensors (tensors) + JSON (the rest); no pickle."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.shadow.items()})
    optim = optimizer.state_dict()
    for index, state in optim["state"].items():
        for key, value in state.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value)
    if not all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point()):
        raise RuntimeError("refusing to write a training state with NaN or infinite values")
    groups = [{k: v for k, v in g.items()} for g in optim["param_groups"]]
    save_tensors(path, tensors, {"format": "glow-train-state/1"})
    write_json(path.with_suffix(".json"), {**info, "param_groups": groups})


def read_state_info(path: Path) -> dict[str, Any]:
    """The JSON part of a training state."""
    try:
        return json.loads(path.with_suffix(".json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path.with_suffix('.json')}: unreadable training state: {exc}") from None


def load_state(path: Path, model: Glow, ema: EMA, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore what :func:`save_state` wrote; returns its JSON part."""
    info = read_state_info(path)
    tensors, _ = read_tensors(path)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ema.shadow = {k[4:]: v.to(model.device) for k, v in tensors.items() if k.startswith("ema.")}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})
    return info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m model.train", description=__doc__.split("\n\n")[0])
    data = p.add_argument_group("data")
    data.add_argument("--train", type=Path, default=FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz",
                      help="training images: IDX (.gz or raw), .npz with 'images' (and 'labels'), or a folder of"
                      " PNG/JPEG/WebP (recursive; class subfolders are labels)")
    data.add_argument("--channels", type=int, choices=(1, 3), default=None,
                      help="1 (grey) or 3 (RGB); default: inferred from the data (stated in the log)")
    data.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                      help="bring every image to H x W by --fit (default: all images must share one size)")
    data.add_argument("--fit", choices=FITS, default="scale-crop",
                      help="how --image-size is reached: scale-crop (keep the aspect ratio, crop the centre) or resize")
    data.add_argument("--val-count", type=int, default=None,
                      help="images held out for validation and calibration, drawn by --val-seed (stratified when"
                      " the data has labels); default: 5000, or a tenth of smaller data sets")
    data.add_argument("--val-seed", type=int, default=0, help="seed of the validation draw (recorded with the run)")
    data.add_argument("--dataset-name", default="fashion-mnist")
    arch = p.add_argument_group("architecture (fixed at the start of a run; defaults from the image size, see"
                                " model/architecture.py)")
    arch.add_argument("--levels", type=int, default=None)
    arch.add_argument("--steps", type=int, default=None, help="flow steps per level (K)")
    arch.add_argument("--hidden", type=int, default=None, help="coupling network width")
    arch.add_argument("--n-bits", type=int, default=8)
    opt = p.add_argument_group("optimisation")
    defaults = TrainSettings()
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        opt.add_argument(flag, type=type(value), default=None, help=f"default {value}")
    p.add_argument("--epochs", type=float, default=None, help="alternative to --max-steps")
    p.add_argument("--stop-at", type=int, default=None,
                   help="stop at this step, the schedule unchanged (replays a run that was stopped early)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--output", type=Path, required=True, help="run folder (state, log)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output exactly")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point: a bad input file or state ends the run with one line and exit code 2."""
    try:
        return train(parse_args(argv), argv)
    except (DataError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


DEFAULT_VAL_COUNT = 5000


def training_data(
    args: argparse.Namespace, info: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray, dict[str, Any] | None]:
    """(train images, validation images, data record) of a run: recorded on --resume (and checked), else drawn.

    A run recorded before data records kept the last ``val_count`` images for validation; it resumes so.
    """
    if info and not info.get("data"):
        train_images, val_images = split_validation(load_images(args.train), info["val_count"])
        return train_images, val_images, None
    if info:
        dataset, train_index, val_index = reopen(info["data"], args.train)
        return dataset.images[train_index], dataset.images[val_index], info["data"]
    size = tuple(args.image_size) if args.image_size else None
    dataset = load_dataset(args.train, args.channels, size, args.fit)
    count = len(dataset.images)
    val_count = args.val_count if args.val_count is not None else min(DEFAULT_VAL_COUNT, max(1, count // 10))
    train_index, val_index = split_indices(count, val_count, args.val_seed, dataset.labels)
    channels = dataset.images.shape[1]
    how = "inferred from the data" if dataset.channels_inferred else "as asked"
    stratified = ", stratified by label" if dataset.labels is not None else ""
    print(f"data: {count} images of {'x'.join(map(str, dataset.images.shape[1:]))} ({channels} channel"
          f"{'s' if channels > 1 else ''}, {how}); {val_count} held out for validation (seed {args.val_seed}"
          f"{stratified})", file=sys.stderr)
    record = data_record(args.train, dataset, size, args.fit, args.val_seed, val_index)
    return dataset.images[train_index], dataset.images[val_index], record


def train(args: argparse.Namespace, argv: list[str] | None) -> int:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    try:
        device = resolve_device(args.device)
    except DeviceUnavailable as exc:
        raise SystemExit(str(exc)) from None
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if args.threads:
        torch.set_num_threads(args.threads)
    lead = rank == 0
    state_path = args.output / STATE_FILE

    info: dict[str, Any] = {}
    if args.resume:
        if not state_path.is_file():
            raise SystemExit(f"--resume: no training state at {state_path}")
        info = read_state_info(state_path)
        args.dataset_name, args.val_count = info["dataset_name"], info["val_count"]  # fixed for the run
    train_images, val_images, record = training_data(args, info)
    train_data = torch.from_numpy(train_images)
    if args.resume:
        config = GlowConfig.from_dict(info["config"])
        settings = TrainSettings(**info["settings"])
    else:
        _, height, width = train_images.shape[1:]
        try:
            arch = default_architecture(height, width, args.levels, args.steps, args.hidden)
        except ValueError as exc:
            raise DataError(f"{args.train}: {exc}") from None
        config = GlowConfig(tuple(train_images.shape[1:]), arch.levels, arch.steps_per_level, arch.hidden_channels,
                            args.n_bits)
        if lead:
            print(f"model: {config.levels} levels x {config.steps_per_level} steps, width {config.hidden_channels},"
                  f" on {'x'.join(map(str, config.image_shape))} images", file=sys.stderr)
        settings = TrainSettings()
    for name in asdict(settings):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    if args.epochs is not None:
        settings.max_steps = int(args.epochs * (len(train_data) // (settings.batch_size * world)))
    if tuple(train_images.shape[1:]) != config.image_shape:
        raise SystemExit(f"{args.train}: images are {train_images.shape[1:]}, the run's model needs {config.image_shape}")

    torch.manual_seed(settings.seed)
    model = Glow(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    ema = EMA(model, settings.ema_decay)
    step, wall_time = 0, 0.0
    if args.resume:
        info = load_state(state_path, model, ema, optimizer)
        step, wall_time = int(info["step"]), float(info["wall_time_s"])
        if not info.get("data") and info.get("dataset_sha256") != fingerprint([args.train]):
            print(f"warning: {args.train} differs from the data the run started on", file=sys.stderr)
    else:
        first = train_data[batch_indices(len(train_data), settings.batch_size, 0, settings.seed, 0, 1)]
        model.initialize(first.to(device), torch.Generator(device=device).manual_seed(settings.seed))
        ema = EMA(model, settings.ema_decay)
    train_model: nn.Module = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(model)

    command = " ".join(["python -m model.train", *(argv if argv is not None else sys.argv[1:])])
    stop: dict[str, int | str | None] = {"signal": None}

    def request_stop(signum: int, _frame: Any) -> None:
        stop["signal"] = signum

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    args.output.mkdir(parents=True, exist_ok=True)
    log = (args.output / LOG_FILE).open("a") if lead else None

    def write_log(record: dict[str, Any]) -> None:
        if log is not None:
            log.write(json.dumps(record) + "\n")
            log.flush()

    def checkpoint() -> None:
        if lead:
            save_state(state_path, model, ema, optimizer, {
                "step": step, "wall_time_s": wall_time, "config": config.to_dict(),
                "settings": asdict(settings), "dataset_name": args.dataset_name,
                "data": record, "val_count": len(val_images),
                "command": info.get("command", command), "world_size": world,
                "resumed_with": [*info.get("resumed_with", []), *([command] if args.resume else [])],
                "device": str(device), "threads": torch.get_num_threads(),
            })

    def evaluate() -> None:
        evaluation = Glow(config).to(device)
        evaluation.load_state_dict(ema.shadow)
        result = bits_per_dim(evaluation.eval(), val_images, seed=settings.seed)
        write_log({"step": step, "wall_time_s": round(wall_time, 1), "val_bpd": result.dequantized,
                   "val_bpd_bin_centre": result.bin_centre})
        bar.write(f"step {step}: val {result.dequantized:.4f} bits/dim (bin centre {result.bin_centre:.4f})")

    bar = tqdm(total=settings.max_steps, initial=step, disable=args.quiet or not lead, unit="step",
               dynamic_ncols=True, smoothing=0.05)
    model.train()
    started = time.monotonic() - wall_time
    last_eval = last_save = time.monotonic()
    bad_steps, running, window_images, window_start = 0, None, 0, time.monotonic()
    if args.stop_at is not None and args.stop_at <= step:
        raise SystemExit(f"--stop-at {args.stop_at}: the run is already at step {step}")
    end = settings.max_steps if args.stop_at is None else min(args.stop_at, settings.max_steps)
    while step < end:
        index = batch_indices(len(train_data), settings.batch_size, step, settings.seed, rank, world)
        batch = train_data[index].to(device)
        noise = step_noise(batch.shape, step, settings.seed, rank).to(device)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, settings)
        loss = model.bits_per_dim(train_model(batch, noise)).mean()
        non_finite, stopping = any_rank(not torch.isfinite(loss), stop["signal"] is not None,
                                        device=device, world=world)
        if stopping:
            stop["signal"] = stop["signal"] or "on another rank"
            break
        if non_finite:
            bad_steps += 1
            bar.write(f"step {step}: non-finite loss ({loss.item()}), step skipped")
            if bad_steps >= MAX_BAD_STEPS:
                raise SystemExit(f"{bad_steps} non-finite losses in a row: stopping without saving")
            step += 1
            continue
        bad_steps = 0
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if settings.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        ema.update(model, step)
        step += 1
        wall_time = time.monotonic() - started
        value = loss.item()
        running = value if running is None else 0.98 * running + 0.02 * value
        window_images += len(batch) * world
        if step % 50 == 0:
            rate = window_images / (time.monotonic() - window_start)
            bar.set_postfix(bpd=f"{running:.3f}", img_s=f"{rate:.0f}", lr=f"{learning_rate(step, settings):.1e}")
            write_log({"step": step, "wall_time_s": round(wall_time, 1), "train_bpd": running, "images_per_s": rate})
            window_images, window_start = 0, time.monotonic()
        bar.update(1)
        now = time.monotonic()
        if lead and now - last_eval > settings.eval_minutes * 60:
            evaluate()
            last_eval = time.monotonic()
        if now - last_save > settings.checkpoint_minutes * 60:
            checkpoint()
            last_save = time.monotonic()
    bar.close()
    checkpoint()
    if lead:
        if stop["signal"] is None:
            evaluate()
        reason = (f"signal {stop['signal']}" if stop["signal"] is not None
                  else f"--stop-at {end}" if end < settings.max_steps else f"max_steps {settings.max_steps}")
        print(f"stopped at step {step} ({reason}); state in {state_path}")
        log.close()
    if world > 1:
        dist.barrier()  # rank 0 may still be evaluating; gloo aborts if a peer leaves first
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
