"""The guarded HTTP/1.1 protocol on transports of any event loop (uvloop's are not asyncio.Transport subclasses)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import uvicorn
from uvicorn.server import ServerState

from service.protocol import HEAD_TIMEOUT, guarded_protocol


class DuckTransport:
    """A transport with asyncio.Transport's methods that is not one (as uvloop's TCPTransport)."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = self.eof = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None: ...


def connection(header_timeout_s: float) -> tuple[Any, DuckTransport]:
    """The guarded protocol of an app no request may reach, connected to a duck-typed transport."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("no request reaches the app")

    config = uvicorn.Config(app, http=guarded_protocol(header_timeout_s), loop="asyncio", log_level="critical")
    config.load()
    protocol = config.http_protocol_class(config=config, server_state=ServerState(), app_state={})
    transport = DuckTransport()
    protocol.connection_made(transport)
    return protocol, transport


async def test_a_stalled_head_on_a_duck_typed_transport_is_answered_408_and_closed() -> None:
    protocol, transport = connection(0.05)
    protocol.data_received(b"POST /log-likelihood HTTP/1.1\r\nHost: x\r\n")  # half a head
    await asyncio.sleep(0.2)
    (answer,) = transport.written
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 Request Timeout\r\n") and b"\r\nx-request-id: " in head
    assert json.loads(body) == {"detail": HEAD_TIMEOUT}
    assert transport.eof  # the lingering close: FIN first


async def test_bytes_that_are_not_http_get_a_json_400_with_a_request_id() -> None:
    protocol, transport = connection(5.0)
    protocol.data_received(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 12abc\r\n\r\n")
    (answer,) = transport.written
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n") and b"\r\nx-request-id: " in head
    assert json.loads(body)["detail"].startswith("malformed HTTP request: ")
    assert transport.eof
