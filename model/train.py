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

The parts, one job each: :func:`join_cluster` (device, process group), :func:`load_data`
(images, validation split), :func:`run_setup` (architecture and settings),
:func:`fresh_state` / :func:`resumed_state`, :class:`TrainState` (loss and optimiser
step), :func:`train_loop`, :func:`evaluate`, :func:`checkpoint` and :class:`TrainLog`;
:func:`train` only sequences them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from model.calibrate import ProvenanceError, held_out_indices
from model.checkpoint import (
    CheckpointError, load_checkpoint, read_sidecar, read_tensors, resolve_paths, save_tensors, write_json,
)
from model.architecture import default_architecture
from model.data import (
    FASHION_MNIST_DIR, FITS, DataError, Dataset, data_record, fingerprint, load_dataset, load_images, reopen,
    split_indices, split_validation,
)
from model.device import DeviceUnavailable, resolve_device
from model.evaluate import BitsPerDim, bits_per_dim, classification_accuracy
from model.glow import Glow, GlowConfig

STATE_FILE = "state.safetensors"
DEFAULT_VAL_COUNT = 5000
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


STATE_FIELDS: dict[str, type | tuple[type, ...]] = {"step": int, "wall_time_s": (int, float), "param_groups": list}
RUN_FIELDS: dict[str, type | tuple[type, ...]] = {**STATE_FIELDS, "config": dict, "settings": dict}  # a trainer's run


def read_state_info(path: Path, fields: dict[str, type | tuple[type, ...]] = STATE_FIELDS) -> dict[str, Any]:
    """The JSON part of a training state: CheckpointError unless it is an object with ``fields`` of their types,
    a step and a wall time >= 0 (a hand-edited or damaged state, refused before anything runs)."""
    file = path.with_suffix(".json")
    try:
        info = json.loads(file.read_text())
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: not JSON, or a number past the digit limit
        raise CheckpointError(f"{file}: unreadable training state: {exc}") from None
    if not isinstance(info, dict):
        raise CheckpointError(f"{file}: unusable training state: not a JSON object")
    for key, kind in fields.items():
        if not isinstance(info.get(key), kind) or isinstance(info.get(key), bool):
            raise CheckpointError(f"{file}: unusable training state: {key!r} is missing or of the wrong type")
    if info["step"] < 0 or not (math.isfinite(info["wall_time_s"]) and info["wall_time_s"] >= 0):
        raise CheckpointError(f"{file}: unusable training state: step {info['step']}, wall time {info['wall_time_s']}")
    return info


