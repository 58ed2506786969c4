"""The client's own logic, against an in-process fake server (tests/client/fake_server.py)
and without one: back-off and jitter bounds, the connection state machine, auth failures,
keep-alive, auto-batching, exactly-once resends, de-duplication and gap fetch, resume
cursors, and the cipher against vectors made by the JS SDK."""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import AsyncIterator

import pytest

from realtime_client import (
    Backoff,
    ChannelState,
    ChannelStateChange,
    Cipher,
    CipherError,
    ConnectionState,
    ConnectionStateChange,
    Message,
    Realtime,
    RealtimeError,
    is_cipher_encoding,
)
from realtime_client.connection import _Slots, endpoint_to_websocket_url
from realtime_client.rest import _link_next, endpoint_to_http_url
from realtime_protocol.frames import (
    AckFrame,
    AuthFrame,
    BatchMember,
    ErrorFrame,
    FetchFrame,
    FetchResponseFrame,
    HistoryFrame,
    MessageFrame,
    PingFrame,
    PresenceAction,
    PresenceFrame,
    PublishFrame,
    ServerFrame,
    SubscribeFrame,
)
from realtime_protocol.frames import (
    Message as WireMessage,
)
from tests.client.conftest import until
from tests.client.fake_server import FakeServer

MESSAGE_ID = re.compile(r"^\d{13}-[0-9a-f]{8}$")


@pytest.fixture
async def server() -> AsyncIterator[FakeServer]:
    running = await FakeServer().start()
    yield running
    await running.close()


@pytest.fixture
async def clients() -> AsyncIterator[list[Realtime]]:
    made: list[Realtime] = []
    yield made
    await asyncio.gather(*(client.close() for client in made), return_exceptions=True)


def client_for(server: FakeServer, clients: list[Realtime], **options: object) -> Realtime:
    if not {"key", "token", "auth_callback"} & options.keys():
        options["key"] = "app.k:secret"
    options.setdefault("initial_reconnect_delay", 0.05)
    options.setdefault("max_reconnect_delay", 0.2)
    client = Realtime(endpoint=server.url, **options)  # type: ignore[arg-type]
    clients.append(client)
    return client


def wire_message(serial: int, message_id: str, data: str = "1", client: str = "c") -> WireMessage:
    return WireMessage("room", "m", data.encode(), message_id, client, 1, "", serial)


# ---- pure ----


