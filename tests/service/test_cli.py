"""The glow command line; end to end on colour images: a folder of RGB PNGs -> glow train -> glow export ->
glow serve beside the shipped model -> scores over HTTP under /models/photos/... -> glow score of the folder,
in-process and against the server.

The images are 32x32 patches of the two photographs scikit-learn ships (``load_sample_images``),
in one subfolder per photograph (labels, so the validation split is stratified). The model is
tiny and trains 3 steps: this checks the plumbing, not the model.
"""

from __future__ import annotations

import base64
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from service_testing import REPO, ServerProcess, random_pixels

from model.anomaly import AnomalyScorer
from model.checkpoint import Checkpoint

from service.cli import COMMANDS, main

SIZE = 32


def glow(*args: str) -> subprocess.CompletedProcess[str]:
    """``glow ARGS`` (the console script's entry point), checked."""
    done = subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("serve", "train", "export", "calibrate", "evaluate", "score"):
        assert f"\n  {command} " in out
    assert set(COMMANDS) == {"serve", "train", "export", "calibrate", "evaluate", "score"}


def test_an_unknown_command_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fly"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown command 'fly'" in err


def test_a_missing_optional_dependency_names_its_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def without_sklearn(name: str) -> object:
        raise ModuleNotFoundError("No module named 'sklearn'", name="sklearn")

    monkeypatch.setattr("service.cli.import_module", without_sklearn)
    assert main(["evaluate"]) == 1
    err = capsys.readouterr().err
    assert err == "glow evaluate: needs sklearn, which is not installed: pip install 'glow-service[eval]'\n"


def test_score_writes_one_row_per_image_in_order_with_the_served_numbers(
    tmp_path: Path, tiny_checkpoint: Path, reference: Checkpoint, capsys: pytest.CaptureFixture[str]
) -> None:
    images = np.stack(random_pixels(3, 7))  # (3, 1, 28, 28)
    np.savez(tmp_path / "set.npz", images=images[:, 0])
    out = tmp_path / "scores.jsonl"
    assert main(["score", str(tmp_path / "set.npz"), "--weights", str(tiny_checkpoint), "--device", "cpu",
                 "--output", str(out), "--quiet", "--batch-size", "2"]) == 0  # fmt: skip
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    expected = AnomalyScorer(reference.model, reference.calibration).score(torch.from_numpy(images))
    assert [row["image"] for row in rows] == ["#0", "#1", "#2"]
    assert [row["log_likelihood"] for row in rows] == pytest.approx(expected.log_likelihood.tolist(), rel=1e-5)
    assert "3 images scored" in capsys.readouterr().err
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # as a plain open would make it, not a temporary file's 0600