def load_state(path: Path, model: Glow, ema: EMA, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore what :func:`save_state` wrote; returns its JSON part."""
    info = read_state_info(path)
    tensors, _ = read_tensors(path)
    try:
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    except RuntimeError as exc:  # missing, unexpected or mis-shaped tensors: the state's config is not its weights'
        raise CheckpointError(f"{path}: the weights do not match the state's config ({str(exc).splitlines()[0]})")
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
    data.add_argument("--train-labels", type=Path, default=None,
                      help="IDX label file of IDX --train images (default: the labels file beside them, if any)")
    data.add_argument("--channels", type=int, choices=(1, 3), default=None,
                      help="1 (grey) or 3 (RGB); default: inferred from the data (stated in the log)")
    data.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                      help="bring every image to H x W by --fit (default: all images must share one size)")
    data.add_argument("--fit", choices=FITS, default="scale-crop",
                      help="how --image-size is reached: scale-crop (keep the aspect ratio, crop the centre) or resize")
    data.add_argument("--val-count", type=int, default=None,
                      help="images held out for validation and calibration, drawn by --val-seed (stratified when"
                      f" the data has labels); default: {DEFAULT_VAL_COUNT}, or a tenth of smaller data sets")
    data.add_argument("--val-seed", type=int, default=0, help="seed of the validation draw (recorded with the run)")
    data.add_argument("--dataset-name", default="fashion-mnist")
    arch = p.add_argument_group("architecture (fixed at the start of a run; defaults from the image size, see"
                                " model/architecture.py)")
    arch.add_argument("--levels", type=int, default=None)
    arch.add_argument("--steps", type=int, default=None, help="flow steps per level (K)")
    arch.add_argument("--hidden", type=int, default=None, help="coupling network width")
    arch.add_argument("--n-bits", type=int, default=8)
    arch.add_argument("--conditional", action="store_true",
                      help="a class-conditional top prior (model/class_prior.py), trained on p(x | label): the data"
                      " must have labels")
    arch.add_argument("--label-names", nargs="+", default=None, metavar="NAME",
                      help="class names, in class-number order (default: the class subfolders' names, else 0..K-1)")
    arch.add_argument("--init-from", type=Path, default=None, metavar="CHECKPOINT",
                      help="start from an exported checkpoint's weights and architecture (a fresh optimiser), holding out"
                      " the images it held out; with --conditional its top latent gets a Gaussian per class, fitted in"
                      " closed form (fit_class_prior)")
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
    args = p.parse_args(argv)
    problem = flag_problem(args)
    if problem is not None:
        p.error(problem)
    return args


AT_LEAST_1 = ("batch_size", "levels", "steps", "hidden", "threads")
AT_LEAST_0 = ("max_steps", "warmup_steps", "decay_start", "seed", "val_seed")  # --max-steps 0: set up and evaluate
POSITIVE = ("lr", "eval_minutes", "checkpoint_minutes", "epochs")  # finite and > 0
UNIT_INTERVAL = {"ema_decay": (0.0, 1.0, False), "min_lr_ratio": (0.0, 1.0, True)}  # (low, high, high included)
SCHEDULES = ("constant", "cosine")


def flag_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the numeric flags given (None: nothing), before any data is read or state written."""

    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    given = {name: value for name, value in vars(args).items() if value is not None}
    for name in AT_LEAST_1:
        if name in given and given[name] < 1:
            return f"{flag(name)} must be at least 1, got {given[name]}"
    for name in AT_LEAST_0:
        if name in given and given[name] < 0:
            return f"{flag(name)} must be at least 0, got {given[name]}"
    for name in POSITIVE:
        if name in given and not (math.isfinite(given[name]) and given[name] > 0):
            return f"{flag(name)} must be a finite number above 0, got {given[name]}"
    if "grad_clip" in given and not (math.isfinite(given["grad_clip"]) and given["grad_clip"] >= 0):
        return f"--grad-clip must be a finite number >= 0 (0: off), got {given['grad_clip']}"
    for name, (low, high, closed) in UNIT_INTERVAL.items():
        value = given.get(name)
        if value is not None and not (low <= value < high or (closed and value == high)):
            return f"{flag(name)} must be in [{low:g}, {high:g}{']' if closed else ')'}, got {value}"
    if not 1 <= args.n_bits <= 8:
        return f"--n-bits must be in 1..8, got {args.n_bits}"
    if "schedule" in given and given["schedule"] not in SCHEDULES:
        return f"--schedule must be one of {', '.join(SCHEDULES)}, got {given['schedule']!r}"
    if args.output.exists() and not args.output.is_dir():
        return f"--output {args.output}: is a file; the run needs a folder"
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point: a bad input file or state ends the run with one line and exit code 2."""
    try:
        return train(parse_args(argv), argv)
    except (DataError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


@dataclass(frozen=True)
class Cluster:
    """This process's place among the training processes (one, unless started by torchrun)."""

    world: int  # number of processes
    rank: int
    device: torch.device

    @property
    def lead(self) -> bool:
        """Rank 0: the one process that writes the state and the log and evaluates."""
        return self.rank == 0


def join_cluster(device_name: str) -> Cluster:
    """The training device and, under torchrun (``WORLD_SIZE`` > 1), the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    try:
        device = resolve_device(device_name)
    except DeviceUnavailable as exc:
        raise SystemExit(str(exc)) from None
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Cluster(world, rank, device)


def leave_cluster(cluster: Cluster) -> None:
    """Tear the process group down once every rank is done (no-op for one process)."""
    if cluster.world > 1:
        dist.barrier()  # rank 0 may still be evaluating; gloo aborts if a peer leaves first
        dist.destroy_process_group()


@dataclass(frozen=True)
class TrainData:
    """The run's images, uint8 (N, C, H, W): the training part and the held-out validation part."""

    train: torch.Tensor
    val: np.ndarray
    # how the data was read, its manifest and the validation indices (``model.data.data_record``); None for a run
    # started before data records, which holds out the last ``val_count`` images
    record: dict[str, Any] | None
    train_labels: torch.Tensor | None = None  # (N,) class numbers, where the data has labels
    val_labels: np.ndarray | None = None
    label_names: list[str] | None = None  # where the data names its classes


def load_data(args: argparse.Namespace, previous: dict[str, Any] | None) -> TrainData:
    """The images and the validation split: the recorded ones when resuming (checked against the manifest),
    else read by the data flags and drawn with ``--val-seed``."""
    if previous is not None and not previous.get("data"):
        train, val = split_validation(load_images(args.train), previous["val_count"])
        return TrainData(torch.from_numpy(train), val, None)
    if previous is not None:
        dataset, train_index, val_index = reopen(previous["data"], args.train)
        return split_data(dataset, train_index, val_index, previous["data"])
    size = tuple(args.image_size) if args.image_size else None
    dataset = load_dataset(args.train, args.channels, size, args.fit, args.train_labels)
    count, channels = len(dataset.images), dataset.images.shape[1]
    how = "inferred from the data" if dataset.channels_inferred else "as asked"
    if args.init_from is not None:
        try:  # the images it held out, or validation would score images the weights were trained on
            val_index = held_out_indices(read_sidecar(resolve_paths(args.init_from)[1])["dataset"], args.train, count)
        except ProvenanceError as exc:
            raise DataError(str(exc)) from None
        train_index = np.setdiff1d(np.arange(count), val_index)
        split = f"the {len(val_index)} images {args.init_from} held out"
    else:
        val_count = args.val_count if args.val_count is not None else min(DEFAULT_VAL_COUNT, max(1, count // 10))
        train_index, val_index = split_indices(count, val_count, args.val_seed, dataset.labels)
        stratified = ", stratified by label" if dataset.labels is not None else ""
        split = f"{val_count} held out (seed {args.val_seed}{stratified})"
    print(f"data: {count} images of {'x'.join(map(str, dataset.images.shape[1:]))} ({channels} channel"
          f"{'s' if channels > 1 else ''}, {how}); validation: {split}", file=sys.stderr)
    record = data_record(args.train, dataset, size, args.fit, args.val_seed, val_index, args.train_labels)
    if args.init_from is not None:  # not drawn: the checkpoint's own held-out images
        record["split"] = {"held_out_by": str(args.init_from), "seed": None, "stratified": False,
                           "validation_indices": val_index.tolist()}
    return split_data(dataset, train_index, val_index, record)


def split_data(dataset: Dataset, train_index: np.ndarray, val_index: np.ndarray,
               record: dict[str, Any]) -> TrainData:
    labels = dataset.labels
    return TrainData(torch.from_numpy(dataset.images[train_index]), dataset.images[val_index], record,
                     None if labels is None else torch.from_numpy(labels[train_index]),
                     None if labels is None else labels[val_index], dataset.label_names)


def previous_run(args: argparse.Namespace) -> dict[str, Any] | None:
    """The JSON part of the state to continue (``--resume``), or None for a fresh run."""
    path = args.output / STATE_FILE
    if not args.resume:
        if path.exists():
            raise SystemExit(f"--output {args.output} holds a run ({STATE_FILE}): --resume continues it; a new run"
                             " needs another folder")
        return None
    if not path.is_file():
        raise SystemExit(f"--resume: no training state at {path}")
    return read_state_info(path, RUN_FIELDS)


def run_setup(args: argparse.Namespace, previous: dict[str, Any] | None, data: TrainData,
              world: int) -> tuple[GlowConfig, TrainSettings]:
    """The architecture (the state's when resuming, else the flags' over ``model.architecture``'s defaults for the
    image size) and the optimisation settings (the state's or the defaults, with every flag given taking precedence)."""
    image_shape = tuple(data.train.shape[1:])
    if previous is not None:
        try:
            config = GlowConfig.from_dict(previous["config"])
            settings = TrainSettings(**previous["settings"])
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{args.output / STATE_FILE}: the state's config or settings are invalid: {exc}") \
                from None
    elif args.init_from is not None:
        config = replace(load_checkpoint(args.init_from).model.config, labels=class_names(args, data))
        settings = TrainSettings()
    else:
        try:
            arch = default_architecture(image_shape[1], image_shape[2], args.levels, args.steps, args.hidden)
        except ValueError as exc:
            raise DataError(f"{args.train}: {exc}") from None
        config = GlowConfig(image_shape, arch.levels, arch.steps_per_level,  # type: ignore[arg-type]
                            arch.hidden_channels, args.n_bits, class_names(args, data))
        settings = TrainSettings()
    for name in asdict(settings):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    if args.epochs is not None:
        settings.max_steps = int(args.epochs * (len(data.train) // (settings.batch_size * world)))
    if image_shape != config.image_shape:
        raise SystemExit(f"{args.train}: images are {image_shape}, the run's model needs {config.image_shape}")
    return config, settings


def class_names(args: argparse.Namespace, data: TrainData) -> tuple[str, ...]:
    """The classes of a ``--conditional`` run (``--label-names``, the data's names, or 0..K-1); () otherwise."""
    if not args.conditional:
        return ()
    if data.train_labels is None:
        raise DataError(f"{args.train}: --conditional needs labels (an IDX label file beside the images, 'labels' in"
                        " the .npz, or class subfolders)")
    count = int(data.train_labels.max()) + 1
    names = args.label_names or data.label_names or [str(k) for k in range(count)]
    if len(names) != count:
        raise DataError(f"--label-names: {len(names)} names for {count} classes")
    return tuple(names)


@dataclass
class TrainState:
    """What a step changes: the model, its optimiser and EMA, the step count and the training time."""

    model: Glow
    network: nn.Module  # what the forward pass calls: the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    ema: EMA
    step: int = 0
    wall_time: float = 0.0  # seconds of training over every process lifetime of the run

    def loss(self, batch: torch.Tensor, noise: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Mean dequantised bits/dim of a uint8 batch with its noise u ~ U[0, 1): of p(x | label) when
        the model is class-conditional (``labels`` then the batch's), else of p(x)."""
        return self.model.bits_per_dim(self.network(batch, noise, labels)).mean()

    def update(self, loss: torch.Tensor, settings: TrainSettings) -> None:
        """One optimiser step on ``loss`` at this step's learning rate (the gradient clipped), the EMA
        after it; the step count advances."""
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.step, settings)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if settings.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), settings.grad_clip)
        self.optimizer.step()
        self.ema.update(self.model, self.step)
        self.step += 1


def seeded_state(config: GlowConfig, settings: TrainSettings, device: torch.device) -> TrainState:
    """A model with the weights ``settings.seed`` draws, at step 0."""
    torch.manual_seed(settings.seed)
    model = Glow(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    return TrainState(model, model, optimizer, EMA(model, settings.ema_decay))


def fresh_state(config: GlowConfig, settings: TrainSettings, data: TrainData, device: torch.device,
                init_from: Path | None = None) -> TrainState:
    """A new run's state: the weights of ``init_from`` (a checkpoint), or ActNorm initialised from the first batch
    of the data order; the class frequencies from the training labels; the EMA from that."""
    state = seeded_state(config, settings, device)
    if init_from is not None:
        weights = load_checkpoint(init_from, device).model.state_dict()
        missing, unexpected = state.model.load_state_dict(weights, strict=False)
        if unexpected or any(not name.startswith("class_prior.") for name in missing):
            raise CheckpointError(f"{init_from}: weights do not fit the run's model (missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]})")
    else:
        first = data.train[batch_indices(len(data.train), settings.batch_size, 0, settings.seed, 0, 1)]
        state.model.initialize(first.to(device), torch.Generator(device=device).manual_seed(settings.seed))
    if state.model.class_prior is not None and data.train_labels is not None:
        state.model.class_prior.set_frequencies(data.train_labels)
        if init_from is not None:
            fit_class_prior(state.model, data, settings)
    state.ema = EMA(state.model, settings.ema_decay)
    return state


CLASS_FIT_IMAGES = 20_000  # training images whose top latents fit the class Gaussians of an --init-from run


@torch.no_grad()
def fit_class_prior(model: Glow, data: TrainData, settings: TrainSettings, limit: int = CLASS_FIT_IMAGES) -> None:
    """Each class's top-latent Gaussian at its maximum-likelihood value under the (trained) flow, from the first
    ``limit`` images of a seeded draw, dequantised (one uniform draw each) as the training objective is."""
    assert model.class_prior is not None and data.train_labels is not None
    generator = torch.Generator().manual_seed(settings.seed)
    index = torch.randperm(len(data.train), generator=generator)[:limit]
    tops = []
    for start in range(0, len(index), 256):
        batch = data.train[index[start : start + 256]]
        noise = torch.rand(batch.shape, generator=generator)
        tops.append(model.log_prob_and_levels(batch.to(model.device), noise.to(model.device))[1][-1].cpu())
    model.class_prior.fit(torch.cat(tops), data.train_labels[index])


def resumed_state(config: GlowConfig, settings: TrainSettings, path: Path, device: torch.device) -> TrainState:
    """The state :func:`save_state` wrote to ``path``."""
    state = seeded_state(config, settings, device)
    info = load_state(path, state.model, state.ema, state.optimizer)
    state.step, state.wall_time = int(info["step"]), float(info["wall_time_s"])
    return state


def step_batch(data: TrainData, settings: TrainSettings, step: int,
               cluster: Cluster) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """This rank's uint8 batch at ``step``, its dequantisation noise and its labels (where the data has them),
    on the device."""
    index = batch_indices(len(data.train), settings.batch_size, step, settings.seed, cluster.rank, cluster.world)
    batch = data.train[index].to(cluster.device)
    labels = None if data.train_labels is None else data.train_labels[index].to(cluster.device)
    return batch, step_noise(batch.shape, step, settings.seed, cluster.rank).to(cluster.device), labels


class TrainLog:
    """The run's record for people: ``log.jsonl`` lines and a progress bar (rank 0 only).

    Every 50 steps a line holds the running training bits/dim (an exponential average,
    weight 0.02 per step) and the images/s since the last line; every evaluation, the
    validation bits/dim both ways (see ``model.evaluate``).
    """

    EVERY = 50  # steps between training lines

    def __init__(self, path: Path | None, total: int, initial: int, quiet: bool) -> None:
        self._file = path.open("a") if path is not None else None
        self._bar = tqdm(total=total, initial=initial, disable=quiet or path is None, unit="step",
                         dynamic_ncols=True, smoothing=0.05)
        self._running: float | None = None
        self._images = 0
        self._since = time.monotonic()

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def note(self, text: str) -> None:
        """A line on the console (every rank), above the progress bar."""
        self._bar.write(text)

    def trained(self, step: int, wall_time: float, loss: float, images: int, lr: float) -> None:
        """A finished optimiser step: ``images`` over all ranks, ``lr`` the next step's learning rate."""
        self._running = loss if self._running is None else 0.98 * self._running + 0.02 * loss
        self._images += images
        if step % self.EVERY == 0:
            rate = self._images / (time.monotonic() - self._since)
            self._bar.set_postfix(bpd=f"{self._running:.3f}", img_s=f"{rate:.0f}", lr=f"{lr:.1e}")
            self.write({"step": step, "wall_time_s": round(wall_time, 1), "train_bpd": self._running,
                        "images_per_s": rate})
            self._images, self._since = 0, time.monotonic()
        self._bar.update(1)

    def validated(self, step: int, wall_time: float, result: BitsPerDim, accuracy: float | None = None) -> None:
        self.write({"step": step, "wall_time_s": round(wall_time, 1), "val_bpd": result.dequantized,
                    "val_bpd_bin_centre": result.bin_centre, **({} if accuracy is None else {"val_accuracy": accuracy})})
        self.note(f"step {step}: val {result.dequantized:.4f} bits/dim (bin centre {result.bin_centre:.4f})"
                  + ("" if accuracy is None else f", class accuracy {accuracy:.4f}"))

    def end_progress(self) -> None:
        self._bar.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class StopRequest:
    """SIGINT and SIGTERM set ``signal`` instead of ending the process, so the run stops between steps."""

    def __init__(self) -> None:
        self.signal: int | str | None = None
        signal.signal(signal.SIGINT, self.request)
        signal.signal(signal.SIGTERM, self.request)

    def request(self, signum: int, _frame: Any) -> None:
        self.signal = signum


@dataclass(frozen=True)
class Run:
    """What one training process holds fixed from start to end."""

    cluster: Cluster
    data: TrainData
    config: GlowConfig
    settings: TrainSettings
    state_path: Path
    end: int  # the step this process stops at: max_steps, or --stop-at when earlier
    record: dict[str, Any]  # provenance written with every state (see checkpoint)


def checkpoint(run: Run, state: TrainState) -> None:
    """Write the training state (rank 0)."""
    if run.cluster.lead:
        save_state(run.state_path, state.model, state.ema, state.optimizer, {
            "step": state.step, "wall_time_s": state.wall_time, **run.record, "threads": torch.get_num_threads(),
        })


def evaluate(run: Run, state: TrainState, log: TrainLog) -> None:
    """Validation bits/dim of the EMA weights (what gets exported), logged."""
    evaluation = Glow(run.config).to(state.model.device)
    evaluation.load_state_dict(state.ema.shadow)
    evaluation.eval()
    accuracy = (None if not evaluation.conditional or run.data.val_labels is None
                else classification_accuracy(evaluation, run.data.val, run.data.val_labels))
    log.validated(state.step, state.wall_time, bits_per_dim(evaluation, run.data.val, seed=run.settings.seed),
                  accuracy)


def train_loop(run: Run, state: TrainState, log: TrainLog, stop: StopRequest) -> None:
    """Step until ``run.end`` or a stop request on any rank; evaluate and checkpoint on their timers.

    A non-finite loss (on any rank) skips its step on every rank; ``MAX_BAD_STEPS`` in a
    row end the run without saving.
    """
    settings, cluster = run.settings, run.cluster
    started = time.monotonic() - state.wall_time
    last_eval = last_save = time.monotonic()
    bad_steps = 0
    while state.step < run.end:
        batch, noise, labels = step_batch(run.data, settings, state.step, cluster)
        loss = state.loss(batch, noise, labels if state.model.conditional else None)
        non_finite, stopping = any_rank(not torch.isfinite(loss), stop.signal is not None,
                                        device=cluster.device, world=cluster.world)
        if stopping:
            stop.signal = stop.signal or "on another rank"
            return
        if non_finite:
            bad_steps += 1
            log.note(f"step {state.step}: non-finite loss ({loss.item()}), step skipped")
            if bad_steps >= MAX_BAD_STEPS:
                raise SystemExit(f"{bad_steps} non-finite losses in a row: stopping without saving")
            state.step += 1
            continue
        bad_steps = 0
        state.update(loss, settings)
        state.wall_time = time.monotonic() - started
        log.trained(state.step, state.wall_time, loss.item(), len(batch) * cluster.world,
                    learning_rate(state.step, settings))
        now = time.monotonic()
        if cluster.lead and now - last_eval > settings.eval_minutes * 60:
            evaluate(run, state, log)
            last_eval = time.monotonic()
        if now - last_save > settings.checkpoint_minutes * 60:
            checkpoint(run, state)
            last_save = time.monotonic()


def provenance(argv: list[str] | None, previous: dict[str, Any] | None) -> dict[str, Any]:
    """The command that started the run and those that resumed it (for the model card)."""
    command = " ".join(["python -m model.train", *(argv if argv is not None else sys.argv[1:])])
    if previous is None:
        return {"command": command, "resumed_with": []}
    return {"command": previous.get("command", command), "resumed_with": [*previous.get("resumed_with", []), command]}


def init_record(args: argparse.Namespace, previous: dict[str, Any] | None) -> dict[str, Any]:
    """The checkpoint a run started from (``--init-from``), its weights' sha256 included, kept across resumes."""
    if previous is not None:
        return {k: previous[k] for k in ("init_from",) if k in previous}
    if args.init_from is None:
        return {}
    checkpoint_ = load_checkpoint(args.init_from)
    return {"init_from": {"path": str(args.init_from), "name": checkpoint_.meta.get("name"),
                          "weights_sha256": checkpoint_.meta.get("weights_sha256")}}


def train(args: argparse.Namespace, argv: list[str] | None) -> int:
    """One training process: set up, step until done or told to stop, save, evaluate, report."""
    cluster = join_cluster(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    previous = previous_run(args)
    dataset_name = previous["dataset_name"] if previous is not None else args.dataset_name  # fixed for the run
    data = load_data(args, previous)
    config, settings = run_setup(args, previous, data, cluster.world)
    state_path = args.output / STATE_FILE
    sha256 = fingerprint([args.train]) if data.record is None else None  # runs from before data records
    if previous is not None:
        state = resumed_state(config, settings, state_path, cluster.device)
        if sha256 is not None and previous.get("dataset_sha256") != sha256:
            print(f"warning: {args.train} differs from the data the run started on", file=sys.stderr)
    else:
        state = fresh_state(config, settings, data, cluster.device, args.init_from)
        if cluster.lead:
            print(f"model: {config.levels} levels x {config.steps_per_level} steps, width {config.hidden_channels},"
                  f" on {'x'.join(map(str, config.image_shape))} images"
                  + (f", conditional on {len(config.labels)} classes" if config.labels else "")
                  + (f", from {args.init_from}" if args.init_from else ""), file=sys.stderr)
    if cluster.world > 1:
        state.network = nn.parallel.DistributedDataParallel(state.model)
    if args.stop_at is not None and args.stop_at <= state.step:
        raise SystemExit(f"--stop-at {args.stop_at}: the run is already at step {state.step}")
    end = settings.max_steps if args.stop_at is None else min(args.stop_at, settings.max_steps)
    record = {"config": config.to_dict(), "settings": asdict(settings), "dataset_name": dataset_name,
              **({"data": data.record} if data.record else {"dataset_sha256": sha256}), "val_count": len(data.val),
              **provenance(argv, previous), **init_record(args, previous),
              "world_size": cluster.world, "device": str(cluster.device)}
    run = Run(cluster, data, config, settings, state_path, end, record)
    stop = StopRequest()
    args.output.mkdir(parents=True, exist_ok=True)
    log = TrainLog(args.output / LOG_FILE if cluster.lead else None, settings.max_steps, state.step, args.quiet)
    state.model.train()
    train_loop(run, state, log, stop)
    log.end_progress()
    checkpoint(run, state)
    if cluster.lead:
        if stop.signal is None:
            evaluate(run, state, log)
        reason = (f"signal {stop.signal}" if stop.signal is not None
                  else f"--stop-at {end}" if end < settings.max_steps else f"max_steps {settings.max_steps}")
        print(f"stopped at step {state.step} ({reason}); state in {state_path}")
    log.close()
    leave_cluster(cluster)
    return 0


if __name__ == "__main__":
    sys.exit(main())
