"""The endpoints of the HTTP contract (docs/API.md): request parsing, validation, responses.

The model endpoints (``/model``, ``/log-likelihood``, ``/sample``, ``/encode``,
``/decode``) are registered twice: without a prefix they serve the default model, under
``/models/{name}`` the model of that name (404 listing the names for an unknown one).

Every check happens here, before anything is queued, so one request's bad input never
reaches a batch it shares with others. Routes hand numpy arrays to the batchers and get
arrays back; they never touch a tensor.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.formparsers import MultiPartException, MultiPartParser

from service import formdata, imaging
from service.limits import RequestLimits, base64_decoded_length
from service.schemas import (
    DecodeRequest,
    DecodeResponse,
    EncodeResponse,
    ErrorResponse,
    Health,
    ImageScore,
    ImagesRequest,
    LogLikelihoodResponse,
    ModelInfo,
    ModelList,
    Readiness,
    SampleResponse,
    decode_request,
    describe_errors,
)
from service.runner import Score, Scorable
from service.state import ModelState, ServiceState

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

MAX_LATENT_ABS = float(np.finfo(np.float32).max)  # the model computes in float32; under it z ~ N(0, 1)
MAX_SEED = 2**64 - 1
RETRY_AFTER_S = "1"  # while loading or shutting down
JSON, MULTIPART = "application/json", "multipart/form-data"

ERROR_DESCRIPTIONS = {
    400: "undecodable body or image",
    404: "no model of that name (the detail lists the names)",
    413: "body too large or too many images",
    415: "unsupported content type",
    422: "well-formed but invalid values",
    503: "overloaded (queue full, see Retry-After), not ready or shutting down",
    504: "timed out in the queue",
}


ERROR_HEADERS = {
    503: {
        "Retry-After": {
            "description": "whole seconds to wait before retrying",
            "required": True,
            "schema": {"type": "integer", "minimum": 1},
        }
    }
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the given error codes, all ``{"detail": ...}`` (503 with ``Retry-After``)."""
    return {
        code: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[code]}
        | ({"headers": ERROR_HEADERS[code]} if code in ERROR_HEADERS else {})
        for code in codes
    }


IMAGES_BODY = {
    "requestBody": {
        "required": True,
        "description": "PNG or JPEG images, as multipart `images` file parts or as JSON base64 strings",
        "content": {
            MULTIPART: {
                "schema": {
                    "type": "object",
                    "required": ["images"],
                    "properties": {
                        "images": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "one PNG or JPEG file per part",
                        }
                    },
                }
            },
            JSON: {"schema": ImagesRequest.model_json_schema()},
        },
    }
}
DECODE_BODY = {"requestBody": {"required": True, "content": {JSON: {"schema": DecodeRequest.model_json_schema()}}}}


class ClientDisconnected(Exception):
    """The client went away before its answer was ready."""


async def get_state(request: Request) -> ServiceState:
    """The app's service state. Dependencies are coroutines: FastAPI runs plain functions in its
    thread pool, a thread hand-off per dependency per request (a quarter of the event loop's time
    at concurrency 64, measured with py-spy)."""
    return request.app.state.service


async def ready_state(state: Annotated[ServiceState, Depends(get_state)]) -> ServiceState:
    """The service, or 503 while it is loading, failing or shutting down."""
    reason = state.unready_reason()
    if reason is not None:
        raise HTTPException(503, reason, headers={"Retry-After": RETRY_AFTER_S})
    return state


StateDep = Annotated[ServiceState, Depends(get_state)]
ReadyDep = Annotated[ServiceState, Depends(ready_state)]


async def model_name(
    name: Annotated[str, Path(description="the name of a model, as GET /models lists them")],
) -> str:
    """Declares (and documents) the ``name`` path parameter of the ``/models/{name}`` routes."""
    return name


async def model_state(request: Request, state: ReadyDep) -> ModelState:
    """The model a route serves: the one named in its path, or the default; 404 for an unknown name."""
    name = request.path_params.get("name")
    model = state.default if name is None else state.models.get(name)
    if model is None:
        raise HTTPException(404, f"no model named {name!r}; this service serves: {', '.join(state.models)}")
    request.state.model = model.name
    return model


ModelDep = Annotated[ModelState, Depends(model_state)]


async def resolve_model(request: Request) -> ModelState:
    """What ``ModelDep`` gives an endpoint, for callers outside FastAPI's dependency solving (service.fastlane)."""
    return await model_state(request, await ready_state(await get_state(request)))


