"""Limits without sockets or NATS (issue 12, item 5): the token bucket, the session's publish
rate decisions, the per-app connection counts of the registry, the REST rule, the settings,
and Session + Connection (+ the long-poll adapter) with the in-memory engines, metrics
included."""

from __future__ import annotations

import asyncio
import base64
import math
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import REGISTRY

from gateway.app import LONG_POLL, create_app
from gateway.connection import Connection
from gateway.longpoll import SESSION_HEADER
from gateway.services import GatewayServices
from realtime_protocol import binary_codec, json_codec
from realtime_protocol.errors import ProtocolError
from realtime_protocol.frames import AuthFrame, ConnectedFrame, ErrorFrame, PublishFrame
from shared import rest
from shared.auth import Keyring, parse_api_key
from shared.history import HistoryOp, HistoryQuery
from shared.limits import KeyedBuckets, Limit, TokenBucket
from shared.session import (
    MAX_PUBLISH_PAUSE_S,
    Authenticate,
    Codec,
    Limits,
    Pause,
    Publish,
    Reply,
    Session,
    SessionState,
)
from shared.settings import Settings
from testing.memory_engines import MemoryBus, MemoryPresence

KEY = "app1.main:secret-one"
SECOND_KEY = "app1.other:secret-two"
OTHER_APP_KEY = "app2.main:secret-three"
KEYRING = Keyring([parse_api_key(text) for text in (KEY, SECOND_KEY, OTHER_APP_KEY)])


class FakeClock:
    """Monotonic seconds that move only when told to."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def limited(name: Limit) -> float:
    """The gateway's ``realtime_rate_limited_total`` for ``name`` (this process)."""
    value = REGISTRY.get_sample_value("realtime_rate_limited_total", {"limit": name.value})
    assert value is not None, f"no sample for {name}"
    return value


# ---- the token bucket ----


def test_a_bucket_starts_full_spends_its_burst_then_refuses() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10, burst=5, clock=clock)
    assert [bucket.take() for _ in range(7)] == [True] * 5 + [False] * 2


def test_a_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10, burst=5, clock=clock)
    for _ in range(5):
        assert bucket.take()
    clock.advance(0.25)  # 2.5 tokens
    assert [bucket.take() for _ in range(3)] == [True, True, False]
    clock.advance(60)  # a long pause refills no more than the burst
    assert [bucket.take() for _ in range(6)] == [True] * 5 + [False]


def test_refused_takes_cost_nothing() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=1, burst=1, clock=clock)
    assert bucket.take()
    for _ in range(100):  # a client hammering a refusing bucket is not locked out longer
        assert not bucket.take()
    clock.advance(1.0)
    assert bucket.take()


def test_a_cost_above_the_burst_passes_from_a_full_bucket_and_leaves_debt() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10, burst=5, clock=clock)
    assert bucket.full and bucket.take(20)  # full: the 20 pass at once
    assert bucket.tokens == -15
    assert not bucket.take()
    assert bucket.retry_after() == pytest.approx(1.6)  # 16 tokens at 10/s
    clock.advance(1.55)
    assert not bucket.take()
    clock.advance(0.06)
    assert bucket.take()


def test_a_cost_above_the_burst_waits_for_a_full_bucket() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10, burst=5, clock=clock)
    assert bucket.take(2)
    assert not bucket.take(20)  # 3 held, 5 (the whole burst) needed
    assert bucket.tokens == 3
    assert bucket.retry_after(20) == pytest.approx(0.2)
    clock.advance(0.2)
    assert bucket.take(20)


def test_retry_after_is_zero_when_a_take_would_pass() -> None:
    bucket = TokenBucket(rate=4, burst=2, clock=FakeClock())
    assert bucket.retry_after() == 0
    bucket.take(2)
    assert bucket.retry_after() == pytest.approx(0.25)


def test_a_clock_going_backwards_refills_nothing() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10, burst=2, clock=clock)
    bucket.take(2)
    clock.advance(-5)
    assert not bucket.take()
    clock.advance(5.15)  # back to where it was, plus 0.15 s: one token and a half
    assert bucket.take() and not bucket.take()


