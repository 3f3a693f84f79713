"""Typed, validated settings of the service, read from command-line flags and ``GLOW_*`` variables.

Every field is a flag (``max_batch_size`` -> ``--max-batch-size``) and an environment
variable (``GLOW_MAX_BATCH_SIZE``); a flag wins over the variable, the variable over the
default. Values are validated here, before anything is loaded, and a bad one raises
:class:`SettingsError` with one line naming the flag, the variable and what is wrong.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from model.device import check_device_name
from service.imaging import MAX_RESIZE_PIXELS
from service.models import SEPARATOR, SHIPPED, ModelSpec, check_entry, model_specs, shipped_weights, split_entries

DEFAULT_WEIGHTS = shipped_weights("fashion-mnist")
ENV_PREFIX = "GLOW_"


class SettingsError(ValueError):
    """A flag or ``GLOW_*`` variable with a bad value; the message is one line."""


class Settings(BaseSettings):
    """How one server process runs: where it listens, which checkpoint, how it batches."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    host: str = Field("127.0.0.1", min_length=1, description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on (0: any free port)")
    weights: Annotated[tuple[str, ...], NoDecode] = Field(
        (str(DEFAULT_WEIGHTS),),
        description="checkpoints to serve: PATH or NAME=PATH, repeatable or joined by ','; PATH is a checkpoint folder"
        " (glow.safetensors + glow.json), its .safetensors file, a folder of checkpoint folders, or a shipped name"
        f" ({', '.join(SHIPPED)}); the first is the default model",
    )
    device: str = Field(
        "auto", description="where the model runs: auto (CUDA when present), cpu, cuda or cuda:N; on CUDA with "
        "TF32 off (full float32, as calibrated)"
    )
    threads: int = Field(
        0, ge=0, le=1024,
        description="torch intra-op threads of the model on the CPU (0: the CPU cores this process may use, less "
        "one for the event loop, at least 1; with several workers, each's share; measured faster than all cores, see"
        " bench/README.md)",
    )
    workers: int = Field(
        1, ge=1, le=256,
        description="server processes on the one port, each with its own event loop, copy of every model "
        "and batchers; metrics merged across them (see README, 'Several processes')",
    )
    torchscript: bool = Field(
        True, description="run the folded model as frozen TorchScript graphs, one GIL hand-off per batch (1.4x the "
        "served throughput of the eager form measured on 2 CPU cores; false: eager)",
    )
    max_batch_size: int = Field(64, ge=1, le=65536, description="images per model call (1 turns batching off)")
    max_wait_ms: float = Field(
        0.0, ge=0, le=60_000, allow_inf_nan=False,
        description="how long a batch waits for more images after its first (0: it takes what queued while the "
        "model was busy, measured faster than a fixed wait at every concurrency; see bench/README.md)",
    )
    max_queue_size: int = Field(1024, ge=1, description="images waiting per operation before requests get 503")
    request_timeout_s: float = Field(
        30.0, gt=0, allow_inf_nan=False, description="how long a request may wait in the queue before a 504"
    )
    anomaly_fpr: float = Field(
        0.01, gt=0, lt=1, description="share of in-distribution images flagged is_anomaly (sets the threshold)"
    )
    anomaly_orientation: bool = Field(
        False, description="add the orientation detector to the anomaly score (the image against itself upside down: "
        "Fashion-MNIST flipped 0.78 -> 0.96 AUROC) at 1.75x the scoring cost per image; see README, Anomaly scores",
    )
    max_body_bytes: int = Field(
        0, ge=0, description="one body cap for every endpoint, in bytes (413 beyond); 0: caps sized from the model "
        "per endpoint (README, Reliability)"
    )
    max_image_bytes: int = Field(
        0, ge=0, description="largest image file in a request, in bytes (413 beyond); 0: 64 KiB or 4 bytes per "
        "pixel of the model's images, whichever is more"
    )
    max_source_pixels: int = Field(
        MAX_RESIZE_PIXELS, ge=1, description="pixels of the images one resize=true request may ask to decode, in "
        "all, checked from their headers (413 beyond)"
    )
    max_images_per_request: int = Field(64, ge=1, description="most images (or latents) in one request (413 beyond)")
    max_sample_n: int = Field(64, ge=1, description="largest n of GET /sample")
    max_in_flight: int = Field(
        256, ge=1, description="requests handled at once, probes aside (503 with Retry-After beyond, before the "
        "body is read)"
    )
    body_timeout_s: float = Field(
        20.0, gt=0, allow_inf_nan=False, description="longest time to receive a request body (408 and the "
        "connection closed beyond)"
    )
    keep_alive_s: float = Field(
        5.0, gt=0, allow_inf_nan=False, description="idle time after which a keep-alive connection is closed"
    )
    header_timeout_s: float = Field(
        10.0, gt=0, allow_inf_nan=False, description="longest time from a connection's opening (or its last "
        "response) to a complete request head (408 and the connection closed beyond)"
    )
    shutdown_grace_s: float = Field(
        3.0, ge=0, allow_inf_nan=False, description="after SIGTERM: seconds readiness is 503 while new requests "
        "are still accepted and answered 503 with Connection: close (for load balancers to notice), before the "
        "listener closes and queued work drains"
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="logging level")

    @field_validator("log_level", "device", mode="before")
    @classmethod
    def _lower_case(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        return check_device_name(value)

    @field_validator("weights", mode="before")
    @classmethod
    def _weights_entries(cls, value: Any) -> tuple[str, ...]:
        values = [value] if isinstance(value, (str, Path)) else list(value)
        entries = tuple(split_entries(values))
        if not entries:
            raise ValueError("no checkpoint given")
        for entry in entries:
            check_entry(entry)
        return entries

    @property
    def models(self) -> list[ModelSpec]:
        """The models to serve, the default first (``service.models``); ValueError for an ambiguous folder."""
        return model_specs(self.weights)

    @model_validator(mode="after")
    def _requests_fit_the_queue(self) -> Settings:
        for name in ("max_images_per_request", "max_sample_n"):
            if getattr(self, name) > self.max_queue_size:
                raise ValueError(
                    f"{flag(name)} ({getattr(self, name)}) exceeds {flag('max_queue_size')} ({self.max_queue_size}):"
                    " such a request could never be queued"
                )
        return self

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None) -> Settings:
        """Settings from command-line flags over ``GLOW_*`` variables over defaults, or SettingsError."""
        given = vars(_parser().parse_args(argv))
        try:
            return cls(**given)
        except ValidationError as exc:
            raise SettingsError(describe(exc)) from None


