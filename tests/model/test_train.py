"""The trainer on a tiny synthetic data set: learning, exact resume, bad inputs, DDP, export."""

from __future__ import annotations

import gzip
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from model import train as trainer
from model.anomaly import ORIENTATION, reference_key, rows_for
from model.checkpoint import load_checkpoint
from model.export import load_run
from model.export import main as export_main
from model.glow import Glow

ROOT = Path(__file__).resolve().parents[2]


def synthetic_images(n: int = 192, seed: int = 0) -> np.ndarray:
    """Blurry bright squares on black, 8x8: a distribution a tiny flow can learn quickly."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 8, 8), dtype=np.uint8)
    for i in range(n):
        top, left = rng.integers(0, 4, size=2)
        images[i, top : top + 4, left : left + 4] = rng.integers(150, 256)
    return images


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "images.npz"
    np.savez(path, images=synthetic_images())
    return path


def run_args(data: Path, output: Path, *extra: str) -> list[str]:
    return ["--train", str(data), "--val-count", "32", "--steps", "1", "--hidden", "8", "--batch-size", "16",
            "--warmup-steps", "5", "--lr", "0.005", "--output", str(output), "--quiet", "--threads", "1", *extra]


def val_records(output: Path) -> list[dict]:
    records = [json.loads(line) for line in (output / trainer.LOG_FILE).read_text().splitlines()]
    return [r for r in records if "val_bpd" in r]


def test_a_few_steps_lower_the_validation_loss(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert trainer.main(run_args(data, out, "--max-steps", "0")) == 0
    assert trainer.main(run_args(data, out, "--max-steps", "60", "--resume")) == 0
    first, last = val_records(out)[0], val_records(out)[-1]
    assert (first["step"], last["step"]) == (0, 60)
    assert last["val_bpd"] < first["val_bpd"] - 0.5, (first, last)
    info = json.loads((out / "state.json").read_text())
    assert info["step"] == 60 and info["config"]["image_shape"] == [1, 8, 8]
    assert "--resume" not in info["command"] and len(info["resumed_with"]) == 1  # both recorded for the card
    assert "--max-steps 60 --resume" in info["resumed_with"][0]


@pytest.mark.parametrize(("flags", "message"), [
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--hidden", "0"], "--hidden must be at least 1, got 0"),
    (["--threads", "-2"], "--threads must be at least 1, got -2"),
    (["--warmup-steps", "-1"], "--warmup-steps must be at least 0, got -1"),
    (["--lr", "nan"], "--lr must be a finite number above 0, got nan"),
    (["--epochs", "-1"], "--epochs must be a finite number above 0, got -1.0"),
    (["--grad-clip", "nan"], "--grad-clip must be a finite number >= 0 (0: off), got nan"),
    (["--ema-decay", "2"], "--ema-decay must be in [0, 1), got 2.0"),
    (["--min-lr-ratio", "nan"], "--min-lr-ratio must be in [0, 1], got nan"),
    (["--n-bits", "9"], "--n-bits must be in 1..8, got 9"),
    (["--schedule", "bogus"], "--schedule must be one of constant, cosine, got 'bogus'"),
])  # fmt: skip
def test_bad_flags_are_one_line_before_anything_is_read_or_written(
        tmp_path: Path, flags: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        trainer.main(run_args(tmp_path / "absent.npz", tmp_path / "run", *flags))
    assert exited.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_new_run_does_not_overwrite_a_run_or_a_file(data: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert trainer.main(run_args(data, out, "--max-steps", "0")) == 0
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    with pytest.raises(SystemExit, match="holds a run \\(state.safetensors\\): --resume continues it"):
        trainer.main(run_args(data, out, "--max-steps", "2"))
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    with pytest.raises(SystemExit) as exited:
        trainer.main(run_args(data, data, "--max-steps", "0"))  # --output the data file itself
    assert exited.value.code == 2 and "is a file; the run needs a folder" in capsys.readouterr().err


@pytest.mark.parametrize(("edit", "message"), [
    (lambda info: [], "unusable training state: not a JSON object"),
    (lambda info: {k: v for k, v in info.items() if k != "config"}, "'config' is missing or of the wrong type"),
    (lambda info: {**info, "settings": "fast"}, "'settings' is missing or of the wrong type"),
    (lambda info: {**info, "step": -5}, "unusable training state: step -5"),
    (lambda info: {**info, "step": 1e30}, "'step' is missing or of the wrong type"),
    (lambda info: {**info, "wall_time_s": float("nan")}, "wall time nan"),
    (lambda info: {**info, "settings": {**info["settings"], "speed": 2}}, "the state's config or settings are invalid"),
    (lambda info: {**info, "config": {**info["config"], "hidden_channels": 32}},
     "the weights do not match the state's config"),
])  # fmt: skip
def test_a_damaged_state_is_one_line_on_resume(data: Path, tmp_path: Path, edit: Any, message: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert trainer.main(run_args(data, out, "--max-steps", "0")) == 0
    state = out / "state.json"
    state.write_text(json.dumps(edit(json.loads(state.read_text()))))
    damaged = state.read_text()
    assert trainer.main(run_args(data, out, "--max-steps", "2", "--resume")) == 2
    assert message in capsys.readouterr().err
    assert state.read_text() == damaged  # refused, nothing written


def test_resume_continues_exactly(data: Path, tmp_path: Path) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert trainer.main(run_args(data, straight, "--max-steps", "16")) == 0
    assert trainer.main(run_args(data, split, "--max-steps", "7")) == 0
    assert json.loads((split / "state.json").read_text())["step"] == 7
    assert trainer.main(run_args(data, split, "--max-steps", "16", "--resume")) == 0
    for weights in ("model", "ema"):
        a, _ = load_run(straight, weights)
        b, _ = load_run(split, weights)
        for (name, left), right in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(left, right), f"{weights}.{name} differs after resume"


def test_stop_at_stops_without_changing_the_schedule(data: Path, tmp_path: Path) -> None:
    """--stop-at 9 then --resume is the straight 16-step cosine run; --max-steps 9 would reshape the cosine."""
    cosine = ("--schedule", "cosine", "--max-steps", "16")
    straight, stopped, shortened = tmp_path / "straight", tmp_path / "stopped", tmp_path / "shortened"
    assert trainer.main(run_args(data, straight, *cosine)) == 0
    assert trainer.main(run_args(data, stopped, *cosine, "--stop-at", "9")) == 0
    assert json.loads((stopped / "state.json").read_text())["step"] == 9
    assert trainer.main(run_args(data, stopped, "--resume")) == 0
    assert trainer.main(run_args(data, shortened, "--schedule", "cosine", "--max-steps", "9")) == 0
    assert trainer.main(run_args(data, shortened, *cosine, "--resume")) == 0
    weights = {name: load_run(path, "model")[0].state_dict() for name, path in
               (("straight", straight), ("stopped", stopped), ("shortened", shortened))}
    for name, value in weights["straight"].items():
        assert torch.equal(weights["stopped"][name], value), name
    assert not all(torch.equal(weights["shortened"][name], value) for name, value in weights["straight"].items())
    with pytest.raises(SystemExit, match="already at step 16"):
        trainer.main(run_args(data, straight, "--resume", "--stop-at", "9"))


def test_resume_without_a_state_is_refused(data: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no training state"):
        trainer.main(run_args(data, tmp_path / "empty", "--resume"))


def test_non_finite_losses_skip_steps_and_never_save(data: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Glow, "forward",
                        lambda self, x, noise=None, labels=None: torch.full((x.shape[0],), float("nan")))
    with pytest.raises(SystemExit, match="non-finite losses in a row"):
        trainer.main(run_args(data, tmp_path / "nan", "--max-steps", "50"))
    assert not (tmp_path / "nan" / trainer.STATE_FILE).exists()


def test_corrupt_training_data_gives_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    header = (2051).to_bytes(4, "big") + (10).to_bytes(4, "big") + (8).to_bytes(4, "big") * 2
    bad.write_bytes(gzip.compress(header + bytes(100)))
    assert trainer.main(run_args(bad, tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(bad) in err and "truncated" in err and "\n" not in err


def test_learning_rate_warms_up_then_decays() -> None:
    s = trainer.TrainSettings(lr=1e-3, warmup_steps=10, schedule="cosine", max_steps=110, min_lr_ratio=0.1)
    assert trainer.learning_rate(0, s) == pytest.approx(1e-4)
    assert trainer.learning_rate(9, s) == pytest.approx(1e-3)
    assert trainer.learning_rate(60, s) == pytest.approx(0.55e-3)
    assert trainer.learning_rate(110, s) == pytest.approx(1e-4)
    assert trainer.learning_rate(60, trainer.TrainSettings(lr=1e-3, warmup_steps=10)) == 1e-3
    late = trainer.TrainSettings(lr=1e-3, warmup_steps=10, schedule="cosine", max_steps=300, min_lr_ratio=0.1,
                                 decay_start=100)  # a resumed run annealing from step 100
    assert trainer.learning_rate(99, late) == 1e-3
    assert trainer.learning_rate(200, late) == pytest.approx(0.55e-3)
    assert trainer.learning_rate(300, late) == pytest.approx(1e-4)


def test_batches_of_ranks_partition_each_epoch() -> None:
    per_epoch = [trainer.batch_indices(64, 8, step, 0, rank, 2) for step in range(4) for rank in range(2)]
    assert sorted(torch.cat(per_epoch).tolist()) == list(range(64))
    assert torch.equal(trainer.batch_indices(64, 8, 1, 0, 0, 1), trainer.batch_indices(64, 8, 1, 0, 0, 1))
    assert not torch.equal(trainer.batch_indices(64, 8, 0, 0, 0, 1), trainer.batch_indices(64, 8, 8, 0, 0, 1))


def test_two_gloo_processes_train_with_ddp(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "model.train", *run_args(data, out, "--max-steps", "4", "--device", "cpu")],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    info = json.loads((out / "state.json").read_text())
    assert info["step"] == 4 and info["world_size"] == 2


def rank_pid(launcher: int, rank: int) -> int | None:
    """Pid of the torchrun worker with RANK=rank among the launcher's children (Linux /proc)."""
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    for pid in children:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    return None


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc to find a worker's pid")
def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "model.train", *run_args(data, out, "--max-steps", "100000", "--device", "cpu",
                                        "--checkpoint-minutes", "0.005")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "state.json").is_file():  # both ranks are past DDP set-up and stepping
            assert launcher.poll() is None and time.monotonic() < deadline, "training never started"
            time.sleep(0.1)
        worker = rank_pid(launcher.pid, 1)
        assert worker is not None
        os.kill(worker, signal.SIGTERM)  # rank 1 only: rank 0 must learn of it, not wait in an all-reduce
        stdout, stderr = launcher.communicate(timeout=120)
    finally:
        launcher.kill()
    assert launcher.returncode == 0, stderr[-2000:]
    assert "(signal on another rank)" in stdout
    info = json.loads((out / "state.json").read_text())
    assert 0 < info["step"] < 100000 and info["world_size"] == 2


