"""Limits that protect neighbours (issue 12, item 5) against real gateway processes and
nats-server: publishes per second per connection, connections per app, long-poll sessions
per app, REST publishes per key, and the existing limits (channels, presence members,
sizes), each refused as documented and counted in ``realtime_rate_limited_total``.

Two dedicated gateways with small limits: ``limited`` (rates, sizes, members) and ``capped``
(connection caps), so that no test here depends on the shared cluster's defaults.
"""

from __future__ import annotations

import asyncio
import base64
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
import websockets

from realtime_protocol import binary_codec
from realtime_protocol.frames import AuthFrame, ConnectedFrame, ErrorFrame
from tests.support import (
    APP_KEY,
    OTHER_APP_KEY,
    RESTRICTED_KEY,
    JsonClient,
    Service,
    json_client,
    start_nats,
    start_service,
    wait_ready,
)

PUBLISH_RATE = 5
PUBLISH_BURST = 5
REST_RATE = 1
REST_BURST = 3
MAX_CONNECTIONS_PER_APP = 4
MAX_LONGPOLL_PER_APP = 2
MAX_FRAME_BYTES = 2048
SESSION_HEADER = "foony-lp-session"


@dataclass
class Gateways:
    limited: Service
    capped: Service


@pytest.fixture(scope="module")
def gateways() -> Iterator[Gateways]:
    nats = start_nats()
    services: list[Service] = []
    try:
        limited = {
            "RT_PUBLISH_RATE": str(PUBLISH_RATE),
            "RT_PUBLISH_BURST": str(PUBLISH_BURST),
            "RT_REST_PUBLISH_RATE": str(REST_RATE),
            "RT_REST_PUBLISH_BURST": str(REST_BURST),
            "RT_MAX_CHANNELS": "2",
            "RT_MAX_FRAME_BYTES": str(MAX_FRAME_BYTES),
            "RT_MAX_BATCH_MEMBERS": "3",
            "RT_PRESENCE_MAX_MEMBERS": "1",
            "RT_PRESENCE_MAX_DATA_BYTES": "100",
        }
        capped = {
            "RT_MAX_CONNECTIONS_PER_APP": str(MAX_CONNECTIONS_PER_APP),
            "RT_MAX_LONGPOLL_SESSIONS_PER_APP": str(MAX_LONGPOLL_PER_APP),
        }
        services.append(start_service("gateway", nats.url, env=limited))
        services.append(start_service("gateway", nats.url, env=capped))
        for service in services:
            wait_ready(service.port)
        yield Gateways(*services)
    finally:
        for service in services:
            service.stop()
        nats.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def channel_name(prefix: str) -> str:
    return f"{prefix}:{uuid.uuid4().hex[:10]}"


def limited(service: Service, limit: str) -> float:
    """``realtime_rate_limited_total{limit=...}`` on a gateway's ``/metrics``."""
    with urllib.request.urlopen(f"{service.http}/metrics", timeout=2) as response:
        text = response.read().decode()
    prefix = f'realtime_rate_limited_total{{limit="{limit}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    raise AssertionError(f"no sample for {limit}")


async def answers(client: JsonClient, count: int) -> dict[int, dict[str, Any]]:
    """The next ``count`` acks and errs, by request id (other frames are skipped)."""
    found: dict[int, dict[str, Any]] = {}
    while len(found) < count:
        frame = await client.receive()
        if frame["t"] in ("ack", "err"):
            found[frame["id"]] = frame
    return found


async def ping(client: JsonClient) -> float:
    started = time.monotonic()
    await client.send({"t": "ping"})
    await client.receive_until("pong", timeout=3)
    return time.monotonic() - started


# ---- publishes per connection ----