@pytest.mark.parametrize(("rate", "burst"), [(0, 10), (-1, 10), (10, 0), (10, 0.5)])
def test_a_bucket_needs_a_rate_and_a_burst(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst)


def test_keyed_buckets_are_independent_and_forget_only_full_ones() -> None:
    clock = FakeClock()
    buckets = KeyedBuckets(rate=1, burst=2, clock=clock, prune_above=4)
    assert buckets.take("a", 2) and not buckets.take("a")
    assert buckets.take("b")  # another key has its own bucket
    for key in ("c", "d"):
        assert buckets.take(key, 0)  # seen, still full
    assert len(buckets) == 4
    buckets.take("e")  # the fifth key prunes: the full ones go
    assert len(buckets) == 3  # a, b (not full) and e
    assert not buckets.take("a")  # a's debt was not forgotten
    for index in range(100):  # keys that come and go: each refills before the next
        buckets.take(f"k{index}")
        clock.advance(1)
    assert len(buckets) <= 2 * 4  # bounded, whatever the number of keys seen


# ---- the session's publish rate ----


def session(clock: FakeClock, **limits: Any) -> Session:
    created = Session(KEYRING, Limits(**limits), clock_ms=lambda: 1234, clock=clock)
    [command] = created.receive_message(orjson.dumps({"t": "auth", "key": KEY}), is_text=True)
    assert isinstance(command, Authenticate)
    created.authenticate(command.frame, assign_client_id="assigned")
    created.accept("conn-1")
    return created


def pub(request_id: int, channel: str = "room", members: int = 0) -> bytes:
    frame: dict[str, Any] = {"t": "pub", "id": request_id, "channel": channel, "name": "n"}
    if members:
        frame["messages"] = [{"name": "m", "data": index} for index in range(members)]
    else:
        frame["data"] = request_id
    return orjson.dumps(frame)


def outcome(commands: list[Any]) -> str | int:
    """``"publish"``, or the code of the ``err`` the publish got (a refusal for the rate is
    followed by a ``Pause``)."""
    if isinstance(commands[-1], Pause):
        commands = commands[:-1]
    [command] = commands
    if isinstance(command, Publish):
        return "publish"
    assert isinstance(command, Reply) and isinstance(command.frame, ErrorFrame)
    return command.frame.code


def pause(commands: list[Any]) -> float | None:
    """The ``Pause`` that ends ``commands``, in seconds, if any."""
    pauses = [command.seconds for command in commands if isinstance(command, Pause)]
    assert len(pauses) <= 1 and (not pauses or isinstance(commands[-1], Pause)), commands
    return pauses[0] if pauses else None


def test_publishes_beyond_the_bucket_get_42900_scoped_and_the_session_stays() -> None:
    clock = FakeClock()
    connection = session(clock, publish_rate=2, publish_burst=3)
    results = [outcome(connection.receive_message(pub(n), is_text=True)) for n in range(1, 6)]
    assert results == ["publish"] * 3 + [42900] * 2
    refusal = connection.receive_message(pub(6), is_text=True)[0]
    assert isinstance(refusal, Reply) and refusal.limit is Limit.PUBLISH_RATE
    assert isinstance(refusal.frame, ErrorFrame) and refusal.frame.id == 6
    assert "2 messages/s" in refusal.frame.message and "burst 3" in refusal.frame.message
    assert connection.state is SessionState.CONNECTED
    clock.advance(0.5)  # one token back
    assert [outcome(connection.receive_message(pub(n), is_text=True)) for n in (7, 8)] == [
        "publish",
        42900,
    ]


def test_a_batch_counts_once_per_member() -> None:
    clock = FakeClock()
    connection = session(clock, publish_rate=10, publish_burst=10)
    assert outcome(connection.receive_message(pub(1, members=4), is_text=True)) == "publish"
    assert outcome(connection.receive_message(pub(2, members=4), is_text=True)) == "publish"
    # Two tokens left: a batch of three is refused whole, a single message still passes.
    assert outcome(connection.receive_message(pub(3, members=3), is_text=True)) == 42900
    assert outcome(connection.receive_message(pub(4), is_text=True)) == "publish"
    assert outcome(connection.receive_message(pub(5), is_text=True)) == "publish"
    assert outcome(connection.receive_message(pub(6), is_text=True)) == 42900


