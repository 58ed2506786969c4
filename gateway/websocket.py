"""The WebSocket transport: a thin aiohttp loop around ``Connection``.

Reading goes through aiohttp. Writing is split: while the socket keeps up, queued frames are
written straight to the transport by the loop-iteration flush (``FlushScheduler``), framed
here (server frames: no mask, no compression), so a fan-out costs one write per connection
and no task switch; when the socket's buffer backs up, a writer task waits for it to drain
and takes over until it has.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct

from aiohttp import WSMsgType, web

from gateway.connection import Connection
from gateway.outbox import FlushScheduler
from gateway.services import GatewayServices
from shared.session import CLOSE_GOING_AWAY, CLOSE_NORMAL, CLOSE_TRY_AGAIN_LATER, Codec
from shared.settings import Settings

__all__ = ["serve_websocket"]

log = logging.getLogger(__name__)

_WRITE_DRAIN_TIMEOUT_S = 5.0
# How long the close handshake may take before the transport is aborted.
_CLOSE_TIMEOUT_S = 2.0
# How often a reader paused by back-pressure checks whether the client went away.
_PAUSED_CHECK_S = 0.5
# Above this many unsent bytes in the transport, stop writing directly and wait for drain.
_TRANSPORT_HIGH_WATER = 256 * 1024
_TRANSPORT_LOW_WATER = 64 * 1024
_DRAIN_POLL_S = 0.002
_FLUSHER = FlushScheduler()


def frame_header(length: int, opcode: int) -> bytes:
    """RFC 6455 header of one final, unmasked server frame."""
    if length < 126:
        return bytes((0x80 | opcode, length))
    if length < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, length)
    return struct.pack("!BBQ", 0x80 | opcode, 127, length)


class _DirectWriter:
    """Writes a connection's outbox to its transport at the end of the loop iteration."""

    __slots__ = ("backed_up", "connection", "transport")

    def __init__(self, connection: Connection, transport: asyncio.Transport) -> None:
        self.connection = connection
        self.transport = transport
        self.backed_up = False

    def ready(self) -> None:
        _FLUSHER.mark(self.flush)

    def flush(self) -> None:
        outbox = self.connection.outbox
        transport = self.transport
        if self.backed_up or outbox.closed or transport.is_closing():
            outbox.wake()  # the writer task handles slow sockets, overflow and closing
            return
        if transport.get_write_buffer_size() > _TRANSPORT_HIGH_WATER:
            self.backed_up = True
            outbox.wake()
            return
        opcode = 0x1 if self.connection.session.codec is Codec.JSON else 0x2
        for message in outbox.take():
            transport.write(_framed(message, opcode))


# A fan-out hands the very same bytes object to every connection in one flush: frame it once.
_last_message: bytes = b""
_last_frame: bytes = b""


def _framed(message: bytes, opcode: int) -> bytes:
    global _last_message, _last_frame
    if message is _last_message and _last_frame[0] & 0x0F == opcode:
        return _last_frame
    _last_message = message
    _last_frame = frame_header(len(message), opcode) + message
    return _last_frame


