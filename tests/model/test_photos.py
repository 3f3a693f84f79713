"""The RGB patch data set: patches lie wholly in their columns, at every scale, and the draw is seeded."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from model.photos import SCALES, main, patches


def column_ramp(height: int = 120, width: int = 200) -> np.ndarray:
    """A photo whose red channel is its column index: a patch's red values say where it came from."""
    photo = np.zeros((height, width, 3), dtype=np.uint8)
    photo[..., 0] = np.arange(width, dtype=np.uint8)[None, :]
    photo[..., 1] = 128
    return photo


def test_patches_stay_in_their_columns_at_every_scale() -> None:
    photo = column_ramp()
    rng = np.random.default_rng(0)
    train = patches(photo, (0.0, 0.75), 300, 16, rng)
    test = patches(photo, (0.75, 1.0), 300, 16, rng)
    assert train.shape == test.shape == (300, 16, 16, 3) and train.dtype == np.uint8
    # scaled copies keep the ramp in original units, to within Lanczos' ringing
    assert train[..., 0].max() <= 0.75 * 200 + 2
    assert test[..., 0].min() >= 0.75 * 200 - 2
    assert np.all(np.abs(train[..., 1].astype(int) - 128) <= 1)
    # every scale is drawn: a ramp scaled by s rises by 1/s per column
    steps = {round(float(np.median(np.diff(p[0, :, 0].astype(float))))) for p in train}
    assert steps == {round(1 / s) for s in SCALES}


def test_a_region_too_narrow_at_a_scale_falls_back_to_full_size() -> None:
    narrow = patches(column_ramp(height=40, width=60), (0.75, 1.0), 50, 12, np.random.default_rng(1))
    assert narrow[..., 0].min() >= 45 - 1


def test_the_draw_is_seeded() -> None:
    photo = column_ramp()
    first = patches(photo, (0.0, 1.0), 20, 16, np.random.default_rng(3))
    assert np.array_equal(first, patches(photo, (0.0, 1.0), 20, 16, np.random.default_rng(3)))
    assert not np.array_equal(first, patches(photo, (0.0, 1.0), 20, 16, np.random.default_rng(4)))


def test_without_the_photos_extra_the_command_says_what_to_install(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "skimage", None)  # import skimage now raises ModuleNotFoundError
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    assert main(["--output", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'glow-service[photos]'" in err and "skimage" in err
    assert not list(tmp_path.iterdir())
