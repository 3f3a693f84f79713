"""A small typed client of the service over httpx, synchronous (:class:`GlowClient`) and asynchronous
(:class:`AsyncGlowClient`), with the same methods::

    from service.client import GlowClient

    with GlowClient("http://127.0.0.1:8000") as glow:
        scores = glow.score([open("shirt.png", "rb").read()])
        print(scores[0].bits_per_dim, scores[0].is_anomaly)
        samples = glow.sample(n=4, temperature=0.7, seed=0)  # PNG bytes, and the seed used

Images go up as PNG or JPEG bytes (multipart ``images`` parts) and come back as PNG
bytes. A response other than 2xx raises :class:`GlowAPIError` with its status, detail
and request ID.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from service.schemas import DecodeResponse, EncodeResponse, ImageScore, LogLikelihoodResponse, ModelInfo, SampleResponse

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 60.0


class GlowAPIError(Exception):
    """The service answered with an error status."""

    def __init__(self, status_code: int, detail: str, request_id: str | None) -> None:
        super().__init__(f"{status_code}: {detail} (request {request_id})")
        self.status_code = status_code
        self.detail = detail
        self.request_id = request_id


@dataclass(frozen=True)
class Samples:
    """Images drawn by GET /sample, as PNG bytes, with what reproduces them."""

    images: list[bytes]
    temperature: float
    seed: int


@dataclass(frozen=True)
class _Call:
    """One HTTP request of the API, independent of sync or async transport."""

    method: str
    path: str
    options: dict[str, Any]


def _images_call(path: str, images: Sequence[bytes], resize: bool, **flags: bool) -> _Call:
    parts = [("images", (f"image{index}", data, _content_type(data))) for index, data in enumerate(images)]
    params = {name: "true" for name, on in {"resize": resize, **flags}.items() if on}
    return _Call("POST", path, {"files": parts, "params": params})


def _content_type(data: bytes) -> str:
    return "image/png" if data.startswith(b"\x89PNG") else "image/jpeg"


def _sample_call(n: int, temperature: float, seed: int | None) -> _Call:
    params: dict[str, Any] = {"n": n, "temperature": temperature}
    if seed is not None:
        params["seed"] = seed
    return _Call("GET", "/sample", {"params": params})


def _decode_call(latents: Sequence[Sequence[float]]) -> _Call:
    return _Call("POST", "/decode", {"json": {"latents": [list(map(float, latent)) for latent in latents]}})


def _json(response: httpx.Response) -> Any:
    """The JSON of a 2xx response, or GlowAPIError."""
    if response.is_success:
        return response.json()
    try:
        detail = str(response.json()["detail"])
    except (ValueError, KeyError, TypeError):
        detail = response.text or response.reason_phrase
    raise GlowAPIError(response.status_code, detail, response.headers.get("X-Request-ID"))


def _samples(response: httpx.Response) -> Samples:
    body = SampleResponse.model_validate(_json(response))
    return Samples([base64.b64decode(image) for image in body.images], body.temperature, body.seed)


def _pngs(response: httpx.Response) -> list[bytes]:
    return [base64.b64decode(image) for image in DecodeResponse.model_validate(_json(response)).images]


class GlowClient:
    """Synchronous client; use as a context manager, or call :meth:`close`."""

    def __init__(
        self, base_url: str = DEFAULT_URL, *, timeout: float = DEFAULT_TIMEOUT_S, headers: dict[str, str] | None = None
    ) -> None:
        self._http = httpx.Client(base_url=base_url, timeout=timeout, headers=headers)

    def __enter__(self) -> GlowClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: _Call) -> httpx.Response:
        return self._http.request(call.method, call.path, **call.options)

    def healthy(self) -> bool:
        return self._http.get("/healthz").is_success

    def ready(self) -> bool:
        return self._http.get("/readyz").is_success

    def model_info(self) -> ModelInfo:
        return ModelInfo.model_validate(_json(self._http.get("/model")))

    def score(
        self, images: Sequence[bytes], *, resize: bool = False, heatmap: bool = False, heatmap_overlay: bool = False
    ) -> list[ImageScore]:
        """Log-likelihood and anomaly score of each image, in order; ``heatmap``: each with its ``heatmap``
        ([H][W] floats), ``heatmap_overlay``: and a base64 PNG of it drawn over the image."""
        response = self._send(_images_call("/log-likelihood", images, resize, heatmap=heatmap,
                                           heatmap_overlay=heatmap_overlay))
        return LogLikelihoodResponse.model_validate(_json(response)).results

    def encode(self, images: Sequence[bytes], *, resize: bool = False) -> EncodeResponse:
        return EncodeResponse.model_validate(_json(self._send(_images_call("/encode", images, resize))))

    def decode(self, latents: Sequence[Sequence[float]]) -> list[bytes]:
        """PNG bytes of the image of each latent."""
        return _pngs(self._send(_decode_call(latents)))

    def sample(self, n: int = 16, temperature: float = 0.7, seed: int | None = None) -> Samples:
        return _samples(self._send(_sample_call(n, temperature, seed)))


class AsyncGlowClient:
    """Asynchronous client; use as an async context manager, or await :meth:`aclose`.

    ``transport`` lets tests serve an app in-process (``httpx.ASGITransport(app=app)``).
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        headers: dict[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout, headers=headers, transport=transport)

    async def __aenter__(self) -> AsyncGlowClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: _Call) -> httpx.Response:
        return await self._http.request(call.method, call.path, **call.options)

    async def healthy(self) -> bool:
        return (await self._http.get("/healthz")).is_success

    async def ready(self) -> bool:
        return (await self._http.get("/readyz")).is_success

    async def model_info(self) -> ModelInfo:
        return ModelInfo.model_validate(_json(await self._http.get("/model")))

    async def score(
        self, images: Sequence[bytes], *, resize: bool = False, heatmap: bool = False, heatmap_overlay: bool = False
    ) -> list[ImageScore]:
        """Log-likelihood and anomaly score of each image, in order; ``heatmap`` and ``heatmap_overlay`` as in
        :meth:`GlowClient.score`."""
        response = await self._send(_images_call("/log-likelihood", images, resize, heatmap=heatmap,
                                                 heatmap_overlay=heatmap_overlay))
        return LogLikelihoodResponse.model_validate(_json(response)).results

    async def encode(self, images: Sequence[bytes], *, resize: bool = False) -> EncodeResponse:
        return EncodeResponse.model_validate(_json(await self._send(_images_call("/encode", images, resize))))

    async def decode(self, latents: Sequence[Sequence[float]]) -> list[bytes]:
        """PNG bytes of the image of each latent."""
        return _pngs(await self._send(_decode_call(latents)))

    async def sample(self, n: int = 16, temperature: float = 0.7, seed: int | None = None) -> Samples:
        return _samples(await self._send(_sample_call(n, temperature, seed)))
