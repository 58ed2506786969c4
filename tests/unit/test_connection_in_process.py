"""The protocol's behaviour through Session + Connection + in-memory engines, in one process:
no sockets, no nats-server (issue 10 item 2). Publish and ack, resume, presence transitions
and grace, error codes. The real-NATS integration and SDK interop tests cover the same
ground against the real engines.

Every test runs twice: as a WebSocket JSON client (one text message per frame) and as a
long-poll client (binary records in concatenated bodies, the way ``gateway.longpoll`` feeds
``Connection.receive_body``). The assertions read frames in their JSON form either way."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import orjson
import pytest

from gateway.connection import Connection
from gateway.services import GatewayServices
from realtime_protocol import binary_codec, json_codec
from realtime_protocol.frames import Message
from shared.auth import Keyring, parse_api_key
from shared.capabilities import Capability
from shared.settings import Settings
from testing.memory_engines import MemoryBus, MemoryPresence

KEY = "app1.main:secret-one"
READ_ONLY_KEY = "app1.reader:secret-two"
GRACE_S = 0.2


def services(**settings: Any) -> GatewayServices:
    keyring = Keyring(
        [
            parse_api_key(KEY),
            parse_api_key(READ_ONLY_KEY, Capability.parse({"public:*": ["subscribe"]})),
        ]
    )
    bus = MemoryBus()
    return GatewayServices(
        settings=Settings(**settings),
        keyring=keyring,
        broker=bus,
        router=bus,
        history=bus,
        presence=MemoryPresence(grace_s=GRACE_S, max_members=3),
    )


async def settle() -> None:
    """Let spawned work (publishes run as tasks) finish."""
    for _ in range(10):
        await asyncio.sleep(0)


TRANSPORT = {"name": "websocket"}


@pytest.fixture(params=["websocket", "long-polling"], autouse=True)
def transport(request: pytest.FixtureRequest) -> str:
    """Which transport's framing the clients of this test use."""
    TRANSPORT["name"] = str(request.param)
    return str(request.param)


class Client:
    """A client wired straight to a ``Connection``: JSON texts (WebSocket) or binary
    long-poll bodies, per the ``transport`` fixture."""

    def __init__(self, gateway: GatewayServices) -> None:
        self.long_polling = TRANSPORT["name"] == "long-polling"
        self.connection = Connection(gateway, TRANSPORT["name"])
        self.next_id = 0

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
        """Everything the client was sent since last asked, as JSON objects."""
        messages = self.connection.outbox.take()
        if not self.long_polling:
            return [orjson.loads(message) for message in messages]
        records = binary_codec.iter_records(b"".join(messages))
        return [
            orjson.loads(json_codec.encode_server_text(binary_codec.decode_server_record(record)))
            for record in records
        ]

    async def request(self, kind: str, **fields: Any) -> list[dict[str, Any]]:
        self.next_id += 1
        await self.send({"t": kind, "id": self.next_id, **fields})
        return self.frames()

    async def finish(self, graceful: bool) -> None:
        await self.connection.finish(graceful)


async def connect(gateway: GatewayServices, key: str = KEY, **auth: Any) -> Client:
    client = Client(gateway)
    await client.send({"t": "auth", "key": key, **auth})
    [connected] = client.frames()
    assert connected["t"] == "connected", connected
    return client


def channel() -> str:
    return f"chan:{uuid.uuid4().hex[:8]}"


async def test_publishes_are_acked_with_contiguous_serials_and_delivered_once() -> None:
    gateway = services()
    subscriber, publisher = await connect(gateway), await connect(gateway, clientId="pub")
    name = channel()
    assert await subscriber.request("sub", channel=name) == [{"t": "ack", "id": 1}]
    acks = []
    for message_id in ("m1", "m2", "m3", "m1"):  # the last one is a resend
        [ack] = await publisher.request("pub", channel=name, name="n", data=1, messageId=message_id)
        acks.append(ack["seq"])
    assert acks == [1, 2, 3, 1]
    delivered = subscriber.frames()
    assert [(frame["t"], frame["seq"], frame["clientId"]) for frame in delivered] == [
        ("msg", 1, "pub"),
        ("msg", 2, "pub"),
        ("msg", 3, "pub"),
    ]


async def test_a_resume_replays_a_backlog_larger_than_a_page_then_acks() -> None:
    gateway = services()
    name = channel()
    for index in range(1500):
        await gateway.broker.publish(
            "app1", Message(name, "n", b"%d" % index, f"m{index}", "pub", 0)
        )
    client = await connect(gateway)
    frames = await client.request("sub", channel=name, lastSerial=1)
    assert [frame["seq"] for frame in frames[:-1]] == list(range(2, 1501))
    assert frames[-1] == {"t": "ack", "id": 1, "resumed": True}


