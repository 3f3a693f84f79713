"""PNG/JPEG bytes and base64 text <-> uint8 pixel arrays (C, H, W), with the checks of the contract.

Decoding untrusted bytes only ever raises an :class:`ImageError` whose ``status_code``
is the contract's: 400 undecodable, 413 too large (Pillow's decompression-bomb guard,
kept as it is, the source-pixel budget of resizing, JPEG scans), 422 the wrong size (unless
resizing). An image of another mode is converted to the model's (L for one channel,
RGB for three; 16-bit grey scaled to 8 bits).

The cost of a request is bounded before any pixel is decoded: :func:`decode_images`
reads every image's header first (a few hundred bytes each) and refuses the request if
an image has the wrong size, is a JPEG of more than ``MAX_JPEG_SCANS`` scans, or, when
resizing, if its images hold more than ``max_source_pixels`` pixels in all. JPEGs are
then decoded at a reduced scale where that suffices (Pillow's ``draft``), and large
downscales start with a box reduction (``reducing_gap``).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import math
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

FORMATS = ("PNG", "JPEG")
MODES = {1: "L", 3: "RGB"}  # channels -> Pillow mode
MAX_RESIZE_PIXELS = 2048 * 2048  # largest image resize=true decodes (a bound on work per image)
MAX_JPEG_SCANS = 100  # progressive JPEGs use ~10; each scan re-reads the image's coefficients (~0.5 ms at 4 Mpx)
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})  # Pillow's modes of 16-bit grey PNGs
REDUCING_GAP = 3.0  # downscales by more than this start with a box reduction (Pillow: near-identical quality)
GRID_PADDING = 2  # pixels between the tiles of a sample grid


class ImageError(ValueError):
    """An image the service refuses; ``status_code`` is the HTTP status of the refusal."""

    status_code = 400


class UndecodableImage(ImageError):
    status_code = 400


class ImageTooLarge(ImageError):
    status_code = 413


class WrongImageSize(ImageError):
    status_code = 422


def mode_of(channels: int) -> str:
    """The Pillow mode of images with ``channels`` channels."""
    if channels not in MODES:
        raise ValueError(f"only 1- and 3-channel images are supported, not {channels}")
    return MODES[channels]


@contextlib.contextmanager
def untrusted_image() -> Iterator[None]:
    """Whatever Pillow raises on untrusted bytes, as ImageError: a decompression bomb is ImageTooLarge,
    anything else UndecodableImage; an ImageError raised inside passes unchanged."""
    try:
        yield
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image refused as a decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise UndecodableImage("not a PNG or JPEG image") from None
    except Exception as exc:  # whatever Pillow raises on untrusted bytes, the image is undecodable
        raise UndecodableImage(f"corrupt PNG or JPEG image ({type(exc).__name__}: {exc})") from None


def refuse_bombs(width: int, height: int) -> None:
    """ImageTooLarge past Pillow's decompression-bomb limit, where Pillow itself only warns."""
    if width * height > Image.MAX_IMAGE_PIXELS:
        raise ImageTooLarge(
            f"image of {width}x{height} pixels exceeds the decompression-bomb limit of {Image.MAX_IMAGE_PIXELS} pixels"
        )


def refuse_scan_bombs(data: bytes) -> None:
    """ImageTooLarge for a JPEG of more than :data:`MAX_JPEG_SCANS` scans, whose decoding costs a pass over
    the image per scan (a 62 KB JPEG of 2,800 tiny scans took 1.5 s of CPU). Each scan begins with an SOS
    marker (FF DA); entropy-coded data stuffs every FF byte with 00, so those two bytes never occur inside a scan.
    """
    if data[:2] == b"\xff\xd8":
        scans = data.count(b"\xff\xda")
        if scans > MAX_JPEG_SCANS:
            raise ImageTooLarge(f"JPEG of {scans} scans refused: at most {MAX_JPEG_SCANS} are decoded")


def eight_bit(image: Image.Image) -> Image.Image:
    """A 16-bit grey image (a 16-bit PNG) scaled to 8 bits, round(v / 257); Pillow's own ``convert("L")`` clips
    every value past 255 instead. Any other image unchanged."""
    if image.mode not in SIXTEEN_BIT_MODES:
        return image
    values = np.clip(np.asarray(image, dtype=np.float64), 0, 65535)
    return Image.fromarray(np.rint(values / 257).astype(np.uint8), mode="L")


