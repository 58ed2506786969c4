"""Presence replicated through the KV bucket (issue 5)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import (
    APP_KEY,
    Cluster,
    JsonClient,
    TcpProxy,
    json_client,
    running_cluster,
)

TTL_S = 3.0
GRACE_S = 2.0


@pytest.fixture(scope="module")
def presence_cluster() -> Iterator[Cluster]:
    environment = {
        "RT_PRESENCE_TTL_S": str(TTL_S),
        "RT_PRESENCE_GRACE_S": str(GRACE_S),
        "RT_PRESENCE_MAX_MEMBERS": "4",
        "RT_PRESENCE_MAX_DATA_BYTES": "64",
    }
    with running_cluster(environment) as running:
        yield running


def channel_name() -> str:
    return f"room:{uuid.uuid4().hex[:10]}"


def event(frame: dict[str, Any]) -> tuple[str, str, Any]:
    return frame["action"], frame["clientId"], frame.get("data")


async def next_event(client: JsonClient, timeout: float = 5.0) -> dict[str, Any]:
    return await client.receive_until("presEvt", timeout=timeout)


async def test_snapshot_and_live_events_across_gateways(presence_cluster: Cluster) -> None:
    cluster = presence_cluster
    channel = channel_name()
    alice = await json_client(cluster.a.url, clientId="alice")
    ack = await alice.request("pres", channel=channel, action="enter", data={"mood": "ok"})
    assert ack["t"] == "ack"
    watcher = await json_client(cluster.b.url, clientId="watcher")
    ack = await watcher.request("presSub", channel=channel)
    assert ack["t"] == "ack"
    # The snapshot came before the ack.
    snapshot = [f for f in watcher.backlog if f["t"] == "presEvt"]
    watcher.backlog.clear()
    assert [event(f) for f in snapshot] == [("enter", "alice", {"mood": "ok"})]
    assert snapshot[0]["connectionId"] and snapshot[0]["timestamp"] > 0
    bob = await json_client(cluster.b.url, clientId="bob")
    await bob.request("pres", channel=channel, action="enter")
    assert event(await next_event(watcher)) == ("enter", "bob", None)
    await alice.request("pres", channel=channel, action="update", data={"mood": "great"})
    assert event(await next_event(watcher)) == ("update", "alice", {"mood": "great"})
    # Same data again: no event.
    await alice.request("pres", channel=channel, action="enter", data={"mood": "great"})
    await alice.request("pres", channel=channel, action="leave")
    assert event(await next_event(watcher)) == ("leave", "alice", {"mood": "great"})
    # A leave of a non-member is acked with no event.
    assert (await alice.request("pres", channel=channel, action="leave"))["t"] == "ack"
    with pytest.raises(asyncio.TimeoutError):
        await next_event(watcher, timeout=0.5)
    for client in (alice, bob, watcher):
        await client.close()


async def test_own_events_echo_and_pres_unsub_keeps_membership(presence_cluster: Cluster) -> None:
    channel = channel_name()
    client = await json_client(presence_cluster.a.url, clientId="self")
    await client.request("presSub", channel=channel)
    await client.request("pres", channel=channel, action="enter", data=1)
    assert event(await next_event(client)) == ("enter", "self", 1)
    await client.request("presUnsub", channel=channel)
    other = await json_client(presence_cluster.b.url)
    await other.request("presSub", channel=channel)
    assert [event(f) for f in other.backlog if f["t"] == "presEvt"] == [("enter", "self", 1)]
    await client.close()
    await other.close()


async def test_several_connections_of_one_client_are_separate_members(
    presence_cluster: Cluster,
) -> None:
    channel = channel_name()
    first = await json_client(presence_cluster.a.url, clientId="twin")
    second = await json_client(presence_cluster.b.url, clientId="twin")
    for client in (first, second):
        await client.request("pres", channel=channel, action="enter", data="here")
    watcher = await json_client(presence_cluster.a.url)
    await watcher.request("presSub", channel=channel)
    members = [f for f in watcher.backlog if f["t"] == "presEvt"]
    assert len(members) == 2 and len({m["connectionId"] for m in members}) == 2
    for client in (first, second, watcher):
        await client.close()


async def test_clean_close_leaves_at_once(presence_cluster: Cluster) -> None:
    channel = channel_name()
    watcher = await json_client(presence_cluster.b.url)
    await watcher.request("presSub", channel=channel)
    client = await json_client(presence_cluster.a.url, clientId="leaver")
    await client.request("pres", channel=channel, action="enter", data={"x": 1})
    assert event(await next_event(watcher)) == ("enter", "leaver", {"x": 1})
    started = time.monotonic()
    await client.close()
    assert event(await next_event(watcher)) == ("leave", "leaver", {"x": 1})
    assert time.monotonic() - started < 1.0
    await watcher.close()


async def test_quick_reconnect_keeps_membership_then_grace_expires(
    presence_cluster: Cluster,
) -> None:
    channel = channel_name()
    watcher = await json_client(presence_cluster.b.url)
    await watcher.request("presSub", channel=channel)
    proxy = await TcpProxy(presence_cluster.a.port).start()
    client = await JsonClient.connect(proxy.url)
    connected = await client.auth(key=APP_KEY, clientId="flaky")
    await client.request("pres", channel=channel, action="enter", data="hi")
    assert event(await next_event(watcher)) == ("enter", "flaky", "hi")
    proxy.cut()  # the link dies without a close frame
    # Reconnect (to the other gateway) inside the grace, and re-enter like the SDK does.
    again = await JsonClient.connect(presence_cluster.b.url)
    resumed = await again.auth(
        key=APP_KEY, clientId="flaky", resumeConnectionId=connected["connectionId"]
    )
    assert resumed["connectionId"] == connected["connectionId"]
    await again.request("pres", channel=channel, action="enter", data="hi")
    with pytest.raises(asyncio.TimeoutError):
        await next_event(watcher, timeout=GRACE_S + TTL_S + 1)  # no leave, no enter
    # Now a cut with no reconnect: the leave comes once the grace is over.
    proxy2 = await TcpProxy(presence_cluster.b.port).start()
    third = await JsonClient.connect(proxy2.url)
    await third.auth(key=APP_KEY, clientId="gone")
    await third.request("pres", channel=channel, action="enter", data="bye")
    assert event(await next_event(watcher)) == ("enter", "gone", "bye")
    started = time.monotonic()
    proxy2.cut()
    leave = await next_event(watcher, timeout=GRACE_S + 5)
    waited = time.monotonic() - started
    assert event(leave) == ("leave", "gone", "bye")
    assert GRACE_S - 0.5 <= waited <= GRACE_S + 3, waited
    await again.close()
    await watcher.close()
    await proxy.close()
    await proxy2.close()


async def test_unsub_ends_watcher_and_membership(presence_cluster: Cluster) -> None:
    channel = channel_name()
    watcher = await json_client(presence_cluster.b.url)
    await watcher.request("presSub", channel=channel)
    client = await json_client(presence_cluster.a.url, clientId="unsubber")
    await client.request("sub", channel=channel)
    await client.request("pres", channel=channel, action="enter")
    assert event(await next_event(watcher)) == ("enter", "unsubber", None)
    await client.request("unsub", channel=channel)
    assert event(await next_event(watcher)) == ("leave", "unsubber", None)
    await client.close()
    await watcher.close()


async def test_json_sub_also_delivers_presence_once(presence_cluster: Cluster) -> None:
    channel = channel_name()
    client = await json_client(presence_cluster.a.url, clientId="legacy")
    await client.request("sub", channel=channel)
    await client.request("presSub", channel=channel)
    other = await json_client(presence_cluster.b.url, clientId="peer")
    await other.request("pres", channel=channel, action="enter")
    assert event(await next_event(client)) == ("enter", "peer", None)
    with pytest.raises(asyncio.TimeoutError):
        await next_event(client, timeout=0.5)
    await client.close()
    await other.close()


async def test_limits(presence_cluster: Cluster) -> None:
    channel = channel_name()
    clients = [await json_client(presence_cluster.a.url, clientId=f"m{i}") for i in range(5)]
    for client in clients[:4]:
        assert (await client.request("pres", channel=channel, action="enter"))["t"] == "ack"
    full = await clients[4].request("pres", channel=channel, action="enter")
    assert full["t"] == "err" and full["code"] == 42900
    big = await clients[0].request("pres", channel=channel, action="update", data="x" * 100)
    assert big["t"] == "err" and big["code"] == 40001 and "64" in big["message"]
    for client in clients:
        await client.close()


async def test_killed_gateway_members_leave_within_the_ttl() -> None:
    """Its heartbeat expires within the TTL: every watcher sends the leaves at once."""
    environment = {"RT_PRESENCE_TTL_S": str(TTL_S), "RT_PRESENCE_GRACE_S": "30"}
    with running_cluster(environment) as cluster:
        channel = channel_name()
        watcher = await json_client(cluster.b.url)
        await watcher.request("presSub", channel=channel)
        doomed = [await json_client(cluster.a.url, clientId=f"d{i}") for i in range(3)]
        for index, client in enumerate(doomed):
            await client.request("pres", channel=channel, action="enter", data=index)
        for _ in doomed:
            await next_event(watcher)
        # One more whose enter is written just before the kill: no heartbeat of its gateway
        # comes after it, and it must leave all the same.
        last = await json_client(cluster.a.url, clientId="d3")
        await last.request("pres", channel=channel, action="enter", data=3)
        started = time.monotonic()
        os.kill(cluster.a.process.pid, signal.SIGKILL)
        events = [await next_event(watcher, timeout=TTL_S + 10) for _ in range(5)]
        elapsed = time.monotonic() - started
        print(f"\nmembers of a SIGKILLed gateway left after {elapsed:.2f}s (TTL {TTL_S}s)")
        assert event(events[0]) == ("enter", "d3", 3)
        assert sorted(event(f) for f in events[1:]) == [
            ("leave", "d0", 0),
            ("leave", "d1", 1),
            ("leave", "d2", 2),
            ("leave", "d3", 3),
        ]
        assert elapsed <= TTL_S + 3
        # A new watcher no longer sees them.
        late = await json_client(cluster.b.url)
        await late.request("presSub", channel=channel)
        assert not [f for f in late.backlog if f["t"] == "presEvt"]
        await watcher.close()
        await late.close()
