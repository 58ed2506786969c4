"""The Python client against the real cluster (nats-server, two gateways, history worker):
publish/subscribe across gateways, history pages, presence, resume across a cut TCP
connection, exactly-once resends, token renewal on 40102."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from realtime_client import (
    ChannelState,
    ChannelStateChange,
    ConnectionState,
    ConnectionStateChange,
    Message,
    OutgoingMessage,
    PresenceMessage,
    RealtimeError,
    Rest,
    create_jwt,
    generate_random_key,
)
from realtime_client.realtime import BatchSpec
from tests.client.conftest import ClientFactory, channel_name, until
from tests.support import APP_KEY, Cluster, TcpProxy


async def test_publish_and_subscribe_across_gateways(
    cluster: Cluster, make_client: ClientFactory
) -> None:
    name = channel_name()
    subscriber = make_client(endpoint=cluster.b.url, client_id="reader")
    publisher = make_client(client_id="writer")
    received: list[Message] = []
    chats: list[Message] = []
    channel = subscriber.channels.get(name)
    await channel.subscribe(received.append)
    await channel.subscribe(chats.append, "chat")
    assert channel.state is ChannelState.ATTACHED

    outgoing = publisher.channels.get(name)
    serials = await asyncio.gather(
        outgoing.publish("chat", {"text": "one"}), outgoing.publish("chat", {"text": "two"})
    )
    # Two single publishes within the batch interval go out as one batch: one serial.
    assert serials[0] == serials[1] > 0
    batch_serial = await outgoing.publish([OutgoingMessage("a", 1), ("b", [2]), {"name": "c"}])
    assert batch_serial == serials[0] + 1
    assert await outgoing.publish("typing", True, ephemeral=True) == 0
    await until(lambda: len(received) == 6, "six messages")

    assert [(m.name, m.data) for m in received] == [
        ("chat", {"text": "one"}),
        ("chat", {"text": "two"}),
        ("a", 1),
        ("b", [2]),
        ("c", None),
        ("typing", True),
    ]
    assert {m.client_id for m in received} == {"writer"}
    assert received[0].message_id.endswith(":0") and received[1].message_id.endswith(":1")
    assert received[5].ephemeral and received[5].serial == 0
    assert [m.name for m in chats] == ["chat", "chat"]
    assert channel.serial == batch_serial
    assert publisher.client_id == "writer" and subscriber.connection_id


async def test_stream_history_pages_and_batch_publish(make_client: ClientFactory) -> None:
    name, other = channel_name(), channel_name()
    client = make_client()
    channel = client.channels.get(name)
    async with await channel.stream() as messages:
        for index in range(5):
            await channel.publish("n", index)  # one record each: awaited one by one
        result = await client.batch_publish(
            [BatchSpec([name, other], [("x", 1), ("y", 2)]), BatchSpec(other, ("z", 3))]
        )
        assert (result.success_count, result.failure_count) == (2, 0)
        seen = [await messages.get(timeout=5) for _ in range(7)]
    assert [m.data for m in seen] == [0, 1, 2, 3, 4, 1, 2]

    page = await channel.history(limit=2)
    # Two records, oldest first: the fifth publish and the batch (expanded).
    assert [m.data for m in page.messages] == [4, 1, 2]
    assert page.more
    pages = [page async for page in channel.history_pages(limit=2)]
    assert [[m.data for m in p.messages] for p in pages] == [[4, 1, 2], [2, 3], [0, 1]]
    assert not pages[-1].more
    other_history = await client.channels.get(other).history()
    assert [m.name for m in other_history.messages] == ["x", "y", "z"]


async def test_presence_enter_update_leave_get_and_subscribe(
    cluster: Cluster, make_client: ClientFactory
) -> None:
    name = channel_name()
    watcher = make_client(endpoint=cluster.b.url, client_id="watcher")
    member = make_client(client_id="alice")
    events: list[PresenceMessage] = []
    presence = watcher.channels.get(name).presence
    await presence.subscribe(events.append)
    assert await presence.get() == []

    alice = member.channels.get(name).presence
    await alice.enter({"mood": "happy"})
    await until(lambda: len(events) == 1, "enter")
    members = await presence.get()
    assert [(m.action, m.client_id, m.data) for m in members] == [
        ("present", "alice", {"mood": "happy"})
    ]
    assert members[0].connection_id == member.connection_id

    await alice.update({"mood": "busy"})
    await alice.leave()
    await until(lambda: len(events) == 3, "update and leave")
    assert [(e.action, e.data) for e in events] == [
        ("enter", {"mood": "happy"}),
        ("update", {"mood": "busy"}),
        ("leave", {"mood": "busy"}),  # leave carries the last data
    ]
    assert await presence.get() == []


async def test_resume_across_a_cut_connection(proxy: TcpProxy, make_client: ClientFactory) -> None:
    name = channel_name()
    subscriber = make_client(endpoint=proxy.url, client_id="resumer")
    publisher = make_client()
    received: list[Message] = []
    changes: list[ChannelStateChange] = []
    states: list[ConnectionStateChange] = []
    channel = subscriber.channels.get(name)
    channel.on(changes.append)
    subscriber.connection.on(states.append)
    presence = channel.presence
    await channel.subscribe(received.append)
    await presence.enter({"here": True})
    outgoing = publisher.channels.get(name)
    await outgoing.publish("before", 0)
    await until(lambda: len(received) == 1, "the first message")
    first_connection = subscriber.connection_id

    # Hold the server's frames so nothing published from now on reaches the subscriber
    # live, then cut: everything must come back through the resume.
    proxy.hold = True
    for index in range(1, 21):
        await outgoing.publish("during", index)
    proxy.cut()
    proxy.hold = False
    await until(lambda: len(received) == 21, "the resumed messages")
    assert [m.data for m in received] == list(range(21))
    assert subscriber.connection_id == first_connection  # resumeConnectionId honoured
    resumed = [c for c in changes if c.current is ChannelState.ATTACHED and c.resumed]
    assert resumed, changes
    assert [s.current for s in states][:5] == [
        ConnectionState.CONNECTING,
        ConnectionState.CONNECTED,
        ConnectionState.DISCONNECTED,
        ConnectionState.CONNECTING,
        ConnectionState.CONNECTED,
    ]
    retry_in = states[2].retry_in
    assert retry_in is not None and 0.05 <= retry_in <= 0.1  # the first back-off, jittered
    # Presence re-entered with the same connection id and data.
    observer = publisher.channels.get(name).presence
    members = await observer.get()
    assert [(m.connection_id, m.data) for m in members] == [(first_connection, {"here": True})]


async def test_publishes_in_flight_are_resent_exactly_once(
    cluster: Cluster, proxy: TcpProxy, make_client: ClientFactory
) -> None:
    name = channel_name()
    client = make_client(endpoint=proxy.url, client_id="once")
    channel = client.channels.get(name)
    await client.connect()
    proxy.hold = True  # the server stores the publish, its ack never arrives
    publish = asyncio.ensure_future(channel.publish("only", {"once": True}))
    async with Rest(key=APP_KEY, endpoint=cluster.a.http) as rest:
        stored: list[Any] = []

        async def stored_now() -> bool:
            page = await rest.channel(name).history()
            stored[:] = page.items
            return bool(page.items)

        for _ in range(200):
            if await stored_now():
                break
            await asyncio.sleep(0.02)
        assert len(stored) == 1 and not publish.done()
        proxy.cut()
        proxy.hold = False
        serial = await asyncio.wait_for(publish, 10)  # acked after the resend
        page = await rest.channel(name).history()
    assert [(m.serial, m.data) for m in page.items] == [(serial, {"once": True})]
    assert page.items[0].id == stored[0].id


async def test_token_renewal_on_40102(cluster: Cluster, make_client: ClientFactory) -> None:
    calls: list[float] = []

    def token() -> str:
        calls.append(asyncio.get_running_loop().time())
        return create_jwt(APP_KEY, "renewing", ttl=1.5)

    name = channel_name()
    client = make_client(auth_callback=token)
    notices: list[ConnectionStateChange] = []
    client.connection.on(
        lambda change: notices.append(change) if change.current is change.previous else None
    )
    received: list[Message] = []
    await client.channels.get(name).subscribe(received.append)
    await until(lambda: len(calls) >= 2, "a renewed token", timeout=8)
    await client.connect(timeout=5)
    assert any(isinstance(n.reason, RealtimeError) and n.reason.code == 40102 for n in notices)
    # Renewed at once, not after a back-off, and the channel works on the new connection.
    await client.channels.get(name).publish("after", "renewal")
    await until(lambda: [m.data for m in received] == ["renewal"], "a message after renewal")
    assert client.client_id == "renewing"


async def test_static_credentials_fail_and_capabilities_are_terminal(
    make_client: ClientFactory,
) -> None:
    expired = create_jwt(APP_KEY, "late", ttl=1)
    await asyncio.sleep(1.1)
    client = make_client(token=expired)
    with pytest.raises(RealtimeError) as failure:
        await client.connect(timeout=5)
    assert failure.value.code == 40102 and client.state is ConnectionState.FAILED

    bad = make_client(key="app1.main:wrong")
    with pytest.raises(RealtimeError) as refused:
        await bad.connect(timeout=5)
    assert refused.value.code == 40101

    limited = make_client(token=create_jwt(APP_KEY, "limited", {"public:*": ["subscribe"]}))
    channel = limited.channels.get(channel_name("secret"))
    with pytest.raises(RealtimeError) as denied:
        await channel.attach()
    assert 40300 <= denied.value.code < 40400 and channel.state is ChannelState.FAILED


async def test_encrypted_channel_round_trip(cluster: Cluster, make_client: ClientFactory) -> None:
    key = generate_random_key()
    name = channel_name()
    sender = make_client()
    reader = make_client(endpoint=cluster.b.url)
    plain_view = make_client()
    received: list[Message] = []
    raw: list[Message] = []
    await reader.channels.get(name, cipher=key).subscribe(received.append)
    await plain_view.channels.get(name).subscribe(raw.append)
    await sender.channels.get(name, cipher=key).publish("secret", {"pin": 1234})
    await until(lambda: len(received) == 1 and len(raw) == 1, "the encrypted message")
    assert (received[0].data, received[0].encoding) == ({"pin": 1234}, "")
    assert raw[0].encoding == "cipher+aes-256-gcm/base64" and isinstance(raw[0].data, str)
    history = await reader.channels.get(name).history()
    assert [m.data for m in history.messages] == [{"pin": 1234}]


async def test_rest_client(cluster: Cluster) -> None:
    name = channel_name()
    async with Rest(key=APP_KEY, endpoint=cluster.a.http, client_id="backend") as rest:
        assert abs(await rest.time() - time.time() * 1000) < 60_000
        channel = rest.channel(name)
        first = await channel.publish("one", 1)
        again = await channel.publish({"name": "one", "data": 1, "id": first.message_id})
        assert again.serial == first.serial  # deduplicated by id
        await channel.publish([{"name": "a", "data": 2}, {"name": "b", "data": 3}])
        page = await channel.history(limit=1)
        assert [m.name for m in page.items] == ["b", "a"] and page.has_next()  # newest first
        older = await page.next()
        assert older is not None and [m.data for m in older.items] == [1] and older.is_last()
        assert [m.client_id for m in page.items] == ["backend", "backend"]
        outcome = await rest.batch_publish({name: [{"name": "c"}], "bad name": [{"name": "d"}]})
        assert outcome["bad name"].code == 40001  # type: ignore[union-attr]
        details = await rest.auth.request_token("token-user", ttl=60)
        assert details.client_id == "token-user" and details.key_name == "app1.main"
        assert await rest.channel(name).presence.get() == []

    calls = 0

    async def token() -> str:
        nonlocal calls
        calls += 1
        # The first token is already expired: the 401 makes the client renew once.
        return create_jwt(APP_KEY, "rest-user", ttl=1) if calls > 1 else expired

    expired = create_jwt(APP_KEY, "rest-user", ttl=1)
    await asyncio.sleep(1.1)
    async with Rest(auth_callback=token, endpoint=cluster.a.http) as rest:
        result = await rest.channel(name).publish("by-token", None)
        assert result.serial and calls == 2
    with pytest.raises(httpx.ConnectError):
        async with Rest(key=APP_KEY, endpoint="http://127.0.0.1:1") as rest:
            await rest.time()