def test_backoff_is_the_sdk_ceiling_with_jitter_below_it() -> None:
    backoff = Backoff(1.0, 30.0, jitter=0.5, generator=random.Random(7))
    ceilings = [1, 2, 4, 8, 16, 30, 30, 30]
    delays = [backoff.next() for _ in ceilings]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling * 0.5 <= delay <= ceiling
    assert len({round(d / c, 6) for d, c in zip(delays, ceilings, strict=True)}) > 1  # jittered
    backoff.reset()
    assert 0.5 <= backoff.next() <= 1.0
    exact = Backoff(1.0, 30.0, jitter=0.0)
    assert [exact.next() for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    many = Backoff(0.1, 0.1, jitter=1.0, generator=random.Random(1))
    samples = [many.next() for _ in range(2000)]
    assert min(samples) >= 0.0 and max(samples) <= 0.1
    assert min(samples) < 0.01 and max(samples) > 0.09  # spread over the whole range
    assert Backoff(1, 30).ceiling(10_000) == 30  # no overflow after a very long outage
    with pytest.raises(ValueError):
        Backoff(1.0, 30.0, jitter=1.5)


def test_endpoints_map_as_in_the_sdks() -> None:
    assert endpoint_to_websocket_url("realtime.example") == "wss://realtime.example"
    assert endpoint_to_websocket_url("ws://h:1/p") == "ws://h:1/p"
    assert endpoint_to_websocket_url("https://h") == "wss://h"
    assert endpoint_to_http_url("h") == "https://h"
    assert endpoint_to_http_url("http://h:8080/") == "http://h:8080"
    assert endpoint_to_http_url("ws://h:8080") == "http://h:8080"
    assert _link_next('</channels/a/messages?before=8&limit=2>; rel="next"') == (
        "/channels/a/messages?before=8&limit=2"
    )
    assert _link_next('</x>; rel="prev"') is None


# JS SDK 0.16.0 Cipher output (tests/node_modules/@foony/realtime, crypto.ts).
JS_KEY_256 = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
JS_KEY_128 = "//79/Pv6+fj39vX08/Lx8A=="
JS_DATA_256 = (
    "1RJd7PPSU+VNJgYXYLeH1mety9xNq5cCCe9+sBEO9rRdnx7OqygB+51bReAAPyXKh9jJPJpqbC+ZHhnrHO2z9cRO"
)
JS_DATA_128 = "XDm98IxG9WHHOkK5To58G1nRe53O1hrPSOM+45aOuFJrHH2tWOXEh1paYw=="


def test_cipher_reads_js_vectors_and_round_trips() -> None:
    cipher = Cipher(JS_KEY_256)
    assert cipher.decrypt("cipher+aes-256-gcm/base64", JS_DATA_256) == {
        "text": "héllo ✓",
        "n": [1, 2.5, None],
    }
    assert Cipher(JS_KEY_128).decrypt("cipher+aes-128-gcm/base64", JS_DATA_128) == ("just a string")
    encoding, data = cipher.encrypt({"a": [1, "✓"]})
    assert encoding == "cipher+aes-256-gcm/base64"
    assert cipher.decrypt(encoding, data) == {"a": [1, "✓"]}
    assert cipher.encrypt(1)[1] != cipher.encrypt(1)[1]  # a fresh IV every time
    assert Cipher(JS_KEY_128, "aes-128-gcm").encoding == "cipher+aes-128-gcm/base64"
    assert is_cipher_encoding("utf-8/cipher+aes-128-gcm/base64")
    assert not is_cipher_encoding("json") and not is_cipher_encoding(None)
    with pytest.raises(CipherError):
        Cipher(JS_KEY_128).decrypt("cipher+aes-128-gcm/base64", JS_DATA_256)  # wrong key
    tampered = JS_DATA_256[:-6] + ("A" if JS_DATA_256[-6] != "A" else "B") + JS_DATA_256[-5:]
    with pytest.raises(CipherError):
        cipher.decrypt("cipher+aes-256-gcm/base64", tampered)
    with pytest.raises(CipherError):
        cipher.decrypt("base64", JS_DATA_256)
    with pytest.raises(ValueError):
        Cipher(JS_KEY_128, "aes-256-gcm")  # a label that contradicts the key
    with pytest.raises(ValueError):
        Cipher(b"short")


# ---- the connection's state machine ----


async def test_states_reconnect_and_resume_connection_id(
    server: FakeServer, clients: list[Realtime]
) -> None:
    client = client_for(server, clients, client_id="alice")
    changes: list[ConnectionStateChange] = []
    client.connection.on(changes.append)
    await client.connect()
    assert server.auths[0] == AuthFrame(key="app.k:secret", client_id="alice")
    await server.drop()
    await until(lambda: len(server.auths) == 2 and client.state is ConnectionState.CONNECTED, "")
    assert server.auths[1].resume_connection_id == "conn-1" == client.connection_id
    await client.close()
    states = [change.current for change in changes]
    assert states == [
        ConnectionState.CONNECTING,
        ConnectionState.CONNECTED,
        ConnectionState.DISCONNECTED,
        ConnectionState.CONNECTING,
        ConnectionState.CONNECTED,
        ConnectionState.CLOSING,
        ConnectionState.CLOSED,
    ]
    disconnected = changes[2]
    assert disconnected.previous is ConnectionState.CONNECTED
    assert disconnected.retry_in is not None and 0.025 <= disconnected.retry_in <= 0.05
    with pytest.raises(RealtimeError):
        await client.channels.get("room").attach()  # closed: nothing reconnects


async def test_auth_errors_fail_static_keys_and_retry_callbacks(
    server: FakeServer, clients: list[Realtime]
) -> None:
    server.handshake = lambda auth, attempt: ErrorFrame(40101, "bad key")
    static = client_for(server, clients)
    with pytest.raises(RealtimeError) as failed:
        await static.connect(timeout=5)
    assert failed.value.code == 40101 and static.state is ConnectionState.FAILED
    assert len(server.auths) == 1  # never retried

    tokens = iter(["t1", "t2", "t3"])
    server.handshake = lambda auth, attempt: (
        ErrorFrame(40102, "expired") if auth.token == "t1" else server._connected(auth, attempt)
    )

    async def renew() -> str:
        return next(tokens)

    renewing = client_for(server, clients, auth_callback=renew)
    await renewing.connect(timeout=5)
    assert [auth.token for auth in server.auths[1:]] == ["t1", "t2"]

    # Not an auth error: a static key retries (rate limit, server not ready).
    attempts = len(server.auths)
    server.handshake = lambda auth, attempt: (
        ErrorFrame(42900, "busy") if attempt == attempts + 1 else server._connected(auth, attempt)
    )
    busy = client_for(server, clients)
    await busy.connect(timeout=5)
    assert busy.state is ConnectionState.CONNECTED


async def test_keep_alive_timeout_reconnects(server: FakeServer, clients: list[Realtime]) -> None:
    server.keep_alive_ms = 100
    server.answer_pings = False
    client = client_for(server, clients)
    await client.connect()
    await until(lambda: len(server.auths) >= 2, "a reconnect after the pong deadline", 3)
    assert server.of_type(PingFrame)
    assert server.sockets[0].close_code == 4002


async def test_suspend_fails_pending_and_connect_restores(
    server: FakeServer, clients: list[Realtime]
) -> None:
    client = client_for(server, clients)
    channel = client.channels.get("room")
    await channel.attach()
    await client.suspend()
    assert client.state is ConnectionState.SUSPENDED and channel.state is ChannelState.SUSPENDED
    with pytest.raises(RealtimeError):
        await channel.publish("x", 1)  # not queued while suspended
    await client.connect()
    await until(lambda: channel.state is ChannelState.ATTACHED, "re-attached")
    assert len(server.of_type(SubscribeFrame)) == 2


# ---- publishing ----


async def test_single_publishes_are_auto_batched(
    server: FakeServer, clients: list[Realtime]
) -> None:
    client = client_for(server, clients)
    channel = client.channels.get("room")
    await client.connect()
    serials = await asyncio.gather(*(channel.publish("n", index) for index in range(450)))
    publishes = server.of_type(PublishFrame)
    assert [len(frame.members) for frame in publishes] == [200, 200, 50]
    assert [member.data for member in publishes[0].members[:3]] == [b"0", b"1", b"2"]
    assert serials == [1] * 200 + [2] * 200 + [3] * 50
    assert all(MESSAGE_ID.match(frame.message_id) for frame in publishes)
    assert len({frame.message_id for frame in publishes}) == 3

    assert await channel.publish("typing", None, ephemeral=True) == 0
    ephemeral = server.of_type(PublishFrame)[-1]
    assert ephemeral.ephemeral and not ephemeral.members and ephemeral.data == b"null"
    await channel.publish([("a", 1)], ephemeral=True)
    assert server.of_type(PublishFrame)[-1].members == (BatchMember("a", b"1"),)


async def test_unacked_publishes_are_resent_with_their_message_id(
    server: FakeServer, clients: list[Realtime]
) -> None:
    client = client_for(server, clients)
    channel = client.channels.get("room")
    await client.connect()
    server.ack_publishes = False
    publish = asyncio.ensure_future(channel.publish("once", 1))
    await server.wait_for(lambda: len(server.of_type(PublishFrame)) == 1)
    server.ack_publishes = True
    await server.drop()
    assert await asyncio.wait_for(publish, 5) == 1
    first, resent = server.of_type(PublishFrame)
    assert resent.message_id == first.message_id and resent.id > first.id
    assert resent.members == first.members

    # Published while disconnected: queued, sent once connected.
    server.handshake = lambda auth, attempt: (
        ErrorFrame(50001, "not ready") if attempt == 3 else server._connected(auth, attempt)
    )
    await server.drop()
    await until(lambda: client.state is not ConnectionState.CONNECTED, "the drop")
    assert await asyncio.wait_for(channel.publish("queued", 2), 5) == 2


# ---- channels ----


async def test_dedup_gap_fetch_and_resume_cursor(
    server: FakeServer, clients: list[Realtime]
) -> None:
    client = client_for(server, clients)
    channel = client.channels.get("room")
    received: list[Message] = []
    await channel.subscribe(received.append)
    await server.push(MessageFrame(wire_message(5, "a")))  # the baseline
    await server.push(MessageFrame(wire_message(6, "b")), MessageFrame(wire_message(6, "b")))
    await until(lambda: channel.serial == 6, "cursor 6")
    await server.push(MessageFrame(wire_message(9, "e")))  # 7 and 8 missing
    await server.wait_for(lambda: bool(server.of_type(FetchFrame)))
    fetch = server.of_type(FetchFrame)[0]
    assert (fetch.channel, fetch.from_serial) == ("room", 6)
    missing = tuple(wire_message(serial, id) for serial, id in ((7, "c"), (8, "d"), (9, "e")))
    await server.push(FetchResponseFrame(fetch.id, "room", missing, True))
    await until(lambda: channel.serial == 9, "cursor 9")
    assert [m.message_id for m in received] == ["a", "b", "e", "c", "d"]  # "e" only once
    # Another client's message with the same id is not a duplicate.
    await server.push(MessageFrame(wire_message(10, "a", client="other")))
    await until(lambda: len(received) == 6, "a same-id message from another client")

    changes: list[ChannelStateChange] = []
    channel.on(changes.append)
    server.ack_requests = False
    await server.drop()
    await server.wait_for(lambda: len(server.of_type(SubscribeFrame)) == 2)
    resume = server.of_type(SubscribeFrame)[-1]
    assert resume.last_serial == 10
    await server.push(AckFrame(resume.id, 0, False))  # the range aged out
    await until(lambda: any(change.current is ChannelState.ATTACHED for change in changes), "")
    attached = [change for change in changes if change.current is ChannelState.ATTACHED][-1]
    assert not attached.resumed and channel.serial == 0


async def test_batches_expand_and_presence_reenters(
    server: FakeServer, clients: list[Realtime]
) -> None:
    client = client_for(server, clients)
    channel = client.channels.get("room")
    received: list[Message] = []
    named: list[Message] = []
    await channel.subscribe(received.append)
    await channel.subscribe(named.append, ["b"])
    batch = WireMessage(
        "room",
        "",
        None,
        "batch",
        "c",
        7,
        serial=3,
        members=(BatchMember("a", b"1"), BatchMember("b", b'"two"', "enc")),
    )
    await server.push(MessageFrame(batch))
    await until(lambda: len(received) == 2, "the batch")
    assert [(m.name, m.data, m.message_id, m.encoding, m.serial) for m in received] == [
        ("a", 1, "batch:0", "", 0),
        ("b", "two", "batch:1", "enc", 0),
    ]
    assert [m.name for m in named] == ["b"] and channel.serial == 3

    await channel.presence.enter({"n": 1})
    await server.drop()
    await server.wait_for(lambda: len(server.of_type(PresenceFrame)) == 2)
    enters = server.of_type(PresenceFrame)
    assert [(frame.action, frame.data) for frame in enters] == [
        (PresenceAction.ENTER, b'{"n":1}'),
        (PresenceAction.ENTER, b'{"n":1}'),
    ]
    # One sub per attach: the re-entry waits for the restoring sub instead of sending another.
    assert len(server.of_type(SubscribeFrame)) == 2
    await channel.detach()
    await server.drop()
    await until(lambda: client.state is ConnectionState.CONNECTED and len(server.auths) == 3, "")
    await asyncio.sleep(0.05)
    assert len(server.of_type(PresenceFrame)) == 2  # detached: no re-entry


async def test_listener_errors_do_not_stop_delivery(
    server: FakeServer, clients: list[Realtime]
) -> None:
    client = client_for(server, clients)
    channel = client.channels.get("room")
    errors: list[BaseException] = []
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: errors.append(context["exception"]))
    try:

        def broken(message: Message) -> None:
            raise ValueError("application bug")

        received: list[Message] = []
        await channel.subscribe(broken)
        await channel.subscribe(received.append)
        await server.push(MessageFrame(wire_message(1, "x")))
        await until(lambda: len(received) == 1, "delivery past a broken listener")
        assert isinstance(errors[0], ValueError)
    finally:
        loop.set_exception_handler(previous)


