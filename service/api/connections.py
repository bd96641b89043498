"""Slow and idle clients: the bounds uvicorn itself lacks, at the connection level.

uvicorn closes a keep-alive connection idle for ``timeout_keep_alive`` seconds, but it
waits forever for a request to arrive: a client that opens connections and sends nothing,
or trickles its headers or body a byte a second, holds them as long as it likes. And a
request it cannot parse gets a plain-text 400. ``guarded_protocol`` is uvicorn's httptools
protocol with three additions:

* a request must arrive whole (headers and body) within ``read_timeout_s`` of its first
  byte, and a new connection must start one within that time; else the client gets a JSON
  408 (when nothing was answered yet) and the connection is closed;
* at most ``max_idle`` keep-alive connections wait idle: beyond it, a connection whose
  response is complete is closed at once instead of kept;
* a malformed request (bad header bytes, a broken request line) gets a JSON 400.

``server_options(settings)`` are the ``uvicorn.Config`` arguments that install it. Behind a
reverse proxy the proxy's own timeouts come first (deploy/README.md)."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from service.config import Settings

log = logging.getLogger("ufcal.connections")


def _json_reply(status: bytes, detail: str) -> bytes:
    body = json.dumps({"detail": detail}).encode()
    return (
        b"HTTP/1.1 " + status + b"\r\n"
        b"content-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n"
        b"connection: close\r\n\r\n" + body
    )


def guarded_protocol(read_timeout_s: float, max_idle: int) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with the bounds above (a class per configuration)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    idle: set[Any] = set()
    timeout_reply = _json_reply(
        b"408 Request Timeout",
        f"the request did not arrive within UFCAL_REQUEST_READ_TIMEOUT_S={read_timeout_s:g} s",
    )

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        _read_deadline: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._read_deadline = self.loop.call_later(read_timeout_s, self._read_expired)

        def _disarm(self) -> None:
            if self._read_deadline is not None:
                self._read_deadline.cancel()
                self._read_deadline = None

        def _read_expired(self) -> None:
            self._read_deadline = None
            if self.transport.is_closing():
                return
            cycle = self.cycle
            running = cycle is not None and not cycle.response_complete
            if not (running and cycle.response_started):  # nothing answered yet: 408
                if running:  # the app waits for the body: it sees a disconnect, sends nothing
                    cycle.disconnected = True
                    cycle.message_event.set()
                self.transport.write(timeout_reply)
            log.info("slow request closed", extra={"fields": {"timeout_s": read_timeout_s}})
            self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()  # a new connection must start a request in time

        def data_received(self, data: bytes) -> None:
            idle.discard(self)
            super().data_received(data)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()  # each request's clock starts at its first byte

        def on_message_complete(self) -> None:
            self._disarm()
            super().on_message_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.transport.is_closing() or self.pipeline:
                return
            if len(idle) >= max_idle:
                self.transport.close()  # enough idle connections are held already
            else:
                idle.add(self)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            idle.discard(self)
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            self._disarm()
            if not self.transport.is_closing():
                self.transport.write(_json_reply(b"400 Bad Request", msg))
                self.transport.close()

    return GuardedHttpToolsProtocol


def server_options(settings: Settings) -> dict[str, Any]:
    """The ``uvicorn.Config`` arguments bounding slow and idle clients."""
    return {
        "http": guarded_protocol(settings.request_read_timeout_s, settings.max_idle_connections),
        "timeout_keep_alive": settings.keepalive_timeout_s,
    }
