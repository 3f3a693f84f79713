"""Default Glow architecture for an image size: levels, steps per level and width.

Each level squeezes the image by 2 in height and width, so L levels need both sides
divisible by 2^L. The default takes as many levels as the sides allow while the top
level's grid stays at least 4x4, at most 4; nothing is ever padded, so bits/dim is
always over the native C*H*W pixels. A side that is odd allows no level: bring the images
to an even size with ``--image-size H W`` (see ``model.data`` for the fit rules).

| image (H x W) | levels | steps per level | width |
|---|---|---|---|
| 28 x 28 (MNIST-like) | 2 (top 7 x 7) | 16 | 64 |
| 32 x 32 | 3 (top 4 x 4) | 16 | 64 |
| 48 x 48 | 3 (top 6 x 6) | 16 | 128 |
| 64 x 64 | 4 (top 4 x 4) | 16 | 128 |
| 30 x 30 | 1 (top 15 x 15) | 16 | 64 |
| 27 x 27 | none: refused, use --image-size | | |

Width is 64 up to 32 pixels on the longer side, 128 above. Every value can be
overridden (``--levels``, ``--steps``, ``--hidden``).
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_LEVELS = 4
MIN_TOP_SIDE = 4  # smallest side of the top level's grid the default allows
STEPS_PER_LEVEL = 16
NARROW, WIDE = 64, 128
WIDE_ABOVE = 32  # pixels on the longer side above which couplings are WIDE


@dataclass(frozen=True)
class Architecture:
    levels: int
    steps_per_level: int
    hidden_channels: int


def max_levels(height: int, width: int) -> int:
    """How many times both sides halve exactly (the most levels a Glow can have on them)."""
    levels = 0
    while height % 2 == 0 and width % 2 == 0 and height > 1 and width > 1:
        height, width, levels = height // 2, width // 2, levels + 1
    return levels


def default_levels(height: int, width: int) -> int:
    """The most levels that divide both sides with a top grid of at least 4x4 (at most 4; 1 if only 1 divides)."""
    levels = 0
    while (
        levels < min(MAX_LEVELS, max_levels(height, width))
        and min(height, width) // 2 ** (levels + 1) >= MIN_TOP_SIDE
    ):
        levels += 1
    return max(levels, min(1, max_levels(height, width)))


def default_architecture(
    height: int, width: int, levels: int | None = None, steps: int | None = None, hidden: int | None = None
) -> Architecture:
    """The table's architecture for H x W, with any of its values overridden; ValueError if no level fits."""
    chosen = default_levels(height, width) if levels is None else levels
    allowed = max_levels(height, width)
    if not 1 <= chosen <= allowed:
        room = "no level (a side is odd)" if allowed == 0 else f"at most {allowed} levels, not {chosen}"
        raise ValueError(
            f"{height}x{width} images allow {room}: each level halves both sides; give --image-size H W"
            " with sides divisible by 2^levels (e.g. 32 32)"
        )
    width_default = WIDE if max(height, width) > WIDE_ABOVE else NARROW
    return Architecture(chosen, STEPS_PER_LEVEL if steps is None else steps, width_default if hidden is None else hidden)
