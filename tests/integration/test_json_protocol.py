"""The JSON text protocol end to end against real processes (issue 2)."""

from __future__ import annotations

import asyncio
import time
import uuid

import jwt
import orjson
import pytest

from tests.support import (
    APP_KEY,
    OTHER_APP_KEY,
    Cluster,
    JsonClient,
    http_status,
    json_client,
)


def channel_name(prefix: str = "test") -> str:
    return f"{prefix}:{uuid.uuid4().hex[:12]}"


def make_token(key: str = APP_KEY, **claims: object) -> str:
    name, _, secret = key.partition(":")
    payload: dict[str, object] = {"iat": int(time.time()), "exp": int(time.time()) + 3600}
    payload.update(claims)
    return jwt.encode(payload, secret, algorithm="HS256", headers={"kid": name})


async def test_health_and_readiness(cluster: Cluster) -> None:
    for gateway in cluster.gateways:
        assert http_status(f"{gateway.http}/healthz") == 200
        assert http_status(f"{gateway.http}/readyz") == 200
        assert http_status(f"{gateway.http}/no-such-route") == 404


async def test_connected_frame_with_key(cluster: Cluster) -> None:
    client = await JsonClient.connect(cluster.a.url)
    connected = await client.auth(key=APP_KEY, clientId="alice")
    assert connected["t"] == "connected"
    assert connected["clientId"] == "alice"
    assert connected["connectionId"]
    assert connected["keepAliveMs"] == 15000
    await client.close()


async def test_server_assigns_client_id_when_none(cluster: Cluster) -> None:
    client = await JsonClient.connect(cluster.a.url)
    connected = await client.auth(key=APP_KEY)
    assert connected["t"] == "connected" and connected["clientId"]
    await client.close()


async def test_jwt_auth_uses_sub(cluster: Cluster) -> None:
    client = await JsonClient.connect(cluster.b.url)
    connected = await client.auth(token=make_token(sub="bob"))
    assert connected["t"] == "connected" and connected["clientId"] == "bob"
    await client.close()


@pytest.mark.parametrize(
    ("auth", "code"),
    [
        ({"key": "app1.main:wrong-secret"}, 40101),
        ({"key": "nosuch.key:secret"}, 40101),
        ({"key": "not-a-key"}, 40101),
        ({"token": "not.a.jwt"}, 40101),
        ({"token": make_token(APP_KEY.split(":")[0] + ":forged-secret", sub="x")}, 40101),
        ({"token": make_token(sub="x", exp=int(time.time()) - 10)}, 40102),
        ({}, 40101),
    ],
    ids=[
        "bad-secret",
        "unknown-key",
        "malformed-key",
        "malformed-jwt",
        "bad-signature",
        "expired",
        "no-credential",
    ],
)
async def test_auth_failures(cluster: Cluster, auth: dict[str, str], code: int) -> None:
    client = await JsonClient.connect(cluster.a.url)
    reply = await client.auth(**auth)
    assert reply["t"] == "err" and reply["code"] == code, reply
    assert "id" not in reply
    await asyncio.wait_for(client.socket.wait_closed(), 5)
    await client.close()


async def test_token_with_mismatched_client_id_is_rejected(cluster: Cluster) -> None:
    client = await JsonClient.connect(cluster.a.url)
    reply = await client.auth(token=make_token(sub="bob"), clientId="mallory")
    assert reply == {"t": "err", "code": 40101, "message": reply["message"]}
    await client.close()


async def test_ping_pong(cluster: Cluster) -> None:
    client = await json_client(cluster.a.url)
    await client.send({"t": "ping"})
    assert await client.receive() == {"t": "pong"}
    await client.close()


async def test_cross_gateway_delivery(cluster: Cluster) -> None:
    channel = channel_name()
    subscriber = await json_client(cluster.a.url, clientId="sub")
    publisher = await json_client(cluster.b.url, clientId="pub")
    assert await subscriber.request("sub", channel=channel) == {"t": "ack", "id": 1}
    ack = await publisher.request(
        "pub", channel=channel, name="greeting", data={"text": "héllo ✓"}, messageId="m-1"
    )
    assert ack["t"] == "ack" and ack["seq"] == 1
    message = await subscriber.receive_until("msg")
    assert message == {
        "t": "msg",
        "channel": channel,
        "name": "greeting",
        "data": {"text": "héllo ✓"},
        "timestamp": message["timestamp"],
        "messageId": "m-1",
        "clientId": "pub",
        "seq": 1,
    }
    assert abs(message["timestamp"] - time.time() * 1000) < 60_000
    await subscriber.close()
    await publisher.close()


