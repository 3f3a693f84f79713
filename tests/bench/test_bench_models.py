"""bench/models.py: the random-weight stand-ins and the check that guards the fast forms' rows."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.models import checked, checkpoint_exists, folded_model, load_images, random_checkpoint, random_glow
from model.checkpoint import load_checkpoint
from model.glow import GlowConfig

TINY = argparse.Namespace(levels=1, steps=1, hidden=4, seed=0, images="")


def test_random_pixels_stand_in_for_missing_images_and_are_seeded() -> None:
    images, source = load_images(TINY, (1, 28, 28), 5)
    again, _ = load_images(TINY, (1, 28, 28), 5)
    assert source == "random pixels" and images.shape == (5, 1, 28, 28) and images.dtype == torch.uint8
    assert torch.equal(images, again)


def test_a_random_checkpoint_loads_with_its_calibration(tmp_path: Path) -> None:
    assert not checkpoint_exists(tmp_path / "random")
    path = random_checkpoint(tmp_path / "random", TINY)
    assert checkpoint_exists(path)
    checkpoint = load_checkpoint(path, "cpu")
    assert checkpoint.model.config == GlowConfig(levels=1, steps_per_level=1, hidden_channels=4)
    assert checkpoint.calibration  # the served anomaly score needs it


def test_a_fast_form_is_timed_only_while_it_matches_the_model(capsys) -> None:  # type: ignore[no-untyped-def]
    images, _ = load_images(TINY, (1, 28, 28), 8)
    model = random_glow(GlowConfig(levels=1, steps_per_level=1, hidden_channels=4), images, seed=0)
    assert checked(lambda: folded_model(model), model, images, "folded") is not None
    other = random_glow(GlowConfig(levels=1, steps_per_level=1, hidden_channels=4), images, seed=1)
    assert checked(lambda: folded_model(other), model, images, "folded") is None  # different weights
    assert "deviates from the model" in capsys.readouterr().out
    assert checked(lambda: 1 / 0, model, images, "broken") is None
    assert "does not build" in capsys.readouterr().out
