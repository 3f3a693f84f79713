"""Pydantic models of every request and response body, so ``/openapi.json`` documents the whole API."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, Strict, create_model, model_serializer

LATENT_ORDER = (
    "the standardised latents of every level, level 1's split first and the top level's last,"
    " each flattened in (C, H, W) order (latent_shapes lists them); under the model every entry is N(0, 1)"
)


FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
"""A number of a response: NaN or infinity fails validation (a 500) instead of reaching a client as null."""


class ErrorResponse(BaseModel):
    detail: str = Field(description="what is wrong, in words a user can act on")


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready"] = "ready"


class Batching(BaseModel):
    max_batch_size: int = Field(description="images per model call")
    max_wait_ms: float = Field(description="how long a batch waits for more images after its first")
    max_queue_size: int = Field(description="images waiting per operation before requests get 503")


class Limits(BaseModel):
    max_images_per_request: int
    max_sample_n: int
    max_body_bytes: int = Field(description="the largest body cap of any endpoint (413 beyond)")
    body_bytes: dict[str, int] = Field(
        description="body cap per endpoint: images (/log-likelihood, /encode), decode (/decode), other"
    )
    max_image_bytes: int = Field(description="largest image file in a request (413 beyond)")
    max_source_pixels: int = Field(description="pixels a resize=true request may decode, in all (413 beyond)")
    max_in_flight: int = Field(description="requests handled at once, probes aside (503 beyond)")
    body_timeout_s: float = Field(description="longest time to receive a body (408 beyond)")
    request_timeout_s: float = Field(description="longest wait in the queue before a 504")


class AnomalyInfo(BaseModel):
    method: str = Field(description="short, stable name of the anomaly score (its detectors' names joined by '+')")
    description: str = Field(description="what anomaly_score is, in words")
    threshold: FiniteFloat = Field(description="anomaly_score above which is_anomaly is true")
    false_positive_rate: float = Field(description="share of the reference set above the threshold, by design")
    reference_size: int = Field(description="in-distribution images the percentiles are computed against")


class ModelInfo(BaseModel):
    name: str
    dataset: str = Field(description="name of the training data set")
    image_shape: list[int] = Field(description="[C, H, W] of the images the model takes")
    n_bits: int
    levels: int
    steps_per_level: int
    hidden_channels: int
    parameters: int
    test_bits_per_dim: float | None = Field(description="dequantised bits/dim on the test set (null: not measured)")
    test_bits_per_dim_bin_centre: float | None = Field(
        description="mean of what /log-likelihood returns as bits_per_dim, on the test set (null: not measured)"
    )
    weights_sha256: str
    device: str
    dtype: str
    batching: Batching
    latent_dim: int = Field(description="C*H*W, the length of every latent")
    latent_shapes: list[list[int]] = Field(description="[C, H, W] of each level's part of the latent, in order")
    latent_order: str = Field(LATENT_ORDER, description="how a latent is laid out")
    anomaly: AnomalyInfo
    limits: Limits
    labels: list[str] | None = Field(
        None, description="class names, index = class number, of a class-conditional checkpoint (absent otherwise)"
    )

    @model_serializer(mode="wrap")
    def _omit_absent_labels(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """An unconditional checkpoint's /model has no ``labels`` key (API.md, Extensions)."""
        data = handler(self)
        if data.get("labels") is None:
            data.pop("labels", None)
        return data


class ModelSummary(BaseModel):
    name: str = Field(description="the name the model is served under: /models/{name}/...")
    dataset: str = Field(description="name of the training data set")
    image_shape: list[int] = Field(description="[C, H, W] of the images the model takes")
    default: bool = Field(description="served by the routes without a /models/{name} prefix too")


class ModelList(BaseModel):
    models: list[ModelSummary] = Field(description="every model of the service, the default first")


class ImagesRequest(BaseModel):
    """Images as base64 PNG/JPEG files (the JSON alternative to multipart ``images`` parts)."""

    model_config = ConfigDict(extra="forbid")

    images: list[str] = Field(min_length=1, description="base64-encoded PNG or JPEG files")
    resize: bool = Field(False, description="resize images of another size to the model's instead of refusing them")
    heatmap: bool = Field(False, description="each result also carries `heatmap` (/log-likelihood only)")
    heatmap_overlay: bool = Field(
        False, description="each result also carries `heatmap` and `heatmap_overlay` (/log-likelihood only)"
    )