async def test_publisher_receives_its_own_messages_in_serial_order(cluster: Cluster) -> None:
    channel = channel_name()
    client = await json_client(cluster.a.url, clientId="echo")
    await client.request("sub", channel=channel)
    for index in range(20):
        await client.send(
            {
                "t": "pub",
                "id": 100 + index,
                "channel": channel,
                "name": "n",
                "data": index,
                "messageId": f"id-{index}",
            }
        )
    acks: dict[int, int] = {}
    messages: list[dict[str, object]] = []
    while len(acks) < 20 or len(messages) < 20:
        frame = await client.receive()
        if frame["t"] == "ack":
            acks[frame["id"]] = frame["seq"]
        elif frame["t"] == "msg":
            messages.append(frame)
    assert [acks[100 + index] for index in range(20)] == list(range(1, 21))
    assert [m["seq"] for m in messages] == list(range(1, 21))
    assert [m["data"] for m in messages] == list(range(20))
    await client.close()


async def test_ephemeral_and_batch_publish(cluster: Cluster) -> None:
    channel = channel_name()
    subscriber = await json_client(cluster.a.url)
    publisher = await json_client(cluster.b.url, clientId="batcher")
    await subscriber.request("sub", channel=channel)
    ack = await publisher.request(
        "pub", channel=channel, name="typing", data=None, messageId="e-1", ephemeral=True
    )
    assert ack == {"t": "ack", "id": ack["id"]}  # no seq: ephemeral takes no serial
    live = await subscriber.receive_until("msg")
    assert live["ephemeral"] is True and "seq" not in live and live["data"] is None
    members = [{"name": "a", "data": {"i": 1}}, {"name": "b", "data": "two", "encoding": "enc"}]
    ack = await publisher.request("pub", channel=channel, messageId="b-1", messages=members)
    assert ack["seq"] == 1
    batch = await subscriber.receive_until("msg")
    assert batch["messages"] == members and batch["seq"] == 1 and batch["messageId"] == "b-1"
    assert batch["name"] == "" and batch["data"] is None
    await subscriber.close()
    await publisher.close()


async def test_resent_message_id_is_stored_once(cluster: Cluster) -> None:
    channel = channel_name()
    subscriber = await json_client(cluster.a.url)
    await subscriber.request("sub", channel=channel)
    publisher = await json_client(cluster.b.url, clientId="same")
    first = await publisher.request("pub", channel=channel, name="x", data=1, messageId="dup")
    second = await publisher.request("pub", channel=channel, name="x", data=1, messageId="dup")
    third = await publisher.request("pub", channel=channel, name="x", data=2, messageId="other")
    assert (first["seq"], second["seq"], third["seq"]) == (1, 1, 2)
    seen = [await subscriber.receive_until("msg") for _ in range(2)]
    assert [m["messageId"] for m in seen] == ["dup", "other"]
    await subscriber.close()
    await publisher.close()


async def test_unsubscribe_stops_delivery(cluster: Cluster) -> None:
    channel = channel_name()
    client = await json_client(cluster.a.url)
    await client.request("sub", channel=channel)
    assert (await client.request("unsub", channel=channel))["t"] == "ack"
    publisher = await json_client(cluster.b.url)
    await publisher.request("pub", channel=channel, name="x", data=1, messageId="u-1")
    await client.send({"t": "ping"})
    assert await client.receive() == {"t": "pong"}  # and no msg before it
    with pytest.raises(asyncio.TimeoutError):
        await client.receive(timeout=0.3)
    await client.close()
    await publisher.close()


async def test_apps_never_see_each_others_channels(cluster: Cluster) -> None:
    channel = channel_name("shared")
    app1 = await json_client(cluster.a.url, key=APP_KEY)
    app2 = await json_client(cluster.a.url, key=OTHER_APP_KEY)
    await app1.request("sub", channel=channel)
    await app2.request("sub", channel=channel)
    ack = await app2.request("pub", channel=channel, name="x", data="for app2", messageId="i-1")
    assert ack["seq"] == 1
    assert (await app2.receive_until("msg"))["data"] == "for app2"
    ack = await app1.request("pub", channel=channel, name="x", data="for app1", messageId="i-1")
    assert ack["seq"] == 1  # a serial sequence of its own, and no dedup across apps
    assert (await app1.receive_until("msg"))["data"] == "for app1"
    with pytest.raises(asyncio.TimeoutError):
        await app2.receive_until("msg", timeout=0.3)
    history = await app2.request("hist", channel=channel)
    assert [m["data"] for m in history["messages"]] == ["for app2"]
    await app1.close()
    await app2.close()


async def test_history_round_trip(cluster: Cluster) -> None:
    channel = channel_name()
    client = await json_client(cluster.b.url, clientId="h")
    for index in range(5):
        await client.request("pub", channel=channel, name="n", data=index, messageId=f"h-{index}")
    page = await client.request("hist", channel=channel, limit=2)
    assert [m["seq"] for m in page["messages"]] == [4, 5] and page["more"] is True
    page = await client.request("hist", channel=channel, limit=10, before=4)
    assert [m["data"] for m in page["messages"]] == [0, 1, 2] and "more" not in page
    fetched = await client.request("fetch", channel=channel, fromSerial=3)
    assert [m["seq"] for m in fetched["messages"]] == [4, 5] and fetched["resumed"] is True
    await client.close()


# ---- bad input: every case gets an err with the protocol's code; neighbours don't notice ----


