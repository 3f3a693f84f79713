"""Re-calibrate a checkpoint's anomaly score: ``python -m model.calibrate --weights DIR --train PATH``.

Recomputes the calibration tensors (see ``model.anomaly``) from the checkpoint's
validation split, as recorded when it was trained (the recorded indices, after checking
the data against the recorded manifest; for checkpoints from before data records, the
last ``val_count`` training images) and rewrites the checkpoint with the same weights
and metadata. Used when
the scoring method changes without retraining; ``model.export`` calls the same code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from model.anomaly import DETECTORS, ORIENTATION, calibrate, describe, method_name
from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.data import DataError, load_images, reopen, split_validation
from model.glow import Glow


def anomaly_meta(val_count: int) -> dict[str, Any]:
    """The sidecar's description of the calibration: its rows, methods and reference."""
    rows = DETECTORS + (ORIENTATION,)
    return {"rows": [{"name": r.name, "description": r.description, "weight": r.weight, "two_sided": r.two_sided}
                     for r in rows],
            "methods": {method_name(m): describe(m) for m in (DETECTORS, rows)},
            "reference": f"validation split ({val_count} held-out training images): the first half fits the rows' "
            "parameters, the second half their z-scores and the reference scores", "reference_size": val_count - val_count // 2}


def calibration_for(model: Glow, train_path: Path, val_count: int) -> dict[str, torch.Tensor]:
    """Calibration on the last ``val_count`` images (the split of checkpoints recorded without a data record)."""
    _, val = split_validation(load_images(train_path), val_count)
    return calibrate(model, torch.as_tensor(val))


def recorded_calibration(model: Glow, record: dict[str, Any], train_path: Path | None) -> dict[str, torch.Tensor]:
    """Calibration on exactly the recorded validation images, after checking the data against its manifest."""
    dataset, _, val = reopen(record, train_path)
    return calibrate(model, torch.as_tensor(dataset.images[val]))


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
        record = checkpoint.meta["dataset"].get("data")
        val_count = args.val_count or int(checkpoint.meta["dataset"]["val_count"])
        if record and args.val_count is None:
            calibration = recorded_calibration(checkpoint.model, record, args.train)
        elif args.train is None:
            raise DataError(f"{args.weights} records no data: give --train")
        else:
            calibration = calibration_for(checkpoint.model, args.train, val_count)
    except (CheckpointError, DataError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    meta = {k: v for k, v in checkpoint.meta.items()}
    meta["anomaly"] = anomaly_meta(val_count)
    save_checkpoint(checkpoint.model, checkpoint.weights_path.parent, meta, calibration)
    print(f"recalibrated {checkpoint.weights_path}: {', '.join(meta['anomaly']['methods'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