async def serve_websocket(request: web.Request, services: GatewayServices) -> web.WebSocketResponse:
    """Accept a WebSocket on any path and run one connection until it ends.

    Every way a connection ends (client close, server close, reset, overflow, an unexpected
    error) runs the same teardown: the writer is given a bounded time to send the close
    frame, the transport is aborted if it could not, and ``Connection.finish`` always runs.
    """
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
    await socket.prepare(request)
    connection = Connection(services, "websocket")
    transport = request.transport
    direct: _DirectWriter | None = None
    if transport is not None:
        direct = _DirectWriter(connection, transport)
        connection.outbox.on_ready = direct.ready
    writer = asyncio.create_task(_write(socket, connection, direct))
    connection.outbox.on_overflow = lambda: _overflowed(connection, writer)
    loop = asyncio.get_running_loop()
    last_seen = [loop.time()]
    watchdog = asyncio.create_task(_watch_silence(connection, last_seen, settings))
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
            last_seen[0] = loop.time()
            if message.type is WSMsgType.BINARY:
                await connection.receive(message.data, is_text=False)
            elif message.type is WSMsgType.TEXT:
                await connection.receive(message.data.encode(), is_text=True)
            else:
                # A deliberate close by the client ends its presence at once; a dropped link
                # keeps it for the grace period (close, closed or error, e.g. aiohttp's cap).
                graceful = message.type is WSMsgType.CLOSE and message.data in (
                    CLOSE_NORMAL,
                    CLOSE_GOING_AWAY,
                )
                break
    except (ConnectionError, asyncio.CancelledError):
        pass
    except Exception:
        log.exception("connection %s failed", connection.session.connection_id or "(no id yet)")
    finally:
        watchdog.cancel()
        connection.close(connection.close_code, connection.close_reason)
        try:
            await asyncio.wait_for(asyncio.shield(writer), _WRITE_DRAIN_TIMEOUT_S)
        except BaseException:  # whatever happened (timeout, cancel), tear down below
            writer.cancel()
        if transport is not None and transport.get_write_buffer_size():
            # Bytes the client never read would keep the socket (and its memory) alive.
            transport.abort()
        await connection.finish(graceful)
    return socket


def _overflowed(connection: Connection, writer: asyncio.Task[None]) -> None:
    """The client stopped reading and its queue passed twice the bound: close it (1013).

    The queued data is already discarded; the writer, possibly stuck waiting for the socket
    to drain, is cancelled and tries the close frame for a bounded time, then aborts."""
    connection.close(CLOSE_TRY_AGAIN_LATER, "slow consumer")
    writer.cancel()


async def _watch_silence(
    connection: Connection, last_seen: list[float], settings: Settings
) -> None:
    """Close a socket that sent no auth in time, or went silent for longer than a pinging
    client ever does (two keep-alive intervals and 10 s). One timer per connection per
    interval, instead of a timeout armed around every receive."""
    loop = asyncio.get_running_loop()
    idle_timeout = 2 * settings.keep_alive_ms / 1000 + 10
    while not connection.is_closing:
        allowed = idle_timeout if connection.is_connected else settings.auth_timeout_s
        remaining = last_seen[0] + allowed - loop.time()
        if remaining <= 0:
            reason = "idle timeout" if connection.is_connected else "no auth frame in time"
            connection.close(CLOSE_NORMAL, reason)
            return
        await asyncio.sleep(remaining)


async def _write(
    socket: web.WebSocketResponse, connection: Connection, direct: _DirectWriter | None
) -> None:
    """The slow path: wait for a backed-up socket to drain, write what queued meanwhile,
    then hand back to the direct path; and close the socket at the end."""
    outbox = connection.outbox
    try:
        while True:
            messages = await outbox.get()
            if not messages:
                break
            opcode = WSMsgType.TEXT if connection.session.codec is Codec.JSON else WSMsgType.BINARY
            for message in messages:
                await socket.send_frame(message, opcode)
            if direct is not None and direct.backed_up:
                transport = direct.transport
                # aiohttp exposes no drain waiter for writes made outside it; poll the
                # (rare) slow socket instead.
                while (  # noqa: ASYNC110
                    not transport.is_closing()
                    and transport.get_write_buffer_size() > _TRANSPORT_LOW_WATER
                ):
                    await asyncio.sleep(_DRAIN_POLL_S)
                if not outbox.pending:
                    direct.backed_up = False
    except (ConnectionError, RuntimeError, asyncio.CancelledError) as error:
        # ConnectionError covers aiohttp's "Connection lost" as well as resets.
        log.debug("write ended: %r", error)
    finally:
        # However the writing ended, the connection ends: the reader may be paused waiting
        # for this queue to drain.
        connection.close(connection.close_code, connection.close_reason)
        outbox.discard()
        # A client that does not read never answers the close frame: bounded wait.
        with contextlib.suppress(BaseException):
            async with asyncio.timeout(_CLOSE_TIMEOUT_S):
                await socket.close(
                    code=connection.close_code, message=connection.close_reason.encode()[:120]
                )