def decode_image(data: bytes, shape: tuple[int, int, int], resize: bool = False) -> np.ndarray:
    """PNG or JPEG bytes -> uint8 pixels of ``shape`` (C, H, W), or ImageError."""
    channels, height, width = shape
    refuse_scan_bombs(data)
    with untrusted_image():
        with Image.open(io.BytesIO(data), formats=FORMATS) as image:
            size = image.size
            refuse_bombs(*size)
            if size != (width, height):
                if not resize:
                    raise WrongImageSize(
                        f"image is {size[0]}x{size[1]} pixels, the model takes {width}x{height}"
                        " (width x height); send that size or set resize=true"
                    )
                if size[0] * size[1] > MAX_RESIZE_PIXELS:
                    raise ImageTooLarge(
                        f"image of {size[0]}x{size[1]} pixels is too large to resize"
                        f" (at most {MAX_RESIZE_PIXELS} pixels)"
                    )
            if size != (width, height):
                image.draft(mode_of(channels), (width, height))  # JPEG: decode at 1/2..1/8 scale where it suffices
            converted = eight_bit(image).convert(mode_of(channels))
            if converted.size != (width, height):
                converted = converted.resize((width, height), Image.Resampling.LANCZOS, reducing_gap=REDUCING_GAP)
            pixels = np.asarray(converted, dtype=np.uint8)
    return pixels.reshape(height, width, channels).transpose(2, 0, 1).copy()  # (C, H, W)


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the image's header alone, or ImageError (undecodable, past Pillow's bomb limit, or a
    JPEG of too many scans)."""
    refuse_scan_bombs(data)
    with untrusted_image():
        with Image.open(io.BytesIO(data), formats=FORMATS) as image:
            width, height = image.size
    refuse_bombs(width, height)
    return width, height


def check_sizes(
    blobs: Sequence[bytes], shape: tuple[int, int, int], resize: bool, max_source_pixels: int
) -> None:
    """From the headers only: every image of the model's size, or (resizing) all of them within the pixel budget."""
    _, height, width = shape
    total = 0
    for index, data in enumerate(blobs):
        try:
            size = image_size(data)
        except ImageError as exc:
            raise type(exc)(f"images[{index}]: {exc}") from None
        if size != (width, height):
            if not resize:
                raise WrongImageSize(
                    f"images[{index}]: image is {size[0]}x{size[1]} pixels, the model takes {width}x{height}"
                    " (width x height); send that size or set resize=true"
                )
            total += size[0] * size[1]
    if total > max_source_pixels:
        raise ImageTooLarge(
            f"the images to resize hold {total} pixels in all; at most {max_source_pixels} per request"
            " (--max-source-pixels): send smaller images or fewer per request"
        )


def decode_images(
    blobs: Sequence[bytes],
    shape: tuple[int, int, int],
    resize: bool = False,
    max_source_pixels: int = MAX_RESIZE_PIXELS,
) -> list[np.ndarray]:
    """Every image of a request, or the ImageError of the first bad one, naming it (images[i]).

    All headers are checked (:func:`check_sizes`) before the first image is decoded.
    """
    check_sizes(blobs, shape, resize, max_source_pixels)
    arrays = []
    for index, data in enumerate(blobs):
        try:
            arrays.append(decode_image(data, shape, resize))
        except ImageError as exc:
            raise type(exc)(f"images[{index}]: {exc}") from None
    return arrays


def from_base64(text: str, index: int) -> bytes:
    """Standard base64 (padding required, no other characters) -> bytes, or UndecodableImage."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise UndecodableImage(f"images[{index}]: not valid base64") from None


def to_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 pixels (C, H, W), C in {1, 3} -> PNG bytes."""
    mode_of(pixels.shape[0])
    hwc = pixels.transpose(1, 2, 0)
    image = Image.fromarray(np.ascontiguousarray(hwc[:, :, 0] if pixels.shape[0] == 1 else hwc))  # L or RGB
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def grid(images: Sequence[np.ndarray], padding: int = GRID_PADDING) -> np.ndarray:
    """uint8 images (C, H, W) -> one (C, H', W') image tiling them row by row, ceil(sqrt(n)) per row."""
    channels, height, width = images[0].shape
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    out = np.zeros(
        (channels, rows * height + (rows + 1) * padding, columns * width + (columns + 1) * padding), dtype=np.uint8
    )
    for index, image in enumerate(images):
        top = padding + (index // columns) * (height + padding)
        left = padding + (index % columns) * (width + padding)
        out[:, top : top + height, left : left + width] = image
    return out