async def test_a_publish_flood_gets_42900_per_excess_publish_and_the_connection_stays(
    gateways: Gateways,
) -> None:
    service = gateways.limited
    before = limited(service, "publish_rate")
    client = await json_client(service.url, clientId="flooder")
    channel = channel_name("flood")
    started = time.monotonic()
    for index in range(1, 21):  # pipelined: far faster than 5/s
        await client.send({"t": "pub", "id": index, "channel": channel, "data": index})
    replies = await answers(client, 20)
    took = time.monotonic() - started
    acked = sorted(i for i, frame in replies.items() if frame["t"] == "ack")
    refused = sorted(i for i, frame in replies.items() if frame["t"] == "err")
    assert acked[:PUBLISH_BURST] == list(range(1, PUBLISH_BURST + 1)), acked  # the burst
    assert {replies[i]["code"] for i in refused} == {42900}
    assert "5 messages/s" in replies[refused[0]]["message"]
    # Each refusal paused the input for a token's time (0.2 s), so the flood was read at
    # about one refusal per ack beyond the burst.
    assert len(refused) >= 5 and len(acked) - PUBLISH_BURST <= len(refused) + 1, replies
    assert took >= 0.9 * (len(refused) - 1) / PUBLISH_RATE, took
    # Refused publishes were not stored: the acked ones hold serials 1, 2, 3... in order.
    assert [replies[i]["seq"] for i in acked] == list(range(1, len(acked) + 1))
    assert await ping(client) < 1.0  # still connected and served
    # A token back: the next publish is stored right after the acked ones (nothing refused
    # was stored).
    await asyncio.sleep(1.0 / PUBLISH_RATE + 0.05)
    ack = await client.request("pub", channel=channel, data="later")
    assert (ack["t"], ack["seq"]) == ("ack", len(acked) + 1)
    assert limited(service, "publish_rate") == before + len(refused)
    await client.close()


async def test_a_batch_counts_each_member(gateways: Gateways) -> None:
    client = await json_client(gateways.limited.url)
    channel = channel_name("batch")
    batch = [{"name": "m", "data": index} for index in range(3)]
    assert (await client.request("pub", channel=channel, messages=batch))["t"] == "ack"
    refused = await client.request("pub", channel=channel, messages=batch)  # 2 tokens left
    assert (refused["t"], refused["code"]) == ("err", 42900)
    assert (await client.request("pub", channel=channel, data=1))["seq"] == 2
    await client.close()


async def test_a_flooding_neighbour_does_not_slow_or_limit_others(gateways: Gateways) -> None:
    """While one connection floods (its excess refused, its input paced), another on the
    same gateway keeps its own bucket: every one of its publishes is acked, promptly."""
    service = gateways.limited
    flooder = await json_client(service.url, clientId="flooder")
    quiet = await json_client(service.url, clientId="quiet")
    channel = channel_name("neighbours")
    for index in range(1, 201):
        await flooder.send({"t": "pub", "id": index, "channel": channel, "data": index})
    waits = []
    for index in range(PUBLISH_BURST):
        started = time.monotonic()
        ack = await quiet.request("pub", channel=channel, data=f"quiet-{index}")
        waits.append(time.monotonic() - started)
        assert ack["t"] == "ack", ack
        waits.append(await ping(quiet))
    assert max(waits) < 0.5, waits
    replies = await answers(flooder, PUBLISH_BURST + 1)
    assert [frame["t"] for frame in replies.values()].count("err") >= 1  # it was flooding
    # Dropped, not closed: its close frame waits behind the paced backlog.
    flooder.socket.transport.abort()
    await quiet.close()


# ---- connections and long-poll sessions per app ----


def auth_record(key: str) -> bytes:
    return binary_codec.frame_record(binary_codec.encode_client_frame(AuthFrame(key=key)))


async def lp_connect(http: aiohttp.ClientSession, service: Service, key: str) -> tuple[Any, Any]:
    """``/lp/connect``: (the session token or None, the first record of the answer)."""
    async with http.post(
        f"{service.http}/lp/connect",
        data=auth_record(key),
        headers={"Content-Type": "application/octet-stream"},
    ) as response:
        assert response.status == 200  # a refused handshake too (PROTOCOL.md 5)
        body = await response.read()
        token = response.headers.get(SESSION_HEADER)
    first = binary_codec.decode_server_record(next(iter(binary_codec.iter_records(body))))
    return token, first


