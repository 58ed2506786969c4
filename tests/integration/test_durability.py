"""Durable messaging: contiguous serials under contention, exactly-once, resume, history
worker failures and retention (issue 4)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import (
    Cluster,
    JsonClient,
    json_client,
    running_cluster,
    start_nats,
    start_service,
    wait_ready,
)


def channel_name(prefix: str) -> str:
    return f"{prefix}:{uuid.uuid4().hex[:10]}"


async def publish_burst(
    client: JsonClient, channel: str, tag: str, count: int, window: int = 8
) -> list[int]:
    """Publish ``count`` messages keeping ``window`` unacknowledged; return the serials
    acked, in send order."""
    first_id = client.next_id()
    client._next_id = first_id + count
    serials: dict[int, int] = {}
    sent = 0
    while len(serials) < count:
        while sent < count and sent - len(serials) < window:
            await client.send(
                {
                    "t": "pub",
                    "id": first_id + sent,
                    "channel": channel,
                    "name": tag,
                    "data": sent,
                    "messageId": f"{tag}-{sent}",
                }
            )
            sent += 1
        frame = await client.receive(timeout=20)
        assert frame["t"] != "err", frame
        if frame["t"] == "ack":
            serials[frame["id"]] = frame["seq"]
    return [serials[first_id + index] for index in range(count)]


async def collect(client: JsonClient, until_serial: int, timeout: float = 20) -> list[int]:
    serials: list[int] = []
    while not serials or serials[-1] < until_serial:
        frame = await client.receive(timeout=timeout)
        if frame["t"] == "msg":
            serials.append(frame["seq"])
    return serials


async def test_four_publishers_two_gateways_subscriber_joins_and_resumes(cluster: Cluster) -> None:
    channel = channel_name("hot")
    per_publisher = 400
    total = 4 * per_publisher
    publishers = [
        await json_client(g.url, clientId=f"p{i}") for i, g in enumerate([cluster.a, cluster.b] * 2)
    ]
    seed = await publishers[0].request("pub", channel=channel, name="seed", data=0, messageId="s")
    assert seed["seq"] == 1
    total += 1
    bursts = [
        asyncio.create_task(publish_burst(p, channel, f"p{i}", per_publisher))
        for i, p in enumerate(publishers)
    ]
    # Join mid-stream on A, resuming after serial 1, while the publishers hammer the channel.
    await asyncio.sleep(0.02)
    subscriber = await json_client(cluster.a.url)
    first = await subscriber.request("sub", channel=channel, lastSerial=1)
    assert first["resumed"] is True
    seen = []
    for frame in subscriber.backlog:
        if frame["t"] == "msg":
            seen.append(frame["seq"])
    subscriber.backlog.clear()
    half = total // 2
    while not seen or seen[-1] < half:
        frame = await subscriber.receive(timeout=20)
        if frame["t"] == "msg":
            seen.append(frame["seq"])
    # The connection drops having processed up to the midpoint; what it had beyond is lost.
    seen = [serial for serial in seen if serial <= half]
    await subscriber.close()
    # Resume on the other gateway from the last serial seen.
    resumed = await json_client(cluster.b.url)
    ack = await resumed.request("sub", channel=channel, lastSerial=seen[-1])
    assert ack["resumed"] is True
    rest = [frame["seq"] for frame in resumed.backlog if frame["t"] == "msg"]
    resumed.backlog.clear()
    acked = [serial for burst in await asyncio.gather(*bursts) for serial in burst]
    if (seen + rest)[-1] < total:
        rest += await collect(resumed, total)
    assert seen[0] == 2 and seen[-1] == half and rest
    assert seen + rest == list(range(2, total + 1)), "every serial once, in order"
    assert sorted(acked) == list(range(2, total + 1))
    for burst in bursts:
        serials = burst.result()
        assert serials == sorted(serials), "one connection's publishes keep their order"
    newest = await resumed.request("hist", channel=channel, limit=1000)
    older = await resumed.request("hist", channel=channel, limit=1000, before=total - 999)
    stored = older["messages"] + newest["messages"]
    assert [m["seq"] for m in stored] == list(range(1, total + 1))
    assert len({m["messageId"] for m in stored}) == total
    for client in [*publishers, resumed]:
        await client.close()


async def test_resend_on_another_gateway_is_acked_with_the_same_serial(cluster: Cluster) -> None:
    channel = channel_name("dedup")
    watcher = await json_client(cluster.a.url)
    await watcher.request("sub", channel=channel)
    first = await json_client(cluster.a.url, clientId="resender")
    second = await json_client(cluster.b.url, clientId="resender")
    other = await json_client(cluster.b.url, clientId="someone-else")
    one = await first.request("pub", channel=channel, name="n", data=1, messageId="same")
    two = await second.request("pub", channel=channel, name="n", data=1, messageId="same")
    # Another client's identical messageId is its own message (dedup is per clientId).
    three = await other.request("pub", channel=channel, name="n", data=2, messageId="same")
    assert (one["seq"], two["seq"], three["seq"]) == (1, 1, 2)
    messages = [await watcher.receive_until("msg") for _ in range(2)]
    assert [(m["seq"], m["clientId"]) for m in messages] == [(1, "resender"), (2, "someone-else")]
    with pytest.raises(asyncio.TimeoutError):
        await watcher.receive_until("msg", timeout=0.3)
    for client in (watcher, first, second, other):
        await client.close()


async def test_resume_flags_and_replay(cluster: Cluster) -> None:
    channel = channel_name("resume")
    publisher = await json_client(cluster.b.url)
    for index in range(6):
        await publisher.request("pub", channel=channel, name="n", data=index, messageId=f"r{index}")
    client = await json_client(cluster.a.url)
    ack = await client.request("sub", channel=channel, lastSerial=3)
    assert ack["resumed"] is True
    assert [f["seq"] for f in client.backlog if f["t"] == "msg"] == [4, 5, 6]
    client.backlog.clear()
    # Up to date: resumed, nothing replayed.
    ack = await client.request("sub", channel=channel, lastSerial=6)
    assert ack["resumed"] is True and not client.backlog
    # A cursor above anything stored means the server lost state the client saw.
    ack = await client.request("sub", channel=channel, lastSerial=60)
    assert ack["resumed"] is False and not client.backlog
    # No cursor: no resumed flag at all.
    assert await client.request("sub", channel=channel) == {"t": "ack", "id": client._next_id}
    # Live delivery continues exactly once after all those repeated subs.
    await publisher.request("pub", channel=channel, name="n", data=6, messageId="r6")
    assert (await client.receive_until("msg"))["seq"] == 7
    with pytest.raises(asyncio.TimeoutError):
        await client.receive_until("msg", timeout=0.3)
    await client.close()
    await publisher.close()


async def test_legacy_json_cursors_by_message_id(cluster: Cluster) -> None:
    channel = channel_name("legacy")
    publisher = await json_client(cluster.b.url)
    for index in range(4):
        await publisher.request("pub", channel=channel, name="n", data=index, messageId=f"L{index}")
    await publisher.request(
        "pub",
        channel=channel,
        messageId="B",
        messages=[{"name": "a", "data": 1}, {"name": "b", "data": 2}],
    )
    client = await json_client(cluster.a.url)
    ack = await client.request("sub", channel=channel, lastMessageId="L1")
    assert ack["resumed"] is True
    assert [f["messageId"] for f in client.backlog if f["t"] == "msg"] == ["L2", "L3", "B"]
    client.backlog.clear()
    ack = await client.request("sub", channel=channel, lastMessageId="B:1")
    assert ack["resumed"] is True and not client.backlog
    ack = await client.request("sub", channel=channel, lastMessageId="unknown")
    assert ack["resumed"] is False and not client.backlog
    page = await client.request("hist", channel=channel, start="L3")
    assert [m["messageId"] for m in page["messages"]] == ["L0", "L1", "L2"]
    await client.close()
    await publisher.close()


async def test_fetch_fills_gaps_and_caps(cluster: Cluster) -> None:
    channel = channel_name("fetch")
    client = await json_client(cluster.a.url)
    for index in range(3):
        await client.request("pub", channel=channel, name="n", data=index, messageId=f"f{index}")
    result = await client.request("fetch", channel=channel, fromSerial=1)
    assert [m["seq"] for m in result["messages"]] == [2, 3] and result["resumed"] is True
    result = await client.request("fetch", channel=channel, fromSerial=50)
    assert result["messages"] == [] and result["resumed"] is True
    await client.close()


async def test_resume_connection_id_is_kept(cluster: Cluster) -> None:
    client = await JsonClient.connect(cluster.a.url)
    connected = await client.auth(key="app1.main:secret-one", clientId="keeper")
    await client.close()
    again = await JsonClient.connect(cluster.a.url)
    resumed = await again.auth(
        key="app1.main:secret-one", clientId="keeper", resumeConnectionId=connected["connectionId"]
    )
    assert resumed["connectionId"] == connected["connectionId"]
    # Another identity cannot take over a live connection's id.
    thief = await JsonClient.connect(cluster.a.url)
    other = await thief.auth(
        key="app1.main:secret-one", clientId="thief", resumeConnectionId=connected["connectionId"]
    )
    assert other["connectionId"] != connected["connectionId"]
    await again.close()
    await thief.close()


# ---- a cluster with tiny retention, and one with no history worker ----


@pytest.fixture(scope="module")
def tiny_cluster() -> Iterator[Cluster]:
    environment = {
        "RT_RETENTION_MAX_PER_CHANNEL": "5",
        "RT_REQUEST_TIMEOUT_S": "1",
        "RT_AUTH_TIMEOUT_S": "1",
    }
    with running_cluster(environment) as running:
        yield running


async def test_retention_ages_out_cursors(tiny_cluster: Cluster) -> None:
    channel = channel_name("retained")
    client = await json_client(tiny_cluster.a.url)
    for index in range(12):
        await client.request("pub", channel=channel, name="n", data=index, messageId=f"t{index}")
    page = await client.request("hist", channel=channel)
    assert page["t"] == "histRes", page
    assert [m["seq"] for m in page["messages"]] == [8, 9, 10, 11, 12] and "more" not in page
    ack = await client.request("sub", channel=channel, lastSerial=3)
    assert ack["resumed"] is False and not [f for f in client.backlog if f["t"] == "msg"]
    ack = await client.request("sub", channel=channel, lastSerial=7)
    assert ack["resumed"] is True
    assert [f["seq"] for f in client.backlog if f["t"] == "msg"] == [8, 9, 10, 11, 12]
    gone = await client.request("fetch", channel=channel, fromSerial=2)
    assert gone["resumed"] is False and gone["messages"] == []
    await client.close()


async def test_no_history_worker_gives_50000_not_a_hang() -> None:
    nats = start_nats()
    gateway = start_service("gateway", nats.url, env={"RT_REQUEST_TIMEOUT_S": "0.5"})
    try:
        wait_ready(gateway.port)
        client = await json_client(gateway.url)
        started = asyncio.get_running_loop().time()
        for frame in ({"channel": "c"}, {"channel": "c", "fromSerial": 0}):
            kind = "hist" if "fromSerial" not in frame else "fetch"
            reply: dict[str, Any] = await client.request(kind, **frame)
            assert reply["t"] == "err" and reply["code"] == 50000, reply
        assert asyncio.get_running_loop().time() - started < 3
        await client.close()
    finally:
        gateway.stop()
        nats.stop()


async def test_resend_pipelined_into_the_same_batch_is_stored_once(cluster: Cluster) -> None:
    channel = channel_name("pipelined")
    watcher = await json_client(cluster.b.url)
    await watcher.request("sub", channel=channel)
    client = await json_client(cluster.a.url, clientId="piper")
    ids = ["a", "b", "a", "c", "b", "d"]
    for index, message_id in enumerate(ids):
        await client.send(
            {
                "t": "pub",
                "id": 100 + index,
                "channel": channel,
                "name": "n",
                "data": index,
                "messageId": message_id,
            }
        )
    acks: dict[int, int] = {}
    while len(acks) < len(ids):
        frame = await client.receive()
        if frame["t"] == "ack":
            acks[frame["id"]] = frame["seq"]
    serials = [acks[100 + index] for index in range(len(ids))]
    assert serials == [1, 2, 1, 3, 2, 4]
    delivered = [await watcher.receive_until("msg") for _ in range(4)]
    assert [m["messageId"] for m in delivered] == ["a", "b", "c", "d"]
    with pytest.raises(asyncio.TimeoutError):
        await watcher.receive_until("msg", timeout=0.3)
    await client.close()
    await watcher.close()


async def test_socket_without_auth_is_closed_after_the_auth_timeout(tiny_cluster: Cluster) -> None:
    client = await JsonClient.connect(tiny_cluster.a.url)
    started = asyncio.get_running_loop().time()
    await asyncio.wait_for(client.socket.wait_closed(), 5)
    waited = asyncio.get_running_loop().time() - started
    assert 0.8 <= waited <= 3, waited
    # An authenticated, pinging connection is not closed by the same watchdog.
    alive = await json_client(tiny_cluster.a.url)
    for _ in range(3):
        await asyncio.sleep(0.6)
        await alive.send({"t": "ping"})
        assert await alive.receive() == {"t": "pong"}
    await alive.close()
