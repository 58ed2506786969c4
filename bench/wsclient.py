"""A minimal asyncio WebSocket client for load generation: thousands of connections per
process, each one an ``asyncio.Protocol`` with no per-message task, that counts delivered
records (and, for a sample of connections, decodes them to measure latency).

Speaks exactly what the benchmarks need: the HTTP upgrade, masked client frames, unmasked
server frames without fragmentation or extensions.
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct
import time
from collections.abc import Callable
from typing import cast

import orjson

from realtime_protocol import binary_codec
from shared.websocket_frames import client_frame

__all__ = ["Counter", "WebSocketClient", "client_frame", "connect_many"]

_MESSAGE_OPCODES = {binary_codec.Opcode.MSG, binary_codec.Opcode.BATCH}
MARKER = b'{"sent":'
"""Every payload the benchmark publishers send starts with this."""


class Counter:
    """Shared tallies of one load-generating process."""

    def __init__(self) -> None:
        self.deliveries = 0
        self.messages = 0
        self.latencies_ms: list[float] = []
        self.other: list[bytes] = []


class WebSocketClient(asyncio.Protocol):
    """One connection: upgrade, send ``opening`` frames, then count what arrives."""

    def __init__(
        self,
        host: str,
        path: str,
        opening: list[bytes],
        counter: Counter,
        ready: asyncio.Future[None],
        sample: bool = False,
        mode: str = "realtime",
    ) -> None:
        self.host = host
        self.path = path
        self.opening = opening
        self.counter = counter
        self.ready = ready
        self.sample = sample
        # "realtime": our records; "raw": every binary message is one delivery (the aiohttp
        # ceiling); "nats": NATS protocol text, each MSG line a delivery.
        self.mode = mode
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.upgraded = False
        self.replies = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but behave as one.
        self.transport = cast(asyncio.Transport, transport)
        key = base64.b64encode(os.urandom(16)).decode()
        self.transport.write(
            (
                f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )

    def send(self, payload: bytes, opcode: int = 0x2) -> None:
        assert self.transport is not None
        self.transport.write(client_frame(payload, opcode))

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        if not self.upgraded:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            if not buffer.startswith(b"HTTP/1.1 101"):
                raise ConnectionError(bytes(buffer[:80]).decode(errors="replace"))
            del buffer[: end + 4]
            self.upgraded = True
            for frame in self.opening:
                self.send(frame, 0x1 if self.mode == "nats" else 0x2)
            if not self.opening and not self.ready.done():
                self.ready.set_result(None)
        counter = self.counter
        offset = 0
        size = len(buffer)
        # shared.websocket_frames.parse_header, inlined: this loop runs for every frame of
        # every connection of the load generator.
        while size - offset >= 2:
            opcode = buffer[offset] & 0x0F
            length = buffer[offset + 1] & 0x7F
            start = offset + 2
            if length == 126:
                if size - offset < 4:
                    break
                length = (buffer[offset + 2] << 8) | buffer[offset + 3]
                start = offset + 4
            elif length == 127:
                if size - offset < 10:
                    break
                length = struct.unpack_from("!Q", buffer, offset + 2)[0]
                start = offset + 10
            end = start + length
            if end > size:
                break
            offset = end
            counter.messages += 1
            if self.mode == "raw":
                counter.deliveries += 1
            elif self.mode == "nats":
                self._nats(bytes(buffer[start:end]))
            elif opcode != 0x2:
                continue
            elif self.sample or not self.ready.done():
                self._records(bytes(buffer[start:end]))
            else:
                # Counting at C speed keeps the load generator from being the bottleneck:
                # every benchmark payload starts with this marker.
                counter.deliveries += buffer.count(MARKER, start, end)
        if offset:
            del buffer[:offset]

    def _records(self, payload: bytes) -> None:
        counter = self.counter
        for record in binary_codec.iter_records(payload):
            if record[0] in _MESSAGE_OPCODES:
                counter.deliveries += 1
                if self.sample:
                    self._latency(binary_codec.decode_server_record(record))
            else:
                self.replies += 1
                if self.replies == len(self.opening) and not self.ready.done():
                    self.ready.set_result(None)

    def _latency(self, frame: object) -> None:
        message = getattr(frame, "message", None)
        if message is not None and message.data:
            sent = orjson.loads(message.data)
            if isinstance(sent, dict) and "sent" in sent:
                self.counter.latencies_ms.append((time.time_ns() - sent["sent"]) / 1e6)

    def _nats(self, payload: bytes) -> None:
        # The NATS WebSocket reference packs many MSG lines into each frame.
        self.counter.deliveries += payload.count(b"MSG ")
        if b"PING" in payload and self.transport is not None:
            self.send(b"PONG\r\n", 0x1)
        if not self.ready.done() and (b"PONG" in payload or b"+OK" in payload):
            self.ready.set_result(None)

    def connection_lost(self, error: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(error or ConnectionError("closed before ready"))


async def connect_many(
    host: str,
    port: int,
    count: int,
    opening: Callable[[int], list[bytes]],
    counter: Counter,
    samples: int = 0,
    mode: str = "realtime",
    concurrency: int = 200,
) -> list[WebSocketClient]:
    """Open ``count`` connections (at most ``concurrency`` handshakes at once); return once
    every one has had its opening frames answered."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(concurrency)
    clients: list[WebSocketClient] = []

    def factory(index: int, ready: asyncio.Future[None]) -> Callable[[], WebSocketClient]:
        return lambda: WebSocketClient(
            f"{host}:{port}", "/", opening(index), counter, ready, index < samples, mode
        )

    async def one(index: int) -> None:
        async with gate:
            for attempt in range(5):
                ready: asyncio.Future[None] = loop.create_future()
                try:
                    _, client = await loop.create_connection(factory(index, ready), host, port)
                    await asyncio.wait_for(ready, 30)
                except ConnectionError:
                    if attempt == 4:
                        raise
                    await asyncio.sleep(0.1 * (attempt + 1))
                    continue
                clients.append(client)
                return

    await asyncio.gather(*(one(index) for index in range(count)))
    return clients