def flag(name: str) -> str:
    """The command-line flag of a settings field: ``max_batch_size`` -> ``--max-batch-size``."""
    return "--" + name.replace("_", "-")


def describe(exc: ValidationError) -> str:
    """One line naming each bad setting (flag and variable), its value and what is wrong."""
    problems = []
    for error in exc.errors():
        if error["loc"]:
            name = str(error["loc"][0])
            message = str(error["msg"]).removeprefix("Value error, ")
            problems.append(f"{flag(name)} / {ENV_PREFIX}{name.upper()}: {message} (got {error['input']!r})")
        else:
            problems.append(str(error["msg"]).removeprefix("Value error, "))
    return "invalid settings: " + "; ".join(problems)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one SettingsError line instead of printing usage."""

    def error(self, message: str) -> Any:
        raise SettingsError(f"{message} (see python -m service --help)")


def _parser() -> argparse.ArgumentParser:
    """One flag per settings field; flags left out are absent from the namespace (env and defaults apply)."""
    parser = _Parser(
        prog="python -m service",
        description="Serve a Glow checkpoint over HTTP. Every flag can also be set as GLOW_<FLAG>.",
        argument_default=argparse.SUPPRESS,
    )
    for name, field in Settings.model_fields.items():
        repeatable = name == "weights"
        default = SEPARATOR.join(field.default) if repeatable else field.default
        parser.add_argument(
            flag(name),
            dest=name,
            metavar=name.upper(),
            action="append" if repeatable else "store",
            help=f"{field.description} (env {ENV_PREFIX}{name.upper()}, default {default})",
        )
    return parser