def test_export_writes_a_verified_checkpoint_and_card(data: Path, tmp_path: Path) -> None:
    run, shipped = tmp_path / "run", tmp_path / "shipped"
    assert trainer.main(run_args(data, run, "--max-steps", "60")) == 0
    assert export_main(["--run", str(run), "--train", str(data), "--test", str(data), "--output", str(shipped)]) == 0
    checkpoint = load_checkpoint(shipped)
    metrics = checkpoint.meta["metrics"]
    assert checkpoint.meta["training"]["steps"] == 60
    assert {key.split(".")[1] for key in checkpoint.calibration if key.endswith(".z")} == {
        row.name for row in rows_for(True)} and ORIENTATION in rows_for(True)
    assert checkpoint.calibration[reference_key(rows_for(False))].shape == (16,)  # the second half of 32 images
    assert checkpoint.meta["dataset"]["val_count"] == 32
    assert metrics["test_bits_per_dim"] >= metrics["test_bits_per_dim_bin_centre"] - 0.5
    ema, _ = load_run(run)
    assert all(torch.equal(a, b) for a, b in zip(ema.state_dict().values(), checkpoint.model.state_dict().values()))
    for name in ("README.md", "samples.png", "training-curve.png"):
        assert (shipped / name).is_file(), name
    assert f"{metrics['test_bits_per_dim']:.4f}" in (shipped / "README.md").read_text()


