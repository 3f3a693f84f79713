"""Image files <-> pixel arrays: round trips, mode conversion, resizing, and every refusal."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from service_testing import SHAPE, random_pixels, to_png

from service import imaging
from service.imaging import ImageTooLarge, UndecodableImage, WrongImageSize


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), channels=st.sampled_from([1, 3]))
def test_png_round_trip_is_pixel_exact(seed: int, channels: int) -> None:
    (pixels,) = random_pixels(1, seed, (channels, 12, 8))
    assert np.array_equal(imaging.decode_image(imaging.encode_png(pixels), (channels, 12, 8)), pixels)


def test_rgb_is_converted_for_a_grayscale_model() -> None:
    (rgb,) = random_pixels(1, 1, (3, *SHAPE[1:]))
    expected = np.asarray(Image.fromarray(rgb.transpose(1, 2, 0)).convert("L"))[None]
    assert np.array_equal(imaging.decode_image(to_png(rgb), SHAPE), expected)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "1", "I;16"])
def test_other_modes_are_converted_to_the_model_mode(mode: str) -> None:
    (gray,) = random_pixels(1, 2)
    pixels = imaging.decode_image(to_png(gray, mode=mode), SHAPE)
    assert pixels.shape == SHAPE and pixels.dtype == np.uint8


@pytest.mark.parametrize("channels", [1, 3])
def test_16_bit_grey_is_scaled_to_8_bits_not_clipped(channels: int) -> None:
    (gray,) = random_pixels(1, 12)
    buffer = io.BytesIO()
    Image.fromarray(gray[0].astype(np.uint16) * 257).save(buffer, format="PNG")  # the same picture, 16 bits deep
    assert Image.open(io.BytesIO(buffer.getvalue())).mode == "I;16"
    pixels = imaging.decode_image(buffer.getvalue(), (channels, *SHAPE[1:]))
    assert all(np.array_equal(plane, gray[0]) for plane in pixels)


def test_jpegs_of_too_many_scans_are_refused_before_decoding() -> None:
    (gray,) = random_pixels(1, 13)
    buffer = io.BytesIO()
    Image.fromarray(gray[0]).save(buffer, format="JPEG", progressive=True)
    progressive = buffer.getvalue()
    assert imaging.decode_image(progressive, SHAPE).shape == SHAPE  # a usual progressive JPEG: ~10 scans
    first_scan = progressive.index(b"\xff\xda")
    end = progressive.index(b"\xff", first_scan + 2)  # the first scan runs up to the next marker:
    while progressive[end + 1] == 0 or 0xD0 <= progressive[end + 1] <= 0xD7:  # not a stuffed byte nor a restart
        end = progressive.index(b"\xff", end + 2)
    scan = progressive[first_scan:end]  # repeated, as a scan bomb repeats its scans
    bomb = progressive[:first_scan] + scan * imaging.MAX_JPEG_SCANS + progressive[first_scan:]
    scans = bomb.count(b"\xff\xda")
    assert scans > imaging.MAX_JPEG_SCANS
    for decode in (lambda: imaging.decode_image(bomb, SHAPE), lambda: imaging.image_size(bomb)):
        with pytest.raises(ImageTooLarge, match=f"JPEG of {scans} scans refused: at most {imaging.MAX_JPEG_SCANS}"):
            decode()


def test_grayscale_is_converted_for_an_rgb_model() -> None:
    (gray,) = random_pixels(1, 3)
    pixels = imaging.decode_image(to_png(gray), (3, *SHAPE[1:]))
    assert all(np.array_equal(pixels[c], gray[0]) for c in range(3))


def test_jpeg_is_accepted() -> None:
    (gray,) = random_pixels(1, 4)
    data = to_png(gray, format="JPEG")
    expected = np.asarray(Image.open(io.BytesIO(data)))[None]
    assert np.array_equal(imaging.decode_image(data, SHAPE), expected)


def test_the_wrong_size_is_refused_naming_the_expected_size() -> None:
    (small,) = random_pixels(1, 5, (1, 10, 14))
    with pytest.raises(WrongImageSize, match="14x10 pixels, the model takes 28x28") as refused:
        imaging.decode_image(to_png(small), SHAPE)
    assert refused.value.status_code == 422


def test_resize_brings_any_size_to_the_model_size() -> None:
    (small,) = random_pixels(1, 6, (3, 10, 14))
    expected = np.asarray(
        Image.fromarray(small.transpose(1, 2, 0)).convert("L").resize((28, 28), Image.Resampling.LANCZOS)
    )[None]
    assert np.array_equal(imaging.decode_image(to_png(small), SHAPE, resize=True), expected)


def test_resize_refuses_images_too_large_to_be_worth_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(imaging, "MAX_RESIZE_PIXELS", 100)
    (image,) = random_pixels(1, 7, (1, 20, 20))
    with pytest.raises(ImageTooLarge, match="too large to resize") as refused:
        imaging.decode_image(to_png(image), SHAPE, resize=True)
    assert refused.value.status_code == 413


@pytest.mark.parametrize("limit", [300, 500], ids=["bomb-error", "bomb-warning"])
def test_pillow_decompression_bomb_guard_gives_413(monkeypatch: pytest.MonkeyPatch, limit: int) -> None:
    """784 pixels: more than twice 300 (Pillow raises), between 500 and 1000 (Pillow only warns)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    (image,) = random_pixels(1, 8)
    with pytest.warns(Image.DecompressionBombWarning) if limit == 500 else contextlib.nullcontext():
        with pytest.raises(ImageTooLarge, match="decompression.bomb") as refused:
            imaging.decode_image(to_png(image), SHAPE)
    assert refused.value.status_code == 413


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not a PNG or JPEG"),
        (b"definitely not an image", "not a PNG or JPEG"),
        (to_png(random_pixels(1, 9)[0], format="GIF"), "not a PNG or JPEG"),
        (to_png(random_pixels(1, 9)[0], format="BMP"), "not a PNG or JPEG"),
        (to_png(random_pixels(1, 9)[0])[:60], "corrupt"),
    ],
    ids=["empty", "text", "gif", "bmp", "truncated"],
)
def test_undecodable_bytes_give_400(data: bytes, message: str) -> None:
    with pytest.raises(UndecodableImage, match=message) as refused:
        imaging.decode_image(data, SHAPE)
    assert refused.value.status_code == 400


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), data=st.data())
def test_damaged_files_only_ever_give_an_image_error(seed: int, data: st.DataObject) -> None:
    """Flipped bytes and truncations of a valid PNG or JPEG: an image of the right shape, or an ImageError."""
    (pixels,) = random_pixels(1, seed)
    blob = bytearray(to_png(pixels, format=data.draw(st.sampled_from(["PNG", "JPEG"]))))
    for _ in range(data.draw(st.integers(1, 8))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    blob = blob[: data.draw(st.integers(0, len(blob)))]
    try:
        decoded = imaging.decode_image(bytes(blob), SHAPE)
    except imaging.ImageError as exc:
        assert exc.status_code in (400, 413, 422)
    else:
        assert decoded.shape == SHAPE and decoded.dtype == np.uint8


def test_decode_images_names_the_bad_image() -> None:
    good = to_png(random_pixels(1, 10)[0])
    with pytest.raises(UndecodableImage, match=r"^images\[1\]: not a PNG or JPEG"):
        imaging.decode_images([good, b"junk", good], SHAPE)


def test_base64_round_trip_and_refusal() -> None:
    assert imaging.from_base64(imaging.to_base64(b"\x00\x01png"), 0) == b"\x00\x01png"
    for bad in ("not base64!", "abc", "YWJj\n==="):
        with pytest.raises(UndecodableImage, match=r"images\[3\]: not valid base64"):
            imaging.from_base64(bad, 3)


def test_grid_tiles_images_row_by_row() -> None:
    tiles = [np.full((1, 4, 3), value, dtype=np.uint8) for value in (10, 20, 30, 40, 50)]
    out = imaging.grid(tiles, padding=1)
    assert out.shape == (1, 2 * 4 + 3, 3 * 3 + 4)  # 3 columns, 2 rows
    assert out[0, 1, 1] == 10 and out[0, 1, 5] == 20 and out[0, 6, 1] == 40 and out[0, 6, 9] == 0
    assert out[0, 0].max() == 0  # padding


def test_only_one_and_three_channels_are_supported() -> None:
    with pytest.raises(ValueError, match="1- and 3-channel"):
        imaging.mode_of(2)
