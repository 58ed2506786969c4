"""Admission control of TCP connections, in front of aiohttp's HTTP parser.

Two limits (issue 9, item 9):

* Request-head timeout. A connection must deliver each complete HTTP request head within
  ``header_timeout_s`` of becoming ready for it: of being accepted, and on a kept-alive
  connection of the previous handler finishing. aiohttp has no such timeout; the closest it
  comes is its keep-alive timer (an hour by default), so sockets that trickle a partial head
  (slowloris) were held for that long, and the WebSocket auth timeout only starts after the
  upgrade. An idle kept-alive connection is one waiting for its next head, so the same timer
  bounds HTTP keep-alive too.
* Connections per client address. With ``max_per_address`` set, a new connection from an IP
  that already holds that many is closed before aiohttp sees it. 0 means no cap: behind a
  load balancer every client has the balancer's address.

``ConnectionGuard.protocols`` wraps aiohttp's protocol factory (``AppRunner.server``) for
``loop.create_server``; ``ConnectionGuard.middleware`` tells the guard when a request reaches
the application (WebSocket upgrades and plain HTTP alike). Per connection this costs one timer
and one dict counter; reads go straight to aiohttp's protocol, so nothing runs per message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import cast

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from gateway.metrics import METRICS
from shared.limits import Limit

__all__ = ["ConnectionGuard"]

log = logging.getLogger(__name__)


class ConnectionGuard:
    """Times request heads and caps connections per client address for one listener."""

    def __init__(self, header_timeout_s: float, max_per_address: int) -> None:
        self.header_timeout_s = header_timeout_s
        self.max_per_address = max_per_address
        # Open connections per client IP, kept only while capping; an entry goes at zero so
        # a scan of many addresses leaves nothing behind.
        self.per_address: dict[str, int] = {}
        # Connections waiting for a request head, with the timer that closes them.
        self._waiting: dict[asyncio.Transport, asyncio.TimerHandle] = {}
        self._loop = asyncio.get_running_loop()
        self.middleware: Middleware = self._make_middleware()

    def protocols(self, factory: Callable[[], asyncio.Protocol]) -> Callable[[], _Guarded]:
        """A protocol factory for ``loop.create_server`` that guards ``factory``'s protocols."""
        return lambda: _Guarded(self, factory())

    def _make_middleware(self) -> Middleware:
        @web.middleware
        async def request_head_received(
            request: web.Request, handler: Handler
        ) -> web.StreamResponse:
            transport = request.transport
            self._disarm(transport)
            try:
                return await handler(request)
            finally:
                # The connection is now ready for its next request head. After a WebSocket
                # or a non-kept-alive response aiohttp closes it and connection_lost
                # cancels this timer.
                self._arm(transport)

        return request_head_received

    def admit(self, transport: asyncio.Transport) -> str | None:
        """Count a new connection and arm its head timer, or close it at once (the address
        is at its cap) and return None. Returns the address it was counted under."""
        address = ""
        if self.max_per_address > 0:
            peer = transport.get_extra_info("peername")
            # IPv4 and IPv6 peers are (host, port, ...): count the host, not the port.
            address = str(peer[0]) if isinstance(peer, tuple) and peer else ""
            count = self.per_address.get(address, 0)
            if count >= self.max_per_address:
                METRICS.rate_limited[Limit.CONNECTIONS_PER_ADDRESS].inc()
                log.debug("refused a connection: %s holds %d", address, count)
                transport.abort()
                return None
            self.per_address[address] = count + 1
        self._arm(transport)
        return address

    def release(self, transport: asyncio.Transport, address: str) -> None:
        """Forget a closed connection that ``admit`` counted (closed, reset or aborted)."""
        self._disarm(transport)
        if self.max_per_address > 0:
            count = self.per_address[address] - 1
            if count:
                self.per_address[address] = count
            else:
                del self.per_address[address]

    def _arm(self, transport: asyncio.Transport | None) -> None:
        if self.header_timeout_s <= 0 or transport is None or transport.is_closing():
            return
        self._disarm(transport)
        self._waiting[transport] = self._loop.call_later(
            self.header_timeout_s, self._expire, transport
        )

    def _disarm(self, transport: asyncio.Transport | None) -> None:
        timer = self._waiting.pop(transport, None) if transport is not None else None
        if timer is not None:
            timer.cancel()

    def _expire(self, transport: asyncio.Transport) -> None:
        del self._waiting[transport]
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "closed %s: no complete request head within %.1f s",
                transport.get_extra_info("peername"),
                self.header_timeout_s,
            )
        # Abort, not close: nothing is owed to a client that sent no request in time, and a
        # close would wait for it to read whatever is still buffered.
        transport.abort()


class _Guarded(asyncio.Protocol):
    """One accepted connection in front of aiohttp's protocol: admitted (or refused) when it
    is made, released when it is lost; everything in between goes to aiohttp directly."""

    # Instance attributes bound to aiohttp's methods (see __init__), not methods of this class.
    # (mypy: a Callable's parameter has no name, the method's is called "data".)
    data_received: Callable[[bytes], None]  # type: ignore[assignment]
    eof_received: Callable[[], bool | None]
    pause_writing: Callable[[], None]
    resume_writing: Callable[[], None]

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self._guard = guard
        self._inner = inner
        self._transport: asyncio.Transport | None = None
        self._address = ""
        # Reads (every WebSocket frame a client sends) and flow control call the transport's
        # protocol: bound straight to aiohttp's methods they take no hop through this object.
        # Set here, before the transport exists, because uvloop looks data_received up once,
        # when the transport is created.
        self.data_received = inner.data_received
        self.eof_received = inner.eof_received
        self.pause_writing = inner.pause_writing
        self.resume_writing = inner.resume_writing

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Admit the connection and hand it to aiohttp, or leave it closed."""
        # A stream server's transports are read-write transports.
        stream = cast(asyncio.Transport, transport)
        address = self._guard.admit(stream)
        if address is None:
            return  # aborted: aiohttp never hears of it
        self._transport = stream
        self._address = address
        self._inner.connection_made(stream)

    def connection_lost(self, exc: Exception | None) -> None:
        """Release the connection's slot and timer, then let aiohttp clean up."""
        if self._transport is None:
            return
        self._guard.release(self._transport, self._address)
        self._transport = None
        self._inner.connection_lost(exc)