def test_a_resumed_run_keeps_its_architecture_and_takes_the_optimisation_flags_given(tmp_path: Path) -> None:
    data = trainer.TrainData(torch.zeros(100, 1, 8, 8, dtype=torch.uint8), np.zeros((4, 1, 8, 8), np.uint8), {})
    previous = {"config": {"image_shape": [1, 8, 8], "levels": 1, "steps_per_level": 3, "hidden_channels": 8,
                           "n_bits": 8},
                "settings": {**vars(trainer.TrainSettings(lr=0.01, max_steps=40)), "seed": 5}}
    args = trainer.parse_args(["--output", str(tmp_path), "--levels", "3", "--lr", "0.002", "--epochs", "2"])
    config, settings = trainer.run_setup(args, previous, data, world=1)
    assert (config.levels, config.steps_per_level) == (1, 3)  # --levels 3 cannot change a running model
    assert (settings.lr, settings.seed) == (0.002, 5)
    assert settings.max_steps == 2 * (100 // 64)  # --epochs counts whole batches of the run's batch size
    fresh, _ = trainer.run_setup(args, None, data, world=1)
    assert (fresh.levels, fresh.steps_per_level) == (3, 16)
    with pytest.raises(SystemExit, match="images are"):
        trainer.run_setup(args, {**previous, "config": {**previous["config"], "image_shape": [1, 16, 16]}}, data, 1)


def test_provenance_keeps_the_first_command_and_lists_each_resume() -> None:
    first = trainer.provenance(["--output", "run"], None)
    assert first == {"command": "python -m model.train --output run", "resumed_with": []}
    again = trainer.provenance(["--output", "run", "--resume"], first)
    later = trainer.provenance(["--output", "run", "--resume", "--lr", "1e-4"], again)
    assert later["command"] == first["command"]
    assert later["resumed_with"] == ["python -m model.train --output run --resume",
                                     "python -m model.train --output run --resume --lr 1e-4"]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic squares, labelled by brightness (dim or bright): a class the top latent can tell."""
    images = synthetic_images()
    path = tmp_path_factory.mktemp("labelled") / "images.npz"
    np.savez(path, images=images, labels=(images.max(axis=(1, 2)) >= 203).astype(np.int64))
    return path


def test_a_conditional_run_from_a_checkpoint_starts_from_its_flow_and_holds_out_its_images(labelled: Path,
                                                                                   tmp_path: Path) -> None:
    run, shipped, tuned = tmp_path / "run", tmp_path / "shipped", tmp_path / "tuned"
    assert trainer.main(run_args(labelled, run, "--max-steps", "20")) == 0
    assert export_main(["--run", str(run), "--test", str(labelled), "--output", str(shipped)]) == 0
    start = load_checkpoint(shipped)
    args = run_args(labelled, tuned, "--init-from", str(shipped), "--conditional", "--label-names", "dim", "bright",
                    "--max-steps", "0")
    assert trainer.main(args) == 0
    info = json.loads((tuned / "state.json").read_text())
    assert info["config"]["labels"] == ["dim", "bright"]
    assert info["init_from"]["weights_sha256"] == start.meta["weights_sha256"]
    held_out = start.meta["dataset"]["data"]["split"]["validation_indices"]
    assert info["data"]["split"]["validation_indices"] == held_out  # the same images stay unseen
    begun, _ = load_run(tuned)  # step 0: the checkpoint's flow, its class Gaussians fitted in closed form
    flow = {k: v for k, v in begun.state_dict().items() if not k.startswith("class_prior.")}
    assert flow.keys() == start.model.state_dict().keys()
    assert all(torch.equal(v, start.model.state_dict()[k]) for k, v in flow.items())
    assert float(begun.class_prior.mean.abs().max()) > 0 and float(begun.class_prior.log_sigma.abs().max()) > 0
    assert 0.0 <= val_records(tuned)[0]["val_accuracy"] <= 1.0
    assert trainer.main([*args[:-1], "30", "--resume"]) == 0
    assert export_main(["--run", str(tuned), "--test", str(labelled), "--output", str(tmp_path / "out")]) == 0
    tuned_checkpoint = load_checkpoint(tmp_path / "out")
    metrics = tuned_checkpoint.meta["metrics"]
    assert tuned_checkpoint.model.config.labels == ("dim", "bright")
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    # p(x) >= pi_y p(x | y): the mixture's bits/dim exceed the conditional's by at most log2(1/pi)/D
    assert metrics["test_bits_per_dim"] <= metrics["test_bits_per_dim_given_label"] + math.log2(2) / 64 + 1e-6
    card = (tmp_path / "out" / "README.md").read_text()
    assert "classes.png" in card and f"{metrics['test_accuracy']:.4f}" in card and "started from" in card


def test_conditional_runs_need_labels_and_the_checkpoints_data(data: Path, labelled: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert trainer.main(run_args(data, tmp_path / "a", "--conditional", "--max-steps", "0")) == 2
    assert "--conditional needs labels" in capsys.readouterr().err
    assert trainer.main(run_args(data, tmp_path / "b", "--max-steps", "0")) == 0
    assert export_main(["--run", str(tmp_path / "b"), "--test", str(data), "--output", str(tmp_path / "ck")]) == 0
    refused = run_args(labelled, tmp_path / "c", "--init-from", str(tmp_path / "ck"), "--max-steps", "0")
    assert trainer.main(refused) == 2  # other data than the checkpoint's: its held-out split means nothing here
    assert "not the data" in capsys.readouterr().err
