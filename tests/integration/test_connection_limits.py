"""Admission control of TCP connections (issue 9, item 9).

A socket that never completes its HTTP request head (slowloris) is closed after
``RT_HEADER_TIMEOUT_S``, and one client address holds at most
``RT_MAX_CONNECTIONS_PER_ADDRESS`` sockets; real gateway processes, hostile raw sockets, and a
bystander that must keep working.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import orjson
import pytest
import websockets

from tests.support import (
    APP_KEY,
    JsonClient,
    RawWebSocket,
    Service,
    json_client,
    start_nats,
    start_service,
    wait_ready,
)

HEADER_TIMEOUT_S = 1.0
MAX_PER_ADDRESS = 20
PARTIAL_HEAD = b"GET / HTTP/1.1\r\nHost: x\r\n"
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


@dataclass
class Gateways:
    """Two gateways with the short header timeout: one capped per address, one not (the
    slowloris test opens far more sockets than the cap)."""

    capped: Service
    uncapped: Service


@pytest.fixture(scope="module")
def gateways() -> Iterator[Gateways]:
    nats = start_nats()
    services: list[Service] = []
    try:
        timeout = {"RT_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S)}
        cap = {"RT_MAX_CONNECTIONS_PER_ADDRESS": str(MAX_PER_ADDRESS)}
        services.append(start_service("gateway", nats.url, env=timeout | cap))
        services.append(start_service("gateway", nats.url, env=timeout))
        for service in services:
            wait_ready(service.port)
        yield Gateways(*services)
    finally:
        for service in services:
            service.stop()
        nats.stop()


async def ping(client: JsonClient) -> None:
    await client.send({"t": "ping"})
    await client.receive_until("pong", timeout=3)


async def wait_closed(reader: asyncio.StreamReader, timeout: float) -> float | None:
    """Monotonic time at which the peer closed (EOF or reset), or None if it stayed open.
    Any byte from the gateway is a failure: a slow head must get no answer."""
    try:
        data = await asyncio.wait_for(reader.read(4096), timeout)
    except TimeoutError:  # before OSError: TimeoutError is one
        return None
    except (ConnectionError, OSError):
        return time.monotonic()
    assert data == b"", data
    return time.monotonic()


async def read_response(reader: asyncio.StreamReader) -> bytes:
    """One HTTP response with a Content-Length body; returns the status line."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await asyncio.wait_for(reader.readexactly(length), 3)
    return head.split(b"\r\n", 1)[0]


async def partial_head(port: int) -> tuple[float, asyncio.StreamReader, asyncio.StreamWriter]:
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(PARTIAL_HEAD)
    await writer.drain()
    return started, reader, writer


