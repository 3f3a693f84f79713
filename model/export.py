"""Export a training run as a shippable checkpoint: ``python -m model.export --run RUN --output DIR``.

Takes the run's EMA weights, reads the run's data as it was recorded (checked against
its manifest; the validation split by its recorded indices; test images read with the
same channels and size), measures bits/dim on the train, validation and test
images (dequantised with a recorded seed, and at bin centres), stores the
validation split's anomaly scores as the calibration reference, and writes
``glow.safetensors`` + ``glow.json`` (see ``model.checkpoint``), then the model card
(``README.md``, ``samples.png``, ``training-curve.png``; see ``model.card``).
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from model.anomaly import calibrate
from model.calibrate import ProvenanceError, anomaly_meta, check_training_file
from model.card import write_card
from model.checkpoint import CheckpointError, parameter_count, read_sidecar, read_tensors, resolve_paths, save_checkpoint
from model.data import DataError, compact_record, fingerprint, load_dataset, load_images, reopen, split_validation
from model.device import DeviceUnavailable, exact_float32, resolve_device
from model.evaluate import bits_per_dim, classification_accuracy
from model.glow import Glow, GlowConfig
from model.train import LOG_FILE, RUN_FIELDS, STATE_FILE, read_state_info

TRAIN_SUBSET = 10_000  # training images scored for the card's train bits/dim


def load_run(run: Path, weights: str = "ema") -> tuple[Glow, dict[str, Any]]:
    """The model of a run folder (its EMA weights by default) and the state's JSON."""
    info = read_state_info(run / STATE_FILE, RUN_FIELDS)
    tensors, _ = read_tensors(run / STATE_FILE)
    model = Glow(GlowConfig.from_dict(info["config"]))
    prefix = f"{weights}."
    model.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    return model.eval(), info


def hardware(info: dict[str, Any]) -> str:
    device = info.get("device", "cpu")
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {info.get('threads', '?')} threads x {info.get('world_size', 1)} process(es)"


def reopen_like(record: dict[str, Any], test: Path) -> Any:
    """The test set read as the training data was (channels, size, fit): a ``model.data.Dataset``."""
    return load_dataset(test, record["channels"], record["image_size"], record["fit"])


def class_metrics(model: Glow, test: Any, seed: int) -> dict[str, Any]:
    """A class-conditional model's test accuracy (argmax p(k | x)) and bits/dim of p(x | label), where the test
    set has labels; {} for an unconditional model."""
    if not model.conditional:
        return {}
    if test.labels is None:
        return {"test_accuracy": None}
    given = bits_per_dim(model, test.images, seed=seed, labels=test.labels)
    return {"test_accuracy": classification_accuracy(model, test.images, test.labels),
            "test_bits_per_dim_given_label": given.dequantized,
            "test_bits_per_dim_given_label_bin_centre": given.bin_centre}


def init_meta(info: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint a run started from (``--init-from``), with the steps and hours that made it, if readable."""
    start = info.get("init_from")
    if not start:
        return {}
    try:
        earlier = read_sidecar(resolve_paths(start["path"])[1]).get("training", {})
    except CheckpointError:
        earlier = {}
    return {"init_from": {**start, "steps": earlier.get("steps"), "wall_time_s": earlier.get("wall_time_s"),
                          "hardware": earlier.get("hardware")}}


def validation_text(record: dict[str, Any] | None, count: int) -> str:
    if not record:
        return f"the last {count} training images, held out from training"
    split = record["split"]
    if split.get("held_out_by"):
        return f"the {count} training images that {split['held_out_by']} held out, held out from training again"
    how = "stratified by label" if split["stratified"] else "uniformly"
    return f"{count} training images drawn {how} with seed {split['seed']}, held out from training"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="training run folder (state.safetensors, log.jsonl)")
    p.add_argument("--train", type=Path, default=None,
                   help="the training images the run used (default: where they were; checked against its manifest)")
    p.add_argument("--test", type=Path, required=True, help="test images to report bits/dim on")
    p.add_argument("--output", type=Path, required=True, help="checkpoint folder to write")
    p.add_argument("--name", default=None, help="model name (default: glow-<dataset>)")
    p.add_argument("--seed", type=int, default=0, help="seed of the dequantisation noise")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    try:
        model, info = load_run(args.run)
        device = resolve_device(args.device)
    except (CheckpointError, ValueError, DeviceUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model.to(device)
    exact_float32(device)
    record = info.get("data")
    try:
        if record:
            data, train_index, val_index = reopen(record, args.train)
            train_images, val_images = data.images[train_index], data.images[val_index]
            train_path = Path(args.train or record["source"])
            test_set = reopen_like(record, args.test)
        elif args.train is None:
            raise DataError(f"{args.run} records no data: give --train")
        else:
            check_training_file(args.train, info.get("dataset_sha256"))
            train_images, val_images = split_validation(load_images(args.train), info["val_count"])
            train_path, test_set = args.train, load_dataset(args.test)
    except (DataError, ProvenanceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    dataset = info["dataset_name"]
    test_images = test_set.images
    print(f"scoring {len(test_images)} test, {len(val_images)} validation, {min(TRAIN_SUBSET, len(train_images))}"
          " training images", file=sys.stderr)
    test = bits_per_dim(model, test_images, seed=args.seed)
    val = bits_per_dim(model, val_images, seed=args.seed)
    train = bits_per_dim(model, train_images[:TRAIN_SUBSET], seed=args.seed)
    classes = class_metrics(model, test_set, args.seed)
    calibration = calibrate(model, torch.as_tensor(val_images))
    steps = int(info["step"])
    per_epoch = len(train_images) // (info["settings"]["batch_size"] * info.get("world_size", 1))
    meta = {
        "name": args.name or f"glow-{dataset}",
        "dataset": {
            "name": dataset,
            "train_files": fingerprint([train_path]) if train_path.is_file() else {},
            "test_files": fingerprint([args.test]) if args.test.is_file() else {},
            "validation": validation_text(record, len(val_images)),
            "val_count": len(val_images),
            **({"data": compact_record(record)} if record else {}),
        },
        "metrics": {
            "test_bits_per_dim": test.dequantized,
            "test_bits_per_dim_bin_centre": test.bin_centre,
            "val_bits_per_dim": val.dequantized,
            "val_bits_per_dim_bin_centre": val.bin_centre,
            "train_bits_per_dim": train.dequantized,
            "train_bits_per_dim_bin_centre": train.bin_centre,
            "train_images_scored": train.images,
            "dequantization_seed": args.seed,
            **classes,
        },
        "anomaly": anomaly_meta(info["val_count"]),
        "training": {
            "command": info["command"],
            "resumed_with": info.get("resumed_with", []),
            "steps": steps,
            "epochs": round(steps / per_epoch, 2),
            "wall_time_s": round(float(info["wall_time_s"]), 1),
            "hardware": hardware(info),
            "settings": info["settings"],
            "weights": "exponential moving average",
            **init_meta(info),
        },
    }
    weights = save_checkpoint(model, args.output, meta, calibration)
    write_card(model, read_sidecar(weights.with_suffix(".json")), args.output, args.run / LOG_FILE)
    print(
        f"wrote {weights} ({parameter_count(model):,} parameters): test {test.dequantized:.4f} bits/dim "
        f"(bin centre {test.bin_centre:.4f}), val {val.dequantized:.4f}, train {train.dequantized:.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
