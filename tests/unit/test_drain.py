"""Graceful drain without NATS (issue 13, item 2): the closing schedule (a pure function),
the spread closing of connections, a connection's acks before its close, and the gateway's
HTTP face while draining (aiohttp in process, with the in-memory engines). The SDK clients
moving between real gateways are in tests/integration/test_drain.py."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from gateway.app import LONG_POLL, create_app
from gateway.connection import Connection
from gateway.drain import TICK_S, close_schedule, drain_connections
from gateway.services import GatewayServices
from realtime_protocol.frames import Message
from shared.auth import Keyring, parse_api_key
from shared.session import CLOSE_GOING_AWAY
from shared.settings import Settings
from testing.memory_engines import MemoryBus, MemoryPresence

KEY = "app1.main:secret-one"


# ---- the schedule ----


def test_closes_are_spread_evenly_over_the_window_the_first_at_once() -> None:
    assert close_schedule(10, 1.0) == [(pytest.approx(i / 10), 1) for i in range(10)]
    # Few connections over a long window: one every window/count, rounded down to the tick.
    assert close_schedule(3, 10.0) == [(0.0, 1), (pytest.approx(3.3), 1), (pytest.approx(6.65), 1)]


def test_closes_due_within_one_tick_go_together() -> None:
    schedule = close_schedule(10_000, 10.0)
    assert len(schedule) == 200  # one batch per 50 ms tick, not 10,000 timers
    assert {count for _, count in schedule} == {50}
    assert schedule[-1][0] == pytest.approx(9.95)


def test_nothing_to_close_or_no_window() -> None:
    assert close_schedule(0, 10.0) == []
    assert close_schedule(5, 0.0) == [(0.0, 5)]
    assert close_schedule(1, 10.0) == [(0.0, 1)]


@given(count=st.integers(1, 5000), window=st.floats(0.01, 60.0))
def test_every_connection_is_closed_once_within_the_window_at_a_steady_pace(
    count: int, window: float
) -> None:
    schedule = close_schedule(count, window)
    offsets = [offset for offset, _ in schedule]
    assert sum(how_many for _, how_many in schedule) == count
    assert offsets == sorted(set(offsets)) and offsets[0] == 0.0
    assert offsets[-1] < window
    # No tick closes more than its share of the window (plus the one rounding adds).
    share = math.ceil(count * TICK_S / window) + 1
    assert max(how_many for _, how_many in schedule) <= share


# ---- spreading the closes ----


class FakeConnection:
    """Records when it was asked to close, and with what."""

    def __init__(self) -> None:
        self.closed_at: float | None = None
        self.calls: list[tuple[int, str, float]] = []

    @property
    def is_closing(self) -> bool:
        return self.closed_at is not None

    async def close_settled(self, code: int, reason: str, settle_s: float) -> None:
        self.calls.append((code, reason, settle_s))
        self.closed_at = asyncio.get_running_loop().time()


async def test_connections_close_on_schedule_and_late_ones_at_the_end() -> None:
    connections = [FakeConnection() for _ in range(4)]
    already_closing = FakeConnection()
    already_closing.closed_at = 0.0
    late = FakeConnection()
    listed = [*connections, already_closing]

    async def arrive_late() -> None:
        await asyncio.sleep(0.1)
        listed.append(late)  # a handshake that was under way when the drain began

    loop = asyncio.get_running_loop()
    started = loop.time()
    arrival = asyncio.create_task(arrive_late())
    closed = await drain_connections(lambda: listed, 0.4, settle_s=0.25)
    await arrival
    assert closed == 5
    offsets = [connection.closed_at - started for connection in connections]  # type: ignore[operator]
    for expected, offset in zip((0.0, 0.1, 0.2, 0.3), offsets, strict=True):
        assert expected <= offset < expected + 0.05, offsets
    assert late.closed_at is not None and late.closed_at - started >= 0.3
    assert already_closing.calls == []
    assert {call for connection in [*connections, late] for call in connection.calls} == {
        (CLOSE_GOING_AWAY, "server draining", 0.25)
    }


# ---- acks before the close ----


class SlowBus(MemoryBus):
    """Stores a publish only once ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def publish(self, app: str, message: Message) -> int:
        await self.release.wait()
        return await super().publish(app, message)


def services(bus: MemoryBus | None = None, **settings: Any) -> GatewayServices:
    bus = MemoryBus() if bus is None else bus  # (an empty bus is falsy: it has a len)
    return GatewayServices(
        settings=Settings(**settings),
        keyring=Keyring([parse_api_key(KEY)]),
        broker=bus,
        router=bus,
        history=bus,
        presence=MemoryPresence(grace_s=0.5),
    )


