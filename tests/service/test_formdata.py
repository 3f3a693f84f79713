"""The plain-body multipart reader gives exactly Starlette's parts, or declines (None) and leaves the body to it."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from service.formdata import image_parts

BOUNDARY = "b0undary"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"
LIMIT = 8


def starlette_parts(content_type: str, body: bytes) -> list[bytes] | str:
    """What the route's Starlette path reads: the ``images`` files, or why it would refuse the body."""

    async def parse() -> list[bytes] | str:
        async def stream():  # type: ignore[no-untyped-def]
            yield body

        parser = MultiPartParser(Headers({"content-type": content_type}), stream(), max_files=LIMIT, max_fields=64)
        try:
            form = await parser.parse()
        except MultiPartException as exc:
            return f"refused: {exc.message}"
        try:
            parts = form.getlist("images")
            if sorted(set(form.keys())) != ["images"] or not all(isinstance(p, UploadFile) for p in parts):
                return f"other fields: {sorted(set(form.keys()))}"
            return [await part.read() for part in parts]  # type: ignore[union-attr]
        finally:
            await form.close()

    return asyncio.run(parse())


def part(name: str, filename: str | None, data: bytes, headers: str = "Content-Type: image/png\r\n") -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n{headers}\r\n".encode() + data + b"\r\n"


def body_of(parts: list[bytes], end: bytes = f"--{BOUNDARY}--\r\n".encode()) -> bytes:
    return b"".join(parts) + end


datas = st.binary(max_size=64) | st.sampled_from([b"", b"\r\n", b"--", f"\r\n--{BOUNDARY}".encode(), b"\x89PNG\r\n"])
parts = st.builds(
    part,
    name=st.sampled_from(["images", "images", "other", "Images"]),
    filename=st.sampled_from(["a.png", "", None, 'x"y']),
    data=datas,
    headers=st.sampled_from(["Content-Type: image/png\r\n", "", "X-Odd : 1\r\n", "content-type: a\r\ncontent-type: b\r\n"]),
)

image_file_parts = st.builds(part, name=st.just("images"), filename=st.sampled_from(["a.png", "", "x y.jpg"]), data=datas,
                             headers=st.sampled_from(["Content-Type: image/png\r\n", "", "X-Odd: 1\r\n"]))


@settings(max_examples=200, deadline=None)
@given(parts=st.lists(image_file_parts, min_size=1, max_size=LIMIT), end=st.sampled_from(["--\r\n", "--"]))
def test_image_bodies_are_read_as_starlette_reads_them(parts: list[bytes], end: str) -> None:
    body = body_of(parts, f"--{BOUNDARY}{end}".encode())
    expected = starlette_parts(CONTENT_TYPE, body)
    lean = image_parts(CONTENT_TYPE, body, LIMIT)
    if f"\r\n--{BOUNDARY}".encode() in b"".join(p.partition(b"\r\n\r\n")[2][:-2] for p in parts):
        assert lean is None or lean == expected  # data holding a delimiter: not a plain body of these parts
    else:
        assert lean == expected


@settings(max_examples=400, deadline=None)
@given(
    parts=st.lists(image_file_parts | parts, min_size=0, max_size=LIMIT + 2),
    end=st.sampled_from([f"--{BOUNDARY}--\r\n", f"--{BOUNDARY}--", f"--{BOUNDARY}--\r\nepilogue", f"--{BOUNDARY}", ""]),
    cut=st.none() | st.integers(min_value=0, max_value=2000),
    noise=st.none() | st.tuples(st.integers(min_value=0, max_value=2000), st.binary(min_size=1, max_size=4)),
    content_type=st.sampled_from([CONTENT_TYPE, CONTENT_TYPE + "; charset=latin-1", "multipart/form-data",
                                  f'multipart/form-data; boundary="{BOUNDARY}"']),
)
def test_what_it_reads_is_what_starlette_reads(
    parts: list[bytes], end: str, cut: int | None, noise: tuple[int, bytes] | None, content_type: str
) -> None:
    body = body_of(parts, end.encode())
    if cut is not None:
        body = body[:cut]
    if noise is not None:
        at, extra = noise
        body = body[:at] + extra + body[at:]
    lean = image_parts(content_type, body, LIMIT)
    if lean is not None:
        assert starlette_parts(content_type, body) == lean


def test_plain_bodies_are_read_without_starlette() -> None:
    blobs = [b"\x89PNG\r\n\x1a\n" + bytes(range(256)), b"", b"x--" + BOUNDARY.encode()]  # a delimiter needs its CRLF
    for end in (f"--{BOUNDARY}--\r\n", f"--{BOUNDARY}--"):
        body = body_of([part("images", f"{i}.png", blob) for i, blob in enumerate(blobs)], end.encode())
        assert image_parts(CONTENT_TYPE, body, LIMIT) == blobs == starlette_parts(CONTENT_TYPE, body)


def test_bodies_of_another_shape_are_left_to_starlette() -> None:
    image = part("images", "a.png", b"png")
    declined = {
        "a text field": body_of([image, part("note", None, b"hi")]),
        "images as text": body_of([part("images", None, b"png")]),
        "too many files": body_of([image] * (LIMIT + 1)),
        "no closing delimiter": body_of([image], b""),
        "an epilogue": body_of([image], f"--{BOUNDARY}--\r\nmore".encode()),
        "a preamble": b"preamble\r\n" + body_of([image]),
        "no parts": body_of([]),
        "LF line ends": body_of([image]).replace(b"\r\n", b"\n"),
    }
    for why, body in declined.items():
        assert image_parts(CONTENT_TYPE, body, LIMIT) is None, why
    assert image_parts("multipart/form-data", body_of([image]), LIMIT) is None  # no boundary: Starlette's 400
    assert image_parts(CONTENT_TYPE + "; charset=latin-1", body_of([image]), LIMIT) is None
