"""The image files of a plain multipart/form-data body, read with a few bytes operations.

:func:`image_parts` reads the common shape of an image request: every part a file part named
``images`` (a ``Content-Disposition: form-data; name="images"; filename="..."`` header), CRLF
line ends, no preamble, nothing after the closing delimiter, no ``charset`` on the body's
content type. For such a body it returns the parts' bytes in order, exactly what Starlette's
``MultiPartParser`` gives (tests/service/test_formdata.py holds the two against each other on
generated and mangled bodies). For any other body it returns None, and the caller parses it
with Starlette's parser, which gives every other body its usual answer and error message.
It never raises.

Starlette's parser builds an ``UploadFile`` over a ``SpooledTemporaryFile`` per part and feeds
python-multipart's byte-level state machine; reading plain bodies here took the event loop's CPU
per 64-image request from 12.0 to 5.5 ms in an A/B run (bench/README.md, "Serving overhead").
"""

from __future__ import annotations

import re

from python_multipart.multipart import parse_options_header

CRLF = b"\r\n"
FIELD = b"images"
TOKEN = re.compile(rb"[A-Za-z0-9-]+")  # a header name as clients write them


def image_parts(content_type: str, body: bytes, max_parts: int) -> list[bytes] | None:
    """The bytes of each ``images`` file part of ``body``, in order; None unless the body has the plain shape
    above and at most ``max_parts`` parts."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary or b"charset" in params:
        return None
    delimiter = b"--" + boundary
    if not body.startswith(delimiter + CRLF):
        return None
    segments = body[len(delimiter) :].split(CRLF + delimiter)
    if segments[-1] not in (b"--", b"--" + CRLF) or len(segments) - 1 > max_parts:
        return None
    blobs = []
    for segment in segments[:-1]:
        head, separator, data = segment.partition(CRLF + CRLF)
        if not separator or not head.startswith(CRLF):
            return None
        if not _is_image_file_part(head[len(CRLF) :]):
            return None
        blobs.append(data)
    return blobs


def closing_delimiter(content_type: str) -> bytes | None:
    """``--boundary--``, the line that ends a multipart body of ``content_type``; None without a boundary."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    return b"--" + boundary + b"--" if boundary else None


def _is_image_file_part(head: bytes) -> bool:
    """Whether a part's header block names a file part ``images`` (plain token header names, each once)."""
    disposition = None
    seen = set()
    for line in head.split(CRLF) if head else []:
        name, colon, value = line.partition(b":")
        if not colon or not TOKEN.fullmatch(name) or name.lower() in seen:
            return False
        seen.add(name.lower())
        if name.lower() == b"content-disposition":
            disposition = value.strip()
    if disposition is None:
        return False
    kind, options = parse_options_header(disposition)
    return kind == b"form-data" and options.get(b"name") == FIELD and b"filename" in options
