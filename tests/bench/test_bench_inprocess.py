"""bench.inprocess: the served form timed in process, in its own interpreter, and the served/in-process ratios."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bench import inprocess
from bench.models import random_checkpoint

TINY = argparse.Namespace(levels=1, steps=1, hidden=4, seed=0, images="")


def test_a_fresh_interpreter_times_the_runner_with_and_without_decoding(tmp_path: Path) -> None:
    weights = random_checkpoint(tmp_path / "random", TINY)
    figures = inprocess.run(weights, tmp_path / "absent.idx", batch=4, seconds=0.05, threads=1)  # random pixels
    assert figures["batch"] == 4 and figures["threads"] == 1
    assert figures["model"] > 0 and figures["pipeline"] > 0


def test_ratios_are_each_servers_images_per_second_over_the_median_in_process_figures(
        capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{"images": 1, "concurrency": 64, "ours": {"requests_per_s": 90.0}, "old": {"requests_per_s": 45.0}},
            {"images": 1, "concurrency": 8, "ours": {"requests_per_s": 10.0}}]
    ceilings = [{"images": 1, "concurrency": 64, "batch": 64, "threads": 1, "model": m, "pipeline": p}
                for m, p in ((100.0, 50.0), (120.0, 60.0), (1000.0, 75.0))]
    inprocess.print_ratios(rows, ceilings, ["ours", "old"])
    out = capsys.readouterr().out
    assert "model 120.0, pipeline 60.0 img/s; ours 0.75x / 1.50x  old 0.38x / 0.75x" in out
    assert "c=8" not in out  # no in-process figures at that level
