"""bench/model_throughput.py: its flags, and one tiny run of its tables end to end (the timings are not checked)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.model_throughput import main, parse_args


def test_the_sweep_runs_one_to_the_bench_threads_unless_told() -> None:
    assert parse_args(["--threads", "3"]).sweep_threads == [1, 2, 3]
    assert parse_args(["--threads", "3", "--sweep-threads", "1"]).sweep_threads == [1]
    assert parse_args(["--sweep-threads"]).sweep_threads == []
    with pytest.raises(SystemExit):
        parse_args(["--sweep-threads", "0"])


def test_a_tiny_run_times_each_operation_against_its_conv_ceiling(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    assert main(["--weights", str(tmp_path / "none"), "--images", "", "--levels", "1", "--steps", "1", "--hidden", "4",
                 "--threads", "1", "--batches", "1", "2", "--operations", "log-likelihood", "decode",
                 "--min-time", "0", "--min-repeats", "1", "--conv-min-time", "0", "--no-peer", "--knobs", "none",
                 "--no-contention", "--sweep-threads", "--no-allocator", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "random weights (no checkpoint found)" in printed and "random pixels" in printed
    results = json.loads(out.read_text())
    assert set(results["flops_per_image"]["ours"]) == {"log-likelihood", "decode"}
    assert all(flops > 0 for flops in results["flops_per_image"]["ours"].values())
    assert set(results["ceiling"]) == {"1", "2"} and all(c["calls"] > 0 for c in results["ceiling"].values())
    rows = [(r["operation"], r["batch"]) for r in results["throughput"]]
    assert rows == [("log-likelihood", 1), ("log-likelihood", 2), ("decode", 1), ("decode", 2)]
    assert all(r["ours_images_per_s"] > 0 and "ratio" not in r for r in results["throughput"])
    assert not {"knobs", "contention", "thread_sweep", "allocator"} & set(results)
