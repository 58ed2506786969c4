"""The WebSocket transport: a thin aiohttp loop around ``Connection``."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiohttp import WSMsgType, web

from gateway.connection import Connection
from gateway.services import GatewayServices
from shared.session import CLOSE_GOING_AWAY, CLOSE_NORMAL, CLOSE_TRY_AGAIN_LATER, Codec

__all__ = ["serve_websocket"]

log = logging.getLogger(__name__)

_WRITE_DRAIN_TIMEOUT_S = 5.0


async def serve_websocket(request: web.Request, services: GatewayServices) -> web.WebSocketResponse:
    """Accept a WebSocket on any path and run one connection until it ends."""
    settings = services.settings
    # Compression off: permessage-deflate doubles fan-out CPU (../shared/NOTES-STACK.md), and
    # browsers always offer it. aiohttp's own size cap sits well above the protocol's limit
    # so that an oversized frame gets a 40001 err instead of a closed socket.
    socket = web.WebSocketResponse(
        compress=False,
        max_msg_size=max(4 * settings.max_frame_bytes, 1024 * 1024),
        autoping=True,
    )
    await socket.prepare(request)
    connection = Connection(services, "websocket")
    writer = asyncio.create_task(_write(socket, connection))
    # Clients that ping stay under keepAliveMs of silence; allow two intervals and 10 s.
    idle_timeout = 2 * settings.keep_alive_ms / 1000 + 10
    timeout = settings.auth_timeout_s
    graceful = False
    try:
        while not connection.is_closing:
            message = await socket.receive(timeout=timeout)
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
            if connection.is_connected:
                timeout = idle_timeout
    except TimeoutError:
        reason = "idle timeout" if connection.is_connected else "no auth frame in time"
        connection.close(CLOSE_NORMAL, reason)
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        connection.close(connection.close_code, connection.close_reason)
        try:
            await asyncio.wait_for(writer, _WRITE_DRAIN_TIMEOUT_S)
        except (TimeoutError, asyncio.CancelledError):
            writer.cancel()
        await connection.finish(graceful)
    return socket


async def _write(socket: web.WebSocketResponse, connection: Connection) -> None:
    outbox = connection.outbox
    try:
        while True:
            messages = await outbox.get()
            if not messages:
                break
            if outbox.overflowed:
                connection.close(CLOSE_TRY_AGAIN_LATER, "slow consumer")
                break
            opcode = WSMsgType.TEXT if connection.session.codec is Codec.JSON else WSMsgType.BINARY
            for message in messages:
                await socket.send_frame(message, opcode)
    except (ConnectionResetError, RuntimeError) as error:
        log.debug("write ended: %s", error)
    finally:
        with contextlib.suppress(Exception):
            await socket.close(
                code=connection.close_code, message=connection.close_reason.encode()[:120]
            )
