"""The key registry (issue 12 items 1-4) against real nats-server and two gateways: keys made
with the `realtime keys` CLI work on every gateway within 2 s, their capabilities bound every
frame, REST route and token, revocation closes their connections on every gateway within 5 s,
rotation keeps the old secret for its grace only, and legacy development tokens work."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Iterator

import aiohttp
import jwt
import nats
import orjson
import pytest

from tests.support import SIGNING_KEY, JsonClient, KeyedCluster


@pytest.fixture(scope="module")
def keyed() -> Iterator[KeyedCluster]:
    with KeyedCluster.running() as running:
        yield running


async def handshake(url: str, **auth: str) -> tuple[JsonClient, dict[str, object]]:
    """Connect and send ``auth``; return the client and the server's answer."""
    client = await JsonClient.connect(url)
    return client, await client.auth(**auth)


async def until_accepted(url: str, key: str, timeout: float = 2.0) -> float:
    """Seconds until ``key`` authenticates on the gateway at ``url``."""
    started = time.monotonic()
    while True:
        client, reply = await handshake(url, key=key)
        await client.close()
        if reply["t"] == "connected":
            return time.monotonic() - started
        assert time.monotonic() - started < timeout, f"{key} not accepted within {timeout}s"
        await asyncio.sleep(0.05)


async def test_a_created_key_works_on_every_gateway_within_2_s(keyed: KeyedCluster) -> None:
    key = keyed.create("app1", "--label", "integration")
    assert key.startswith("app1.") and ":" in key
    for gateway in (keyed.a, keyed.b):
        assert await until_accepted(gateway.url, key) < 2.0


async def test_key_capabilities_bound_frames_tokens_and_rest(keyed: KeyedCluster) -> None:
    key = keyed.create("app1", "--capability", '{"public:*":["subscribe","publish"]}')
    await until_accepted(keyed.a.url, key)
    client, client_reply = await handshake(keyed.a.url, key=key)
    assert client_reply["t"] == "connected"
    try:
        assert (await client.request("sub", channel="public:x"))["t"] == "ack"
        denied = await client.request("sub", channel="private:x")
        assert (denied["t"], denied["code"]) == ("err", 40302)
        denied = await client.request("hist", channel="public:x")
        assert (denied["t"], denied["code"]) == ("err", 40301)
        denied = await client.request("pres", channel="public:x", action="enter")
        assert (denied["t"], denied["code"]) == ("err", 40301)
    finally:
        await client.close()
    # A token may narrow the key's capability, never widen it.
    name, _, secret = key.partition(":")
    now = int(time.time())
    wider = jwt.encode(
        {"sub": "u", "cap": '{"*":["*"]}', "iat": now, "exp": now + 60},
        secret,
        headers={"kid": name},
    )
    refused, refused_reply = await handshake(keyed.b.url, token=wider)
    assert (refused_reply["t"], refused_reply["code"]) == ("err", 40101)
    await refused.close()
    # REST: the same capability on every route.
    authorization = "Basic " + base64.b64encode(key.encode()).decode()
    async with aiohttp.ClientSession(headers={"Authorization": authorization}) as http:
        http_base = f"http://127.0.0.1:{keyed.a.port}"
        async with http.post(f"{http_base}/channels/private:x/messages", json={"data": 1}) as r:
            assert r.status == 403 and (await r.json())["error"]["code"] == 40302
        async with http.get(f"{http_base}/channels/public:x/messages") as r:
            assert r.status == 403 and (await r.json())["error"]["code"] == 40301