class ImageScore(BaseModel):
    log_likelihood: FiniteFloat = Field(
        description="log P(x) in nats of the discrete 8-bit image (bin centres); -3.4028234663852886e38 (float32's"
        " lowest) where the model's float32 arithmetic overflows on the image"
    )
    bits_per_dim: FiniteFloat = Field(description="-log P(x) / (D log 2)")
    anomaly_score: FiniteFloat = Field(description="higher = more anomalous; at most 1e6 (images that overflow)")
    percentile: FiniteFloat = Field(ge=0, le=100, description="share of the reference set with a lower anomaly_score")
    is_anomaly: bool = Field(description="anomaly_score above the calibrated threshold")
    heatmap: list[list[float]] | None = Field(
        None, description="with heatmap=true: [H][W] finite floats on the image grid, higher = more anomalous there"
    )
    heatmap_overlay: str | None = Field(
        None, description="with heatmap_overlay=true: base64 PNG of the image in grey with the heatmap in red"
    )
    predicted_label: str | None = Field(
        None, description="class-conditional checkpoints: the most probable class, argmax_k p(k | x)"
    )
    label_probabilities: list[FiniteFloat] | None = Field(
        None, description="class-conditional checkpoints: p(k | x) for every class k (in /model's labels order),"
        " summing to 1; log_likelihood stays log p(x), the mixture over classes"
    )


class LogLikelihoodResponse(BaseModel):
    results: list[ImageScore] = Field(description="one per input image, in input order")
    anomaly_method: str = Field(description="short, stable name of the anomaly score (GET /model describes it)")
    threshold: FiniteFloat = Field(description="anomaly_score above which is_anomaly is true")


class SampleResponse(BaseModel):
    images: list[str] = Field(description="base64 PNG files")
    temperature: float
    seed: int = Field(description="the seed used (drawn when the request gave none): it reproduces these images")


class EncodeResponse(BaseModel):
    latents: list[list[FiniteFloat]] = Field(description=f"one per input image: {LATENT_ORDER}")
    latent_dim: int
    log_likelihood: list[FiniteFloat] = Field(description="nats of each image, as /log-likelihood returns")


class DecodeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    latents: list[list[Annotated[float, Strict()]]] = Field(
        min_length=1, description="latents of latent_dim finite numbers each, laid out as /encode returns them"
    )


def decode_request(latent_dim: int) -> type[BaseModel]:
    """DecodeRequest for this model: latents of exactly latent_dim numbers.

    The count of latents is checked after validation (413), not as a ``max_length`` here:
    pydantic skips the items of a list past its ``max_length``, and a body both too long and
    malformed must get the 422 of its malformed values. Its parsing cost is bounded before
    (``service.limits``: the commas of the body).
    """
    latent = Annotated[list[Annotated[float, Strict()]], Field(min_length=latent_dim, max_length=latent_dim)]
    return create_model(
        "DecodeRequest", __config__=ConfigDict(extra="forbid"), latents=(list[latent], Field(min_length=1))
    )


class DecodeResponse(BaseModel):
    images: list[str] = Field(description="base64 PNG files, one per latent")


def describe_errors(errors: Sequence[Any], limit: int = 5) -> str:
    """Pydantic/FastAPI validation errors -> one sentence naming each bad field (the first ``limit``)."""
    problems = []
    for error in errors[:limit]:
        location = [str(part) for part in error["loc"] if part != "body"]
        where = ""
        if location and location[0] in ("query", "path", "header"):
            where = f"{location[0]} parameter {'.'.join(location[1:])!r}: "
        elif location:
            where = f"{location[0]}{''.join(f'[{p}]' for p in location[1:])}: "
        problems.append(f"{where}{error['msg']}")
    more = f" (and {len(errors) - limit} more)" if len(errors) > limit else ""
    return "; ".join(problems) + more
