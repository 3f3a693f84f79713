"""Re-calibrate a checkpoint's anomaly score: ``python -m model.calibrate --weights DIR --train PATH``.

Recomputes the calibration tensors (see ``model.anomaly``) from the checkpoint's
validation split, as recorded when it was trained (the recorded indices, after checking
the data against the recorded manifest; for checkpoints from before data records, the
last ``val_count`` training images) and rewrites the checkpoint with the same weights
and metadata. Used when
the scoring method changes without retraining; ``model.export`` calls the same code.

The held-out split is only held out for the training file the run used: ``--train``
must have the sha256 the checkpoint records (:func:`check_training_file`), and
``--val-count`` may shrink the split but never reach into the trained-on images.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.anomaly import DETECTORS, ORIENTATION, calibrate, describe, method_name
from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.data import DataError, load_dataset, manifest, manifest_sha256, reopen, sha256_file


def anomaly_meta(val_count: int) -> dict[str, Any]:
    """The sidecar's description of the calibration: its rows, methods and reference."""
    rows = DETECTORS + (ORIENTATION,)
    return {"rows": [{"name": r.name, "description": r.description, "weight": r.weight, "two_sided": r.two_sided}
                     for r in rows],
            "methods": {method_name(m): describe(m) for m in (DETECTORS, rows)},
            "reference": f"validation split ({val_count} held-out training images): the first half fits the rows' "
            "parameters, the second half their z-scores and the reference scores", "reference_size": val_count - val_count // 2}


class ProvenanceError(ValueError):
    """A training file or split other than the one the checkpoint was trained on and held out."""


def check_training_file(path: Path, recorded: str | dict[str, str] | None) -> None:
    """ProvenanceError unless ``path``'s sha256 is the recorded one (a digest, or a name -> digest map)."""
    if not recorded:
        raise ProvenanceError(f"{path}: the run records no sha256 of its training file; cannot check it")
    digests = set(recorded.values()) if isinstance(recorded, dict) else {recorded}
    actual = sha256_file(path)
    if actual not in digests:
        raise ProvenanceError(
            f"{path}: sha256 {actual[:12]}... is not the training file's recorded "
            f"{', '.join(sorted(d[:12] + '...' for d in digests))}: the held-out split would not be held out"
        )


def check_val_count(val_count: int, held_out: int) -> None:
    """ProvenanceError unless 0 < ``val_count`` <= ``held_out`` (the run's held-out split)."""
    if not 0 < val_count <= held_out:
        raise ProvenanceError(
            f"--val-count {val_count}: must be between 1 and the {held_out} images held out from training"
        )


def held_out_indices(dataset: dict[str, Any], train: Path, count: int) -> np.ndarray:
    """The indices, among the ``count`` images of ``train``, that a checkpoint held out from training (its
    sidecar's ``dataset``): its data record's, after checking ``train`` against the recorded manifest, or, for
    checkpoints from before data records, the last ``val_count`` after checking ``train``'s sha256.
    ProvenanceError for other data: its held-out split would not be held out."""
    record = dataset.get("data")
    if record:
        if manifest_sha256(manifest(train)) != record["manifest_sha256"]:
            raise ProvenanceError(f"{train} is not the data the checkpoint was trained on (manifest sha256 differs)")
        return np.asarray(record["split"]["validation_indices"], dtype=np.int64)
    check_training_file(train, dataset.get("train_files"))
    return np.arange(count - int(dataset["val_count"]), count)


def checkpoint_data(dataset: dict[str, Any], train: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """A checkpoint's data (its sidecar's ``dataset``) read as at training, uint8 (N, C, H, W), and the indices
    of the images it held out (:func:`held_out_indices`). ``train`` defaults to where a recorded run's data was.
    DataError or ProvenanceError for other data."""
    record = dataset.get("data")
    if record:
        data, _, held_out = reopen(record, train)  # checked against the recorded manifest
        return data.images, held_out
    if train is None:
        raise DataError("the checkpoint records no data: give --train")
    data = load_dataset(train)
    return data.images, held_out_indices(dataset, train, len(data.images))


def held_out_images(dataset: dict[str, Any], train: Path | None, val_count: int | None = None) -> np.ndarray:
    """The images a checkpoint held out from training (:func:`checkpoint_data`), the last ``val_count`` of them
    when given. DataError or ProvenanceError for other data or a bad count."""
    images, held_out = checkpoint_data(dataset, train)
    if val_count is not None:
        check_val_count(val_count, len(held_out))
        held_out = held_out[-val_count:]
    return images[held_out]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, required=True, help="checkpoint folder")
    p.add_argument("--train", type=Path, default=None,
                   help="the training images the checkpoint was trained on (default: where they were at training;"
                   " checked against the recorded manifest)")
    p.add_argument("--val-count", type=int, default=None, help="default: the checkpoint's recorded split")
    args = p.parse_args(argv)
    try:
        checkpoint = load_checkpoint(args.weights)
        val = held_out_images(checkpoint.meta.get("dataset") or {}, args.train, args.val_count)
    except (CheckpointError, DataError, ProvenanceError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    calibration = calibrate(checkpoint.model, torch.as_tensor(val))
    meta = {k: v for k, v in checkpoint.meta.items()}
    meta["anomaly"] = anomaly_meta(len(val))
    save_checkpoint(checkpoint.model, checkpoint.weights_path.parent, meta, calibration)
    print(f"recalibrated {checkpoint.weights_path}: {', '.join(meta['anomaly']['methods'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