async def json_connection(gateway: GatewayServices) -> Connection:
    connection = Connection(gateway, "websocket")
    await connection.receive(orjson.dumps({"t": "auth", "key": KEY}), is_text=True)
    assert connection.is_connected
    connection.outbox.take()
    return connection


async def test_a_draining_connection_gets_the_acks_of_its_publishes_before_the_close() -> None:
    bus = SlowBus()
    connection = await json_connection(services(bus))
    publish = {"t": "pub", "id": 7, "channel": "c", "data": 1}
    await connection.receive(orjson.dumps(publish), is_text=True)
    closing = asyncio.create_task(connection.close_settled(CLOSE_GOING_AWAY, "draining", 5.0))
    await asyncio.sleep(0.05)
    assert not connection.is_closing  # waiting for the publish in flight
    bus.release.set()
    await asyncio.wait_for(closing, 1.0)
    assert connection.is_closing and connection.close_code == CLOSE_GOING_AWAY
    # The ack was queued before the close, so the transport writes it before the close frame.
    assert [orjson.loads(item)["t"] for item in connection.outbox.take()] == ["ack"]


async def test_a_publish_that_does_not_settle_holds_the_close_only_so_long() -> None:
    connection = await json_connection(services(SlowBus()))
    publish = {"t": "pub", "id": 1, "channel": "c", "data": 1}
    await connection.receive(orjson.dumps(publish), is_text=True)
    started = asyncio.get_running_loop().time()
    await connection.close_settled(CLOSE_GOING_AWAY, "draining", 0.2)
    assert 0.15 < asyncio.get_running_loop().time() - started < 0.5
    assert connection.is_closing
    await connection.finish()


# ---- the gateway's HTTP face while draining ----


@pytest.fixture
async def app_client() -> AsyncIterator[tuple[TestClient[Any, Any], GatewayServices]]:
    gateway = services()
    app = create_app(gateway)
    async with TestClient(TestServer(app)) as client:
        yield client, gateway
        await app[LONG_POLL].close_all()


async def test_a_draining_gateway_is_unready_refuses_connections_and_keeps_serving_rest(
    app_client: tuple[TestClient[Any, Any], GatewayServices],
) -> None:
    client, gateway = app_client
    assert (await client.get("/readyz")).status == 200
    gateway.draining = True
    assert (await client.get("/readyz")).status == 503
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect("/")
    assert refused.value.status == 503
    upgrade = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }
    response = await client.get("/", headers=upgrade)
    assert response.status == 503 and (await response.json())["error"]["code"] == 50001
    response = await client.post("/lp/connect", data=b"")
    assert response.status == 503 and (await response.json())["error"]["code"] == 50001
    # REST is served, on a connection the client must not reuse (its next request goes,
    # through the load balancer, to a ready gateway).
    response = await client.get("/time")
    assert response.status == 200 and response.headers["Connection"] == "close"
    metrics = await (await client.get("/metrics")).text()
    assert "realtime_draining 1.0" in metrics


async def test_a_drained_websocket_closes_1001_and_its_presence_waits_out_the_grace(
    app_client: tuple[TestClient[Any, Any], GatewayServices],
) -> None:
    """The client echoes the server's close; that is no deliberate leave: its memberships
    stay for the grace period, so a resume on another gateway shows no leave/enter."""
    client, gateway = app_client
    channel = f"c{uuid.uuid4().hex[:6]}"
    socket = await client.ws_connect("/")
    await socket.send_str(orjson.dumps({"t": "auth", "key": KEY, "clientId": "me"}).decode())
    assert orjson.loads(await socket.receive_str())["t"] == "connected"
    enter = {"t": "pres", "id": 1, "channel": channel, "action": "enter", "data": {"n": 1}}
    await socket.send_str(orjson.dumps(enter).decode())
    assert orjson.loads(await socket.receive_str())["t"] == "ack"
    members = [
        connection
        for connection in gateway.registry.connections.values()
        if isinstance(connection, Connection)
    ]
    await drain_connections(lambda: members, 0.0, settle_s=1.0)
    message = await socket.receive()
    assert message.type is aiohttp.WSMsgType.CLOSE and message.data == CLOSE_GOING_AWAY
    for _ in range(100):  # the server's teardown (Connection.finish) ran
        if not gateway.registry.connections:
            break
        await asyncio.sleep(0.01)
    assert not gateway.registry.connections
    assert [m.client_id for m in await gateway.presence.members("app1", channel)] == ["me"]
    await asyncio.sleep(0.6)  # the grace (0.5 s) is over: now it leaves
    assert await gateway.presence.members("app1", channel) == []


def test_the_drain_setting_defaults_to_10_seconds_and_takes_units() -> None:
    assert Settings().drain_s == 10.0
    assert Settings.load({"RT_DRAIN_S": "2500ms"}).drain_s == 2.5
    assert REGISTRY.get_sample_value("realtime_draining") is not None