def test_score_into_a_reader_that_stops_early_ends_quietly(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """``glow score ... | head -2``: exit 141 (as SIGPIPE), no traceback, the rows the reader took intact."""
    # 2,000 rows of CSV (~150 kB) outgrow the pipe's 64 kB buffer: the writer meets the closed end whatever the timing
    np.savez(tmp_path / "many.npz", images=np.stack(random_pixels(2000, 3))[:, 0])
    with subprocess.Popen([sys.executable, "-m", "service.cli", "score", str(tmp_path / "many.npz"), "--weights",
                           str(tiny_checkpoint), "--device", "cpu", "--quiet", "--batch-size", "500"], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as scoring:
        assert scoring.stdout is not None and scoring.stderr is not None
        head = [scoring.stdout.readline() for _ in range(2)]
        scoring.stdout.close()
        err = scoring.stderr.read()
        code = scoring.wait(timeout=300)
    assert head[0].startswith("image,log_likelihood") and head[1].startswith("#0,")
    assert code == 141 and "Traceback" not in err and "Broken pipe" not in err, err


def test_score_names_the_image_it_cannot_score(tmp_path: Path, tiny_checkpoint: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "sub").mkdir()
    Image.fromarray(np.zeros((20, 20), dtype=np.uint8)).save(tmp_path / "sub" / "small.png")
    assert main(["score", str(tmp_path), "--weights", str(tiny_checkpoint), "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "sub/small.png: image is 20x20 pixels, the model takes 28x28" in err and "pass --resize" in err


def test_a_refused_score_leaves_the_output_file_as_it_was(tmp_path: Path, tiny_checkpoint: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "keep.csv"
    out.write_text("PRECIOUS\n")
    np.savez(tmp_path / "two.npz", images=np.zeros((2, 28, 28, 2), dtype=np.uint8))  # 2 channels: no model takes them
    assert main(["score", str(tmp_path / "two.npz"), "--weights", str(tiny_checkpoint), "--device", "cpu",
                 "--output", str(out), "--quiet"]) == 2  # fmt: skip
    assert "only 1- and 3-channel images are supported, not 2" in capsys.readouterr().err
    assert out.read_text() == "PRECIOUS\n" and sorted(p.name for p in tmp_path.iterdir()) == ["keep.csv", "two.npz"]


@pytest.mark.parametrize(("flags", "message"), [
    (["--retries", "-1"], "--retries must be at least 0"),
    (["--output", "."], "is a folder; give a file"),
])  # fmt: skip
def test_bad_score_flags_are_one_line_and_exit_2(tmp_path: Path, flags: list[str], message: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["score", str(tmp_path), "--url", "http://127.0.0.1:9", *flags])
    assert exited.value.code == 2 and message in capsys.readouterr().err


def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "no" / "such" / "s.csv"
    assert main(["score", str(tmp_path / "absent.npz"), "--url", "http://127.0.0.1:9", "--output", str(out)]) == 2
    assert capsys.readouterr().err.startswith(f"glow score: --output {out}: ")


def test_python_m_service_score_runs_the_command() -> None:
    done = subprocess.run([sys.executable, "-m", "service.score", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0 and "usage: glow score" in done.stdout


def cut_patches(root: Path, offset: int, count: int) -> None:
    """``count`` 32x32 patches of each sample photograph into root/<photo>/NN.png."""
    from sklearn.datasets import load_sample_images

    for name, photo in zip(("china", "flower"), load_sample_images().images):
        (root / name).mkdir(parents=True)
        for k in range(count):
            y, x = 50 + offset + 40 * (k // 8), 100 + offset + 40 * (k % 8)
            Image.fromarray(photo[y : y + SIZE, x : x + SIZE]).save(root / name / f"{k:02d}.png")


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    cut_patches(root / "train", 0, 32)
    cut_patches(root / "test", 16, 4)
    return root


def test_colour_images_from_folder_to_scores_over_http(photos: Path) -> None:
    run, weights = photos / "run", photos / "weights"
    trained = glow("train", "--train", str(photos / "train"), "--output", str(run), "--max-steps", "3",
                   "--batch-size", "8", "--steps", "1", "--hidden", "8", "--warmup-steps", "1", "--val-count", "16",
                   "--dataset-name", "photos", "--device", "cpu", "--quiet")  # fmt: skip
    assert "64 images of 3x32x32 (3 channels, inferred from the data)" in trained.stderr
    assert "stratified by label" in trained.stderr
    assert "3 levels x 1 steps" in trained.stderr  # levels from the 32x32 size
    glow("export", "--run", str(run), "--test", str(photos / "test"), "--output", str(weights), "--name", "photos")
    sidecar = json.loads((weights / "glow.json").read_text())
    assert sidecar["dataset"]["data"]["files"] == 64 and len(sidecar["dataset"]["data"]["split"]["validation_indices"]) == 16

    local = photos / "local.csv"
    glow("score", str(photos / "test"), "--weights", str(weights), "--output", str(local), "--quiet")
    with local.open() as handle:
        in_process = list(csv.DictReader(handle))
    assert [row["image"] for row in in_process] == [f"{p}/{k:02d}.png" for p in ("china", "flower") for k in range(4)]

    server = ServerProcess(["--weights", "fashion=fashion-mnist", "--weights", f"photos={weights}", "--device", "cpu",
                            "--max-batch-size", "4"])  # fmt: skip
    try:
        server.wait_listening()
        listed = httpx.get(f"{server.url}/models").json()["models"]
        assert [(m["name"], m["image_shape"], m["default"]) for m in listed] == [
            ("fashion", [1, 28, 28], True), ("photos", [3, SIZE, SIZE], False)]
        pngs = [(photos / "test" / row["image"]).read_bytes() for row in in_process]
        body = {"images": [base64.b64encode(png).decode() for png in pngs]}
        response = httpx.post(f"{server.url}/models/photos/log-likelihood", json=body, timeout=60)
        assert response.status_code == 200, response.text
        over_http = response.json()["results"]
        for row, result in zip(in_process, over_http, strict=True):
            assert math.isfinite(result["log_likelihood"]) and 0 <= result["percentile"] <= 100
            assert float(row["log_likelihood"]) == pytest.approx(result["log_likelihood"], rel=1e-5)
            assert float(row["anomaly_score"]) == pytest.approx(result["anomaly_score"], rel=1e-4, abs=1e-4)
        remote = photos / "remote.jsonl"
        glow("score", str(photos / "test"), "--url", server.url, "--model", "photos", "--output", str(remote),
             "--quiet")  # fmt: skip
        rows = [json.loads(line) for line in remote.read_text().splitlines()]
        assert [row["image"] for row in rows] == [row["image"] for row in in_process]
        assert [row["log_likelihood"] for row in rows] == [result["log_likelihood"] for result in over_http]
        server.process.terminate()
        assert server.finish() == 0
    finally:
        server.kill()
