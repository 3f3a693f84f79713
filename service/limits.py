"""What one request may cost: body caps per endpoint sized from the model, and cheap checks of JSON bodies.

Body caps (413 beyond), unless ``--max-body-bytes`` sets one cap for every endpoint:
- ``/log-likelihood`` and ``/encode``: ``max_images_per_request`` images of the model's
  size as base64 PNGs, each allowed ``2 * C*H*W + 4 KiB`` bytes (an uncompressed PNG
  is ``C*H*W`` plus a byte per row and ~100 bytes of chunks; JPEGs carry headers), plus
  ``BODY_SLACK`` for the JSON or multipart framing, and never less than one image of
  ``max_image_bytes``;
- ``/decode``: ``max_images_per_request`` latents of ``latent_dim`` JSON numbers of at most
  ``NUMBER_CHARS`` characters each (Python's longest float repr and a separator), plus
  ``BODY_SLACK``;
- any other path: ``BODY_SLACK``.

JSON bodies are only parsed once their commas (a C-speed byte count) bound the values the
parser would build to what a request within the limits needs, plus ``SMALL_JSON_VALUES``:
a body of a million tiny values is refused with 413 before it costs anything. Nesting is
bounded by the parser itself (pydantic-core refuses depth past its recursion limit: 400).
"""

from __future__ import annotations

from dataclasses import dataclass

from service.settings import Settings

KIB = 1024
BODY_SLACK = 64 * KIB  # JSON/multipart framing, and the cap of bodies of other paths
NUMBER_CHARS = 26  # len("-1.2345678901234567e-308") and ", "
PNG_ALLOWANCE_FACTOR, PNG_ALLOWANCE_BYTES = 2, 4 * KIB  # bytes of one image of the model's size: 2 * C*H*W + 4 KiB
IMAGE_BYTES_FLOOR = 64 * KIB  # least default cap of one image's bytes (room for resize=true of larger images)
SMALL_JSON_VALUES = 4096  # values any JSON body may hold beyond what its request needs (parsed in about a ms)
IMAGE_PATHS = ("/log-likelihood", "/encode")
DECODE_PATHS = ("/decode",)


def base64_length(size: int) -> int:
    return 4 * ((size + 2) // 3)


@dataclass(frozen=True)
class RequestLimits:
    """The caps of one model's requests (see the module docstring)."""

    images_body: int  # bytes of a /log-likelihood or /encode body
    decode_body: int  # bytes of a /decode body
    other_body: int  # bytes of any other body
    image_bytes: int  # bytes of one image file
    max_images: int  # images (or latents) per request
    latent_dim: int

    @classmethod
    def of(cls, settings: Settings, image_shape: tuple[int, ...], latent_dim: int) -> RequestLimits:
        pixels = 1
        for extent in image_shape:
            pixels *= extent
        count = settings.max_images_per_request
        image_bytes = settings.max_image_bytes or max(IMAGE_BYTES_FLOOR, 4 * pixels)
        one_png = PNG_ALLOWANCE_FACTOR * pixels + PNG_ALLOWANCE_BYTES
        images_body = max(count * base64_length(one_png), base64_length(image_bytes)) + BODY_SLACK
        decode_body = count * latent_dim * NUMBER_CHARS + BODY_SLACK
        if settings.max_body_bytes:
            images_body = decode_body = settings.max_body_bytes
        return cls(images_body, decode_body, BODY_SLACK, image_bytes, count, latent_dim)

    def body_cap(self, path: str) -> int:
        """The body cap of a request path (also under a ``/models/{name}`` prefix)."""
        if path.endswith(IMAGE_PATHS):
            return self.images_body
        if path.endswith(DECODE_PATHS):
            return self.decode_body
        return self.other_body

    @property
    def largest_body(self) -> int:
        return max(self.images_body, self.decode_body, self.other_body)

    def json_value_bound(self, what: str) -> int:
        """Most commas (so, values less one per array or object) a JSON body of ``what`` may hold."""
        if what == "latents":
            return self.max_images * (self.latent_dim + 1) + SMALL_JSON_VALUES
        return SMALL_JSON_VALUES

    def too_many_json_values(self, body: bytes, what: str) -> str | None:
        """Why a JSON body holds more values than a request within the limits could, or None.

        A valid ``{"latents": [[...], ...]}`` has ``latent_dim - 1`` commas per latent and one
        between latents; a valid ``{"images": [...], "resize": ...}`` one per image and one more.
        Both are allowed ``SMALL_JSON_VALUES`` more, so that small malformed bodies still get
        their 422 from validation. Counting costs about a millisecond per megabyte and builds
        nothing; past the bound the parser would build objects nothing could use.
        """
        commas, bound = body.count(b","), self.json_value_bound(what)
        if commas <= bound:
            return None
        return (f"the body holds more than {bound} JSON values; a request of at most {self.max_images} {what}"
                " holds fewer")


def base64_decoded_length(text: str) -> int:
    """Bytes a base64 string of this length decodes to, at most (checked before decoding it)."""
    return len(text) * 3 // 4
