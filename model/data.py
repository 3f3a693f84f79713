"""Readers for uint8 image data sets (IDX, image folders, .npz), the validation split and the data manifest.

Every reader returns a ``numpy.uint8`` array and raises :class:`DataError`
naming the offending file for any problem with its input.  :func:`load_images`
dispatches on the path and always returns channels-first ``(N, C, H, W)``;
:func:`load_dataset` adds what training needs: labels (class subfolders, an IDX label
file beside the images, an .npz ``labels`` array), names, channel conversion and a size
policy.

- Channels: 1 or 3. By default inferred (3 if any image has colour, else 1); otherwise
  converted: grey -> RGB by repetition, RGB -> grey by ITU-R 601-2 luma (Pillow's "L").
- Sizes: all images must share one size, unless a target size is given with a fit rule:
  ``scale-crop`` scales the image (Lanczos) until it covers the target, keeping its
  aspect ratio, then crops the centre; ``resize`` scales each side to the target
  (Lanczos, aspect ratio not kept; what the service's ``resize=true`` does).
- Validation split (:func:`split_indices`): ``val_count`` images drawn with a seed,
  stratified by label when labels exist (each class gives its share, largest remainders
  first); the indices are recorded with the run.
- Manifest (:func:`manifest`): every input file (relative path) -> sha256, recorded at
  training and checked (:func:`check_manifest`) before export or calibration reuse the data.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib.npyio import NpzFile
from PIL import Image

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Location used by the Debian package ``dataset-fashion-mnist``."""

IDX_IMAGE_MAGIC = 2051
IDX_LABEL_MAGIC = 2049
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp"})
FITS = ("scale-crop", "resize")
CHANNEL_MODES = {1: "L", 3: "RGB"}
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


