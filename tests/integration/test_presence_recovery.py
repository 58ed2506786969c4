"""Presence recovers from a lost feed consumer and from nats-server restarts (issue 10,
item 8): watchers keep seeing every enter and leave, including the leaves of a gateway
that died while NATS was down, and members whose gateway's heartbeat expired during a long
outage come back.

The tests share one cluster and run in file order: the restart tests kill gateway c."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import nats
import orjson
import pytest

from realtime.dev import find_nats_server
from tests.support import (
    JsonClient,
    NatsServer,
    Service,
    free_port,
    json_client,
    start_nats,
    start_service,
    wait_for_port,
    wait_ready,
)

TTL_S = 3.0
GRACE_S = 2.0
BUCKET = "rt_presence"
ENVIRONMENT = {"RT_PRESENCE_TTL_S": str(TTL_S), "RT_PRESENCE_GRACE_S": str(GRACE_S)}
Event = tuple[str, str, Any]


class PresenceCluster:
    """nats-server on a fixed port and store directory, and three gateways: the watcher's
    (a), the members' (b) and one to kill (c)."""

    def __init__(self, server: NatsServer, gateways: list[Service]) -> None:
        self.server = server
        self.a, self.b, self.c = gateways

    def stop_nats(self) -> None:
        """Stop nats-server, keeping its store directory (``NatsServer.stop`` deletes it)."""
        assert self.server.process is not None
        self.server.process.terminate()
        self.server.process.wait(10)

    def start_nats_again(self) -> None:
        """A new nats-server with the arguments ``start_nats`` used: same port, same store."""
        self.server.process = subprocess.Popen(
            [
                find_nats_server(),
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                str(self.server.port),
                "-sd",
                self.server.store,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.server.port)


@pytest.fixture(scope="module")
def cluster() -> Iterator[PresenceCluster]:
    server = start_nats(free_port())
    if server.process is None:
        server.stop()
        pytest.skip("restarting nats-server needs a local process, not a container")
    gateways = [start_service("gateway", server.url, env=ENVIRONMENT) for _ in range(3)]
    try:
        for gateway in gateways:
            wait_ready(gateway.port)
        yield PresenceCluster(server, gateways)
    finally:
        for gateway in gateways:
            gateway.stop()
        server.stop()


def channel_name() -> str:
    return f"room:{uuid.uuid4().hex[:10]}"


class Watcher:
    """A presSub-ed client that records every presence event it receives."""

    def __init__(self, client: JsonClient) -> None:
        self.client = client
        self.events: list[Event] = []

    @classmethod
    async def start(cls, url: str, channel: str) -> Watcher:
        client = await json_client(url, clientId="watcher")
        ack = await client.request("presSub", channel=channel)
        assert ack["t"] == "ack", ack
        watcher = cls(client)
        watcher.events += [_event(f) for f in client.backlog if f["t"] == "presEvt"]
        client.backlog.clear()
        return watcher

    async def wait_for(self, expected: Event, timeout: float) -> float:
        """Read events until ``expected`` arrives; return when (monotonic time)."""
        deadline = time.monotonic() + timeout
        while expected not in self.events:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {expected} within {timeout:.1f}s; got {self.events}")
            try:
                frame = await self.client.receive_until("presEvt", timeout=remaining)
            except TimeoutError:
                continue
            self.events.append(_event(frame))
        return time.monotonic()

    async def quiet(self, seconds: float) -> None:
        """Record whatever else arrives within ``seconds``."""
        with pytest.raises(TimeoutError):
            while True:
                frame = await self.client.receive_until("presEvt", timeout=seconds)
                self.events.append(_event(frame))


def _event(frame: dict[str, Any]) -> Event:
    return frame["action"], frame["clientId"], frame.get("data")


async def member(url: str, client_id: str, channel: str, data: str) -> JsonClient:
    client = await json_client(url, clientId=client_id)
    ack = await client.request("pres", channel=channel, action="enter", data=data)
    assert ack["t"] == "ack", ack
    return client


async def delete_feed_consumers(url: str) -> int:
    """Delete every consumer of the presence stream (each gateway's feed); return how many."""
    client = await nats.connect(url)
    try:
        js = client.jetstream()
        consumers = await js.consumers_info(f"KV_{BUCKET}")
        for consumer in consumers:
            await js.delete_consumer(f"KV_{BUCKET}", consumer.name)
        return len(consumers)
    finally:
        await client.close()


async def wait_for_heartbeat(url: str, channel: str, client_id: str) -> None:
    """Return right after the next heartbeat of the gateway holding ``client_id``'s
    membership of ``channel``, so that the heartbeat has a whole TTL ahead of it."""
    client = await nats.connect(url)
    try:
        token = channel.replace(":", "=")
        kv = await client.jetstream().key_value(BUCKET)
        gateway = ""
        for key in await kv.keys():
            if f".{token}." not in key:
                continue
            record = orjson.loads((await kv.get(key)).value or b"{}")
            if record.get("clientId") == client_id:
                gateway = record["gateway"]
        assert gateway, f"no record of {client_id} in {channel}"
        subscription = await client.subscribe(f"$KV.{BUCKET}.=gateway.{gateway}")
        await subscription.next_msg(timeout=TTL_S)
    finally:
        await client.close()


async def test_lost_feed_consumer_is_replaced(cluster: PresenceCluster) -> None:
    channel = channel_name()
    watcher = await Watcher.start(cluster.a.url, channel)
    first = await member(cluster.b.url, "first", channel, "1")
    await watcher.wait_for(("enter", "first", "1"), timeout=3)
    # Every gateway's feed consumer goes (an operator, or a server-side cleanup): nats-py's
    # ordered consumer would only notice after two missed idle heartbeats (10 s or more).
    assert await delete_feed_consumers(cluster.server.url) >= 3
    second = await member(cluster.b.url, "second", channel, "2")
    await first.request("pres", channel=channel, action="leave")
    await watcher.wait_for(("enter", "second", "2"), timeout=8)
    await watcher.wait_for(("leave", "first", "1"), timeout=2)
    await watcher.quiet(0.5)
    # Nothing lost, nothing doubled.
    assert sorted(watcher.events) == [
        ("enter", "first", "1"),
        ("enter", "second", "2"),
        ("leave", "first", "1"),
    ]
    assert "presence feed consumer lost (consumer gone)" in cluster.a.log()
    assert "presence re-synced 1 channels" in cluster.a.log()
    for client in (first, second, watcher.client):
        await client.close()


async def test_presence_survives_a_nats_server_restart(cluster: PresenceCluster) -> None:
    channel = channel_name()
    watcher = await Watcher.start(cluster.a.url, channel)
    stayer = await member(cluster.b.url, "stayer", channel, "s")
    doomed = await member(cluster.c.url, "doomed", channel, "d")
    await watcher.wait_for(("enter", "stayer", "s"), timeout=3)
    await watcher.wait_for(("enter", "doomed", "d"), timeout=3)
    before = len(watcher.events)

    # Right after a heartbeat of the stayer's gateway, so that a short outage cannot expire it.
    await wait_for_heartbeat(cluster.server.url, channel, "stayer")
    cluster.stop_nats()
    # The doomed member's gateway dies while NATS is down: nobody will delete its heartbeat,
    # it has to expire, and the watcher has to hear of that.
    os.kill(cluster.c.process.pid, signal.SIGKILL)
    await asyncio.sleep(0.5)
    await asyncio.to_thread(cluster.start_nats_again)
    back = time.monotonic()
    for gateway in (cluster.a, cluster.b):
        await asyncio.to_thread(wait_ready, gateway.port)

    # (a) a new member after the restart reaches the watcher on the other gateway
    newcomer = await member(cluster.b.url, "newcomer", channel, "n")
    await watcher.wait_for(("enter", "newcomer", "n"), timeout=5)
    # (b) so does the leave of a member from before the restart
    await stayer.request("pres", channel=channel, action="leave")
    await watcher.wait_for(("leave", "stayer", "s"), timeout=5)
    # (d) the member of the gateway killed during the outage leaves within about one TTL
    left = await watcher.wait_for(
        ("leave", "doomed", "d"), timeout=back + TTL_S + 4 - time.monotonic()
    )
    print(f"\nkilled gateway's member left {left - back:.2f}s after NATS was back (TTL {TTL_S}s)")
    assert left - back <= TTL_S + 3
    # Each change exactly once: nothing lost, nothing doubled, no leave/enter flicker.
    await watcher.quiet(1.0)
    assert sorted(watcher.events[before:]) == [
        ("enter", "newcomer", "n"),
        ("leave", "doomed", "d"),
        ("leave", "stayer", "s"),
    ]
    # Said once, not per change (the re-sync summary shares the rate limit of test 1's).
    assert cluster.a.log().count("NATS reconnected: restarting the presence feed") == 1
    for client in (stayer, newcomer, watcher.client):
        await client.close()
    await doomed.close()  # its gateway is gone: the socket is already closed


async def test_keys_that_expired_during_a_long_outage_come_back(cluster: PresenceCluster) -> None:
    channel = channel_name()
    watcher = await Watcher.start(cluster.a.url, channel)
    stayer = await member(cluster.b.url, "stayer", channel, "s")
    await watcher.wait_for(("enter", "stayer", "s"), timeout=3)
    before = len(watcher.events)
    # Down for longer than the TTL: the server expires the key as soon as it is back.
    cluster.stop_nats()
    await asyncio.sleep(TTL_S + 1)
    await asyncio.to_thread(cluster.start_nats_again)
    for gateway in (cluster.a, cluster.b):
        await asyncio.to_thread(wait_ready, gateway.port)
    # Gateway b re-asserts its heartbeat and records on reconnect. Depending on who is
    # first, the watcher sees nothing, or the expiry and the return; never a member that
    # silently vanished.
    await watcher.quiet(TTL_S)
    assert watcher.events[before:] in ([], [("leave", "stayer", "s"), ("enter", "stayer", "s")])
    late = await Watcher.start(cluster.a.url, channel)
    assert late.events == [("enter", "stayer", "s")]
    # The failed heartbeats were logged (once per tick at most, never per member).
    assert "presence heartbeat skipped, NATS not connected" in cluster.b.log()
    for client in (stayer, watcher.client, late.client):
        await client.close()
