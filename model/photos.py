"""Natural-image patches: an RGB data set cut from the photographs scikit-image and scikit-learn ship.

``python -m model.photos --output data/photos`` writes three ``.npz`` files of uint8
``(N, 32, 32, 3)`` patches (the ``images`` layout :func:`model.data.read_npz_images` reads):

- ``train.npz``: patches from the left three quarters of each training photograph;
- ``test.npz``: patches from the right quarter of the same photographs (no pixel shared
  with any training patch): test bits/dim on the same scenes, unseen regions;
- ``unseen.npz``: patches from a photograph that gives no training patch (scikit-learn's
  ``flower.jpg``): how the model does on a scene it has never seen.

Each patch is taken from the photograph scaled by 1, 1/2 or 1/4 (Lanczos; chosen
uniformly), at a uniformly drawn position, so the set holds textures at three scales.
Everything is drawn from one seeded generator: the same command writes the same bytes.
Needs ``scikit-image`` and ``scikit-learn`` (the ``photos`` extra).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

TRAIN_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                "retina", "china")
"""scikit-image's colour photographs that ship in its wheel, and scikit-learn's ``china.jpg``."""
UNSEEN_PHOTO = "flower"
SCALES = (1.0, 0.5, 0.25)
TEST_FRACTION = 0.25
"""The right quarter of every training photograph gives the test patches, the rest the training ones."""


def photograph(name: str) -> np.ndarray:
    """One shipped photograph as uint8 ``(H, W, 3)``."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image
        return load_sample_image(f"{name}.jpg")
    import skimage.data
    return getattr(skimage.data, name)()[..., :3]


def _scaled(photo: np.ndarray, scale: float) -> np.ndarray:
    if scale == 1.0:
        return photo
    height, width = photo.shape[:2]
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(photo).resize(size, Image.LANCZOS))


def patches(photo: np.ndarray, columns: tuple[float, float], count: int, size: int,
            rng: np.random.Generator) -> np.ndarray:
    """``count`` patches of ``size`` x ``size`` lying wholly in the given fraction of the photo's columns."""
    pyramid = [_scaled(photo, scale) for scale in SCALES]
    out = np.empty((count, size, size, 3), dtype=np.uint8)
    for k, level in enumerate(rng.integers(0, len(SCALES), count)):
        image = pyramid[level]
        height, width = image.shape[:2]
        left, right = round(columns[0] * width), round(columns[1] * width)
        if right - left < size or height < size:
            image, height, width = pyramid[0], photo.shape[0], photo.shape[1]
            left, right = round(columns[0] * width), round(columns[1] * width)
        y = rng.integers(0, height - size + 1)
        x = rng.integers(left, right - size + 1)
        out[k] = image[y:y + size, x:x + size]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.photos", description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True, type=Path, help="folder for train.npz, test.npz and unseen.npz")
    p.add_argument("--train-per-photo", type=int, default=2500)
    p.add_argument("--test-per-photo", type=int, default=250)
    p.add_argument("--unseen", type=int, default=2000)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    split = 1.0 - TEST_FRACTION
    train, test = [], []
    try:
        for name in TRAIN_PHOTOS:
            photo = photograph(name)
            train.append(patches(photo, (0.0, split), args.train_per_photo, args.size, rng))
            test.append(patches(photo, (split, 1.0), args.test_per_photo, args.size, rng))
        unseen = patches(photograph(UNSEEN_PHOTO), (0.0, 1.0), args.unseen, args.size, rng)
    except ModuleNotFoundError as exc:
        print(f"python -m model.photos: needs {exc.name}, which is not installed: pip install 'glow-service[photos]'",
              file=sys.stderr)
        return 1
    args.output.mkdir(parents=True, exist_ok=True)
    for name, images in (("train", np.concatenate(train)), ("test", np.concatenate(test)), ("unseen", unseen)):
        np.savez(args.output / f"{name}.npz", images=images)
        print(f"{args.output / name}.npz: {len(images)} patches {images.shape[1:]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
