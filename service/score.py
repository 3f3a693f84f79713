"""``glow score INPUT``: the anomaly score of every image of a folder, IDX or .npz file, as CSV or JSONL.

In-process (``--weights``, default the shipped Fashion-MNIST model) the images go through
the service's own decoding and runner, so the numbers are those ``POST /log-likelihood``
returns; with ``--url`` they are sent to a running server (``--model NAME`` for one of
its ``/models/{name}``), batch by batch, retrying a batch answered 503 (overloaded or
not ready) after 1, 2, 4, ... seconds. One row per image, in input order: ``image`` (the
file's path relative to the folder, or ``#index`` in a file), then the fields of a
``/log-likelihood`` result.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import httpx
from PIL import Image
from tqdm import tqdm

from model.checkpoint import CheckpointError
from model.data import DataError, image_files, load_images
from model.device import DeviceUnavailable
from service import imaging
from service.client import GlowAPIError, GlowClient
from service.models import model_specs
from service.settings import DEFAULT_WEIGHTS

FIELDS = ("image", "log_likelihood", "bits_per_dim", "anomaly_score", "percentile", "is_anomaly")
PASSTHROUGH = {".png", ".jpg", ".jpeg"}  # sent as they are; other formats are re-encoded as PNG


def images_of(path: Path) -> tuple[list[str], Iterator[bytes]]:
    """The names of the images under ``path`` and, lazily, each as PNG or JPEG bytes."""
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        files = image_files(path)
        return [file.relative_to(path).as_posix() for file in files], (_file_bytes(file) for file in files)
    images = load_images(path)
    return [f"#{index}" for index in range(len(images))], (imaging.encode_png(image) for image in images)


def _file_bytes(file: Path) -> bytes:
    if file.suffix.lower() in PASSTHROUGH:
        return file.read_bytes()
    try:
        with Image.open(file) as image:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            return buffer.getvalue()
    except (OSError, ValueError) as exc:
        raise DataError(f"{file}: cannot read image: {exc}") from exc


def batches(names: list[str], blobs: Iterator[bytes], size: int) -> Iterator[tuple[list[str], list[bytes]]]:
    for start in range(0, len(names), size):
        chunk = names[start : start + size]
        yield chunk, [next(blobs) for _ in chunk]


class InProcess:
    """Scores with a checkpoint loaded here, exactly as the service decodes and scores."""

    def __init__(self, weights: str, device: str, resize: bool) -> None:
        from service.runner import ModelRunner  # torch loads only for in-process scoring

        specs = model_specs([weights])
        if len(specs) != 1:
            raise DataError(f"--weights {weights}: holds {len(specs)} checkpoints; give one")
        self.runner = ModelRunner(specs[0].path, device)
        self.runner.load()
        self.resize = resize

    def score(self, names: list[str], blobs: list[bytes]) -> list[dict[str, Any]]:
        import torch

        try:
            images = imaging.decode_images(blobs, self.runner.image_shape, self.resize)
        except imaging.ImageError as exc:
            raise DataError(_name_the_image(str(exc), names)) from None
        with torch.inference_mode():
            scores = self.runner.score_batch(self.runner.scorable(images))
        return [vars(score) for score in scores]

    def close(self) -> None:
        self.runner.close()


class Remote:
    """Scores against a running server, retrying a batch answered 503."""

    def __init__(self, url: str, model: str | None, resize: bool, retries: int) -> None:
        self.client = GlowClient(url.rstrip("/") + (f"/models/{model}" if model else ""))
        self.resize, self.retries = resize, retries

    def score(self, names: list[str], blobs: list[bytes]) -> list[dict[str, Any]]:
        for attempt in range(self.retries + 1):
            try:
                return [result.model_dump() for result in self.client.score(blobs, resize=self.resize)]
            except GlowAPIError as exc:
                if exc.status_code != 503 or attempt == self.retries:
                    raise DataError(_name_the_image(f"the server answered {exc}", names)) from None
                time.sleep(min(2.0**attempt, 30.0))
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.client.close()


def _name_the_image(message: str, names: list[str]) -> str:
    """Replace ``images[i]`` in a service error with the image's name."""
    for index, name in enumerate(names):
        message = message.replace(f"images[{index}]", name)
    return message.replace("set resize=true", "pass --resize")


