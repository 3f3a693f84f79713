"""The default architecture of an image size: the table in model/architecture.py's docstring, and its refusals."""

from __future__ import annotations

import re

import pytest

from model.architecture import Architecture, default_architecture
from model.glow import Glow, GlowConfig


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((28, 28), Architecture(2, 16, 64)),
        ((32, 32), Architecture(3, 16, 64)),
        ((48, 48), Architecture(3, 16, 128)),
        ((64, 64), Architecture(4, 16, 128)),
        ((30, 30), Architecture(1, 16, 64)),
        ((64, 32), Architecture(3, 16, 128)),
    ],
)
def test_the_table(size: tuple[int, int], expected: Architecture) -> None:
    assert default_architecture(*size) == expected
    config = GlowConfig((3, *size), expected.levels, 1, 4)  # the levels fit: the model builds
    assert Glow(config).latent_dim == 3 * size[0] * size[1]  # native pixels: nothing padded


def test_every_value_can_be_overridden() -> None:
    assert default_architecture(32, 32, levels=1, steps=4, hidden=16) == Architecture(1, 4, 16)


@pytest.mark.parametrize(("size", "levels", "message"), [
    ((27, 27), None, "27x27 images allow no level (a side is odd)"),
    ((28, 28), 3, "28x28 images allow at most 2 levels, not 3"),
])  # fmt: skip
def test_sizes_no_level_fits_are_refused_with_the_way_out(size: tuple[int, int], levels: int | None,
                                                          message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as refused:
        default_architecture(*size, levels=levels)
    assert "--image-size H W" in str(refused.value)