def test_a_batch_larger_than_the_burst_passes_from_a_full_bucket_then_pays() -> None:
    clock = FakeClock()
    connection = session(clock, publish_rate=10, publish_burst=5, max_batch_members=50)
    assert outcome(connection.receive_message(pub(1, members=20), is_text=True)) == "publish"
    assert outcome(connection.receive_message(pub(2), is_text=True)) == 42900
    clock.advance(1.5)  # 15 of the 16 tokens of debt paid back
    assert outcome(connection.receive_message(pub(3), is_text=True)) == 42900
    clock.advance(0.11)
    assert outcome(connection.receive_message(pub(4), is_text=True)) == "publish"


def test_refused_or_invalid_publishes_spend_no_tokens() -> None:
    clock = FakeClock()
    connection = session(clock, publish_rate=1, publish_burst=1, max_batch_members=2)
    assert outcome(connection.receive_message(pub(1, channel="bad name"), is_text=True)) == 40001
    assert outcome(connection.receive_message(pub(2, members=3), is_text=True)) == 40001
    assert outcome(connection.receive_message(pub(3), is_text=True)) == "publish"


def test_other_requests_are_not_rate_limited() -> None:
    connection = session(FakeClock(), publish_rate=1, publish_burst=1)
    assert outcome(connection.receive_message(pub(1), is_text=True)) == "publish"
    assert outcome(connection.receive_message(pub(2), is_text=True)) == 42900
    [subscribe] = connection.receive_message(b'{"t":"sub","id":3,"channel":"room"}', True)
    assert not isinstance(subscribe, Reply)
    [pong] = connection.receive_message(b'{"t":"ping"}', is_text=True)
    assert isinstance(pong, Reply) and pong.limit is None


def test_a_rate_of_zero_means_no_limit() -> None:
    connection = session(FakeClock(), publish_rate=0, publish_burst=0)
    assert connection.publish_bucket is None
    assert {outcome(connection.receive_message(pub(n), True)) for n in range(1, 3001)} == {
        "publish"
    }


def test_refusals_pause_the_input_for_the_tokens_they_lacked() -> None:
    clock = FakeClock()
    connection = session(clock, publish_rate=4, publish_burst=2, max_batch_members=100)
    assert pause(connection.receive_message(pub(1), True)) is None
    assert pause(connection.receive_message(pub(2), True)) is None
    assert pause(connection.receive_message(pub(3), True)) == pytest.approx(0.25)  # one token
    assert pause(connection.receive_message(b'{"t":"ping"}', True)) is None  # counted once
    clock.advance(0.1)  # 0.4 of a token held; a refused batch is one refused publish
    assert pause(connection.receive_message(pub(4, members=2), True)) == pytest.approx(0.25)
    clock.advance(10)
    assert pause(connection.receive_message(pub(5, members=4), True)) is None  # 2 in debt
    # Until a token is back (3 tokens, 0.75 s), more than one refusal's worth (0.25 s).
    assert pause(connection.receive_message(pub(6), True)) == pytest.approx(0.75)
    clock.advance(10)
    assert pause(connection.receive_message(pub(7, members=80), True)) is None  # 78 in debt
    # 19.75 s until a token is back: capped.
    assert pause(connection.receive_message(pub(8), True)) == MAX_PUBLISH_PAUSE_S


