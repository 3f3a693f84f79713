"""uvicorn's HTTP/1.1 protocol (h11) with a deadline on request heads and a shutdown that drops no request.

- A connection must deliver a complete request head within ``header_timeout_s`` of
  opening or of its last response: a head that stalls half-sent (slowloris) is answered
  408 and closed; a connection that sends nothing is closed (uvicorn's keep-alive timeout
  does the same between requests). Bodies have their own deadline
  (``service.middleware.BodyLimitMiddleware``).
- What this layer answers itself (that 408, and the 400 for bytes h11 refuses as HTTP/1.1)
  is ``{"detail": ...}`` with an ``X-Request-ID``, as every response of the app.
- Closing is lingering (Apache's lingering close): the server half-closes (FIN after the
  last response) and discards what the client still sends for up to ``LINGER_S`` or until
  the client closes. A plain close with unread bytes in the socket (the rest of a body
  refused early with 413 or 503) makes the kernel send RST, which can destroy the
  response before the client reads it: a request answered, yet seen as a reset.
- At shutdown uvicorn closes every connection with no request in progress. Here a
  connection whose next request has partly arrived (bytes in the parser's buffer) is
  left open: the request completes and is answered (503 with ``Connection: close``
  while the service stops), or its head deadline answers 408. An idle connection is
  closed only after ``SHUTDOWN_QUIET_S`` with nothing received: a request its client
  sent just before (still in the socket, unseen by the parser) is answered instead of
  lost, leaving only the unavoidable race of a send that crosses the server's FIN.
"""

from __future__ import annotations

import asyncio
import json
from typing import cast

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.middleware import REQUEST_ID_HEADER, new_request_id

HEAD_TIMEOUT = "the request head did not arrive in time; the connection is closed"


def refusal(status: int, reason: str, detail: str) -> bytes:
    """A whole response, written below the app: ``{"detail": ...}`` with a request ID, and the connection closed."""
    body = json.dumps({"detail": detail}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n{REQUEST_ID_HEADER.lower()}: {new_request_id()}\r\n\r\n").encode() + body


LINGER_S = 2.0  # longest wait for a client to close after the server's FIN
SHUTDOWN_QUIET_S = 0.5  # an idle connection is closed at shutdown after this long with nothing received


class LingeringTransport:
    """A transport whose ``close`` is the protocol's lingering close; everything else passes through."""

    def __init__(self, transport: asyncio.Transport, protocol: GuardedH11Protocol) -> None:
        self._transport = transport
        self._protocol = protocol

    def __getattr__(self, name: str) -> object:
        return getattr(self._transport, name)

    def close(self) -> None:
        self._protocol.linger()

    def is_closing(self) -> bool:
        return self._protocol.lingering or self._transport.is_closing()


class GuardedH11Protocol(H11Protocol):
    """H11Protocol with a request-head deadline and a shutdown that waits for partly received requests."""

    header_timeout_s = 10.0
    _head_timer: asyncio.TimerHandle | None = None
    lingering = False
    _raw: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        self._raw = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio.Transport subclasses
        super().connection_made(LingeringTransport(self._raw, self))  # type: ignore[arg-type]
        self._arm_head_timer()

    def linger(self) -> None:
        """Half-close now, discard what still arrives, close when the client does or LINGER_S later."""
        if self.lingering or self._raw.is_closing():
            return
        self.lingering = True
        self._cancel_head_timer()
        if not self._raw.can_write_eof():
            self._raw.close()
            return
        try:
            self._raw.write_eof()
        except (OSError, RuntimeError):
            self._raw.close()
            return
        self._raw.resume_reading()
        self.loop.call_later(LINGER_S, self._raw.close)

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            return  # the rest of a refused body, or a request after the last response: discarded
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        self.lingering = False
        super().connection_lost(exc)
        self._raw.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_timer()

    def handle_events(self) -> None:
        super().handle_events()
        if self._request_in_progress():
            self._cancel_head_timer()

    def shutdown(self) -> None:
        if self._request_in_progress():
            super().shutdown()  # closes once answered
        elif not self._partly_received():
            self.loop.call_later(SHUTDOWN_QUIET_S, self._close_if_idle)
        # else: its request completes (and closes the connection) or its head deadline answers 408

    def _close_if_idle(self) -> None:
        if not self.transport.is_closing() and not self._request_in_progress() and not self._partly_received():
            super().shutdown()

    def _request_in_progress(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _partly_received(self) -> bool:
        return bool(self.conn.trailing_data[0]) or self.conn.their_state not in (h11.IDLE, h11.DONE)

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        if not self.transport.is_closing() and not self.lingering:
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timeout)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self._request_in_progress():
            return
        if self._partly_received():
            self.transport.write(refusal(408, "Request Timeout", HEAD_TIMEOUT))
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes that are not HTTP/1.1 (h11 refused them), as JSON with a request ID."""
        self.transport.write(refusal(400, "Bad Request", f"malformed HTTP request: {msg}"))
        self.transport.close()


def guarded_protocol(header_timeout_s: float) -> type[GuardedH11Protocol]:
    """The protocol class to give ``uvicorn.Config(http=...)``, with this head deadline."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"header_timeout_s": header_timeout_s})