async def test_resume_cursors_that_cannot_be_honoured_say_so() -> None:
    gateway = services(resume_max_records=10)
    name = channel()
    for index in range(50):
        await gateway.broker.publish("app1", Message(name, "n", b"1", f"m{index}", "pub", 0))
    client = await connect(gateway)
    # Lost state: the client saw more than the server has.
    assert await client.request("sub", channel=name, lastSerial=60) == [
        {"t": "ack", "id": 1, "resumed": False}
    ]
    # Too far behind (more than RT_RESUME_MAX_RECORDS): nothing replayed.
    other = channel()
    for index in range(50):
        await gateway.broker.publish("app1", Message(other, "n", b"1", f"m{index}", "pub", 0))
    assert await client.request("sub", channel=other, lastSerial=5) == [
        {"t": "ack", "id": 2, "resumed": False}
    ]
    # Within the bound: replayed.
    frames = await client.request("sub", channel=other, lastSerial=45)
    assert [frame.get("seq") for frame in frames] == [46, 47, 48, 49, 50, None]
    assert frames[-1] == {"t": "ack", "id": 3, "resumed": True}


async def test_a_failed_resume_leaves_no_subscription_and_frees_its_slot() -> None:
    gateway = services(max_channels_per_connection=1)
    bus = gateway.history
    assert isinstance(bus, MemoryBus)
    bus.fail_history = True
    client = await connect(gateway)
    name = channel()
    [error] = await client.request("sub", channel=name, lastSerial=3)
    assert (error["t"], error["code"], error["id"]) == ("err", 50000, 1)
    await gateway.broker.publish("app1", Message(name, "n", b"1", "x", "pub", 0))
    assert client.frames() == []  # not subscribed
    bus.fail_history = False
    assert await client.request("sub", channel=channel()) == [{"t": "ack", "id": 2}]


async def test_presence_transitions_and_the_grace_period() -> None:
    gateway = services()
    watcher = await connect(gateway, clientId="watcher")
    member = await connect(gateway, clientId="member")
    name = channel()
    assert await watcher.request("presSub", channel=name) == [{"t": "ack", "id": 1}]
    await member.request("pres", channel=name, action="enter", data={"n": 1})
    await member.request("pres", channel=name, action="update", data={"n": 1})  # same: nothing
    await member.request("pres", channel=name, action="update", data={"n": 2})
    events = [(e["action"], e["clientId"], e["data"]) for e in watcher.frames()]
    assert events == [("enter", "member", {"n": 1}), ("update", "member", {"n": 2})]
    # A dropped connection keeps its membership for the grace period, then leaves with its
    # last data; a resume inside the grace takes it over with no leave or enter.
    connection_id = member.connection.session.connection_id
    await member.finish(graceful=False)
    returning = await connect(gateway, clientId="member", resumeConnectionId=connection_id)
    assert returning.connection.session.connection_id == connection_id
    await asyncio.sleep(GRACE_S * 2)
    assert watcher.frames() == []
    await returning.finish(graceful=False)
    await asyncio.sleep(GRACE_S * 2)
    events = [(e["action"], e["clientId"], e["data"]) for e in watcher.frames()]
    assert events == [("leave", "member", {"n": 2})]
    # A clean close leaves at once; a newcomer's presSub snapshot shows who is there.
    third = await connect(gateway, clientId="third")
    await third.request("pres", channel=name, action="enter")
    late = await connect(gateway, clientId="late")
    snapshot = await late.request("presSub", channel=name)
    assert [(e.get("action"), e.get("clientId")) for e in snapshot] == [
        ("enter", "third"),
        (None, None),
    ]
    await third.finish(graceful=True)
    assert [e["action"] for e in late.frames()] == ["leave"]


@pytest.mark.parametrize(
    ("key", "frame", "code"),
    [
        (KEY, {"t": "sub", "id": 1, "channel": "bad channel"}, 40001),
        (KEY, {"t": "pub", "id": 1, "channel": ":starts-with-colon", "data": 1}, 40001),
        (READ_ONLY_KEY, {"t": "sub", "id": 1, "channel": "secret:x"}, 40302),
        (READ_ONLY_KEY, {"t": "pub", "id": 1, "channel": "public:x", "data": 1}, 40301),
    ],
)
async def test_refusals_carry_the_protocol_code_and_keep_the_connection(
    key: str, frame: dict[str, Any], code: int
) -> None:
    client = await connect(services(), key)
    await client.send(frame)
    [error] = client.frames()
    assert (error["t"], error["code"], error["id"]) == ("err", code, 1)
    await client.send({"t": "ping"})
    assert client.frames() == [{"t": "pong"}]


async def test_bad_credentials_and_channel_limits() -> None:
    gateway = services(max_channels_per_connection=2)
    refused = Client(gateway)
    await refused.send({"t": "auth", "key": "app1.main:wrong"})
    [error] = refused.frames()
    assert (error["t"], error["code"]) == ("err", 40101) and refused.connection.is_closing
    client = await connect(gateway)
    assert (await client.request("sub", channel="a"))[0]["t"] == "ack"
    assert (await client.request("presSub", channel="b"))[0]["t"] == "ack"
    [error] = await client.request("sub", channel="c")
    assert (error["t"], error["code"]) == ("err", 42900)