def test_a_message_with_many_refusals_pauses_for_each() -> None:
    clock = FakeClock()
    connection = Session(KEYRING, Limits(publish_rate=100, publish_burst=2), clock=clock)
    auth = binary_codec.encode_client_frame(AuthFrame(key=KEY, client_id="c"))
    [command] = connection.receive_message(binary_codec.frame_record(auth), is_text=False)
    assert isinstance(command, Authenticate)
    connection.authenticate(command.frame, "x")
    connection.accept("conn-1")
    body = b"".join(
        binary_codec.frame_record(
            binary_codec.encode_client_frame(PublishFrame(n, "room", "n", b"1", "", f"m{n}"))
        )
        for n in range(1, 11)
    )
    commands = connection.receive_message(body, is_text=False)
    assert sum(isinstance(command, Publish) for command in commands) == 2
    assert pause(commands) == pytest.approx(8 / 100)  # eight refused: eight tokens' time
    # The same through a long-poll body.
    clock.advance(1)
    assert pause(connection.receive_body(body)) == pytest.approx(8 / 100)


def test_no_pause_without_a_rate_limit_refusal() -> None:
    connection = session(FakeClock(), publish_rate=1, publish_burst=1, max_channels=1)
    assert pause(connection.receive_message(pub(1, channel="bad name"), True)) is None
    assert pause(connection.receive_message(b'{"t":"sub","id":2,"channel":"a"}', True)) is None
    assert pause(connection.receive_message(b'{"t":"sub","id":3,"channel":"b"}', True)) is None


def test_the_binary_codec_is_limited_the_same_way() -> None:
    clock = FakeClock()
    connection = Session(KEYRING, Limits(publish_rate=1, publish_burst=2), clock=clock)
    auth = binary_codec.encode_client_frame(AuthFrame(key=KEY, client_id="c"))
    [command] = connection.receive_message(binary_codec.frame_record(auth), is_text=False)
    assert isinstance(command, Authenticate)
    connection.authenticate(command.frame, "x")
    connection.accept("conn-1")
    assert connection.codec is Codec.BINARY
    # Three publishes in one WebSocket message: the third is refused, alone.
    body = b"".join(
        binary_codec.frame_record(
            binary_codec.encode_client_frame(PublishFrame(n, "room", "n", b"1", "", f"m{n}"))
        )
        for n in (1, 2, 3)
    )
    commands = connection.receive_message(body, is_text=False)
    assert [outcome([command]) for command in commands[:-1]] == ["publish", "publish", 42900]
    assert pause(commands) == pytest.approx(1.0)


def test_every_existing_limit_names_itself_in_its_refusal() -> None:
    connection = session(FakeClock(), max_channels=1, max_frame_bytes=200, max_batch_members=2)
    replies = [
        connection.receive_message(b'{"t":"sub","id":1,"channel":"a"}', True),
        connection.receive_message(b'{"t":"sub","id":2,"channel":"b"}', True),
        connection.receive_message(pub(3, members=3), True),
        connection.receive_message(orjson.dumps({"t": "pub", "id": 4, "data": "x" * 300}), True),
        connection.receive_message(
            orjson.dumps({"t": "pres", "id": 5, "channel": "a", "action": "enter", "data": 1}),
            True,
        ),
    ]
    limits = [commands[0].limit if isinstance(commands[0], Reply) else None for commands in replies]
    assert limits == [
        None,
        Limit.CHANNELS_PER_CONNECTION,
        Limit.BATCH_MEMBERS,
        Limit.MESSAGE_SIZE,
        None,
    ]
    data_limited = session(FakeClock(), max_presence_data_bytes=4)
    [reply] = data_limited.receive_message(
        orjson.dumps({"t": "pres", "id": 1, "channel": "a", "action": "enter", "data": "long"}),
        True,
    )
    assert isinstance(reply, Reply) and reply.limit is Limit.PRESENCE_DATA


# ---- the settings ----