LANE_PATHS = ("/log-likelihood", "/encode")  # served by service.fastlane: endpoints of (request, ModelDep, bool flags)
ResizeQuery = Annotated[
    bool, Query(description="resize images of another size to the model's instead of refusing them with 422")
]

HeatmapQuery = Annotated[
    bool, Query(description="each result also carries `heatmap`: [H][W] floats, higher = more anomalous there")
]
OverlayQuery = Annotated[
    bool, Query(description="each result also carries `heatmap` and `heatmap_overlay`, a base64 PNG of the image"
                " with its heatmap in red")
]


@dataclass
class ImageOptions:
    """Per-request options that a query parameter or the JSON body's field of the same name turns on."""

    heatmap: bool = False
    heatmap_overlay: bool = False

    @property
    def maps(self) -> bool:
        return self.heatmap or self.heatmap_overlay


router = APIRouter()
named_router = APIRouter(prefix="/models/{name}", dependencies=[Depends(model_name)])


def model_route(method: str, path: str, **options: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register an endpoint at ``path`` (the default model) and at ``/models/{name}`` + ``path``."""

    def register(endpoint: Callable[..., Any]) -> Callable[..., Any]:
        router.add_api_route(path, endpoint, methods=[method], **options)
        named = options | {"responses": {**options.get("responses", {}), **errors(404)}}
        named_router.add_api_route(path, endpoint, methods=[method], **named)
        return endpoint

    return register


# ---------------------------------------------------------------- probes
@router.get("/healthz", response_model=Health, tags=["probes"], summary="Liveness: 200 while the process lives")
async def healthz() -> Health:
    return Health()


@router.get(
    "/readyz",
    response_model=Readiness,
    responses=errors(503),
    tags=["probes"],
    summary="Readiness: 200 once loaded and warmed up, 503 before that and while shutting down",
)
async def readyz(_: ReadyDep) -> Readiness:
    return Readiness()


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text exposition"}},
    tags=["probes"],
    summary="Prometheus metrics: requests, latencies, queue waits, batch sizes, queue depths, model info",
)
async def metrics(state: StateDep) -> Response:
    return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get(
    "/models",
    response_model=ModelList,
    responses=errors(503),
    tags=["model"],
    summary="The models of this service, the default first (each served under /models/{name}/...)",
)
async def models(state: ReadyDep) -> ModelList:
    return ModelList(models=state.summaries())


@model_route("GET", "/model", response_model=ModelInfo, responses=errors(503), tags=["model"], summary="Model metadata")
async def model_info(state: ModelDep) -> ModelInfo:
    return state.model_info()


# -------------------------------------------------------------- inference
@model_route(
    "POST",
    "/log-likelihood",
    response_model=LogLikelihoodResponse,
    response_model_exclude_none=True,
    responses=errors(400, 413, 415, 422, 503, 504),
    openapi_extra=IMAGES_BODY,
    tags=["inference"],
    summary="Exact log-likelihood and anomaly score of each image",
    description="Deterministic (pixels scored at their bin centres); an image's score does not depend on the"
    " other images of its request or batch. Results come back in input order. With `heatmap=true` each result"
    " also carries its anomaly heatmap, from the same pass (`heatmap_overlay=true`: and a PNG overlay).",
)
async def log_likelihood(
    request: Request,
    state: ModelDep,
    resize: ResizeQuery = False,
    heatmap: HeatmapQuery = False,
    heatmap_overlay: OverlayQuery = False,
) -> LogLikelihoodResponse:
    options = ImageOptions(heatmap, heatmap_overlay)
    items = await read_images(
        request, state, resize, then=lambda images: state.runner.scorable(images, options.maps), options=options
    )
    if options.maps and not state.runner.heatmaps:
        raise HTTPException(
            422, "this checkpoint has no heatmap calibration; python -m model.heatmap --weights DIR --train PATH adds one"
        )
    scores = await until_disconnected(request, state.scores.submit(items))
    overlays = (await asyncio.to_thread(_overlays, state, items, scores) if options.heatmap_overlay
                else [None] * len(scores))
    return LogLikelihoodResponse(
        results=[
            ImageScore(
                log_likelihood=score.log_likelihood,
                bits_per_dim=score.bits_per_dim,
                anomaly_score=score.anomaly_score,
                percentile=score.percentile,
                is_anomaly=score.is_anomaly,
                heatmap=None if score.heatmap is None else score.heatmap.tolist(),
                heatmap_overlay=overlay,
                **_class_fields(state, score),
            )
            for score, overlay in zip(scores, overlays)
        ],
        anomaly_method=state.runner.scorer.method,
        threshold=state.runner.scorer.threshold,
    )


def _class_fields(state: ModelState, score: Score) -> dict[str, Any]:
    """``predicted_label`` and ``label_probabilities`` of a class-conditional model's score; none otherwise."""
    if score.label_probabilities is None:
        return {}
    probabilities = score.label_probabilities.tolist()
    labels = state.runner.labels
    return {"predicted_label": labels[max(range(len(labels)), key=probabilities.__getitem__)],
            "label_probabilities": probabilities}


def _class_number(state: ModelState, label: str) -> int:
    """A class's number from its name or its number (a name first: names may be digits); 422 otherwise."""
    labels = state.runner.labels
    if not labels:
        raise HTTPException(422, "query parameter 'label': this checkpoint is not class-conditional (no labels)")
    if label in labels:
        return labels.index(label)
    if label.isascii() and label.isdecimal() and int(label) < len(labels):  # "3", not "٣" or "３"
        return int(label)
    raise HTTPException(422, f"query parameter 'label': {label!r} is neither a class name nor a number below "
                        f"{len(labels)}; the classes: {', '.join(labels)}")


def _overlays(state: ModelState, items: list[Scorable], scores: list[Score]) -> list[str | None]:
    """Base64 PNGs of each image with its heatmap drawn over it."""
    return [
        None if score.heatmap is None
        else imaging.to_base64(imaging.encode_png(state.runner.overlay_png_pixels(item.pixels, score.heatmap)))
        for item, score in zip(items, scores)
    ]


@model_route(
    "GET",
    "/sample",
    response_model=SampleResponse,
    responses={
        200: {"content": {"image/png": {}}, "description": "JSON, or with format=png one PNG grid of the samples"},
        **errors(422, 503, 504),
    },
    tags=["inference"],
    summary="Draw images from the model",
)
async def sample(
    request: Request,
    state: ModelDep,
    n: Annotated[int, Query(ge=1, description="number of images, at most --max-sample-n")] = 16,
    temperature: Annotated[
        float, Query(gt=0, allow_inf_nan=False, description="scale of the prior's standard deviation")
    ] = 0.7,
    seed: Annotated[
        int | None, Query(ge=0, le=MAX_SEED, description="same seed, same images; drawn and returned when absent")
    ] = None,
    output: Annotated[
        Literal["json", "png"], Query(alias="format", description="json: base64 PNGs; png: one PNG grid")
    ] = "json",
    label: Annotated[
        str | None, Query(max_length=200, description="class-conditional checkpoints: a class's name or number"
                          " (/model's labels); absent: each sample's class drawn with the training frequencies")
    ] = None,
) -> Response | SampleResponse:
    limit = state.settings.max_sample_n
    if n > limit:
        raise HTTPException(422, f"query parameter 'n': at most {limit} images per request, got {n}")
    number = None if label is None else _class_number(state, label)
    request.state.images = n
    seed = secrets.randbelow(2**32) if seed is None else seed
    noise = state.runner.sample_noise(n, temperature, seed, number)
    images = decoded_or_422(
        await until_disconnected(request, state.samples.submit(list(noise))),
        lambda bad: f"samples {bad} of seed {seed} at temperature {temperature:g}: the inverse flow overflows on their"
        " latents (no image); a lower temperature keeps samples where the model maps them to images",
    )
    if output == "png":
        png = await asyncio.to_thread(lambda: imaging.encode_png(imaging.grid(images)))
        return Response(png, media_type="image/png", headers={"X-Seed": str(seed), "X-Temperature": str(temperature)})
    return SampleResponse(images=await asyncio.to_thread(_png_base64, images), temperature=temperature, seed=seed)


@model_route(
    "POST",
    "/encode",
    response_model=EncodeResponse,
    responses=errors(400, 413, 415, 422, 503, 504),
    openapi_extra=IMAGES_BODY,
    tags=["inference"],
    summary="The latent of each image, and its log-likelihood",
    description="An image whose latents overflow float32 (far outside the training data) is refused with 422.",
)
async def encode(request: Request, state: ModelDep, resize: ResizeQuery = False) -> EncodeResponse:
    images = await read_images(request, state, resize, then=as_decoded)
    encoded = await until_disconnected(request, state.encodings.submit(images))
    overflowed = [index for index, item in enumerate(encoded) if item.latent is None]
    if overflowed:
        raise HTTPException(422, f"images {overflowed}: their latents overflow float32 (images far outside the training"
                            " data); /log-likelihood scores such images as anomalies")
    return EncodeResponse(
        latents=[item.latent.tolist() for item in encoded if item.latent is not None],
        latent_dim=state.runner.latent_dim,
        log_likelihood=[item.log_likelihood for item in encoded],
    )


@model_route(
    "POST",
    "/decode",
    response_model=DecodeResponse,
    responses=errors(400, 413, 415, 422, 503, 504),
    openapi_extra=DECODE_BODY,
    tags=["inference"],
    summary="The image of each latent (decode(encode(png)) gives back the same pixels)",
)
async def decode(request: Request, state: ModelDep) -> DecodeResponse:
    media = media_type(request)
    if media != JSON:
        raise HTTPException(
            415, f"unsupported content type {media or '(none)'!r}: send application/json {{\"latents\": [[...], ...]}}"
        )
    limits = ready_limits(state)
    body = await request.body()
    refuse_value_bombs(limits, body, "latents")
    try:
        payload = parse_json(decode_model(limits.latent_dim), body)
    except WrongLatentLength as exc:  # every value a number: one "[" per latent and the outer one
        check_count(body.count(b"[") - 1, limits.max_images, "latents")
        raise HTTPException(422, str(exc)) from None
    values: list[list[float]] = payload.latents  # type: ignore[attr-defined]
    check_count(len(values), limits.max_images, "latents")
    request.state.images = len(values)
    latents = latents_array(values, state.runner.latent_dim)
    images = decoded_or_422(
        await until_disconnected(request, state.decodings.submit(list(latents))),
        lambda bad: f"latents {bad}: the inverse flow overflows on them (no image; latents are standard normal under"
        " the model, and an image whose forward pass rounded a coupling's scale to 0 cannot be decoded back)",
    )
    return DecodeResponse(images=await asyncio.to_thread(_png_base64, images))


# ---------------------------------------------------------------- parsing
def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def ready_limits(state: ModelState) -> RequestLimits:
    if state.limits is None:  # unreachable once ready: the limits are set before readiness
        raise HTTPException(503, "the model is still loading; retry shortly", headers={"Retry-After": RETRY_AFTER_S})
    return state.limits


def refuse_value_bombs(limits: RequestLimits, body: bytes, what: str) -> None:
    """413 for a JSON body holding more values than any request within the limits (before parsing it)."""
    problem = limits.too_many_json_values(body, what)
    if problem is not None:
        raise HTTPException(413, problem)


@functools.lru_cache(maxsize=8)
def decode_model(latent_dim: int) -> type[BaseModel]:
    return decode_request(latent_dim)


class WrongLatentLength(ValueError):
    """Every value of a decode body is a number, but a latent has the wrong length (422 unless too many)."""


def parse_json(model: type[M], body: bytes) -> M:
    """A JSON body as ``model``: 400 if it is not JSON (or nested too deep), 422 if its values are invalid."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        problems = exc.errors()
        if any(problem["type"] == "json_invalid" for problem in problems):
            raise HTTPException(400, f"the body is not valid JSON: {problems[0]['msg']}") from None
        lengths = [
            p for p in problems
            if len(p["loc"]) == 2 and p["loc"][0] == "latents" and p["type"] in ("too_long", "too_short")
        ]
        if lengths and len(lengths) == len(problems):
            index, ctx = lengths[0]["loc"][1], lengths[0]["ctx"]
            raise WrongLatentLength(
                f"latents[{index}] has {ctx['actual_length']} values; this model's latents have"
                f" {ctx.get('max_length', ctx.get('min_length'))}"
            ) from None
        raise HTTPException(422, describe_errors(problems)) from None


def check_count(count: int, limit: int, what: str) -> None:
    if count > limit:
        raise HTTPException(413, f"{count} {what} in one request; at most {limit} are accepted")


def check_image_bytes(size: int, limit: int, index: int) -> None:
    if size > limit:
        raise HTTPException(
            413, f"images[{index}]: {size} bytes; at most {limit} bytes per image are accepted (--max-image-bytes)"
        )


def as_decoded(images: list[np.ndarray]) -> list[np.ndarray]:
    return images


async def read_images(
    request: Request, state: ModelState, resize: bool, then: Callable[[list[np.ndarray]], T],
    options: ImageOptions | None = None,
) -> T:
    """``then`` of the request's images (uint8 arrays of the model's shape, in order), or the contract's 4xx.

    ``then`` runs in the worker thread that decodes them (``as_decoded``, ``ModelRunner.scorable``).
    ``options``: turned on by the JSON body's fields of the same names, before ``then`` runs; a JSON body
    that sets one for an endpoint without ``options`` is 422.
    """
    limits = ready_limits(state)
    limit = limits.max_images
    media = media_type(request)
    if media == MULTIPART:
        blobs = await multipart_images(request, limit)
    elif media == JSON:
        body = await request.body()
        refuse_value_bombs(limits, body, "images")
        payload = parse_json(ImagesRequest, body)
        check_count(len(payload.images), limit, "images")
        for index, text in enumerate(payload.images):
            check_image_bytes(base64_decoded_length(text), limits.image_bytes, index)
        blobs = [imaging.from_base64(text, index) for index, text in enumerate(payload.images)]
        resize = resize or payload.resize
        if options is not None:
            options.heatmap = options.heatmap or payload.heatmap
            options.heatmap_overlay = options.heatmap_overlay or payload.heatmap_overlay
        elif payload.heatmap or payload.heatmap_overlay:
            raise HTTPException(422, "heatmap and heatmap_overlay are options of /log-likelihood only")
    else:
        raise HTTPException(
            415,
            f"unsupported content type {media or '(none)'!r}: send multipart/form-data with 'images' file parts,"
            " or application/json {\"images\": [\"<base64 PNG/JPEG>\", ...]}",
        )
    for index, blob in enumerate(blobs):
        check_image_bytes(len(blob), limits.image_bytes, index)
    request.state.images = len(blobs)
    shape, pixels = state.runner.image_shape, state.settings.max_source_pixels

    return await asyncio.to_thread(lambda: then(imaging.decode_images(blobs, shape, resize, pixels)))


async def multipart_images(request: Request, limit: int) -> list[bytes]:
    """The bytes of every ``images`` file part, or the contract's 4xx (a plain body read by ``service.formdata``,
    any other by Starlette's parser)."""
    body = await request.body()
    blobs = formdata.image_parts(request.headers["content-type"], body, limit)
    if blobs is not None:
        return blobs
    closing = formdata.closing_delimiter(request.headers["content-type"])
    if closing is not None and closing not in body:  # python-multipart would drop the unfinished part silently
        raise HTTPException(400, f"malformed multipart body: it ends before its closing delimiter {closing.decode()!r}"
                            " (truncated, or a Content-Length shorter than the body)")
    parser = MultiPartParser(request.headers, request.stream(), max_files=limit, max_fields=64)  # the body, cached
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        if exc.message.startswith("Too many files"):
            raise HTTPException(413, f"more than {limit} file parts in one request; at most {limit} images are"
                                " accepted") from None
        raise HTTPException(400, f"malformed multipart body: {exc.message}") from None
    try:
        parts = form.getlist("images")
        if not parts:
            raise HTTPException(
                422, f"no 'images' parts in the multipart body (found: {sorted(set(form.keys())) or 'nothing'})"
            )
        blobs = []
        for index, part in enumerate(parts):
            if isinstance(part, str):
                raise HTTPException(400, f"images[{index}] is a text field; send each image as a file part")
            blobs.append(await part.read())
        return blobs
    finally:
        await form.close()


