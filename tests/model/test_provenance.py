"""export and calibrate refuse a training file or split other than the run's (one line, exit 2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model import train as trainer
from model.anomaly import calibrate
from model.calibrate import held_out_images
from model.calibrate import main as calibrate_main
from model.checkpoint import load_checkpoint, save_checkpoint
from model.data import data_record, fingerprint, load_dataset
from model.export import main as export_main
from model.glow import Glow, GlowConfig

VAL_COUNT = 32


def images(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (96, 8, 8), dtype=np.uint8)


@pytest.fixture(scope="module")
def train_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.npz"
    np.savez(path, images=images(0))
    return path


@pytest.fixture
def other_file(tmp_path: Path) -> Path:
    path = tmp_path / "other.npz"
    np.savez(path, images=images(1))
    return path


@pytest.fixture
def checkpoint(tmp_path: Path, train_file: Path) -> Path:
    """A tiny checkpoint recording ``train_file`` and a held-out split of VAL_COUNT images."""
    torch.manual_seed(0)
    model = Glow(GlowConfig(image_shape=(1, 8, 8), levels=2, steps_per_level=1, hidden_channels=8))
    model.initialize(torch.as_tensor(images(0)[:16, None]))
    meta = {"name": "tiny", "dataset": {"name": "synthetic", "train_files": fingerprint([train_file]),
                                         "val_count": VAL_COUNT}}
    save_checkpoint(model.eval(), tmp_path / "ckpt", meta, calibrate(model, torch.as_tensor(images(0)[-16:, None])))
    return tmp_path / "ckpt"


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def refused_as_other_data(line: str) -> bool:
    """A run with a data record is checked against its manifest (model.data.reopen); an older run against
    its training file's sha256 (model.calibrate.check_training_file)."""
    return "is not the data the run was trained on" in line or "is not the training file's recorded" in line


def test_calibrate_accepts_the_recorded_training_file(checkpoint: Path, train_file: Path) -> None:
    assert calibrate_main(["--weights", str(checkpoint), "--train", str(train_file), "--val-count", "16"]) == 0
    assert load_checkpoint(checkpoint).meta["anomaly"]["reference_size"] == 8


def test_calibrate_uses_a_recorded_split_and_its_last_val_count(checkpoint: Path, train_file: Path) -> None:
    """A checkpoint with a data record calibrates on its drawn held-out images, read as recorded."""
    held_out = np.random.default_rng(3).choice(96, VAL_COUNT, replace=False)
    record = data_record(train_file, load_dataset(train_file), None, "scale-crop", 3, held_out)
    meta = load_checkpoint(checkpoint).meta
    meta["dataset"] = {**meta["dataset"], "data": record}
    save_checkpoint(load_checkpoint(checkpoint).model, checkpoint, meta, load_checkpoint(checkpoint).calibration)
    assert calibrate_main(["--weights", str(checkpoint)]) == 0  # the data is where the record says
    assert load_checkpoint(checkpoint).meta["anomaly"]["reference_size"] == VAL_COUNT - VAL_COUNT // 2
    assert calibrate_main(["--weights", str(checkpoint), "--val-count", "16"]) == 0
    assert load_checkpoint(checkpoint).meta["anomaly"]["reference_size"] == 8
    last = held_out_images(meta["dataset"], None, 16)
    assert np.array_equal(last, images(0)[held_out[-16:], None])  # the recorded indices, not the file's last images


def test_calibrate_refuses_another_training_file(
    checkpoint: Path, other_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (checkpoint / "glow.safetensors").read_bytes()
    assert calibrate_main(["--weights", str(checkpoint), "--train", str(other_file)]) == 2
    assert refused_as_other_data(one_error_line(capsys))
    assert (checkpoint / "glow.safetensors").read_bytes() == before


@pytest.mark.parametrize("val_count", ["0", str(VAL_COUNT + 1), "90"])
def test_calibrate_refuses_a_val_count_past_the_held_out_split(
    checkpoint: Path, train_file: Path, capsys: pytest.CaptureFixture[str], val_count: str
) -> None:
    assert calibrate_main(["--weights", str(checkpoint), "--train", str(train_file), "--val-count", val_count]) == 2
    assert f"between 1 and the {VAL_COUNT} images held out" in one_error_line(capsys)


def test_export_refuses_another_training_file(
    train_file: Path, other_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    args = ["--train", str(train_file), "--val-count", str(VAL_COUNT), "--hidden", "8", "--batch-size", "16",
            "--output", str(run), "--quiet", "--threads", "1", "--max-steps", "0"]
    assert trainer.main(args) == 0
    capsys.readouterr()
    output = tmp_path / "shipped"
    assert export_main(["--run", str(run), "--train", str(other_file), "--test", str(other_file),
                        "--output", str(output)]) == 2
    assert refused_as_other_data(one_error_line(capsys))
    assert not output.exists()