def test_limit_settings_come_from_the_environment() -> None:
    settings = Settings.load(
        {
            "RT_PUBLISH_RATE": "2.5",
            "RT_PUBLISH_BURST": "7",
            "RT_REST_PUBLISH_RATE": "0",
            "RT_MAX_CONNECTIONS_PER_APP": "3",
            "RT_MAX_LONGPOLL_SESSIONS_PER_APP": "2",
        }
    )
    assert (settings.publish_rate, settings.publish_burst) == (2.5, 7)
    assert settings.rest_publish_rate == 0
    assert (settings.max_connections_per_app, settings.max_longpoll_sessions_per_app) == (3, 2)
    defaults = Settings()
    assert (defaults.publish_rate, defaults.publish_burst) == (100, 1000)
    assert (defaults.rest_publish_rate, defaults.rest_publish_burst) == (1000, 2000)
    assert (defaults.max_connections_per_app, defaults.max_longpoll_sessions_per_app) == (0, 0)
    limits = GatewayServices(
        defaults, KEYRING, MemoryBus(), MemoryBus(), MemoryBus(), MemoryPresence()
    )
    assert (limits.limits.publish_rate, limits.limits.publish_burst) == (100, 1000)


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"RT_PUBLISH_RATE": "-1"}, "RT_PUBLISH_RATE"),
        ({"RT_PUBLISH_BURST": "0"}, "RT_PUBLISH_BURST"),
        ({"RT_REST_PUBLISH_RATE": "-5"}, "RT_REST_PUBLISH_RATE"),
        ({"RT_REST_PUBLISH_BURST": "0"}, "RT_REST_PUBLISH_BURST"),
        ({"RT_PUBLISH_RATE": "fast"}, "RT_PUBLISH_RATE"),
    ],
)
def test_bad_limit_settings_are_refused_by_name(environ: dict[str, str], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        Settings.load(environ)


def test_a_zero_burst_is_fine_when_the_rate_is_off() -> None:
    assert Settings.load({"RT_PUBLISH_RATE": "0", "RT_PUBLISH_BURST": "0"}).publish_burst == 0


# ---- the REST rule ----


def caller(key: str) -> rest.Caller:
    return rest.authenticate(KEYRING, "Basic " + base64.b64encode(key.encode()).decode())


def test_rest_publishes_are_limited_per_key_and_per_message() -> None:
    clock = FakeClock()
    buckets = KeyedBuckets(rate=2, burst=4, clock=clock)
    main, second = caller(KEY), caller(SECOND_KEY)
    limits = Limits()
    single = rest.decode_publish(b'{"name":"n"}', "room", main, limits)
    batch = rest.decode_publish(b'[{"name":"a"},{"name":"b"},{"name":"c"}]', "room", main, limits)
    assert rest.publish_refusal(buckets, main, batch) is None  # 3 of 4
    assert rest.publish_refusal(buckets, main, single) is None  # 4 of 4
    refusal = rest.publish_refusal(buckets, main, single)
    assert refusal is not None
    error, retry_after = refusal
    assert (error.code, error.limit, retry_after) == (42900, Limit.REST_PUBLISH_RATE, 1)
    assert rest.publish_refusal(buckets, second, batch) is None  # another key: its own bucket
    clock.advance(0.5)
    assert rest.publish_refusal(buckets, main, single) is None
    clock.advance(0.1)
    refusal = rest.publish_refusal(buckets, main, batch)
    assert refusal is not None and refusal[1] == math.ceil(3 / 2 - 0.1 * 2)


def test_the_openapi_document_lists_429_on_publish() -> None:
    document = rest.openapi_document(Limits())
    responses = document["paths"]["/channels/{channel}/messages"]["post"]["responses"]
    assert responses["429"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorBody"
    }


# ---- the registry's count per app ----


class FakeConnection:
    """What the registry needs of a connection."""

    def __init__(self, key: str) -> None:
        self.session = Session(KEYRING, Limits())
        self.session.authenticate(AuthFrame(key=key, client_id="c"), "x")
        self.closed = False

    def send(self, frame: Any) -> None:
        pass

    def close(self, code: int, reason: str) -> None:
        self.closed = True


def register(gateway: GatewayServices, key: str, resume: str = "") -> tuple[str, FakeConnection]:
    connection = FakeConnection(key)
    identity = connection.session.identity
    assert identity is not None
    connection_id, predecessor = gateway.registry.claim(resume, identity)
    error = gateway.registry.admission_error(identity, predecessor)
    if error is not None:
        raise error
    gateway.registry.add(connection_id, connection)
    return connection_id, connection


def test_the_registry_counts_connections_per_app_and_caps_them() -> None:
    gateway = services(max_connections_per_app=2)
    registry = gateway.registry
    assert registry.max_per_app == 2  # from the settings, whoever built the services
    first_id, first = register(gateway, KEY)
    register(gateway, SECOND_KEY)  # another key of the same app counts too
    with pytest.raises(ProtocolError) as refused:
        register(gateway, KEY)
    assert (refused.value.code, refused.value.request_id) == (42900, 0)
    assert refused.value.limit is Limit.CONNECTIONS_PER_APP
    register(gateway, OTHER_APP_KEY)  # another app is not affected
    assert registry.per_app == {"app1": 2, "app2": 1}
    # A resume of a held id replaces its holder: admitted at the cap, and counted once.
    register(gateway, KEY, resume=first_id)
    assert registry.per_app == {"app1": 2, "app2": 1}
    registry.remove(first_id, first)  # the replaced holder's teardown changes nothing
    assert registry.per_app == {"app1": 2, "app2": 1}
    for connection_id, connection in list(registry.connections.items()):
        registry.remove(connection_id, connection)
    assert registry.per_app == {}


# ---- Session + Connection with the in-memory engines ----


def services(**settings: Any) -> GatewayServices:
    bus = MemoryBus()
    return GatewayServices(
        settings=Settings(**settings),
        keyring=KEYRING,
        broker=bus,
        router=bus,
        history=bus,
        presence=MemoryPresence(grace_s=0.1, max_members=1),
    )


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


class Client:
    """A client wired straight to a ``Connection``: JSON texts, or binary long-poll bodies."""

    def __init__(self, gateway: GatewayServices, transport: str) -> None:
        self.long_polling = transport == "long-polling"
        self.connection = Connection(gateway, transport)

    async def send(self, frame: dict[str, Any]) -> None:
        text = orjson.dumps(frame)
        if self.long_polling:
            decoded = json_codec.decode_client_text(text)
            body = binary_codec.frame_record(binary_codec.encode_client_frame(decoded))
            await self.connection.receive_body(body)
        else:
            await self.connection.receive(text, is_text=True)
        await settle()

    def frames(self) -> list[dict[str, Any]]:
        messages = self.connection.outbox.take()
        if not self.long_polling:
            return [orjson.loads(message) for message in messages]
        return [
            orjson.loads(json_codec.encode_server_text(binary_codec.decode_server_record(item)))
            for item in binary_codec.iter_records(b"".join(messages))
        ]


@pytest.fixture(params=["websocket", "long-polling"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def connect(gateway: GatewayServices, transport: str, key: str = KEY) -> Client:
    client = Client(gateway, transport)
    await client.send({"t": "auth", "key": key, "clientId": uuid.uuid4().hex[:6]})
    [connected] = client.frames()
    assert connected["t"] == "connected", connected
    return client


async def stored(gateway: GatewayServices, channel: str) -> list[Any]:
    result = await gateway.history.query(HistoryQuery(HistoryOp.HISTORY, "app1", channel, 100))
    return [orjson.loads(message.data or b"null") for message in result.messages]


async def test_a_flooding_connection_is_refused_paced_and_stores_nothing_refused(
    transport: str,
) -> None:
    gateway = services(publish_rate=10, publish_burst=3)
    flooder, neighbour = await connect(gateway, transport), await connect(gateway, transport)
    channel = f"flood:{uuid.uuid4().hex[:8]}"
    before = limited(Limit.PUBLISH_RATE)
    took = []
    for index in range(1, 7):
        started = asyncio.get_running_loop().time()
        await flooder.send({"t": "pub", "id": index, "channel": channel, "data": index})
        took.append(asyncio.get_running_loop().time() - started)
    answers = [(frame["t"], frame["id"], frame.get("code")) for frame in flooder.frames()]
    # The burst; then each refusal holds the input for a token's time (0.1 s), so the next
    # publish finds a token.
    assert answers == [
        ("ack", 1, None),
        ("ack", 2, None),
        ("ack", 3, None),
        ("err", 4, 42900),
        ("ack", 5, None),
        ("err", 6, 42900),
    ]
    assert took[3] >= 0.09 and took[5] >= 0.09 and max(took[:3]) < 0.05, took
    assert flooder.connection.is_connected
    assert sorted(await stored(gateway, channel)) == [1, 2, 3, 5]
    assert limited(Limit.PUBLISH_RATE) == before + 2
    # The neighbour's bucket is its own; the flooder's other requests still work.
    await neighbour.send({"t": "pub", "id": 1, "channel": channel, "data": 100})
    assert [frame["t"] for frame in neighbour.frames()] == ["ack"]
    await flooder.send({"t": "ping"})
    assert flooder.frames() == [{"t": "pong"}]


async def test_the_connections_per_app_cap_refuses_the_handshake(transport: str) -> None:
    gateway = services(max_connections_per_app=2)
    first = await connect(gateway, transport)
    await connect(gateway, transport, SECOND_KEY)
    before = limited(Limit.CONNECTIONS_PER_APP)
    refused = Client(gateway, transport)
    await refused.send({"t": "auth", "key": KEY})
    [error] = refused.frames()
    assert (error["t"], error["code"], error.get("id", 0)) == ("err", 42900, 0)
    assert refused.connection.is_closing and not refused.connection.is_connected
    assert limited(Limit.CONNECTIONS_PER_APP) == before + 1
    await refused.connection.finish()
    await connect(gateway, transport, OTHER_APP_KEY)  # another app has room
    await first.connection.finish()
    await connect(gateway, transport)  # a slot came free
    assert gateway.registry.per_app == {"app1": 2, "app2": 1}


async def test_presence_members_count_in_the_metric() -> None:
    gateway = services()  # MemoryPresence(max_members=1)
    one, two = await connect(gateway, "websocket"), await connect(gateway, "websocket")
    channel = f"members:{uuid.uuid4().hex[:8]}"
    before = limited(Limit.PRESENCE_MEMBERS)
    await one.send({"t": "pres", "id": 1, "channel": channel, "action": "enter"})
    await two.send({"t": "pres", "id": 1, "channel": channel, "action": "enter"})
    [error] = two.frames()
    assert (error["t"], error["code"], error["id"]) == ("err", 42900, 1)
    assert limited(Limit.PRESENCE_MEMBERS) == before + 1


async def test_channels_and_sizes_count_in_the_metric() -> None:
    gateway = services(max_channels_per_connection=1, max_frame_bytes=300)
    client = await connect(gateway, "websocket")
    channels, size = limited(Limit.CHANNELS_PER_CONNECTION), limited(Limit.MESSAGE_SIZE)
    await client.send({"t": "sub", "id": 1, "channel": "a"})
    await client.send({"t": "sub", "id": 2, "channel": "b"})
    await client.send({"t": "pub", "id": 3, "channel": "a", "data": "x" * 400})
    codes = [frame.get("code") for frame in client.frames()]
    assert codes == [None, 42900, 40001]
    assert limited(Limit.CHANNELS_PER_CONNECTION) == channels + 1
    assert limited(Limit.MESSAGE_SIZE) == size + 1


# ---- the long-poll adapter ----


@pytest.fixture
async def long_poll() -> AsyncIterator[tuple[TestClient[Any, Any], GatewayServices]]:
    gateway = services(max_longpoll_sessions_per_app=2, max_connections_per_app=3)
    app = create_app(gateway)
    async with TestClient(TestServer(app)) as client:
        yield client, gateway
        await app[LONG_POLL].close_all()  # no session outlives the test


def auth_body(key: str) -> bytes:
    return binary_codec.frame_record(binary_codec.encode_client_frame(AuthFrame(key=key)))


async def lp_connect(client: TestClient[Any, Any], key: str = KEY) -> tuple[str | None, Any]:
    response = await client.post("/lp/connect", data=auth_body(key))
    assert response.status == 200  # refusals too: the SDK reads a body only on a 2xx
    body = await response.read()
    [frame] = [binary_codec.decode_server_record(item) for item in binary_codec.iter_records(body)]
    return response.headers.get(SESSION_HEADER), frame


async def test_long_poll_sessions_per_app_are_capped_like_a_refused_handshake(
    long_poll: tuple[TestClient[Any, Any], GatewayServices],
) -> None:
    client, gateway = long_poll
    before = limited(Limit.LONGPOLL_SESSIONS_PER_APP)
    tokens = [(await lp_connect(client))[0] for _ in range(2)]
    assert all(tokens)
    token, frame = await lp_connect(client, SECOND_KEY)  # the app's, whichever key
    assert token is None
    assert isinstance(frame, ErrorFrame) and (frame.code, frame.id) == (42900, 0)
    assert "long-poll" in frame.message
    assert limited(Limit.LONGPOLL_SESSIONS_PER_APP) == before + 1
    token, frame = await lp_connect(client, OTHER_APP_KEY)
    assert token and isinstance(frame, ConnectedFrame)
    # Ending a session frees its slot; a refused one never held one.
    response = await client.post("/lp/disconnect", headers={SESSION_HEADER: str(tokens[0])})
    assert response.status == 200
    token, frame = await lp_connect(client)
    assert token and isinstance(frame, ConnectedFrame)
    # The gateway-wide cap counts long-poll sessions with the WebSockets: one slot left for
    # app1 (3), which a WebSocket takes; then long-polling is refused by that cap.
    await connect(gateway, "websocket")
    await client.post("/lp/disconnect", headers={SESSION_HEADER: str(tokens[1])})
    token, frame = await lp_connect(client)
    assert token and isinstance(frame, ConnectedFrame)
    refused_by_app_cap = limited(Limit.CONNECTIONS_PER_APP)
    token, frame = await lp_connect(client)
    assert token is None and isinstance(frame, ErrorFrame) and frame.code == 42900
    assert limited(Limit.CONNECTIONS_PER_APP) == refused_by_app_cap + 1


async def test_long_poll_sessions_per_address_count_in_the_metric() -> None:
    gateway = services(max_connections_per_address=1)
    app = create_app(gateway)
    async with TestClient(TestServer(app)) as client:
        token, frame = await lp_connect(client)
        assert token and isinstance(frame, ConnectedFrame)
        before = limited(Limit.CONNECTIONS_PER_ADDRESS)
        response = await client.post("/lp/connect", data=auth_body(KEY))
        assert response.status == 429
        assert (await response.json())["error"]["code"] == 42900
        assert limited(Limit.CONNECTIONS_PER_ADDRESS) == before + 1
        await app[LONG_POLL].close_all()


async def test_a_long_poll_resume_at_the_cap_takes_over_its_predecessor(
    long_poll: tuple[TestClient[Any, Any], GatewayServices],
) -> None:
    client, _ = long_poll
    connection_ids = []
    for client_id in ("c1", "c2"):
        response = await client.post(
            "/lp/connect", data=record_of(AuthFrame(key=KEY, client_id=client_id))
        )
        [frame] = decoded(await response.read())
        assert isinstance(frame, ConnectedFrame)
        connection_ids.append(frame.connection_id)
    # At the cap: a fresh session is refused, a resume of a live one (its client lost the
    # link, the old session has not timed out yet) gets its connection back.
    token, frame = await lp_connect(client)
    assert token is None and isinstance(frame, ErrorFrame) and frame.code == 42900
    resume = AuthFrame(key=KEY, client_id="c1", resume_connection_id=connection_ids[0])
    response = await client.post("/lp/connect", data=record_of(resume))
    [frame] = decoded(await response.read())
    assert isinstance(frame, ConnectedFrame) and frame.connection_id == connection_ids[0]
    assert SESSION_HEADER in response.headers


def record_of(frame: AuthFrame) -> bytes:
    return binary_codec.frame_record(binary_codec.encode_client_frame(frame))


def decoded(body: bytes) -> list[Any]:
    return [binary_codec.decode_server_record(item) for item in binary_codec.iter_records(body)]
