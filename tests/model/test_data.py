"""Tests for model.data: all inputs are synthesised in tmp_path."""

from __future__ import annotations

import gzip
import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.data import (
    FASHION_MNIST_DIR,
    DataError,
    check_manifest,
    compact_record,
    data_record,
    fingerprint,
    load_dataset,
    load_images,
    manifest,
    reopen,
    split_indices,
    read_idx_images,
    read_image_folder,
    read_npz_images,
    sha256_file,
    split_validation,
)

FASHION_TEST = FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz"


def idx_bytes(images: np.ndarray, magic: int = 2051) -> bytes:
    """Encode a uint8 (N, H, W) array as an IDX image file."""
    n, h, w = images.shape
    return struct.pack(">iiii", magic, n, h, w) + images.astype(np.uint8).tobytes()


def sample_images(n: int = 3, h: int = 4, w: int = 5) -> np.ndarray:
    return (np.arange(n * h * w) % 256).astype(np.uint8).reshape(n, h, w)


@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip(tmp_path: Path, compress: bool) -> None:
    images = sample_images()
    data = idx_bytes(images)
    path = tmp_path / "images.bin"  # no .gz suffix: gzip must be sniffed
    path.write_bytes(gzip.compress(data) if compress else data)
    out = read_idx_images(path)
    assert out.dtype == np.uint8
    assert out.shape == (3, 4, 5)
    np.testing.assert_array_equal(out, images)


def test_idx_label_file_magic(tmp_path: Path) -> None:
    path = tmp_path / "labels.idx"
    path.write_bytes(idx_bytes(sample_images(), magic=2049))
    with pytest.raises(DataError) as info:
        read_idx_images(path)
    message = str(info.value)
    assert str(path) in message
    assert "magic 2049, expected 2051" in message
    assert "label" in message


def test_idx_truncated(tmp_path: Path) -> None:
    path = tmp_path / "short.idx"
    path.write_bytes(idx_bytes(sample_images())[:-7])
    with pytest.raises(DataError) as info:
        read_idx_images(path)
    assert str(info.value) == (
        f"{path}: truncated IDX file: header says 3 images of 4x5 (60 bytes) "
        "but only 53 bytes follow"
    )


def test_idx_trailing_bytes(tmp_path: Path) -> None:
    path = tmp_path / "long.idx"
    path.write_bytes(idx_bytes(sample_images()) + b"\0\0")
    with pytest.raises(DataError) as info:
        read_idx_images(path)
    message = str(info.value)
    assert message.startswith(f"{path}: trailing bytes")
    assert "(60 bytes) but 62 bytes follow" in message


def test_idx_header_too_short(tmp_path: Path) -> None:
    path = tmp_path / "tiny.idx"
    path.write_bytes(struct.pack(">ii", 2051, 1))
    with pytest.raises(DataError) as info:
        read_idx_images(path)
    assert str(path) in str(info.value)
    assert "8 bytes" in str(info.value)


def test_idx_corrupt_gzip(tmp_path: Path) -> None:
    path = tmp_path / "broken.gz"
    packed = gzip.compress(idx_bytes(sample_images()))
    path.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(DataError) as info:
        read_idx_images(path)
    assert str(info.value).startswith(f"{path}: cannot read IDX file")


def write_png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path)


def test_image_folder_png_sorted(tmp_path: Path) -> None:
    first = np.full((6, 7), 10, dtype=np.uint8)
    second = np.full((6, 7), 200, dtype=np.uint8)
    write_png(tmp_path / "b.png", second)
    write_png(tmp_path / "a.PNG", first)
    (tmp_path / "notes.txt").write_text("ignored")
    out = read_image_folder(tmp_path)
    assert out.shape == (2, 6, 7)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.stack([first, second]))


