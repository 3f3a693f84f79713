"""Pure ASGI middleware: request IDs, one access-log line and metrics per request, admission, body limits, HEAD.

Pure ASGI (not ``BaseHTTPMiddleware``) so request bodies stream through untouched and
the request's task is the handler's own (a client's disconnect reaches the handler).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import time
import uuid
from collections.abc import Callable

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import Metrics

REQUEST_ID_HEADER = "X-Request-ID"
CLIENT_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,200}")  # echoed when visible ASCII of sane length
# Our own IDs: a random prefix per process and a counter, 32 hex digits. Unique, not secret; a
# uuid4 per request (an os.urandom call) took 5% of the event loop's time at concurrency 64.
_ID_PREFIX = uuid.uuid4().hex[:20]
_ID_COUNTER = itertools.count()

access_log = logging.getLogger("service.access")


def new_request_id() -> str:
    """An ID for a request whose client sent none usable: this process's prefix and a counter."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):012x}"


PROBES = ("/healthz", "/readyz", "/metrics")  # never limited: they must answer while the service is busy
CLOSE = (b"connection", b"close")


class BodyTooLarge(Exception):
    """The request body is larger than the server accepts."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body exceeds the limit of {limit} bytes for this endpoint")


class BodyTimeout(Exception):
    """The client did not send its whole body in time."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"the request body did not arrive within {seconds:g} s; the connection is closed")


class RequestContextMiddleware:
    """Gives every HTTP request an ID (echoing the client's X-Request-ID), logs it and counts it.

    An exception that escapes the app is logged with its traceback and answered as a
    500 ``{"detail": ...}`` that names the request ID (a 500 is always a bug).
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client_id = Headers(scope=scope).get(REQUEST_ID_HEADER, "")
        request_id = client_id if CLIENT_REQUEST_ID.fullmatch(client_id) else new_request_id()
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        started = time.perf_counter()
        status = 499  # client closed the request before an answer started
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status, response_started = message["status"], True
                MutableHeaders(scope=message).append(REQUEST_ID_HEADER, request_id)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            access_log.exception("unhandled error in request %s", request_id)
            status = 500
            if not response_started:
                response = JSONResponse(
                    {"detail": f"internal server error (request {request_id}); this is a bug, please report it"},
                    status_code=500,
                )
                await response(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            route = scope.get("route")
            endpoint = getattr(route, "path", "unmatched")
            self.metrics.observe_request(endpoint, status, seconds, model=state.get("model", ""))
            access_log.info(
                json.dumps(
                    {
                        "request_id": request_id,
                        "method": scope["method"],
                        "endpoint": endpoint,
                        "model": state.get("model", ""),
                        "status": status,
                        "images": state.get("images", 0),
                        "latency_ms": round(seconds * 1000, 3),
                    }
                )
            )


class AdmissionMiddleware:
    """At most ``max_in_flight`` requests handled at once (probes aside), and ``Connection: close`` while stopping.

    A request beyond the limit is answered 503 with Retry-After before its body is read. Once
    ``stopping()`` is true every response closes its connection, so that no keep-alive
    connection is left idle for the server to close under a client's next request.
    """

    def __init__(self, app: ASGIApp, max_in_flight: int, stopping: Callable[[], bool]) -> None:
        self.app = app
        self.max_in_flight = max_in_flight
        self.stopping = stopping
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start" and self.stopping():
                message.setdefault("headers", [])
                MutableHeaders(scope=message)["connection"] = "close"
            await send(message)

        if scope["path"].endswith(PROBES):
            await self.app(scope, receive, send_closing)
            return
        if self.in_flight >= self.max_in_flight:
            response = JSONResponse(
                {"detail": f"{self.in_flight} requests in flight, at most {self.max_in_flight}; retry later"},
                status_code=503, headers={"Retry-After": "1"},
            )
            await response(scope, receive, send_closing)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send_closing)
        finally:
            self.in_flight -= 1


class BodyLimitMiddleware:
    """Bodies over their endpoint's cap get 413, at once from Content-Length or while streaming; a body
    that takes longer than ``body_timeout_s`` to arrive gets 408 and its connection closed.

    ``cap_for(path)`` is the cap of a path in bytes, or None while none is known (the model is not
    loaded: every route answers 503 before reading a body). Once the body is complete, later
    ``receive`` calls (waiting for a disconnect) are not timed.
    """

    def __init__(self, app: ASGIApp, cap_for: Callable[[str], int | None], body_timeout_s: float) -> None:
        self.app = app
        self.cap_for = cap_for
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cap = self.cap_for(scope["path"])
        length = Headers(scope=scope).get("content-length")
        if length is not None and not length.isdigit():
            await _error(400, f"invalid Content-Length header {length!r}")(scope, receive, send)
            return
        if cap is not None and length is not None and int(length) > cap:
            await _error(413, str(BodyTooLarge(cap)))(scope, receive, send)
            return
        received = 0
        complete = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout_s

        async def guarded_receive() -> Message:
            nonlocal received, complete
            if complete:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise BodyTimeout(self.body_timeout_s) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if cap is not None and received > cap:
                    raise BodyTooLarge(cap)
            else:
                complete = True
            return message

        await self.app(scope, guarded_receive, send)


class HeadMiddleware:
    """HEAD answered as GET without its body: a server supports HEAD wherever it supports GET (RFC 9110,
    section 9.3.2), and FastAPI's GET routes do not. The status and headers, Content-Length included, are GET's.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def without_body(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, without_body)


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)