async def test_revocation_closes_key_and_token_connections_on_every_gateway(
    keyed: KeyedCluster,
) -> None:
    key = keyed.create("app1")
    other = keyed.create("app1")  # a bystander key of the same app stays connected
    await until_accepted(keyed.b.url, key)
    name, _, secret = key.partition(":")
    now = int(time.time())
    token = jwt.encode({"sub": "t", "iat": now, "exp": now + 600}, secret, headers={"kid": name})
    by_key, by_key_reply = await handshake(keyed.a.url, key=key)
    by_token, by_token_reply = await handshake(keyed.b.url, token=token)
    bystander, bystander_reply = await handshake(keyed.a.url, key=other)
    for reply in (by_key_reply, by_token_reply, bystander_reply):
        assert reply["t"] == "connected"
    started = time.monotonic()
    result = keyed.keys("revoke", name)
    assert result.returncode == 0, result.stderr
    for client in (by_key, by_token):
        error = await client.receive(timeout=5)
        assert (error["t"], error["code"], error.get("id", 0)) == ("err", 40101, 0)
        await asyncio.wait_for(client.socket.wait_closed(), 5)
        assert client.socket.close_code == 1008
    assert time.monotonic() - started < 5
    # Refused from now on, by key and by token, everywhere; the bystander is untouched.
    for gateway in (keyed.a, keyed.b):
        refused, refused_reply = await handshake(gateway.url, key=key)
        assert refused_reply["code"] == 40101
        await refused.close()
        refused, refused_reply = await handshake(gateway.url, token=token)
        assert refused_reply["code"] == 40101
        await refused.close()
    assert (await bystander.request("sub", channel="still-here"))["t"] == "ack"
    await bystander.close()
    assert keyed.keys("revoke", name).returncode == 1  # nothing left to revoke


async def test_rotation_keeps_the_old_secret_for_its_grace_only(keyed: KeyedCluster) -> None:
    old = keyed.create("app1")
    await until_accepted(keyed.a.url, old)
    result = keyed.keys("rotate", old.partition(":")[0], "--grace", "3s")
    assert result.returncode == 0, result.stderr
    new = result.stdout.strip().splitlines()[-1]
    assert new.partition(":")[0] == old.partition(":")[0] and new != old
    await until_accepted(keyed.a.url, new)
    still, still_reply = await handshake(keyed.b.url, key=old)
    assert still_reply["t"] == "connected"  # inside the grace
    await still.close()
    await asyncio.sleep(3.2)
    refused, refused_reply = await handshake(keyed.b.url, key=old)
    assert refused_reply["code"] == 40101
    await refused.close()


async def test_an_expired_key_is_refused_and_its_connections_closed(keyed: KeyedCluster) -> None:
    key = keyed.create("app1", "--expires", "3s")
    await until_accepted(keyed.a.url, key)
    client, client_reply = await handshake(keyed.a.url, key=key)
    assert client_reply["t"] == "connected"
    error = await client.receive(timeout=6)
    assert (error["t"], error["code"]) == ("err", 40101)
    refused, refused_reply = await handshake(keyed.b.url, key=key)
    assert refused_reply["code"] == 40101
    await refused.close()
    await client.close()


async def test_secrets_are_never_listed_nor_readable_from_a_bucket_dump(
    keyed: KeyedCluster,
) -> None:
    key = keyed.create("app2", "--label", "secretive")
    name, _, secret = key.partition(":")
    listing = keyed.keys("list", "app2")
    assert listing.returncode == 0 and name in listing.stdout and secret not in listing.stdout
    as_json = keyed.keys("list", "--json")
    assert secret not in as_json.stdout
    assert any(orjson.loads(line)["name"] == name for line in as_json.stdout.splitlines())
    # The raw bucket, as anyone with NATS access could dump it.
    nc = await nats.connect(keyed.nats.url)
    try:
        entry = await (await nc.jetstream().key_value("rt_keys")).get(name)
        assert entry.value is not None
        assert secret.encode() not in entry.value and b"secretive" in entry.value
    finally:
        await nc.close()
    # Without the right RT_KEYS_SECRET the CLI cannot open it either.
    wrong = keyed.keys("list", "app2", secret="not-the-secret")
    assert wrong.returncode != 0 and secret not in wrong.stdout + wrong.stderr


async def test_legacy_development_tokens_work_for_their_app(keyed: KeyedCluster) -> None:
    now = int(time.time())
    token = jwt.encode({"sub": "dev-user", "app": "app1", "iat": now, "exp": now + 60}, SIGNING_KEY)
    client, client_reply = await handshake(keyed.a.url, token=token)
    assert client_reply["t"] == "connected" and client_reply["clientId"] == "dev-user"
    assert (await client.request("sub", channel="anything"))["t"] == "ack"
    await client.close()
    forged = jwt.encode({"sub": "x", "app": "app1", "iat": now, "exp": now + 60}, "guess")
    refused, refused_reply = await handshake(keyed.a.url, token=forged)
    assert refused_reply["code"] == 40101
    await refused.close()
