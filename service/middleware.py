"""Pure ASGI middleware: request IDs, one access-log line and metrics per request, the body-size limit.

Pure ASGI (not ``BaseHTTPMiddleware``) so request bodies stream through untouched and
the request's task is the handler's own (a client's disconnect reaches the handler).
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import time
import uuid

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


class BodyTooLarge(Exception):
    """The request body is larger than the server accepts."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body exceeds the limit of {limit} bytes")


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
        request_id = client_id if CLIENT_REQUEST_ID.fullmatch(client_id) else f"{_ID_PREFIX}{next(_ID_COUNTER):012x}"
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


class BodyLimitMiddleware:
    """Refuses bodies over ``max_body_bytes`` with 413: at once from Content-Length, or while streaming."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None and not length.isdigit():
            await _error(400, f"invalid Content-Length header {length!r}")(scope, receive, send)
            return
        if length is not None and int(length) > self.max_body_bytes:
            await _error(413, str(BodyTooLarge(self.max_body_bytes)))(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        await self.app(scope, counting_receive, send)


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)