def write_rows(rows: Iterator[dict[str, Any]], output: IO[str], form: str) -> int:
    count = 0
    writer = csv.DictWriter(output, FIELDS, extrasaction="ignore") if form == "csv" else None
    if writer is not None:
        writer.writeheader()
    for row in rows:
        if writer is not None:
            writer.writerow(row)
        else:
            output.write(json.dumps({field: row[field] for field in FIELDS}) + "\n")
        count += 1
    return count


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="glow score", description=__doc__.split("\n\n")[0])
    p.add_argument("input", type=Path, help="a folder of PNG/JPEG/WebP (recursive), an IDX or an .npz file")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--weights", default=str(DEFAULT_WEIGHTS),
                       help="score in-process with this checkpoint (folder, .safetensors or a shipped name)")
    where.add_argument("--url", default=None, help="score against the server at this URL instead")
    p.add_argument("--model", default=None, help="with --url: the model's name (default: the server's default model)")
    p.add_argument("--output", type=Path, default=None, help="file to write (default: standard output)")
    p.add_argument("--format", choices=("csv", "jsonl"), default=None,
                   help="default: from the output's suffix (.jsonl: JSONL), else CSV")
    p.add_argument("--batch-size", type=int, default=32, help="images per model call or request")
    p.add_argument("--resize", action="store_true", help="resize images of another size to the model's")
    p.add_argument("--retries", type=int, default=5, help="with --url: retries of a batch answered 503")
    p.add_argument("--device", default="auto", help="in-process: auto, cpu or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch-size must be at least 1")
    if args.retries < 0:
        p.error("--retries must be at least 0")
    if args.output is not None and args.output.is_dir():
        p.error(f"--output {args.output}: is a folder; give a file")
    return args


BROKEN_PIPE = 128 + 13  # the shell's code for a process ended by SIGPIPE


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes: 0 done, 2 bad input, an unusable checkpoint or an answer other than 200, 141 the reader of
    standard output closed it."""
    args = parse_args(argv)
    form = args.format or ("jsonl" if args.output and args.output.suffix == ".jsonl" else "csv")
    try:  # written beside --output and renamed onto it once every image is scored: a refusal leaves it as it was
        partial = _partial_output(args.output) if args.output else None
    except OSError as exc:
        print(f"glow score: --output {args.output}: {exc}", file=sys.stderr)
        return 2
    try:
        names, blobs = images_of(args.input)
        scorer: InProcess | Remote = (
            Remote(args.url, args.model, args.resize, args.retries) if args.url
            else InProcess(args.weights, args.device, args.resize)
        )
    except (DataError, ValueError, CheckpointError, DeviceUnavailable) as exc:
        print(f"glow score: {exc}", file=sys.stderr)
        _discard(partial)
        return 2
    progress = tqdm(total=len(names), unit="image", disable=args.quiet, file=sys.stderr)

    def rows() -> Iterator[dict[str, Any]]:
        for chunk, data in batches(names, blobs, args.batch_size):
            for name, result in zip(chunk, scorer.score(chunk, data)):
                yield {"image": name, **result}
            progress.update(len(chunk))

    output = partial if partial is not None else sys.stdout
    try:
        count = write_rows(rows(), output, form)
        if partial is not None:
            partial.close()
            os.replace(partial.name, args.output)
    except BrokenPipeError:  # the reader stopped early (``glow score ... | head``): end quietly, as SIGPIPE would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush finds a sink
        return BROKEN_PIPE
    except (DataError, ValueError, OSError, httpx.HTTPError) as exc:  # ValueError: e.g. 2-channel images
        print(f"glow score: {exc}", file=sys.stderr)
        _discard(partial)
        return 2
    finally:
        progress.close()
        scorer.close()
    print(f"glow score: {count} images scored{f' -> {args.output}' if args.output else ''}", file=sys.stderr)
    return 0


def _partial_output(target: Path) -> IO[str]:
    """A file beside ``target`` to write and then rename onto it, with the mode ``open(target, "w")`` would give
    (a temporary file is made 0600)."""
    partial = tempfile.NamedTemporaryFile("w", newline="", dir=target.parent, prefix=f".{target.name}.",
                                          suffix=".partial", delete=False)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(partial.name, 0o666 & ~umask)
    return partial


def _discard(partial: IO[str] | None) -> None:
    """Close and remove the unfinished output file, if any."""
    if partial is not None:
        partial.close()
        Path(partial.name).unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