def test_image_folder_jpeg_shape(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((8, 9, 3), dtype=np.uint8)).save(tmp_path / "x.jpg")
    Image.fromarray(np.zeros((8, 9, 3), dtype=np.uint8)).save(tmp_path / "y.JPEG")
    assert read_image_folder(tmp_path).shape == (2, 8, 9)
    assert read_image_folder(tmp_path, channels=3).shape == (2, 8, 9, 3)


def test_image_folder_rgb_converted_to_gray(tmp_path: Path) -> None:
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[..., 0] = 255  # pure red
    Image.fromarray(rgb).save(tmp_path / "red.png")
    out = read_image_folder(tmp_path)
    expected = np.asarray(Image.fromarray(rgb).convert("L"))
    assert out.shape == (1, 2, 3)
    np.testing.assert_array_equal(out[0], expected)
    assert int(out[0, 0, 0]) == 76  # ITU-R 601-2 luma of pure red


def test_image_folder_size_mismatch(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", np.zeros((28, 28), dtype=np.uint8))
    write_png(tmp_path / "b.png", np.zeros((32, 32), dtype=np.uint8))
    with pytest.raises(DataError) as info:
        read_image_folder(tmp_path)
    assert str(info.value).startswith(f"{tmp_path / 'b.png'}: image is 32x32, expected 28x28 like the others")
    assert "--image-size H W" in str(info.value)


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_image_folder_unreadable_file(tmp_path: Path, kind: str) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (20, 20), dtype=np.uint8)
    write_png(tmp_path / "a.png", noise)
    png = (tmp_path / "a.png").read_bytes()
    broken = b"not a png at all" if kind == "garbage" else png[: len(png) // 2]
    (tmp_path / "x.png").write_bytes(broken)
    with pytest.raises(DataError) as info:
        read_image_folder(tmp_path)
    assert str(info.value).startswith(f"{tmp_path / 'x.png'}: cannot read image: ")


def test_image_folder_empty(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(DataError) as info:
        read_image_folder(tmp_path)
    assert str(tmp_path) in str(info.value)
    assert "no .png" in str(info.value)


def test_npz_ok_and_integer_cast(tmp_path: Path) -> None:
    images = sample_images().astype(np.int64)
    path = tmp_path / "data.npz"
    np.savez(path, images=images)
    out = read_npz_images(path)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, images)


def test_npz_missing_key(tmp_path: Path) -> None:
    path = tmp_path / "data.npz"
    np.savez(path, pixels=sample_images())
    with pytest.raises(DataError) as info:
        read_npz_images(path)
    assert str(info.value) == f"{path}: no 'images' array in .npz file (found: pixels)"


def test_npz_out_of_range(tmp_path: Path) -> None:
    path = tmp_path / "data.npz"
    np.savez(path, images=np.array([[[0, 256]]], dtype=np.int16))
    with pytest.raises(DataError) as info:
        read_npz_images(path)
    assert str(info.value) == f"{path}: 'images' values span 0..256, expected 0..255"


def test_npz_float_and_bad_ndim(tmp_path: Path) -> None:
    floats = tmp_path / "floats.npz"
    np.savez(floats, images=np.zeros((1, 2, 2), dtype=np.float32))
    with pytest.raises(DataError, match="dtype float32, expected uint8"):
        read_npz_images(floats)
    flat = tmp_path / "flat.npz"
    np.savez(flat, images=np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(DataError, match=r"shape \(4, 4\)"):
        read_npz_images(flat)


def test_npz_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "broken.npz"
    np.savez(path, images=sample_images())
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(DataError) as info:
        read_npz_images(path)
    assert str(info.value).startswith(f"{path}: ")


def test_a_file_that_is_not_a_zip_is_not_an_npz_not_a_pickle(tmp_path: Path) -> None:
    path = tmp_path / "notes.npz"
    path.write_text("just some text\n")
    with pytest.raises(DataError, match="notes.npz: not a .npz archive \\(not a zip file\\)$"):
        read_npz_images(path)


def test_load_images_dispatch(tmp_path: Path) -> None:
    images = sample_images()
    idx = tmp_path / "images-idx3-ubyte"
    idx.write_bytes(idx_bytes(images))
    np.testing.assert_array_equal(load_images(idx), images[:, None])

    rgb = np.arange(2 * 4 * 5 * 3, dtype=np.uint8).reshape(2, 4, 5, 3)
    npz = tmp_path / "rgb.npz"
    np.savez(npz, images=rgb)
    out = load_images(npz, channels=3)
    assert out.shape == (2, 3, 4, 5)
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, rgb.transpose(0, 3, 1, 2))
    with pytest.raises(DataError, match="3 channels, expected 1"):
        load_images(npz, channels=1)

    folder = tmp_path / "folder"
    folder.mkdir()
    write_png(folder / "a.png", np.zeros((4, 5), dtype=np.uint8))
    assert load_images(folder).shape == (1, 1, 4, 5)
    assert load_images(folder, channels=3).shape == (1, 3, 4, 5)


def test_load_images_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.npz"
    with pytest.raises(DataError) as info:
        load_images(missing)
    assert str(missing) in str(info.value)


def test_split_validation() -> None:
    images = np.arange(10)
    train, val = split_validation(images, 3)
    np.testing.assert_array_equal(train, np.arange(7))
    np.testing.assert_array_equal(val, np.array([7, 8, 9]))
    train, val = split_validation(images, 0)
    assert len(train) == 10
    assert val.shape == (0,)
    with pytest.raises(ValueError, match="val_count 10 leaves no training images out of 10"):
        split_validation(images, 10)


def test_sha256_and_fingerprint(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 5000  # larger than one read chunk
    path = tmp_path / "blob.bin"
    path.write_bytes(payload)
    expected = hashlib.sha256(payload).hexdigest()
    assert sha256_file(path) == expected
    assert fingerprint([path]) == {"blob.bin": expected}


@pytest.mark.skipif(
    not FASHION_TEST.is_file(),
    reason=f"{FASHION_TEST} not installed (Debian package dataset-fashion-mnist)",
)
def test_real_fashion_mnist_test_set() -> None:
    images = read_idx_images(FASHION_TEST)
    assert images.shape == (10000, 28, 28)
    assert images.dtype == np.uint8
    assert images.max() > 0


# ----------------------------------------------------------- own images: folders, channels, sizes, split, manifest
def test_folders_are_read_recursively_with_webp_and_class_labels(tmp_path: Path) -> None:
    (tmp_path / "cats" / "deep").mkdir(parents=True)
    (tmp_path / "dogs").mkdir()
    write_png(tmp_path / "dogs" / "a.png", np.full((4, 6), 1, dtype=np.uint8))
    Image.fromarray(np.full((4, 6), 2, dtype=np.uint8)).save(tmp_path / "cats" / "deep" / "b.webp", lossless=True)
    write_png(tmp_path / "cats" / "c.png", np.full((4, 6), 3, dtype=np.uint8))
    dataset = load_dataset(tmp_path)
    assert dataset.names == ["cats/c.png", "cats/deep/b.webp", "dogs/a.png"]
    assert dataset.images.shape == (3, 1, 4, 6) and dataset.channels_inferred
    assert dataset.images[:, 0, 0, 0].tolist() == [3, 2, 1]
    assert dataset.labels.tolist() == [0, 0, 1]


def test_channels_are_inferred_from_colour_and_converted_on_request(tmp_path: Path) -> None:
    grey, colour = tmp_path / "grey", tmp_path / "colour"
    grey.mkdir(), colour.mkdir()
    write_png(grey / "a.png", np.full((4, 4), 9, dtype=np.uint8))
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    Image.fromarray(rgb).save(colour / "red.png")
    write_png(colour / "grey.png", np.full((4, 4), 9, dtype=np.uint8))  # one colour image makes the set RGB
    assert load_dataset(grey).images.shape[1] == 1
    assert load_dataset(colour).images.shape[1] == 3
    assert load_dataset(grey, channels=3).images[0, :, 0, 0].tolist() == [9, 9, 9]
    assert load_dataset(colour, channels=1).images[1, 0, 0, 0] == 76  # red.png (after grey.png): Pillow's luma
    npz = tmp_path / "rgb.npz"
    np.savez(npz, images=rgb[None])
    assert load_dataset(npz, channels=1).images[0, 0, 0, 0] == 76  # arrays convert as folders do


@pytest.mark.parametrize(("fit", "expected"), [("scale-crop", (8, 8)), ("resize", (8, 8))])
def test_mixed_sizes_need_a_size_and_a_fit_rule(tmp_path: Path, fit: str, expected: tuple[int, int]) -> None:
    write_png(tmp_path / "wide.png", np.tile(np.arange(32, dtype=np.uint8), (16, 1)))
    write_png(tmp_path / "square.png", np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(DataError, match="--image-size H W"):
        load_dataset(tmp_path)
    dataset = load_dataset(tmp_path, image_size=(8, 8), fit=fit)
    assert dataset.images.shape[2:] == expected
    wide = dataset.images[dataset.names.index("wide.png"), 0]
    span = int(wide[0].max()) - int(wide[0].min())
    # scale-crop keeps the middle half of the 0..31 ramp; resize squeezes the whole ramp
    assert (span < 20) if fit == "scale-crop" else (span > 25)


def test_the_validation_split_is_seeded_and_stratified() -> None:
    labels = np.array([0] * 90 + [1] * 10)  # sorted by class, as a folder of class subfolders is
    train, val = split_indices(100, 20, seed=3, labels=labels)
    assert len(val) == 20 and set(train) | set(val) == set(range(100)) and not set(train) & set(val)
    assert np.bincount(labels[val]).tolist() == [18, 2]  # each class its share
    again, other = split_indices(100, 20, seed=3, labels=labels), split_indices(100, 20, seed=4, labels=labels)
    assert again[1].tolist() == val.tolist() and other[1].tolist() != val.tolist()
    _, plain = split_indices(100, 20, seed=3)
    assert len(plain) == 20 and plain.max() > 20  # drawn from everywhere, not the last 20
    with pytest.raises(DataError, match="needs 1..99"):
        split_indices(100, 100, seed=0)


def test_the_manifest_catches_changed_missing_and_extra_files(tmp_path: Path) -> None:
    for name in ("a.png", "b.png"):
        write_png(tmp_path / name, np.zeros((4, 4), dtype=np.uint8))
    recorded = manifest(tmp_path)
    check_manifest(tmp_path, recorded)
    write_png(tmp_path / "a.png", np.ones((4, 4), dtype=np.uint8))
    write_png(tmp_path / "c.png", np.ones((4, 4), dtype=np.uint8))
    (tmp_path / "b.png").unlink()
    with pytest.raises(DataError) as info:
        check_manifest(tmp_path, recorded)
    assert "missing: b.png; not in the run: c.png; changed: a.png" in str(info.value)


def test_a_recorded_split_reopens_to_the_same_images_and_refuses_other_data(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for k in range(10):
        write_png(tmp_path / f"{k}.png", rng.integers(0, 256, (4, 4), dtype=np.uint8))
    dataset = load_dataset(tmp_path)
    train, val = split_indices(10, 3, seed=1)
    record = data_record(tmp_path, dataset, None, "scale-crop", 1, val)
    for stored in (record, compact_record(record)):
        again, train_again, val_again = reopen(json.loads(json.dumps(stored)))
        np.testing.assert_array_equal(again.images[val_again], dataset.images[val])
        np.testing.assert_array_equal(train_again, train)
    write_png(tmp_path / "0.png", np.zeros((4, 4), dtype=np.uint8))
    for stored in (record, compact_record(record)):
        with pytest.raises(DataError, match="is not the data"):
            reopen(stored)