@pytest.mark.parametrize(
    ("frame", "code", "scoped", "needle"),
    [
        ("{not json", 40001, False, "invalid JSON"),
        ("[1,2]", 40001, False, "JSON object"),
        ({"t": "nope", "id": 4}, 40001, True, "unknown frame type"),
        ({"id": 4}, 40001, True, "'t'"),
        ({"t": "sub", "id": 4}, 40001, True, "'channel'"),
        ({"t": "sub", "channel": "a"}, 40001, False, "'id'"),
        ({"t": "sub", "id": 4, "channel": 7}, 40001, True, "'channel'"),
        ({"t": "sub", "id": "4", "channel": "a"}, 40001, False, "'id'"),
        ({"t": "sub", "id": 4, "channel": "bad channel"}, 40001, True, "invalid channel"),
        ({"t": "sub", "id": 4, "channel": ":leading"}, 40001, True, "invalid channel"),
        ({"t": "sub", "id": 4, "channel": "x" * 256}, 40001, True, "255"),
        ({"t": "sub", "id": 4, "channel": "ümlaut"}, 40001, True, "invalid channel"),
        ({"t": "pub", "id": 4, "channel": "a", "messages": 3}, 40001, True, "'messages'"),
        ({"t": "pub", "id": 4, "channel": "a", "ephemeral": "yes"}, 40001, True, "'ephemeral'"),
        ({"t": "hist", "id": 4, "channel": "a", "limit": -1}, 40001, True, "'limit'"),
        ({"t": "pres", "id": 4, "channel": "a", "action": "dance"}, 40001, True, "'action'"),
        ({"t": "auth", "key": APP_KEY}, 40001, False, "already authenticated"),
    ],
)
async def test_bad_input_gets_err_and_connection_stays_usable(
    cluster: Cluster, frame: dict[str, object] | str, code: int, scoped: bool, needle: str
) -> None:
    bystander = await json_client(cluster.a.url)
    channel = channel_name()
    await bystander.request("sub", channel=channel)
    client = await json_client(cluster.a.url)
    await client.send(frame)
    error = await client.receive()
    assert error["t"] == "err" and error["code"] == code, error
    assert needle in error["message"], error
    assert ("id" in error) is scoped and error.get("id", 4) == 4
    await client.send({"t": "ping"})
    assert await client.receive() == {"t": "pong"}
    ack = await client.request("pub", channel=channel, name="n", data="after", messageId="ok")
    assert ack["t"] == "ack"
    assert (await bystander.receive_until("msg"))["data"] == "after"
    await client.close()
    await bystander.close()


async def test_oversized_frame_gets_err_and_connection_stays(cluster: Cluster) -> None:
    client = await json_client(cluster.a.url)
    big = {"t": "pub", "id": 9, "channel": "big", "name": "n", "data": "x" * 70_000}
    await client.send(big)
    error = await client.receive()
    assert error["t"] == "err" and error["code"] == 40001 and error["id"] == 9
    assert "65536" in error["message"]
    await client.send({"t": "ping"})
    assert await client.receive() == {"t": "pong"}
    await client.close()


async def test_frame_before_auth_closes_with_err(cluster: Cluster) -> None:
    client = await JsonClient.connect(cluster.a.url)
    await client.send({"t": "sub", "id": 1, "channel": "a"})
    error = await client.receive()
    assert error["t"] == "err" and error["code"] == 40001 and "auth" in error["message"]
    await asyncio.wait_for(client.socket.wait_closed(), 5)


async def test_binary_message_on_json_connection_is_refused(cluster: Cluster) -> None:
    client = await json_client(cluster.a.url)
    await client.socket.send(b"\x01\x0a")
    error = await client.receive()
    assert error["t"] == "err" and error["code"] == 40001 and "text" in error["message"]
    await client.send({"t": "ping"})
    assert await client.receive() == {"t": "pong"}
    await client.close()


async def test_capability_denials(cluster: Cluster) -> None:
    capability = orjson.dumps({"chat:*": ["subscribe"], "news": ["history"]}).decode()
    client = await JsonClient.connect(cluster.a.url)
    connected = await client.auth(token=make_token(sub="limited", cap=capability))
    assert connected["t"] == "connected"
    assert (await client.request("sub", channel="chat:1"))["t"] == "ack"
    denied = await client.request("pub", channel="chat:1", name="n", data=1, messageId="d")
    assert denied["code"] == 40301
    denied = await client.request("sub", channel="other")
    assert denied["code"] == 40302
    await client.close()


async def test_token_expiry_while_connected_sends_40102_and_closes(cluster: Cluster) -> None:
    client = await JsonClient.connect(cluster.a.url)
    connected = await client.auth(token=make_token(sub="short", exp=int(time.time()) + 2))
    assert connected["t"] == "connected"
    notice = await client.receive(timeout=5)
    assert notice["t"] == "err" and notice["code"] == 40102 and "id" not in notice
    await asyncio.wait_for(client.socket.wait_closed(), 5)
