"""A lean path for the image endpoints (``POST /log-likelihood``, ``POST /encode`` and their ``/models/{name}``
forms): pure ASGI, calling the routes' own endpoint functions.

FastAPI's path for a request matches routes, solves the endpoint's dependencies, validates its
parameters, runs its own middleware layers and validates the returned model a second time before
serialising it: on the hot endpoints, most of the event loop's time per request (bench/README.md,
"Serving overhead"). The lane calls the same dependency and endpoint functions itself (``service.routes``) and serialises
the returned model once, with the route's own options.

It takes a request only when it can parse the query exactly as FastAPI would: every parameter
one of the endpoint's boolean flags, given once, spelled as pydantic accepts a boolean. Anything
else (another path or method, an unknown, repeated or invalid parameter) goes to the app
untouched, body unread, so FastAPI answers it (a 422 names the bad parameter). An exception
goes through the app's own exception handlers, so every error status and body is the one the
app would send. ``scope["route"]`` is the matched route, so metrics and the access log name
the route template as for any request.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import parse_qsl

from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

MODELS_PREFIX = "/models/"
TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})  # pydantic's lax booleans, case-insensitive
FALSE = frozenset({"0", "off", "f", "false", "n", "no"})

ModelResolver = Callable[[Request], Awaitable[Any]]


class Lane:
    """One endpoint the lane serves: its routes (default and named), endpoint function and boolean flags."""

    def __init__(self, default: APIRoute, named: APIRoute) -> None:
        self.default, self.named = default, named
        self.endpoint = default.endpoint
        self.flags = frozenset(
            name for name, parameter in inspect.signature(self.endpoint).parameters.items()
            if isinstance(parameter.default, bool)
        )
        self.exclude_none = default.response_model_exclude_none

    def flags_of(self, query_string: bytes) -> dict[str, bool] | None:
        """The query's flags as the endpoint takes them, or None when FastAPI should parse the query."""
        flags: dict[str, bool] = {}
        for key, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
            spelled = value.lower()
            if key not in self.flags or key in flags or (spelled not in TRUE and spelled not in FALSE):
                return None
            flags[key] = spelled in TRUE
        return flags


class FastLaneMiddleware:
    """Serves ``POST`` to the lanes' paths through their endpoint functions; everything else goes to ``app``.

    ``routes``: the routes of the app (the lanes are found by path and method); ``resolve_model(request)``: the
    model a request addresses, or the HTTPException the routes' dependencies raise (503 not
    ready, 404 unknown name).
    """

    def __init__(self, app: ASGIApp, routes: Sequence[Any], paths: Sequence[str], resolve_model: ModelResolver) -> None:
        self.app = app
        self.resolve_model = resolve_model
        posts = {route.path: route for route in routes if isinstance(route, APIRoute) and route.methods == {"POST"}}
        self.lanes = {path: Lane(posts[path], posts[MODELS_PREFIX + "{name}" + path]) for path in paths}

    def match(self, path: str) -> tuple[Lane, str | None] | None:
        """The lane of a request path and the model name in it (None: the default model)."""
        if path.startswith(MODELS_PREFIX):
            name, slash, rest = path[len(MODELS_PREFIX):].partition("/")
            lane = self.lanes.get(slash + rest)
            return None if lane is None or not name else (lane, name)
        lane = self.lanes.get(path)
        return None if lane is None else (lane, None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        matched = self.match(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        flags = None if matched is None else matched[0].flags_of(scope.get("query_string", b""))
        if matched is None or flags is None:
            await self.app(scope, receive, send)
            return
        lane, name = matched
        scope["route"] = lane.default if name is None else lane.named
        scope["path_params"] = {} if name is None else {"name": name}
        request = Request(scope, receive)
        try:
            model = await self.resolve_model(request)
            result: BaseModel = await lane.endpoint(request, model, **flags)
            response = Response(result.model_dump_json(exclude_none=lane.exclude_none), media_type="application/json")
        except Exception as exc:
            handler = _handler_for(scope["app"].exception_handlers, exc)
            if handler is None:
                raise
            response = await handler(request, exc)
        await response(scope, receive, send)


def _handler_for(handlers: dict[Any, Callable[..., Awaitable[Response]]], exc: Exception) -> Any:
    """The app's handler of ``exc``'s class or its nearest base with one, as Starlette looks it up."""
    for cls in type(exc).__mro__:
        if cls in handlers:
            return handlers[cls]
    return None
