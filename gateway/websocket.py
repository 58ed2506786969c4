"""The WebSocket transport: a thin aiohttp loop around ``Connection``.

Reading goes through aiohttp, with back-pressure (a client whose replies back up is not
read); writing is ``gateway.websocket_writer``'s (a loop-iteration flush straight to the
transport, a writer task for slow sockets); teardown is the same for every way a connection
ends.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import WSMsgType, web

from gateway.connection import Connection
from gateway.http import error_response
from gateway.metrics import METRICS
from gateway.services import GatewayServices
from gateway.websocket_writer import DirectWriter, FlushScheduler, write_slowly
from realtime_protocol.errors import ErrorCode
from shared.session import CLOSE_GOING_AWAY, CLOSE_NORMAL, CLOSE_TRY_AGAIN_LATER
from shared.settings import Settings

__all__ = ["serve_websocket"]

log = logging.getLogger(__name__)

_WRITE_DRAIN_TIMEOUT_S = 5.0
# How often a reader paused by back-pressure checks whether the client went away.
_PAUSED_CHECK_S = 0.5


async def serve_websocket(
    request: web.Request, services: GatewayServices, scheduler: FlushScheduler
) -> web.StreamResponse:
    """Accept a WebSocket on any path and run one connection until it ends.

    Every way a connection ends (client close, server close, reset, overflow, an unexpected
    error) runs the same teardown: the writer is given a bounded time to send the close
    frame, the transport is aborted if it could not, and ``Connection.finish`` always runs.
    A draining gateway refuses the upgrade (503, 50001): the client retries, and the load
    balancer, which saw ``/readyz`` fail, sends it to another gateway.
    """
    if services.draining:
        return error_response(
            ErrorCode.BOOTSTRAP, "gateway draining, connect to another one", status=503
        )
    settings = services.settings
    # Compression off: permessage-deflate roughly doubles fan-out CPU (measured in aiohttp:
    # 4.9 -> 10.5 CPU-s per 1M deliveries to 1,000 connections), and browsers always offer it.
    # aiohttp's own size cap sits well above the protocol's limit so that an oversized frame
    # gets a 40001 err instead of a closed socket.
    socket = web.WebSocketResponse(
        compress=False,
        max_msg_size=max(4 * settings.max_frame_bytes, 1024 * 1024),
        autoping=True,
    )
    try:
        await socket.prepare(request)
    except ValueError:
        # aiohttp 3.14 raises (a 500 and a traceback) on non-ASCII bytes in the key, version
        # or Connection header instead of refusing them (found by tests/integration/
        # test_floods.py's handshake fuzzing). UnicodeError is a ValueError.
        return error_response(ErrorCode.BAD_FRAME, "malformed WebSocket handshake", status=400)
    except ConnectionError:
        # The client left before the 101 was written: nobody to answer.
        return web.Response(status=499)
    connection = Connection(services, "websocket")
    transport = request.transport
    direct: DirectWriter | None = None
    if transport is not None:
        direct = DirectWriter(connection, transport, scheduler)
        connection.outbox.on_ready = direct.ready
    slow = _SlowPath(socket, connection, direct)
    if direct is None:
        slow.start()
    else:
        direct.on_slow = slow.start
    connection.outbox.on_overflow = lambda: _overflowed(connection, slow)
    connection.outbox.on_close = lambda: _bound_close(slow.start(), transport)
    loop = asyncio.get_running_loop()
    watchdog = _SilenceWatch(connection, settings)
    graceful = False
    outbox = connection.outbox
    try:
        while not connection.is_closing:
            if outbox.backed_up:
                # The client does not read its replies: stop reading its requests until it
                # does, so TCP pushes back on it instead of our memory growing. While paused
                # nothing reads the socket's end, so look at the transport now and then.
                await outbox.wait_drained(_PAUSED_CHECK_S)
                if transport is not None and transport.is_closing():
                    break
                continue
            message = await socket.receive()
            watchdog.last_seen = loop.time()
            if message.type is WSMsgType.BINARY:
                await connection.receive(message.data, is_text=False)
            elif message.type is WSMsgType.TEXT:
                await connection.receive(message.data.encode(), is_text=True)
            else:
                # A deliberate close by the client ends its presence at once; a dropped link
                # keeps it for the grace period (close, closed or error, e.g. aiohttp's cap).
                # So does a close the server started (a drain, an expired token): the client
                # only echoes our code, and it will be back.
                graceful = (
                    message.type is WSMsgType.CLOSE
                    and message.data in (CLOSE_NORMAL, CLOSE_GOING_AWAY)
                    and not connection.is_closing
                )
                break
    except (ConnectionError, asyncio.CancelledError):
        pass
    except Exception:
        log.exception("connection %s failed", connection.session.connection_id or "(no id yet)")
    finally:
        watchdog.cancel()
        connection.close(connection.close_code, connection.close_reason)
        writer = slow.start()  # it sends the close frame
        try:
            await asyncio.wait_for(asyncio.shield(writer), _WRITE_DRAIN_TIMEOUT_S)
        except BaseException:  # whatever happened (timeout, cancel), tear down below
            writer.cancel()
        if transport is not None and transport.get_write_buffer_size():
            # Bytes the client never read would keep the socket (and its memory) alive.
            transport.abort()
        await connection.finish(graceful)
    return socket


class _SlowPath:
    """The connection's writer task (``write_slowly``), started only when it is needed: a
    backed-up socket, an overflow, or the close (it sends the close frame). Until then the
    direct path writes everything, and an idle connection carries no writer task (~1.5 KB
    of every idle connection, issue 15)."""

    __slots__ = ("_connection", "_direct", "_socket", "task")

    def __init__(
        self,
        socket: web.WebSocketResponse,
        connection: Connection,
        direct: DirectWriter | None,
    ) -> None:
        self._socket = socket
        self._connection = connection
        self._direct = direct
        self.task: asyncio.Task[None] | None = None

    def start(self) -> asyncio.Task[None]:
        """The writer task, started on the first call."""
        if self.task is None:
            self.task = asyncio.create_task(
                write_slowly(self._socket, self._connection, self._direct)
            )
        return self.task


def _overflowed(connection: Connection, slow: _SlowPath) -> None:
    """The client stopped reading and its queue passed twice the bound: close it (1013).

    The queued data is already discarded; a writer that was running, possibly stuck
    waiting for the socket to drain, is cancelled and tries the close frame for a bounded
    time, then aborts. One that the close starts now has nothing to wait for: it sends the
    close frame (cancelling it before its first step would skip that)."""
    METRICS.slow_consumer_disconnects.inc()
    running = slow.task
    connection.close(CLOSE_TRY_AGAIN_LATER, "slow consumer")
    if running is not None:
        running.cancel()


def _bound_close(writer: asyncio.Task[None], transport: asyncio.Transport | None) -> None:
    """The connection started closing (an expired or revoked credential, silence, a
    drain): if its writer is still stuck behind a client that does not read after
    ``_WRITE_DRAIN_TIMEOUT_S``, cancel it and drop the socket, which also wakes the reader.
    Without this, a stalled subscriber kept its slot, outbox and socket buffers for as
    long as its peer stayed silent (test_floods.py)."""

    def expire() -> None:
        if not writer.done():
            writer.cancel()
        if transport is not None and not transport.is_closing():
            transport.abort()

    asyncio.get_running_loop().call_later(_WRITE_DRAIN_TIMEOUT_S, expire)


class _SilenceWatch:
    """Closes a socket that sent no auth in time, or went silent for longer than a pinging
    client ever does (two keep-alive intervals and 10 s). One timer per connection, re-armed
    for what remains, instead of a timeout around every receive; and a timer callback, not
    a task per connection, which saved ~1.5 KB of every idle connection (issue 15)."""

    __slots__ = ("_connection", "_handle", "_idle_timeout", "_settings", "last_seen")

    def __init__(self, connection: Connection, settings: Settings) -> None:
        loop = asyncio.get_running_loop()
        self._connection = connection
        self._settings = settings
        self._idle_timeout = 2 * settings.keep_alive_ms / 1000 + 10
        self.last_seen = loop.time()
        self._handle: asyncio.TimerHandle | None = loop.call_later(
            settings.auth_timeout_s, self._check
        )

    def _check(self) -> None:
        connection = self._connection
        self._handle = None
        if connection.is_closing:
            return
        allowed = self._idle_timeout if connection.is_connected else self._settings.auth_timeout_s
        loop = asyncio.get_running_loop()
        remaining = self.last_seen + allowed - loop.time()
        if remaining <= 0:
            reason = "idle timeout" if connection.is_connected else "no auth frame in time"
            connection.close(CLOSE_NORMAL, reason)
            return
        self._handle = loop.call_later(remaining, self._check)

    def cancel(self) -> None:
        """Stop watching (the connection is over)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