async def refused_at_once(port: int, source: str = "127.0.0.1") -> bool:
    """Whether a new connection from ``source`` is closed without an HTTP answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    started = time.monotonic()
    try:
        writer.write(HEALTHZ)
        await writer.drain()
    except (ConnectionError, OSError):
        return True
    try:
        closed = await wait_closed(reader, 0.5)
    except AssertionError:  # it answered
        closed = None
    finally:
        writer.close()
    return closed is not None and closed - started < 0.5


def authenticated_raw(port: int) -> RawWebSocket:
    raw = RawWebSocket(port)
    raw.send_json({"t": "auth", "key": APP_KEY, "clientId": "raw"})
    _opcode, payload = raw.receive_frame()
    assert orjson.loads(payload)["t"] == "connected", payload
    return raw


def slow_upgrade_then_ping(port: int) -> str:
    """Send a WebSocket handshake in pieces over most of the header timeout, authenticate,
    stay open past the timeout, then ping; returns the type of the answer."""
    raw = RawWebSocket(port, handshake=False)
    head = (
        f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    pieces = 4
    step = len(head) // pieces + 1
    for index in range(pieces):
        raw.sock.sendall(head[index * step : (index + 1) * step])
        if index < pieces - 1:
            time.sleep(0.7 * HEADER_TIMEOUT_S / (pieces - 1))
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = raw.sock.recv(1)
        assert chunk, "closed during a slow but complete handshake"
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 101"), answer
    raw.send_json({"t": "auth", "key": APP_KEY, "clientId": "slow"})
    assert orjson.loads(raw.receive_frame()[1])["t"] == "connected"
    time.sleep(HEADER_TIMEOUT_S + 1.5)
    raw.send_json({"t": "ping"})
    kind = str(orjson.loads(raw.receive_frame()[1])["t"])
    raw.sock.close()
    return kind


async def test_slow_request_heads_are_closed_while_others_are_served(gateways: Gateways) -> None:
    """200 sockets that never finish their request head are closed after the header timeout
    (not before), while a WebSocket client connects and pings meanwhile."""
    port = gateways.uncapped.port
    slow = await asyncio.gather(*(partial_head(port) for _ in range(200)))
    bystander = await json_client(gateways.uncapped.url)
    await ping(bystander)
    limit = HEADER_TIMEOUT_S + 2
    closed = await asyncio.gather(*(wait_closed(reader, limit) for _, reader, _ in slow))
    try:
        still_open = sum(at is None for at in closed)
        assert still_open == 0, f"{still_open} of {len(slow)} slow sockets still open"
        held = [at - started for (started, _, _), at in zip(slow, closed, strict=True) if at]
        assert min(held) > HEADER_TIMEOUT_S - 0.1, min(held)
        assert max(held) < limit, max(held)
        await ping(bystander)
    finally:
        for _, _, writer in slow:
            writer.close()
        await bystander.close()


async def test_slow_complete_upgrade_and_long_lived_sockets_are_not_cut(
    gateways: Gateways,
) -> None:
    """A handshake that takes most of the timeout but completes gets its WebSocket, and
    WebSockets stay open well past the header timeout."""
    slow = asyncio.create_task(asyncio.to_thread(slow_upgrade_then_ping, gateways.capped.port))
    client = await json_client(gateways.capped.url)
    await asyncio.sleep(HEADER_TIMEOUT_S + 1.5)
    await ping(client)
    await client.close()
    assert await slow == "pong"


async def test_each_request_head_on_a_kept_alive_connection_is_timed(gateways: Gateways) -> None:
    """Requests on a kept-alive connection are served; a slow next head (or none at all) is
    closed one header timeout after the previous response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateways.uncapped.port)
    try:
        for _ in range(2):
            writer.write(HEALTHZ)
            await writer.drain()
            assert await read_response(reader) == b"HTTP/1.1 200 OK"
        answered = time.monotonic()
        writer.write(PARTIAL_HEAD)
        await writer.drain()
        closed = await wait_closed(reader, HEADER_TIMEOUT_S + 2)
        assert closed is not None, "a slow second request head was held"
        assert HEADER_TIMEOUT_S - 0.1 < closed - answered < HEADER_TIMEOUT_S + 1
    finally:
        writer.close()


async def connect_within(url: str, timeout: float) -> JsonClient:
    """An authenticated client, retrying while the gateway still counts closed sockets."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await json_client(url)
        except (OSError, EOFError, websockets.exceptions.WebSocketException):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def test_connections_per_address_are_capped(gateways: Gateways) -> None:
    """With 20 sockets held from 127.0.0.1 the 21st is closed at once (another address is
    still served); closed and reset sockets give their slots back."""
    gateway = gateways.capped
    clients = [await json_client(gateway.url) for _ in range(MAX_PER_ADDRESS - 5)]
    raws = [authenticated_raw(gateway.port) for _ in range(5)]
    try:
        assert await refused_at_once(gateway.port)
        assert not await refused_at_once(gateway.port, source="127.0.0.2")
        for client in clients[:3]:
            await client.close()
        for raw in raws[:2]:
            raw.reset()
        clients = clients[3:]
        for _ in range(5):
            clients.append(await connect_within(gateway.url, 2.0))
        assert await refused_at_once(gateway.port)
        await ping(clients[0])
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                await client.close()
        for raw in raws:
            with contextlib.suppress(Exception):
                raw.sock.close()
