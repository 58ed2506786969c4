"""A scriptable in-process protocol server for the client's unit tests: it speaks the binary
protocol through the shared codec, records every client frame, and lets a test decide the
handshake answer, withhold acks and pongs, push frames and drop connections."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import websockets
from websockets.asyncio.server import Server, ServerConnection, serve

from realtime_protocol.binary_codec import (
    decode_client_record,
    encode_server_frame,
    frame_record,
    iter_records,
)
from realtime_protocol.frames import (
    AckFrame,
    AuthFrame,
    ClientFrame,
    ConnectedFrame,
    ErrorFrame,
    HistoryFrame,
    HistoryResponseFrame,
    PingFrame,
    PongFrame,
    PresenceFrame,
    PresenceSubscribeFrame,
    PresenceUnsubscribeFrame,
    PublishFrame,
    ServerFrame,
    SubscribeFrame,
    UnsubscribeFrame,
)

Handshake = Callable[[AuthFrame, int], ServerFrame]


class FakeServer:
    """``handshake(auth, attempt)`` picks the answer to each ``auth`` (default: connected,
    reusing ``resumeConnectionId``); requests are acked unless ``ack_requests`` /
    ``ack_publishes`` are off; pings answered unless ``answer_pings`` is off."""

    def __init__(self, keep_alive_ms: int = 15000) -> None:
        self.keep_alive_ms = keep_alive_ms
        self.handshake: Handshake = self._connected
        self.ack_requests = True
        self.ack_publishes = True
        self.answer_pings = True
        self.answer_history = True
        self.frames: list[ClientFrame] = []
        self.auths: list[AuthFrame] = []
        self.sockets: list[ServerConnection] = []
        self.serial = 0
        self.changed = asyncio.Event()
        self._server: Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def start(self) -> FakeServer:
        self._server = await serve(self._serve, "127.0.0.1", 0, compression=None)
        self.port = next(iter(self._server.sockets)).getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def _connected(self, auth: AuthFrame, attempt: int) -> ServerFrame:
        return ConnectedFrame(
            auth.resume_connection_id or f"conn-{attempt}", self.keep_alive_ms, "client-1"
        )

    def of_type(self, kind: type[Any]) -> list[Any]:
        """The client frames of one type received so far, in order."""
        return [frame for frame in self.frames if isinstance(frame, kind)]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait until ``predicate()`` holds (re-checked whenever a frame arrives)."""
        async with asyncio.timeout(timeout):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

    async def push(self, *frames: ServerFrame, socket: int = -1) -> None:
        """Send ``frames`` in one message on the newest (or ``socket``-th) connection."""
        message = b"".join(frame_record(encode_server_frame(frame)) for frame in frames)
        await self.sockets[socket].send(message)

    async def drop(self) -> None:
        """Abort the newest connection (no close frame, as a dead network path)."""
        self.sockets[-1].transport.abort()

    async def _serve(self, socket: ServerConnection) -> None:
        self.sockets.append(socket)
        try:
            first = await socket.recv()
            assert isinstance(first, bytes)
            auth = decode_client_record(next(iter_records(first)))
            assert isinstance(auth, AuthFrame)
            self.auths.append(auth)
            self._notify()
            answer = self.handshake(auth, len(self.auths))
            await socket.send(frame_record(encode_server_frame(answer)))
            if isinstance(answer, ErrorFrame):
                await socket.close(1008)
                return
            async for message in socket:
                assert isinstance(message, bytes)
                for record in iter_records(message):
                    await self._handle(socket, decode_client_record(record))
        except websockets.ConnectionClosed:
            pass

    async def _handle(self, socket: ServerConnection, frame: ClientFrame) -> None:
        self.frames.append(frame)
        self._notify()
        reply: ServerFrame | None = None
        if isinstance(frame, PingFrame):
            reply = PongFrame() if self.answer_pings else None
        elif isinstance(frame, HistoryFrame):
            if self.answer_history:
                reply = HistoryResponseFrame(frame.id, frame.channel, (), False)
        elif isinstance(frame, PublishFrame):
            if self.ack_publishes:
                if not frame.ephemeral:
                    self.serial += 1
                reply = AckFrame(frame.id, 0 if frame.ephemeral else self.serial)
        elif (
            isinstance(
                frame,
                SubscribeFrame
                | UnsubscribeFrame
                | PresenceFrame
                | PresenceSubscribeFrame
                | PresenceUnsubscribeFrame,
            )
            and self.ack_requests
        ):
            resumed = frame.last_serial > 0 if isinstance(frame, SubscribeFrame) else None
            reply = AckFrame(frame.id, 0, True if resumed else None)
        if reply is not None:
            await socket.send(frame_record(encode_server_frame(reply)))

    def _notify(self) -> None:
        self.changed.set()
