"""The thread sweep of bench/threads.py on a tiny random model (the timings are not checked)."""

from __future__ import annotations

import argparse

import torch

from bench.threads import run_thread_sweep
from model.glow import Glow, GlowConfig


def test_the_thread_sweep_times_every_variant_at_every_setting_and_restores_the_threads() -> None:
    torch.manual_seed(0)
    model = Glow(GlowConfig((1, 8, 8), levels=2, steps_per_level=2, hidden_channels=8)).eval()
    images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    model.initialize(images)
    args = argparse.Namespace(device="cpu", min_time=0.0, min_repeats=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # not a count the sweep ends on
    try:
        rows = run_thread_sweep(model, None, images, [1, 4], [1, 2], rounds=2, args=args, sync=None)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)
    assert [(r["threads"], r["batch"]) for r in rows] == [(1, 1), (1, 4), (2, 1), (2, 4)]
    for row in rows:
        assert set(row["images_per_s"]) == {"plain", "served (traced)"}
        assert all(len(rates) == 2 and all(rate > 0 for rate in rates) for rates in row["images_per_s"].values())
        assert "served_over_peer" not in row  # no peer given