def image_files(folder: str | Path) -> list[Path]:
    """Every PNG, JPEG and WebP file under ``folder`` (recursively), sorted by relative path."""
    folder = Path(folder)
    try:
        files = [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    except OSError as exc:
        raise DataError(f"{folder}: cannot list folder: {exc}") from exc
    if not files:
        raise DataError(f"{folder}: no .png, .jpg, .jpeg or .webp images in folder or its subfolders")
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def fit_image(image: Image.Image, size: tuple[int, int], fit: str) -> Image.Image:
    """``image`` brought to ``size`` (height, width) by the rule ``fit`` (see the module docstring)."""
    height, width = size
    if image.size == (width, height):
        return image
    if fit == "resize":
        return image.resize((width, height), Image.Resampling.LANCZOS)
    if fit != "scale-crop":
        raise ValueError(f"fit must be one of {', '.join(FITS)}, got {fit!r}")
    scale = max(width / image.width, height / image.height)
    scaled = (max(width, math.ceil(image.width * scale)), max(height, math.ceil(image.height * scale)))
    image = image.resize(scaled, Image.Resampling.LANCZOS)
    left, top = (scaled[0] - width) // 2, (scaled[1] - height) // 2
    return image.crop((left, top, left + width, top + height))


def _read_one_image(path: Path, mode: str, size: tuple[int, int] | None, fit: str) -> np.ndarray:
    """Decode one image file with Pillow, converted to ``mode`` and fitted to ``size`` (height, width)."""
    try:
        with Image.open(path) as image:
            converted = image.convert(mode)
            return np.asarray(converted if size is None else fit_image(converted, size, fit), dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot read image: {exc}") from exc


def _is_grey(image: np.ndarray) -> bool:
    return bool((image[..., 0] == image[..., 1]).all() and (image[..., 0] == image[..., 2]).all())


def read_image_folder(
    path: str | Path, channels: int | None = 1, size: tuple[int, int] | None = None, fit: str = "scale-crop"
) -> np.ndarray:
    """Read every PNG/JPEG/WebP under a folder (recursively), sorted by relative path.

    Returns uint8 ``(N, H, W)`` for grey images or ``(N, H, W, 3)`` for RGB. ``channels``
    1 or 3 converts every image; ``None`` infers it (RGB if any image has colour). All
    images must share one size unless ``size`` (height, width) is given with a ``fit`` rule.
    """
    path = Path(path)
    if channels is not None and channels not in CHANNEL_MODES:
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    images: list[np.ndarray] = []
    files = image_files(path)
    for file in files:
        image = _read_one_image(file, CHANNEL_MODES[channels or 3], size, fit)
        if images and image.shape[:2] != images[0].shape[:2]:
            height, width = image.shape[:2]
            ref_height, ref_width = images[0].shape[:2]
            raise DataError(
                f"{file}: image is {width}x{height}, expected "
                f"{ref_width}x{ref_height} like the others ({files[0]}); "
                "give --image-size H W to bring every image to one size"
            )
        images.append(image)
    stacked = np.stack(images)
    if channels is None and all(_is_grey(image) for image in images):
        return np.ascontiguousarray(stacked[..., 0])
    return stacked


def read_npz_images(path: str | Path) -> np.ndarray:
    """Read the ``images`` array of a ``.npz`` file as uint8.

    The array must have shape ``(N, H, W)`` or ``(N, H, W, C)`` and be uint8,
    or of an integer dtype with all values in 0..255.
    """
    path = Path(path)
    try:
        if not zipfile.is_zipfile(path):  # np.load would take it for a pickle and say so
            raise DataError(f"{path}: not a .npz archive (not a zip file)")
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
    are converted to it on decoding; without it a folder's channels are inferred).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        images = read_image_folder(path, channels=channels)
    elif path.suffix.lower() == ".npz":
        images = read_npz_images(path)
    else:
        images = read_idx_images(path)
    images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
    if channels is not None and images.shape[1] != channels:
        raise DataError(f"{path}: images have {images.shape[1]} channels, expected {channels}")
    return np.ascontiguousarray(images)


def convert_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """uint8 ``(N, C, H, W)`` with C in {1, 3} -> ``channels`` channels (repetition, or Pillow's ITU-R 601-2 luma)."""
    if images.shape[1] == channels:
        return images
    if images.shape[1] == 1 and channels == 3:
        return np.ascontiguousarray(np.repeat(images, 3, axis=1))
    if images.shape[1] == 3 and channels == 1:
        r, g, b = (images[:, i].astype(np.uint32) for i in range(3))
        return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)[:, None]
    raise DataError(f"cannot convert {images.shape[1]}-channel images to {channels} channels (1 or 3 only)")


@dataclass
class Dataset:
    """Images ready for a model, with where each came from and its label (when the data has labels)."""

    images: np.ndarray  # (N, C, H, W) uint8
    names: list[str]  # per image: its path relative to a folder, or "#index" in a file
    labels: np.ndarray | None  # (N,) class indices
    channels_inferred: bool  # the channel count came from the data, not from the caller
    label_names: list[str] | None = None  # per class index, where the data names its classes (subfolders)


def _labels_of_files(folder: Path, files: list[Path]) -> tuple[np.ndarray | None, list[str] | None]:
    """(class labels, class names) from the first subfolder of each file, when every file lies in one;
    classes numbered in sorted order of their names."""
    parts = [file.relative_to(folder).parts for file in files]
    if any(len(p) < 2 for p in parts):
        return None, None
    classes = sorted({p[0] for p in parts})
    index = {name: number for number, name in enumerate(classes)}
    return np.array([index[p[0]] for p in parts]), classes


def _idx_labels(path: Path, count: int, partner: Path | None = None) -> np.ndarray | None:
    """The labels of an IDX image file: ``partner``, else the IDX label file beside it
    (``...-images-idx3...`` -> ``...-labels-idx1...``) if any."""
    if partner is not None and not partner.is_file():
        raise DataError(f"{partner}: no such label file")
    partner = partner or path.with_name(path.name.replace("images", "labels").replace("idx3", "idx1"))
    if partner == path or not partner.is_file():
        return None
    raw = partner.read_bytes()
    raw = gzip.decompress(raw) if raw[:2] == _GZIP_MAGIC else raw
    if len(raw) != 8 + count or int(np.frombuffer(raw, ">i4", count=1)[0]) != IDX_LABEL_MAGIC:
        raise DataError(f"{partner}: not an IDX label file of {count} labels for {path}")
    return np.frombuffer(raw, np.uint8, offset=8).astype(np.int64)


def _npz_labels(path: Path, count: int) -> np.ndarray | None:
    with np.load(path, allow_pickle=False) as loaded:
        if "labels" not in loaded.files:
            return None
        labels = loaded["labels"]
    if labels.shape != (count,) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: 'labels' must be {count} integers, one per image, got {labels.dtype} {labels.shape}")
    return labels.astype(np.int64)


def _fit_array(images: np.ndarray, size: tuple[int, int], fit: str) -> np.ndarray:
    """(N, C, H, W) -> (N, C, *size) by ``fit``, image by image through Pillow."""
    if images.shape[2:] == size:
        return images
    modes = {1: "L", 3: "RGB"}
    out = [
        np.asarray(fit_image(Image.fromarray(image[0] if len(image) == 1 else image.transpose(1, 2, 0),
                                             modes[len(image)]), size, fit))
        for image in images
    ]
    stacked = np.stack(out)
    return stacked[:, None] if stacked.ndim == 3 else stacked.transpose(0, 3, 1, 2)


def load_dataset(
    path: str | Path, channels: int | None = None, image_size: tuple[int, int] | None = None, fit: str = "scale-crop",
    labels_path: str | Path | None = None,
) -> Dataset:
    """A folder, ``.npz`` or IDX file as a :class:`Dataset` (channels and sizes as in the module docstring).

    ``labels_path``: an IDX label file for an IDX image file whose labels do not lie beside it under the
    partner name (``...-images-idx3...`` -> ``...-labels-idx1...``)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if channels is not None and channels not in CHANNEL_MODES:
        raise DataError(f"channels must be 1 or 3, got {channels}")
    if fit not in FITS:
        raise DataError(f"the fit rule must be one of {', '.join(FITS)}, got {fit!r}")
    size = None if image_size is None else (int(image_size[0]), int(image_size[1]))
    if size is not None and min(size) < 1:
        raise DataError(f"--image-size must be two positive numbers (height width), got {image_size}")
    if path.is_dir():
        files = image_files(path)
        images = _folder_images(path, channels, size, fit)
        names = [file.relative_to(path).as_posix() for file in files]
        labels, label_names = _labels_of_files(path, files)
    else:
        images = load_images(path)
        if images.shape[1] not in CHANNEL_MODES:
            raise DataError(f"{path}: images have {images.shape[1]} channels; 1 or 3 are supported")
        images = convert_channels(images, channels or images.shape[1])
        images = images if size is None else _fit_array(images, size, fit)
        names = [f"#{index}" for index in range(len(images))]
        label_names = None
        labels = (_npz_labels(path, len(images)) if path.suffix.lower() == ".npz"
                  else _idx_labels(path, len(images), None if labels_path is None else Path(labels_path)))
    return Dataset(np.ascontiguousarray(images), names, labels, channels_inferred=channels is None,
                   label_names=label_names)


def _folder_images(
    path: Path, channels: int | None, size: tuple[int, int] | None, fit: str
) -> np.ndarray:
    images = read_image_folder(path, channels=channels, size=size, fit=fit)
    return images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)


def split_indices(
    count: int, val_count: int, seed: int, labels: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices, each sorted: ``val_count`` of ``count`` drawn with ``seed``, stratified by label."""
    if not 0 < val_count < count:
        raise DataError(f"a validation split of {val_count} needs 1..{count - 1} of the {count} images")
    rng = np.random.default_rng(seed)
    if labels is None:
        val = rng.choice(count, size=val_count, replace=False)
    else:
        classes, sizes = np.unique(labels, return_counts=True)
        shares = sizes * val_count / count
        takes = np.floor(shares).astype(int)
        for index in np.argsort(-(shares - takes), kind="stable")[: val_count - int(takes.sum())]:
            takes[index] += 1  # largest remainders first
        val = np.concatenate([
            rng.choice(np.flatnonzero(labels == label), size=take, replace=False)
            for label, take in zip(classes, takes)
        ])
    val = np.sort(val)
    return np.setdiff1d(np.arange(count), val), val


def manifest(path: str | Path) -> dict[str, str]:
    """Every input file of a data set -> its sha256: a folder's image files by relative path, or the one file."""
    path = Path(path)
    if path.is_dir():
        return {file.relative_to(path).as_posix(): sha256_file(file) for file in image_files(path)}
    return {path.name: sha256_file(path)}


def check_manifest(path: str | Path, recorded: dict[str, str]) -> None:
    """DataError unless ``path`` holds exactly the files of ``recorded`` with the same contents."""
    current = manifest(path)
    missing = sorted(set(recorded) - set(current))
    extra = sorted(set(current) - set(recorded))
    changed = sorted(name for name in set(recorded) & set(current) if recorded[name] != current[name])
    if missing or extra or changed:
        problems = [f"{what}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                    for what, names in (("missing", missing), ("not in the run", extra), ("changed", changed)) if names]
        raise DataError(f"{path} is not the data the run was trained on ({'; '.join(problems)})")


def data_record(
    path: str | Path, dataset: Dataset, image_size: tuple[int, int] | None, fit: str, seed: int, val: np.ndarray,
    labels_path: str | Path | None = None,
) -> dict[str, object]:
    """What a run stores about its data: where, how it was read, the manifest and the validation indices."""
    return {
        "source": str(path),
        **({} if labels_path is None else {"labels": str(labels_path)}),
        "channels": int(dataset.images.shape[1]),
        "image_size": None if image_size is None else [int(v) for v in image_size],
        "fit": fit,
        "manifest": manifest(path),
        "split": {"seed": seed, "stratified": dataset.labels is not None, "validation_indices": val.tolist()},
    }


def manifest_sha256(files: dict[str, str]) -> str:
    """One digest of a whole manifest (what a checkpoint stores instead of the file list)."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def compact_record(record: dict) -> dict:
    """A data record for a checkpoint's sidecar: the manifest replaced by its digest and file count."""
    files = record["manifest"]
    return {k: v for k, v in record.items() if k != "manifest"} | {
        "manifest_sha256": manifest_sha256(files), "files": len(files)}


def reopen(record: dict, path: str | Path | None = None) -> tuple[Dataset, np.ndarray, np.ndarray]:
    """The data a run or checkpoint recorded, checked against its manifest: (dataset, train, validation).

    ``path`` defaults to where the data was at training time.
    """
    path = Path(path or record["source"])
    if "manifest" in record:
        check_manifest(path, record["manifest"])
    elif manifest_sha256(manifest(path)) != record["manifest_sha256"]:
        raise DataError(f"{path} is not the data the checkpoint was trained on ({record['files']} files recorded;"
                        " their sha256s differ)")
    dataset = load_dataset(path, record["channels"], record["image_size"], record["fit"], record.get("labels"))
    val = np.asarray(record["split"]["validation_indices"], dtype=np.int64)
    return dataset, np.setdiff1d(np.arange(len(dataset.images)), val), val


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
