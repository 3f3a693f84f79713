"""uvicorn's HTTP/1.1 protocol (h11) with a deadline on request heads and a shutdown that drops no request.

- A connection must deliver a complete request head within ``header_timeout_s`` of
  opening or of its last response: a head that stalls half-sent (slowloris) is answered
  408 and closed; a connection that sends nothing is closed (uvicorn's keep-alive timeout
  does the same between requests). Bodies have their own deadline
  (``service.middleware.BodyLimitMiddleware``).
- At shutdown uvicorn closes every connection with no request in progress. One whose
  next request has partly arrived (bytes in the parser's buffer) is left open instead:
  the request completes and is answered (503 with ``Connection: close`` while the
  service stops), or its head deadline answers 408. Only connections with nothing
  received are closed.
"""

from __future__ import annotations

import asyncio
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

TIMEOUT_BODY = json.dumps({"detail": "the request head did not arrive in time; the connection is closed"}).encode()
REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    + f"content-length: {len(TIMEOUT_BODY)}\r\n\r\n".encode()
    + TIMEOUT_BODY
)


class GuardedH11Protocol(H11Protocol):
    """H11Protocol with a request-head deadline and a shutdown that waits for partly received requests."""

    header_timeout_s = 10.0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[arg-type]
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_timer()

    def handle_events(self) -> None:
        super().handle_events()
        if self._request_in_progress():
            self._cancel_head_timer()

    def shutdown(self) -> None:
        if not self._request_in_progress() and self._partly_received():
            return  # its request completes (and closes the connection) or times out
        super().shutdown()

    def _request_in_progress(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _partly_received(self) -> bool:
        return bool(self.conn.trailing_data[0]) or self.conn.their_state not in (h11.IDLE, h11.DONE)

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        if not self.transport.is_closing():
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
            self.transport.write(REQUEST_TIMEOUT)
        self.transport.close()


def guarded_protocol(header_timeout_s: float) -> type[GuardedH11Protocol]:
    """The protocol class to give ``uvicorn.Config(http=...)``, with this head deadline."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"header_timeout_s": header_timeout_s})