async def lp_disconnect(http: aiohttp.ClientSession, service: Service, token: str) -> None:
    async with http.post(f"{service.http}/lp/disconnect", headers={SESSION_HEADER: token}) as r:
        assert r.status == 200


async def refused_websocket(url: str, key: str) -> tuple[dict[str, Any], int | None]:
    """Authenticate and expect a refusal: the ``err`` and the close code that followed."""
    socket = await websockets.connect(url, compression=None)
    await socket.send(orjson.dumps({"t": "auth", "key": key}).decode())
    error = orjson.loads(await asyncio.wait_for(socket.recv(), 5))
    with pytest.raises(websockets.ConnectionClosed):
        await asyncio.wait_for(socket.recv(), 5)
    return error, socket.close_code


async def eventually_connected(url: str, key: str) -> JsonClient:
    """A connection once a slot came free (teardown of the old one is asynchronous)."""
    deadline = time.monotonic() + 5
    while True:
        client = await JsonClient.connect(url)
        frame = await client.auth(key=key)
        if frame["t"] == "connected":
            return client
        assert frame["code"] == 42900 and time.monotonic() < deadline, frame
        await client.close()
        await asyncio.sleep(0.05)


async def test_connections_per_app_beyond_the_cap_are_refused_at_the_handshake(
    gateways: Gateways, http: aiohttp.ClientSession
) -> None:
    service = gateways.capped
    before = limited(service, "connections_per_app")
    clients = [await json_client(service.url) for _ in range(MAX_CONNECTIONS_PER_APP)]
    error, close_code = await refused_websocket(service.url, APP_KEY)
    assert (error["t"], error["code"], error.get("id", 0)) == ("err", 42900, 0)
    assert close_code == 1008
    # Long-poll connections count in the same cap, and are refused the long-poll way.
    token, frame = await lp_connect(http, service, RESTRICTED_KEY)  # app1 too, another key
    assert token is None and isinstance(frame, ErrorFrame) and frame.code == 42900
    assert limited(service, "connections_per_app") == before + 2
    # Another app is not affected.
    other = await json_client(service.url, key=OTHER_APP_KEY)
    assert await ping(other) < 1.0
    # Existing connections keep working; one leaving frees a slot.
    assert await ping(clients[0]) < 1.0
    await clients.pop().close()
    clients.append(await eventually_connected(service.url, APP_KEY))
    for client in [*clients, other]:
        await client.close()


async def test_long_poll_sessions_per_app_have_their_own_cap(
    gateways: Gateways, http: aiohttp.ClientSession
) -> None:
    service = gateways.capped
    before = limited(service, "longpoll_sessions_per_app")
    tokens = []
    for _ in range(MAX_LONGPOLL_PER_APP):
        token, frame = await lp_connect(http, service, OTHER_APP_KEY)
        assert token and isinstance(frame, ConnectedFrame)
        tokens.append(token)
    token, frame = await lp_connect(http, service, OTHER_APP_KEY)
    assert token is None
    assert isinstance(frame, ErrorFrame) and (frame.code, frame.id) == (42900, 0)
    assert "long-poll" in frame.message
    assert limited(service, "longpoll_sessions_per_app") == before + 1
    # The app has room for connections: a WebSocket still gets in.
    websocket = await json_client(service.url, key=OTHER_APP_KEY)
    # Ending a session frees its slot.
    await lp_disconnect(http, service, tokens.pop())
    token, frame = await lp_connect(http, service, OTHER_APP_KEY)
    assert token and isinstance(frame, ConnectedFrame)
    tokens.append(token)
    for token in tokens:
        await lp_disconnect(http, service, token)
    await websocket.close()


# ---- REST publishes per key ----


