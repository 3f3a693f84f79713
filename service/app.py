"""``create_app(settings)``: the FastAPI app of one or more checkpoints, with its lifespan, errors and middleware.

The lifespan loads every checkpoint (unless the runners given were loaded beforehand, as
``python -m service`` does so that a bad checkpoint stops it before it listens),
warms the model up and starts the batchers; only then does ``/readyz`` answer 200.
On shutdown readiness turns 503, new work is refused with 503, and everything queued
or running is answered before the lifespan ends.

Every error is JSON ``{"detail": ...}`` with the contract's status code.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from service.batcher import Closed, DeadlineExceeded, Overloaded, Unavailable
from service.fastlane import FastLaneMiddleware
from service.imaging import ImageError
from service.metrics import Metrics
from service.middleware import (
    AdmissionMiddleware,
    BodyLimitMiddleware,
    BodyTimeout,
    BodyTooLarge,
    HeadMiddleware,
    RequestContextMiddleware,
)
from service.pages import add_pages
from service.routes import LANE_PATHS, RETRY_AFTER_S, ClientDisconnected, named_router, resolve_model, router
from service.runner import ModelRunner
from service.schemas import describe_errors
from service.settings import Settings
from service.state import ModelFailed, ServiceState
from service.tuning import tune_process

DESCRIPTION = """Exact log-likelihoods, anomaly scores, samples, latents and decodings of images under a
Glow normalizing flow. Images travel as PNG or JPEG, as multipart `images` parts or JSON
base64 strings; errors are `{"detail": "..."}`; every response carries `X-Request-ID`."""

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that went away; never reaches the client


def runners_for(settings: Settings) -> dict[str, ModelRunner]:
    """A runner (not yet loaded) per model of ``settings.weights``, by name, the default first."""
    return {
        spec.name: ModelRunner(spec.path, settings.device, settings.anomaly_fpr, settings.torchscript,
                               settings.anomaly_orientation)
        for spec in settings.models
    }


def create_app(settings: Settings, runners: Mapping[str, ModelRunner] | ModelRunner | None = None) -> FastAPI:
    """The app serving ``settings.weights``, or the given runners by name (a lone runner: under the first name),
    the process tuned for it."""
    tune_process(settings)
    if isinstance(runners, ModelRunner):
        runners = {settings.models[0].name: runners}
    metrics = Metrics(settings.max_batch_size)
    state = ServiceState(settings, runners or runners_for(settings), metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            await state.start()
            yield
        finally:
            await state.stop()

    app = FastAPI(title="Glow service", version="0.1.0", description=DESCRIPTION, lifespan=lifespan,
                  docs_url=None, redoc_url=None)  # /docs from the app's own files (service.pages)
    app.state.service = state
    app.include_router(router)
    app.include_router(named_router)
    add_pages(app)
    add_error_handlers(app)
    document_model_names(app, list(state.models))
    app.add_middleware(FastLaneMiddleware, routes=[*router.routes, *named_router.routes], paths=LANE_PATHS,
                       resolve_model=resolve_model)  # innermost: inside the limits, IDs, metrics and logs
    app.add_middleware(HeadMiddleware)
    app.add_middleware(BodyLimitMiddleware, cap_for=state.body_cap, body_timeout_s=settings.body_timeout_s)
    app.add_middleware(AdmissionMiddleware, max_in_flight=settings.max_in_flight,
                       stopping=lambda: state.shutting_down)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)  # outermost: sees every response
    return app


def document_model_names(app: FastAPI, names: list[str]) -> None:
    """``/openapi.json`` lists the served names as the ``enum`` of every ``/models/{name}`` path parameter.

    Only the document changes: validation stays with :func:`service.routes.resolve_model`, so an
    unknown name is still the contract's 404 listing the names, not a 422.
    """
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            for operation in (op for item in build()["paths"].values() for op in item.values()):
                for parameter in operation.get("parameters", []):
                    if parameter["in"] == "path" and parameter["name"] == "name":
                        parameter["schema"]["enum"] = names
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def detail(status: int, message: str, retry_after: str | None = None) -> JSONResponse:
    headers = {"Retry-After": retry_after} if retry_after is not None else None
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


def add_error_handlers(app: FastAPI) -> None:
    """Map the service's exceptions to the contract's status codes."""

    async def image_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, ImageError)
        return detail(exc.status_code, str(exc))

    async def overloaded(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, Overloaded)
        return detail(503, f"{exc}; retry later", retry_after=str(exc.retry_after_s))

    async def failed(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, (Unavailable, ModelFailed))
        return detail(503, str(exc), retry_after=str(exc.retry_after_s))

    async def closed(_: Request, exc: Exception) -> Response:
        return detail(503, f"{exc}; retry later or elsewhere", retry_after=RETRY_AFTER_S)

    async def deadline(_: Request, exc: Exception) -> Response:
        return detail(504, f"{exc}; the server is busy, retry later")

    async def too_large(_: Request, exc: Exception) -> Response:
        return detail(413, str(exc))

    async def too_slow(_: Request, exc: Exception) -> Response:
        return JSONResponse({"detail": str(exc)}, status_code=408, headers={"Connection": "close"})

    async def invalid(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return detail(422, describe_errors(exc.errors()))

    async def disconnected(_: Request, __: Exception) -> Response:
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    app.add_exception_handler(ImageError, image_error)
    app.add_exception_handler(Overloaded, overloaded)
    app.add_exception_handler(Closed, closed)
    app.add_exception_handler(Unavailable, failed)
    app.add_exception_handler(ModelFailed, failed)
    app.add_exception_handler(DeadlineExceeded, deadline)
    app.add_exception_handler(BodyTooLarge, too_large)
    app.add_exception_handler(BodyTimeout, too_slow)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(ClientDisconnected, disconnected)
    app.add_exception_handler(ClientDisconnect, disconnected)