def latents_array(latents: list[list[float]], latent_dim: int) -> np.ndarray:
    """(n, latent_dim) float64 from validated JSON numbers, or 422 naming the bad latent."""
    for index, latent in enumerate(latents):
        if len(latent) != latent_dim:
            raise HTTPException(
                422, f"latents[{index}] has {len(latent)} values; this model's latents have {latent_dim}"
            )
    array = np.asarray(latents, dtype=np.float64)
    bad = ~np.isfinite(array).all(axis=1)
    if bad.any():
        raise HTTPException(422, f"latents[{int(np.argmax(bad))}] holds NaN or infinite values")
    big = np.abs(array).max(axis=1) > MAX_LATENT_ABS
    if big.any():
        raise HTTPException(
            422,
            f"latents[{int(np.argmax(big))}] holds values beyond +-{MAX_LATENT_ABS:.4g} (float32's range);"
            " latents are standard normal under the model",
        )
    return array


def decoded_or_422(decoded: list[np.ndarray | None], problem: Callable[[list[int]], str]) -> list[np.ndarray]:
    """The images of ``ModelRunner.decode_batch``, or 422 with ``problem(indices)`` of those it has none of
    (their inverse overflowed)."""
    overflowed = [index for index, image in enumerate(decoded) if image is None]
    if overflowed:
        raise HTTPException(422, problem(overflowed))
    return [image for image in decoded if image is not None]


def _png_base64(images: list[np.ndarray]) -> list[str]:
    return [imaging.to_base64(imaging.encode_png(image)) for image in images]


# ------------------------------------------------------------ disconnects
async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it (dropping what it queued) and raise."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if not task.done():
        raise ClientDisconnected()
    return task.result()


async def _disconnect(request: Request) -> None:
    """Return once the client has disconnected (the body was already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
