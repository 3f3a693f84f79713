"""Readers for uint8 image data sets (IDX, image folders, .npz).

Every reader returns a ``numpy.uint8`` array and raises :class:`DataError`
naming the offending file for any problem with its input.  :func:`load_images`
dispatches on the path and always returns channels-first ``(N, C, H, W)``.
"""

from __future__ import annotations

import gzip
import hashlib
import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from numpy.lib.npyio import NpzFile
from PIL import Image

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Location used by the Debian package ``dataset-fashion-mnist``."""

IDX_IMAGE_MAGIC = 2051
IDX_LABEL_MAGIC = 2049
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
_GZIP_MAGIC = b"\x1f\x8b"
_IDX_HEADER_BYTES = 16
_CHUNK_BYTES = 1 << 20


class DataError(ValueError):
    """An input file is missing, unreadable or malformed, or holds too few images."""


def read_idx_images(path: str | Path) -> np.ndarray:
    """Read an IDX image file (raw or gzip-compressed) as uint8 ``(N, H, W)``."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == _GZIP_MAGIC:
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read IDX file: {exc}") from exc
    if len(raw) < _IDX_HEADER_BYTES:
        raise DataError(
            f"{path}: not an IDX image file: {len(raw)} bytes is shorter than "
            f"the {_IDX_HEADER_BYTES}-byte header"
        )
    magic, count, height, width = np.frombuffer(raw, dtype=">i4", count=4).tolist()
    if magic != IDX_IMAGE_MAGIC:
        hint = " (this is an IDX label file)" if magic == IDX_LABEL_MAGIC else ""
        raise DataError(
            f"{path}: not an IDX image file (magic {magic}, "
            f"expected {IDX_IMAGE_MAGIC}){hint}"
        )
    if min(count, height, width) < 0:
        raise DataError(
            f"{path}: invalid IDX header: negative size {count}x{height}x{width}"
        )
    expected = count * height * width
    actual = len(raw) - _IDX_HEADER_BYTES
    if actual != expected:
        problem = "truncated IDX file" if actual < expected else "trailing bytes in IDX file"
        raise DataError(
            f"{path}: {problem}: header says {count} images of {height}x{width} "
            f"({expected} bytes) but {'only ' if actual < expected else ''}"
            f"{actual} bytes follow"
        )
    pixels = np.frombuffer(raw, dtype=np.uint8, offset=_IDX_HEADER_BYTES)
    return pixels.reshape(count, height, width).copy()


def _read_one_image(path: Path, mode: str) -> np.ndarray:
    """Decode one image file with Pillow, converted to ``mode``."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert(mode), dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot read image: {exc}") from exc


def read_image_folder(path: str | Path, channels: int = 1) -> np.ndarray:
    """Read every PNG/JPEG directly in a folder, sorted by file name.

    Returns uint8 ``(N, H, W)`` for ``channels=1`` (grayscale) or
    ``(N, H, W, 3)`` for ``channels=3`` (RGB). All images must share one size.
    """
    path = Path(path)
    modes = {1: "L", 3: "RGB"}
    if channels not in modes:
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    try:
        files = sorted(
            (p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
            key=lambda p: p.name,
        )
    except OSError as exc:
        raise DataError(f"{path}: cannot list folder: {exc}") from exc
    if not files:
        raise DataError(f"{path}: no .png, .jpg or .jpeg images in folder")
    images: list[np.ndarray] = []
    for file in files:
        image = _read_one_image(file, modes[channels])
        if images and image.shape[:2] != images[0].shape[:2]:
            height, width = image.shape[:2]
            ref_height, ref_width = images[0].shape[:2]
            raise DataError(
                f"{file}: image is {width}x{height}, expected "
                f"{ref_width}x{ref_height} like the others"
            )
        images.append(image)
    return np.stack(images)


def read_npz_images(path: str | Path) -> np.ndarray:
    """Read the ``images`` array of a ``.npz`` file as uint8.

    The array must have shape ``(N, H, W)`` or ``(N, H, W, C)`` and be uint8,
    or of an integer dtype with all values in 0..255.
    """
    path = Path(path)
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, NpzFile):
            raise DataError(f"{path}: not a .npz archive")
        with loaded:
            if "images" not in loaded.files:
                found = ", ".join(loaded.files) or "nothing"
                raise DataError(f"{path}: no 'images' array in .npz file (found: {found})")
            images = loaded["images"]
    except DataError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read .npz file: {exc}") from exc
    if images.ndim not in (3, 4):
        raise DataError(
            f"{path}: 'images' has shape {images.shape}, expected (N, H, W) or (N, H, W, C)"
        )
    if images.dtype == np.uint8:
        return images
    if not np.issubdtype(images.dtype, np.integer):
        raise DataError(f"{path}: 'images' has dtype {images.dtype}, expected uint8")
    if images.size and (images.min() < 0 or images.max() > 255):
        raise DataError(
            f"{path}: 'images' values span {images.min()}..{images.max()}, expected 0..255"
        )
    return images.astype(np.uint8)


def load_images(path: str | Path, channels: int | None = None) -> np.ndarray:
    """Load images as uint8 ``(N, C, H, W)`` from a folder, ``.npz`` or IDX file.

    If ``channels`` is given the data must have that many channels (folders
    are converted to it on decoding).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        images = read_image_folder(path, channels=1 if channels is None else channels)
    elif path.suffix.lower() == ".npz":
        images = read_npz_images(path)
    else:
        images = read_idx_images(path)
    images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
    if channels is not None and images.shape[1] != channels:
        raise DataError(f"{path}: images have {images.shape[1]} channels, expected {channels}")
    return np.ascontiguousarray(images)


def split_validation(images: np.ndarray, val_count: int) -> tuple[np.ndarray, np.ndarray]:
    """Split off the last ``val_count`` images: returns ``(train, val)``.

    The split is fixed (no shuffling), so it is reproducible across runs.
    """
    if val_count < 0:
        raise ValueError(f"val_count must be >= 0, got {val_count}")
    if val_count >= len(images):
        raise DataError(
            f"val_count {val_count} leaves no training images out of {len(images)}"
        )
    cut = len(images) - val_count
    return images[:cut], images[cut:]


def sha256_file(path: str | Path) -> str:
    """Return the hex SHA-256 digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(paths: Iterable[str | Path]) -> dict[str, str]:
    """Map each file's base name to its SHA-256 hex digest."""
    return {Path(p).name: sha256_file(p) for p in paths}