def basic(key: str) -> str:
    return "Basic " + base64.b64encode(key.encode()).decode()


async def rest_publish(
    http: aiohttp.ClientSession, service: Service, channel: str, body: Any, key: str = APP_KEY
) -> tuple[int, Any, Any]:
    async with http.post(
        f"{service.http}/channels/{channel}/messages",
        data=orjson.dumps(body),
        headers={"Authorization": basic(key), "Content-Type": "application/json"},
    ) as response:
        return response.status, await response.json(), response.headers


async def test_rest_publishes_beyond_the_keys_rate_get_429(
    gateways: Gateways, http: aiohttp.ClientSession
) -> None:
    service = gateways.limited
    before = limited(service, "rest_publish_rate")
    channel = channel_name("rest")
    for serial in range(1, REST_BURST + 1):
        status, body, _ = await rest_publish(http, service, channel, {"name": "n", "data": serial})
        assert (status, body["serial"]) == (201, serial)
    status, body, headers = await rest_publish(http, service, channel, {"name": "n"})
    assert status == 429
    assert body["error"]["code"] == 42900 and body["error"]["statusCode"] == 429
    assert "rate limit" in body["error"]["message"]
    assert headers["Retry-After"] == "1"
    batch = [{"name": "b", "data": 1}, {"name": "b", "data": 2}]
    assert (await rest_publish(http, service, channel, batch))[0] == 429
    # Another key has its own bucket.
    status, body, _ = await rest_publish(http, service, channel, {"name": "n"}, RESTRICTED_KEY)
    assert (status, body["serial"]) == (201, REST_BURST + 1)
    assert limited(service, "rest_publish_rate") == before + 2
    # Refused publishes were not stored: the key's next one follows on.
    await asyncio.sleep(1.0 / REST_RATE + 0.05)
    status, body, _ = await rest_publish(http, service, channel, {"name": "n"})
    assert (status, body["serial"]) == (201, REST_BURST + 2)


# ---- the existing limits count in the same metric ----


async def test_existing_limits_count_in_the_metric(
    gateways: Gateways, http: aiohttp.ClientSession
) -> None:
    service = gateways.limited
    names = (
        "channels_per_connection",
        "message_size",
        "batch_members",
        "presence_members",
        "presence_data",
    )
    before = {name: limited(service, name) for name in names}
    client = await json_client(service.url, clientId="one")
    other = await json_client(service.url, clientId="two")
    channel = channel_name("existing")
    assert (await client.request("sub", channel=channel))["t"] == "ack"
    assert (await client.request("presSub", channel=channel_name("p")))["t"] == "ack"
    refused = await client.request("sub", channel=channel_name("third"))
    assert (refused["t"], refused["code"]) == ("err", 42900)
    big = await client.request("pub", channel=channel, data="x" * MAX_FRAME_BYTES)
    assert (big["t"], big["code"]) == ("err", 40001)
    batch = [{"name": "m", "data": index} for index in range(4)]
    too_many = await client.request("pub", channel=channel, messages=batch)
    assert (too_many["t"], too_many["code"]) == ("err", 40001)
    assert (await client.request("pres", channel=channel, action="enter"))["t"] == "ack"
    crowded = await other.request("pres", channel=channel, action="enter")
    assert (crowded["t"], crowded["code"]) == ("err", 42900)
    wordy = await other.request(
        "pres", channel=channel_name("data"), action="enter", data="z" * 200
    )
    assert (wordy["t"], wordy["code"]) == ("err", 40001)
    status, body, _ = await rest_publish(http, service, channel, {"data": "y" * MAX_FRAME_BYTES})
    assert (status, body["error"]["code"]) == (400, 40001)
    after = {name: limited(service, name) for name in names}
    assert {name: after[name] - before[name] for name in names} == {
        "channels_per_connection": 1,
        "message_size": 2,
        "batch_members": 1,
        "presence_members": 1,
        "presence_data": 1,
    }
    await client.close()
    await other.close()
