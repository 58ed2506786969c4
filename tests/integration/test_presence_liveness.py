"""Presence liveness per gateway (issue 17): idle members cost no writes, a gateway whose
heartbeat lapsed comes back with its members, and a member that moved to another gateway
outlives the gateway it left.

The tests share one cluster (gateways a and b, plus c) and run in file order: the last one
kills gateway c."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import nats
import nats.js.errors
import orjson
import pytest
from nats.js.kv import KeyValue

from tests.support import (
    APP_KEY,
    Cluster,
    JsonClient,
    Service,
    TcpProxy,
    json_client,
    running_cluster,
    start_service,
    wait_ready,
)

TTL_S = 3.0
GRACE_S = 2.0
BUCKET = "rt_presence"
ENVIRONMENT = {"RT_PRESENCE_TTL_S": str(TTL_S), "RT_PRESENCE_GRACE_S": str(GRACE_S)}
Event = tuple[str, str, Any]


@pytest.fixture(scope="module")
def gateways() -> Iterator[tuple[Cluster, Service]]:
    with running_cluster(ENVIRONMENT) as cluster:
        third = start_service("gateway", cluster.nats.url, env=ENVIRONMENT)
        try:
            wait_ready(third.port)
            yield cluster, third
        finally:
            third.stop()


def channel_name() -> str:
    return f"room:{uuid.uuid4().hex[:10]}"


def event(frame: dict[str, Any]) -> Event:
    return frame["action"], frame["clientId"], frame.get("data")


async def events_within(client: JsonClient, seconds: float) -> list[Event]:
    """Every presence event ``client`` receives within ``seconds``."""
    found: list[Event] = []
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            found.append(event(await client.receive_until("presEvt", timeout=remaining)))
        except TimeoutError:
            break
    return found


async def bucket(url: str) -> tuple[nats.NATS, KeyValue]:
    client = await nats.connect(url)
    return client, await client.jetstream().key_value(BUCKET)


async def records(kv: KeyValue, channel: str) -> dict[str, dict[str, Any]]:
    """The live member records of ``channel``, by clientId."""
    token = channel.replace(":", "=")
    found = {}
    keys: list[str] = []
    with contextlib.suppress(nats.js.errors.NoKeysError):
        keys = await kv.keys()
    for key in keys:
        if f".{token}." in key:
            try:
                entry = await kv.get(key)
            except nats.js.errors.KeyNotFoundError:
                continue  # deleted since it was listed
            if entry.value:
                record = orjson.loads(entry.value)
                found[record["clientId"]] = record
    return found


async def records_once(
    kv: KeyValue, channel: str, done: Callable[[dict[str, dict[str, Any]]], bool]
) -> dict[str, dict[str, Any]]:
    """The live member records of ``channel`` once ``done`` holds for them (or after 5 s:
    the caller's assertion then says what was left)."""
    for _ in range(25):
        found = await records(kv, channel)
        if done(found):
            return found
        await asyncio.sleep(0.2)
    return await records(kv, channel)


async def snapshot(url: str, channel: str) -> list[Event]:
    late = await json_client(url)
    await late.request("presSub", channel=channel)
    await late.close()
    return sorted(event(f) for f in late.backlog if f["t"] == "presEvt")


async def test_idle_members_cost_no_writes(gateways: tuple[Cluster, Service]) -> None:
    cluster, c = gateways
    channel = channel_name()
    members = [
        await json_client(url, clientId=f"idle{index}")
        for index, url in enumerate((cluster.a.url, cluster.b.url, c.url))
    ]
    for client in members:
        assert (await client.request("pres", channel=channel, action="enter"))["t"] == "ack"
    client, _ = await bucket(cluster.nats.url)
    try:
        writes = await client.subscribe(f"$KV.{BUCKET}.>")
        await asyncio.sleep(TTL_S * 1.5)  # several heartbeats of every gateway
        subjects = []
        while True:
            try:
                subjects.append((await writes.next_msg(timeout=0.01)).subject)
            except nats.errors.TimeoutError:
                break
    finally:
        await client.close()
    heartbeats = {s for s in subjects if s.startswith(f"$KV.{BUCKET}.=gateway.")}
    # Only heartbeats, one key per gateway, each rewritten every third of the TTL; no member
    # record is rewritten however long its member stays.
    assert len(heartbeats) == 3, subjects
    assert all(s in heartbeats for s in subjects), subjects
    assert len(subjects) >= 3 * 3, subjects
    for member in members:
        await member.close()


async def test_a_gateway_whose_heartbeat_lapsed_comes_back_with_its_members(
    gateways: tuple[Cluster, Service],
) -> None:
    cluster, c = gateways
    channel = channel_name()
    watcher = await json_client(cluster.a.url)
    await watcher.request("presSub", channel=channel)
    member = await json_client(c.url, clientId="cut-off")
    await member.request("pres", channel=channel, action="enter", data={"v": 1})
    assert await events_within(watcher, 2) == [("enter", "cut-off", {"v": 1})]
    client, kv = await bucket(cluster.nats.url)
    try:
        gateway = (await records(kv, channel))["cut-off"]["gateway"]
        # Gateway c stops answering (as if cut off) for longer than the TTL, alive all along:
        # its heartbeat expires, watchers see its member leave with its data, and a survivor
        # sweeps its record from the bucket.
        os.kill(c.process.pid, signal.SIGSTOP)
        try:
            leave = await watcher.receive_until("presEvt", timeout=TTL_S + 3)
            assert event(leave) == ("leave", "cut-off", {"v": 1})
            assert await records_once(kv, channel, lambda found: not found) == {}
        finally:
            os.kill(c.process.pid, signal.SIGCONT)
        # Back: it re-asserts its heartbeat, then its records. One enter, nothing more.
        assert await events_within(watcher, TTL_S) == [("enter", "cut-off", {"v": 1})]
        assert (await records(kv, channel))["cut-off"]["gateway"] == gateway
    finally:
        await client.close()
    assert await snapshot(cluster.b.url, channel) == [("enter", "cut-off", {"v": 1})]
    await member.close()
    await watcher.close()


async def test_records_of_the_earlier_layout_stay_visible_until_their_key_expires(
    gateways: tuple[Cluster, Service],
) -> None:
    """A rolling upgrade: the previous release's gateways write records that name no
    gateway, with a per-key TTL they keep refreshing. They are members while the key lives,
    and its expiry is their leave."""
    cluster, _ = gateways
    channel = channel_name()
    watcher = await json_client(cluster.a.url)
    await watcher.request("presSub", channel=channel)
    client = await nats.connect(cluster.nats.url)
    try:
        token = channel.replace(":", "=")
        legacy = orjson.dumps(
            {
                "clientId": "old",
                "connectionId": "legacy-connection",
                "data": '"o"',
                "encoding": "",
                "timestamp": 1,
            }
        )
        reply = await client.request(
            f"$KV.{BUCKET}.app1.{token}.legacy-connection",
            legacy,
            timeout=2,
            headers={"Nats-TTL": "2s"},
        )
        assert b"error" not in reply.data, reply.data
        assert event(await watcher.receive_until("presEvt", timeout=2)) == ("enter", "old", "o")
        assert await snapshot(cluster.b.url, channel) == [("enter", "old", "o")]
        leave = await watcher.receive_until("presEvt", timeout=5)
        assert event(leave) == ("leave", "old", "o")
    finally:
        await client.close()
    await watcher.close()


async def test_a_member_resumed_elsewhere_outlives_the_gateway_it_left(
    gateways: tuple[Cluster, Service],
) -> None:
    cluster, c = gateways
    channel = channel_name()
    watcher = await json_client(cluster.a.url)
    await watcher.request("presSub", channel=channel)
    proxy = await TcpProxy(c.port).start()
    mover = await JsonClient.connect(proxy.url)
    connected = await mover.auth(key=APP_KEY, clientId="mover")
    await mover.request("pres", channel=channel, action="enter", data="m")
    stayer = await json_client(c.url, clientId="stayer")
    await stayer.request("pres", channel=channel, action="enter", data="s")
    assert sorted(await events_within(watcher, 2)) == [
        ("enter", "mover", "m"),
        ("enter", "stayer", "s"),
    ]
    # The link to c dies; the client resumes on b and re-enters, as the SDKs do.
    proxy.cut()
    again = await JsonClient.connect(cluster.b.url)
    resumed = await again.auth(
        key=APP_KEY, clientId="mover", resumeConnectionId=connected["connectionId"]
    )
    assert resumed["connectionId"] == connected["connectionId"]
    assert (await again.request("pres", channel=channel, action="enter", data="m"))["t"] == "ack"
    client, kv = await bucket(cluster.nats.url)
    try:
        moved = await records(kv, channel)
        assert moved["mover"]["gateway"] != moved["stayer"]["gateway"]  # b's now, not c's
        # Then c dies. Its own member leaves within the TTL; the one that moved stays.
        started = time.monotonic()
        os.kill(c.process.pid, signal.SIGKILL)
        leave = await watcher.receive_until("presEvt", timeout=TTL_S + 3)
        print(f"\nkilled gateway's member left after {time.monotonic() - started:.2f}s")
        assert event(leave) == ("leave", "stayer", "s")
        assert await events_within(watcher, 1.0) == []
        assert await snapshot(cluster.b.url, channel) == [("enter", "mover", "m")]
        # A survivor swept c's records from the bucket.
        left = await records_once(kv, channel, lambda found: "stayer" not in found)
        assert list(left) == ["mover"]
    finally:
        await client.close()
    for each in (again, watcher):
        await each.close()
    await proxy.close()