async def test_stream_overflow_is_reported(server: FakeServer, clients: list[Realtime]) -> None:
    client = client_for(server, clients)
    channel = client.channels.get("room")
    stream = await channel.stream(max_queued=2)
    frames: list[ServerFrame] = [MessageFrame(wire_message(n, f"m{n}")) for n in range(1, 5)]
    await server.push(*frames)
    await until(lambda: stream.dropped == 2, "two dropped")
    assert [(await stream.get(1)).message_id for _ in range(2)] == ["m1", "m2"]
    with pytest.raises(RealtimeError, match="overflowed"):
        await stream.get(1)


async def test_publish_slots_bound_and_pass_on_in_order() -> None:
    slots = _Slots(2)
    order: list[int] = []
    release = asyncio.Event()

    async def hold(index: int) -> None:
        async with slots:
            order.append(index)
            await release.wait()

    tasks = [asyncio.ensure_future(hold(index)) for index in range(5)]
    await asyncio.sleep(0.01)
    assert order == [0, 1]  # two slots
    tasks[2].cancel()  # a waiter that gives up does not take a slot
    release.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert order == [0, 1, 3, 4]
    assert slots._free == 2 and not slots._waiters


async def test_close_fails_unacked_publishes_and_pending_requests(
    server: FakeServer, clients: list[Realtime]
) -> None:
    client = client_for(server, clients)
    channel = client.channels.get("room")
    await client.connect()
    server.ack_publishes = False
    server.ack_requests = False
    publish = asyncio.ensure_future(channel.publish("never", 1))
    attach = asyncio.ensure_future(channel.attach())
    await server.wait_for(lambda: bool(server.of_type(PublishFrame)))
    await client.close()
    for pending in (publish, attach):
        with pytest.raises(RealtimeError, match="closed"):
            await pending
    assert channel.state is ChannelState.DETACHED


async def test_attach_and_history_ride_over_a_drop(
    server: FakeServer, clients: list[Realtime]
) -> None:
    client = client_for(server, clients)
    channel = client.channels.get("room")
    await client.connect()
    server.ack_requests = False
    server.answer_history = False
    attach = asyncio.ensure_future(channel.attach())
    history = asyncio.ensure_future(channel.history())
    await server.wait_for(
        lambda: bool(server.of_type(SubscribeFrame) and server.of_type(HistoryFrame))
    )
    server.ack_requests = True
    server.answer_history = True
    await server.drop()
    await asyncio.wait_for(attach, 5)  # attached by the reconnect's restore, not an error
    page = await asyncio.wait_for(history, 5)  # asked again on the new connection
    assert channel.state is ChannelState.ATTACHED and page.messages == ()
    assert len(server.of_type(SubscribeFrame)) == 2 and len(server.of_type(HistoryFrame)) == 2
