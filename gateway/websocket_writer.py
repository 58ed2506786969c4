"""Writing to WebSocket clients: the loop-iteration flush, the direct writer and the slow path.

While a socket keeps up, queued frames are written straight to its transport at the end of
the event-loop iteration (``FlushScheduler``), framed here (server frames: no mask, no
compression), so a fan-out costs one write per connection and no task switch. When the
socket's buffer backs up, a writer task (``write_slowly``) waits for it to drain and takes
over until it has; it also closes the socket at the end, within a bounded time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from aiohttp import WSMsgType, web

from gateway.connection import Connection
from shared.session import Codec
from shared.websocket_frames import OPCODE_BINARY, OPCODE_TEXT, frame_header

__all__ = ["DirectWriter", "FlushScheduler", "write_slowly"]

log = logging.getLogger(__name__)

# How long the close handshake may take before the transport is aborted.
_CLOSE_TIMEOUT_S = 2.0
# Above this many unsent bytes in the transport, stop writing directly and wait for drain.
_TRANSPORT_HIGH_WATER = 256 * 1024
_TRANSPORT_LOW_WATER = 64 * 1024
_DRAIN_POLL_S = 0.002


class FlushScheduler:
    """Runs each marked sink's ``flush`` once, at the end of the current event-loop
    iteration: everything queued for a connection during the iteration (a burst of live
    messages, several acks) leaves in one write, and a lone message leaves at once.

    This replaces one writer-task wake-up per connection per message, which made a fan-out to
    N connections cost N task switches per message. It also frames messages: a fan-out hands
    the very same bytes object to every connection in one flush, so it is framed once.
    """

    def __init__(self) -> None:
        self._marked: list[Callable[[], None]] = []
        self._scheduled = False
        self._last_message = b""
        self._last_frame = b""

    def mark(self, flush: Callable[[], None]) -> None:
        """Call ``flush`` at the end of this iteration (callers mark each sink once)."""
        self._marked.append(flush)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._run)

    def _run(self) -> None:
        marked, self._marked = self._marked, []
        self._scheduled = False
        for flush in marked:
            flush()

    def framed(self, message: bytes, opcode: int) -> bytes:
        """``message`` as one server frame, reusing the last framing for the same object."""
        if message is self._last_message and self._last_frame[0] & 0x0F == opcode:
            return self._last_frame
        self._last_message = message
        self._last_frame = frame_header(len(message), opcode) + message
        return self._last_frame


class DirectWriter:
    """Writes a connection's outbox to its transport at the end of the loop iteration."""

    __slots__ = ("backed_up", "connection", "on_slow", "scheduler", "transport")

    def __init__(
        self, connection: Connection, transport: asyncio.Transport, scheduler: FlushScheduler
    ) -> None:
        self.connection = connection
        self.transport = transport
        self.scheduler = scheduler
        self.backed_up = False
        # Starts the slow path's task (``write_slowly``) if it is not running yet.
        self.on_slow: Callable[[], object] | None = None

    def ready(self) -> None:
        """The outbox got its first frame: flush at the end of this iteration."""
        self.scheduler.mark(self.flush)

    def flush(self) -> None:
        """Write what is queued, unless the socket is backed up (then the slow path)."""
        outbox = self.connection.outbox
        transport = self.transport
        if self.backed_up or outbox.closed or transport.is_closing():
            self._slow()  # the writer task handles slow sockets, overflow and closing
            return
        if transport.get_write_buffer_size() > _TRANSPORT_HIGH_WATER:
            self.backed_up = True
            self._slow()
            return
        opcode = OPCODE_TEXT if self.connection.session.codec is Codec.JSON else OPCODE_BINARY
        framed = self.scheduler.framed
        for message in outbox.take():
            transport.write(framed(message, opcode))

    def _slow(self) -> None:
        if self.on_slow is not None:
            self.on_slow()
        self.connection.outbox.wake()


async def write_slowly(
    socket: web.WebSocketResponse, connection: Connection, direct: DirectWriter | None
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
                    and not connection.is_closing
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
        if direct is not None and direct.transport.get_write_buffer_size():
            # Bytes the client never read would keep the socket (and its reader) alive.
            direct.transport.abort()
