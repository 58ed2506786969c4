"""The REST API (issue 11, PROTOCOL.md section 6) against real gateways, nats-server and a
history worker: publish (seen live and in history), history paging both ways, presence,
token requests, every error shape, and a schemathesis run of the OpenAPI document."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import orjson
import pytest

from tests.support import (
    APP_KEY,
    OTHER_APP_KEY,
    Cluster,
    free_port,
    json_client,
    start_nats,
    start_service,
    wait_for_port,
    wait_ready,
)

ROOT = Path(__file__).resolve().parents[2]
BASIC = "Basic " + base64.b64encode(APP_KEY.encode()).decode()


def channel_name(prefix: str = "rest") -> str:
    return f"{prefix}:{uuid.uuid4().hex[:10]}"


def escaped(channel: str) -> str:
    """The channel as the TS SDK puts it in a path (encodeURIComponent)."""
    return channel.replace(":", "%3A")


@dataclass
class Answer:
    status: int
    body: Any
    headers: Any


class Http:
    """A REST caller for one gateway, Basic-authenticated with ``APP_KEY`` by default."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        auth: str | None = BASIC,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        sent = dict(headers or {})
        if auth is not None:
            sent["Authorization"] = auth
        if body is not None:
            raw = orjson.dumps(body)
        if raw is not None:
            sent.setdefault("Content-Type", "application/json")
        async with self.session.request(method, self.base + path, data=raw, headers=sent) as r:
            text = await r.read()
            parsed = orjson.loads(text) if text else None
            return Answer(r.status, parsed, r.headers)

    async def publish(self, channel: str, body: Any, **options: Any) -> Answer:
        return await self.call("POST", f"/channels/{escaped(channel)}/messages", body, **options)

    async def history(self, channel: str, query: str = "", **options: Any) -> Answer:
        path = f"/channels/{escaped(channel)}/messages" + (f"?{query}" if query else "")
        return await self.call("GET", path, **options)


def assert_error(answer: Answer, status: int, code: int) -> None:
    assert answer.status == status, (answer.status, answer.body)
    assert answer.body["error"]["code"] == code, answer.body
    assert answer.body["error"]["statusCode"] == status
    assert answer.body["error"]["message"]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
def a(cluster: Cluster, session: aiohttp.ClientSession) -> Http:
    return Http(session, cluster.a.http)


@pytest.fixture
def b(cluster: Cluster, session: aiohttp.ClientSession) -> Http:
    return Http(session, cluster.b.http)


async def test_time_needs_no_auth(a: Http) -> None:
    before = time.time_ns() // 1_000_000
    answer = await a.call("GET", "/time", auth=None)
    assert answer.status == 200
    [now] = answer.body
    assert isinstance(now, int) and before - 5 <= now <= time.time_ns() // 1_000_000 + 5


async def test_publish_is_delivered_live_and_stored(cluster: Cluster, a: Http, b: Http) -> None:
    channel = channel_name()
    subscriber = await json_client(cluster.a.url)
    await subscriber.request("sub", channel=channel)
    answer = await b.publish(channel, {"name": "greet", "data": {"hi": [1, 2]}, "clientId": "be"})
    assert answer.status == 201
    assert answer.body["channel"] == channel and answer.body["serial"] == 1
    message_id = answer.body["messageId"]
    nanos, _, suffix = message_id.partition("-")  # <unixNanos>-<8 hex> (PROTOCOL.md 3.9)
    assert nanos.isdigit() and len(suffix) == 8
    live = await subscriber.receive_until("msg")
    assert (live["name"], live["data"], live["clientId"], live["seq"]) == (
        "greet",
        {"hi": [1, 2]},
        "be",
        1,
    )
    assert live["messageId"] == message_id
    await subscriber.close()

    history = await a.history(channel)
    assert history.status == 200 and "Link" not in history.headers
    [item] = history.body
    assert item == {
        "id": message_id,
        "name": "greet",
        "data": {"hi": [1, 2]},
        "timestamp": item["timestamp"],
        "clientId": "be",
        "serial": 1,
    }
    assert isinstance(item["timestamp"], int)


async def test_array_is_one_batch_with_one_serial(cluster: Cluster, a: Http) -> None:
    channel = channel_name()
    subscriber = await json_client(cluster.b.url)
    await subscriber.request("sub", channel=channel)
    await a.publish(channel, {"name": "before", "data": 0})
    batch = [
        {"name": "x", "data": 1, "id": "batch-1"},
        {"name": "y", "data": "two", "encoding": "utf-8/base64", "id": "ignored"},
        {"name": "z", "data": None},
    ]
    answer = await a.publish(channel, batch)
    assert answer.status == 201
    assert answer.body == {"channel": channel, "messageId": "batch-1", "serial": 2}
    await subscriber.receive_until("msg", seq=1)
    live = await subscriber.receive_until("msg", seq=2)
    assert live["messageId"] == "batch-1"
    assert [(m["name"], m["data"]) for m in live["messages"]] == [
        ("x", 1),
        ("y", "two"),
        ("z", None),
    ]
    await subscriber.close()
    items = (await a.history(channel, "direction=forwards")).body
    assert [(i["id"], i["name"], i["serial"]) for i in items] == [
        (items[0]["id"], "before", 1),
        ("batch-1", "x", 2),
        ("batch-1", "y", 2),
        ("batch-1", "z", 2),
    ]
    assert items[2]["encoding"] == "utf-8/base64" and "encoding" not in items[1]
    assert "clientId" not in items[1]  # key auth without clientId: none
    # Backwards is the exact reverse of forwards, batch members included.
    backwards = (await a.history(channel)).body
    assert backwards == list(reversed(items))


async def test_idempotent_publish_answers_the_original_serial(a: Http, b: Http) -> None:
    channel = channel_name()
    first = await a.publish(channel, {"name": "once", "data": 1, "id": "dup-1"})
    await a.publish(channel, {"name": "other", "data": 2})
    again = await b.publish(channel, {"name": "once", "data": 1, "id": "dup-1"})
    assert first.status == again.status == 201
    assert first.body == again.body == {"channel": channel, "messageId": "dup-1", "serial": 1}
    # Another clientId's message with the same id is its own message (dedup per clientId).
    theirs = await a.publish(channel, {"name": "once", "data": 1, "id": "dup-1", "clientId": "c"})
    assert theirs.body["serial"] == 3
    assert [i["serial"] for i in (await a.history(channel)).body] == [3, 2, 1]


async def test_ephemeral_is_live_only(cluster: Cluster, a: Http) -> None:
    channel = channel_name()
    subscriber = await json_client(cluster.a.url)
    await subscriber.request("sub", channel=channel)
    answer = await a.publish(channel, {"name": "blink", "data": 1, "ephemeral": True})
    assert answer.status == 201 and "serial" not in answer.body
    live = await subscriber.receive_until("msg")
    assert live["ephemeral"] is True and live["name"] == "blink"
    await subscriber.close()
    assert (await a.history(channel)).body == []


async def follow(http: Http, channel: str, query: str) -> tuple[list[list[int]], list[str]]:
    """Read pages by following ``Link`` verbatim, as the SDK does; return each page's
    ``data`` and each Link header seen."""
    pages: list[list[int]] = []
    links: list[str] = []
    path: str | None = f"/channels/{escaped(channel)}/messages?{query}"
    while path is not None:
        answer = await http.call("GET", path)
        assert answer.status == 200, answer.body
        pages.append([item["data"] for item in answer.body])
        link = answer.headers.get("Link")
        path = None
        if link is not None:
            links.append(link)
            assert link.endswith('>; rel="next"') and link.startswith("</channels/")
            path = link[1 : link.index(">")]
        assert len(pages) < 20
    return pages, links


async def test_history_pages_both_ways_by_link(a: Http, b: Http) -> None:
    channel = channel_name()
    for value in range(1, 8):
        assert (await a.publish(channel, {"name": "n", "data": value})).body["serial"] == value
    pages, links = await follow(b, channel, "limit=3")
    assert pages == [[7, 6, 5], [4, 3, 2], [1]]
    assert links[0] == f'</channels/{escaped(channel)}/messages?before=5&limit=3>; rel="next"'
    pages, links = await follow(b, channel, "limit=3&direction=forwards")
    assert pages == [[1, 2, 3], [4, 5, 6], [7]]
    assert links[0] == (
        f'</channels/{escaped(channel)}/messages?direction=forwards&after=3&limit=3>; rel="next"'
    )
    # The bounds: before (exclusive) and after (exclusive) in both directions.
    assert (await follow(b, channel, "limit=2&before=6"))[0] == [[5, 4], [3, 2], [1]]
    assert (await follow(b, channel, "limit=2&before=6&after=2"))[0] == [[5, 4], [3]]
    pages = (await follow(b, channel, "limit=2&direction=forwards&before=6&after=1"))[0]
    assert pages == [[2, 3], [4, 5]]
    assert (await follow(b, channel, "before=1"))[0] == [[]]
    # The default page is 100 and the cap 1,000 (counted in records).
    assert len((await b.history(channel, "limit=5000")).body) == 7
    assert len((await b.history(channel)).body) == 7


async def test_limit_counts_records_so_a_batch_is_never_split(a: Http) -> None:
    channel = channel_name()
    await a.publish(channel, {"name": "one", "data": 1})
    await a.publish(channel, [{"name": "b", "data": value} for value in range(5)])
    await a.publish(channel, {"name": "three", "data": 3})
    pages, _ = await follow(a, channel, "limit=2")
    assert pages == [[3, 4, 3, 2, 1, 0], [1]]


async def test_pages_cut_by_bytes_still_link_to_the_rest(a: Http) -> None:
    """Twenty ~60 KB messages exceed a worker reply (1 MiB): a page asking for all of them
    comes back shorter, with a Link, in both directions, and following the links reads
    every message exactly once."""
    channel = channel_name("big")
    for value in range(20):
        body = {"name": "big", "data": {"n": value, "pad": "x" * 60_000}}
        assert (await a.publish(channel, body)).status == 201
    for query, expected in (
        ("limit=1000", list(reversed(range(20)))),
        ("limit=1000&direction=forwards", list(range(20))),
    ):
        pages: list[list[int]] = []
        path: str | None = f"/channels/{escaped(channel)}/messages?{query}"
        while path is not None:
            answer = await a.call("GET", path)
            pages.append([item["data"]["n"] for item in answer.body])
            link = answer.headers.get("Link")
            path = link[1 : link.index(">")] if link else None
        assert len(pages) >= 2 and all(pages), pages
        assert [n for page in pages for n in page] == expected


async def test_presence_get_with_filters(cluster: Cluster, a: Http, b: Http) -> None:
    channel = channel_name("room")
    # Everyone is on gateway A: A answers from the member set it keeps, B (which neither
    # holds a member nor a watcher of the channel) from one read of the channel's keys.
    members = [
        await json_client(cluster.a.url, clientId="ann"),
        await json_client(cluster.a.url, clientId="bob"),
        await json_client(cluster.a.url, clientId="bob"),
    ]
    for index, client in enumerate(members):
        ack = await client.request(
            "pres", channel=channel, action="enter", data={"n": index}, encoding=f"e{index}"
        )
        assert ack["t"] == "ack"
    watcher = await json_client(cluster.a.url)
    await watcher.request("presSub", channel=channel)
    connection_ids = sorted(f["connectionId"] for f in watcher.backlog if f["t"] == "presEvt")
    assert len(connection_ids) == 3
    path = f"/channels/{escaped(channel)}/presence"
    for http in (a, b):
        answer = await http.call("GET", path)
        assert answer.status == 200 and "Link" not in answer.headers
        got = answer.body
        assert sorted(m["connectionId"] for m in got) == connection_ids
        assert [m["clientId"] for m in got] == ["ann", "bob", "bob"]
        assert all(m["action"] == "present" and isinstance(m["timestamp"], int) for m in got)
        assert {m["data"]["n"]: m["encoding"] for m in got} == {0: "e0", 1: "e1", 2: "e2"}
        bobs = (await http.call("GET", path + "?clientId=bob")).body
        assert [m["clientId"] for m in bobs] == ["bob", "bob"]
        one = (await http.call("GET", f"{path}?connectionId={connection_ids[0]}")).body
        assert [m["connectionId"] for m in one] == connection_ids[:1]
        assert len((await http.call("GET", path + "?clientId=bob&limit=1")).body) == 1
        assert (await http.call("GET", path + "?clientId=nobody")).body == []
    await members[0].request("pres", channel=channel, action="leave")
    await watcher.receive_until("presEvt", action="leave")
    for http in (a, b):
        assert [m["clientId"] for m in (await http.call("GET", path)).body] == ["bob", "bob"]
    for client in [*members, watcher]:
        await client.close()


async def test_request_token_then_connect_and_use_it(cluster: Cluster, a: Http) -> None:
    channel = channel_name("chat")
    capability = {"chat:*": ["subscribe", "publish"], "logs:*": ["history"]}
    answer = await a.call(
        "POST",
        "/keys/app1.main/requestToken",
        {"clientId": "tok-user", "ttl": 120_000, "capability": capability},
    )
    assert answer.status == 200, answer.body
    details = answer.body
    assert details["keyName"] == "app1.main" and details["clientId"] == "tok-user"
    assert details["expires"] - details["issued"] == 120_000
    assert orjson.loads(details["capability"]) == capability
    header = jwt.get_unverified_header(details["token"])
    assert header == {"alg": "HS256", "typ": "JWT", "kid": "app1.main"}

    client = await json_client(cluster.b.url, key="", token=details["token"])
    await client.request("sub", channel=channel)
    bearer = "Bearer " + details["token"]
    published = await a.publish(channel, {"name": "n", "data": 1}, auth=bearer)
    assert published.status == 201
    live = await client.receive_until("msg")
    assert live["clientId"] == "tok-user"
    same = await a.publish(channel, {"name": "n", "data": 2, "clientId": "tok-user"}, auth=bearer)
    assert same.status == 201
    await client.close()

    assert_error(await a.history(channel, auth=bearer), 403, 40301)
    assert_error(await a.history("other:1", auth=bearer), 403, 40302)
    assert_error(await a.publish("other:1", {"name": "n"}, auth=bearer), 403, 40302)
    differs = await a.publish(channel, {"name": "n", "clientId": "someone"}, auth=bearer)
    assert_error(differs, 403, 40300)
    presence = await a.call("GET", f"/channels/{escaped(channel)}/presence", auth=bearer)
    assert presence.status == 200  # subscribe is enough to read presence
    assert (await a.history("logs:1", auth=bearer)).status == 200


async def test_request_token_rules(a: Http) -> None:
    path = "/keys/app1.main/requestToken"
    default = (await a.call("POST", path, {"clientId": "u"})).body
    assert default["expires"] - default["issued"] == 3_600_000
    assert orjson.loads(default["capability"]) == {"*": ["*"]}
    clamped = (await a.call("POST", path, {"clientId": "u", "ttl": 10**12})).body
    assert clamped["expires"] - clamped["issued"] == 24 * 3_600_000
    as_string = '{"x:*":["subscribe"]}'
    string_cap = await a.call("POST", path, {"clientId": "u", "capability": as_string})
    assert orjson.loads(string_cap.body["capability"]) == {"x:*": ["subscribe"]}
    # Only the key itself, by Basic auth, may ask.
    assert_error(
        await a.call("POST", "/keys/app1.other/requestToken", {"clientId": "u"}), 403, 40300
    )
    other = "Basic " + base64.b64encode(OTHER_APP_KEY.encode()).decode()
    assert_error(await a.call("POST", path, {"clientId": "u"}, auth=other), 403, 40300)
    bearer = "Bearer " + default["token"]
    assert_error(await a.call("POST", path, {"clientId": "u"}, auth=bearer), 403, 40300)
    for bad in (
        {},
        {"clientId": ""},
        {"clientId": 5},
        {"clientId": "u", "ttl": 0},
        {"clientId": "u", "ttl": 1.5},
        {"clientId": "u", "capability": "{not json"},
        {"clientId": "u", "capability": {"x": "subscribe"}},
        {"clientId": "u", "extra": 1},
    ):
        assert_error(await a.call("POST", path, bad), 400, 40001)


async def test_authentication_failures_are_401(a: Http) -> None:
    channel = channel_name()
    expired = jwt.encode(
        {"sub": "x", "exp": int(time.time()) - 5},
        "secret-one",
        algorithm="HS256",
        headers={"kid": "app1.main"},
    )
    forged = jwt.encode(
        {"sub": "x", "exp": int(time.time()) + 60},
        "wrong",
        algorithm="HS256",
        headers={"kid": "app1.main"},
    )
    wrong_key = "Basic " + base64.b64encode(b"app1.main:nope").decode()
    cases = [
        (None, 40101),
        ("", 40101),
        ("Basic !!!", 40101),
        (wrong_key, 40101),
        ("Digest abc", 40101),
        ("Bearer ", 40101),
        (f"Bearer {forged}", 40101),
        (f"Bearer {expired}", 40102),
    ]
    for auth, code in cases:
        assert_error(await a.history(channel, auth=auth), 401, code)
        assert_error(await a.publish(channel, {"name": "n"}, auth=auth), 401, code)
        presence = await a.call("GET", f"/channels/{escaped(channel)}/presence", auth=auth)
        assert_error(presence, 401, code)
    token_path = "/keys/app1.main/requestToken"
    assert_error(await a.call("POST", token_path, {"clientId": "u"}, auth=None), 401, 40101)


async def test_bad_requests_are_400_with_40001(a: Http) -> None:
    channel = channel_name()
    for bad_channel in ("has.dot", ":lead", "a" * 256, "sp ace", "caf%C3%A9", "%2Fslash"):
        path = f"/channels/{bad_channel}/messages"
        assert_error(await a.call("GET", path), 400, 40001)
        assert_error(await a.call("POST", path, {"name": "n"}), 400, 40001)
        assert_error(await a.call("GET", f"/channels/{bad_channel}/presence"), 400, 40001)
    bodies: list[bytes] = [
        b"",
        b"{",
        b"nul",
        b'"text"',
        b"42",
        b"[]",
        b'{"name": 5}',
        b'{"name": "n", "ephemeral": "yes"}',
        b'{"name": "n", "clientID": "typo"}',
        b'[{"name": "a", "clientId": "x"}, {"name": "b", "clientId": "y"}]',
        b'[{"name": "a", "clientId": "x"}, {"name": "b"}]',
        b'[{"name": "a", "ephemeral": true}, {"name": "b"}]',
        b'[{"name": "a"}, 3]',
        orjson.dumps({"name": "n", "id": "i" * 257}),
        orjson.dumps([{"name": "n"}] * 1001),
        b'{"name": "n", "data": ' + b"[" * 300 + b"]" * 300 + b"}",
        orjson.dumps({"name": "n", "data": "x" * 70_000}),
    ]
    for raw in bodies:
        assert_error(await a.publish(channel, None, raw=raw), 400, 40001)
    # A chunked body (no Content-Length) is cut off at the limit just the same.

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"name": "n", "data": "'
        for _ in range(100):
            yield b"x" * 1000
        yield b'"}'

    async with a.session.post(
        f"{a.base}/channels/{channel}/messages",
        data=chunks(),
        headers={"Authorization": BASIC, "Content-Type": "application/json"},
    ) as response:
        assert response.status == 400
        assert (await response.json())["error"]["code"] == 40001
    for query in ("limit=0", "limit=x", "limit=", "before=0", "after=-1", "direction=up"):
        assert_error(await a.history(channel, query), 400, 40001)
    assert_error(await a.call("GET", f"/channels/{channel}/presence?limit=0"), 400, 40001)
    assert (await a.history(channel)).body == []  # nothing above was stored


async def test_unknown_routes_and_methods(a: Http) -> None:
    assert_error(await a.call("GET", "/nowhere"), 404, 40400)
    answer = await a.call("PUT", "/channels/x/messages", {"name": "n"})
    assert answer.status == 405 and answer.body["error"]["code"] == 40400
    assert answer.headers["Allow"] == "GET, POST, HEAD"
    answer = await a.call("GET", "/keys/app1.main/requestToken")
    assert answer.status == 405 and answer.headers["Allow"] == "POST"
    assert (await a.call("HEAD", "/time", auth=None)).status == 200


async def test_websocket_upgrades_still_work_on_rest_paths(cluster: Cluster) -> None:
    """Upgrades are accepted on every path (PROTOCOL.md section 9, item 1), REST ones too."""
    for path in ("/time", "/channels/chat%3A1/messages", "/channels/x/presence"):
        client = await json_client(cluster.a.url + path, clientId="path")
        assert (await client.request("sub", channel="chat:1"))["t"] == "ack"
        await client.close()


async def test_backend_not_ready_is_503_then_no_worker_is_500(
    session: aiohttp.ClientSession,
) -> None:
    """A gateway whose NATS is not there yet answers 503/50001 on the routes that need it
    (token requests and /time do not); once NATS is up but no history worker answers,
    history is a JSON 500/50000."""
    nats_port = free_port()
    gateway = start_service(
        "gateway", f"nats://127.0.0.1:{nats_port}", env={"RT_REQUEST_TIMEOUT_S": "0.5"}
    )
    nats = None
    try:
        wait_for_port(gateway.port)
        http = Http(session, gateway.http)
        channel = channel_name()
        assert_error(await http.publish(channel, {"name": "n"}), 503, 50001)
        assert_error(await http.history(channel), 503, 50001)
        presence = await http.call("GET", f"/channels/{channel}/presence")
        assert_error(presence, 503, 50001)
        assert (await http.call("GET", "/time", auth=None)).status == 200
        token = await http.call("POST", "/keys/app1.main/requestToken", {"clientId": "u"})
        assert token.status == 200
        # Validation still comes first: a bad request is a 400 whatever the backend.
        assert_error(await http.publish(channel, None, raw=b"{"), 400, 40001)

        nats = start_nats(nats_port)
        wait_ready(gateway.port, timeout=15)
        assert (await http.publish(channel, {"name": "n"})).status == 201
        assert_error(await http.history(channel), 500, 50000)
        assert (await http.call("GET", f"/channels/{channel}/presence")).body == []
    finally:
        gateway.stop()
        if nats is not None:
            nats.stop()
    assert "Traceback" not in gateway.log()


# ---- schemathesis: generated requests against the OpenAPI document ----


def test_generated_requests_get_no_500_and_match_the_schema(cluster: Cluster) -> None:
    """Schemathesis (its CLI: the pytest plugin of this version does not run under pytest 9)
    reads /openapi.json from the live gateway and sends generated requests, positive and
    negative, through every phase: no 500, every status, header and body as documented,
    invalid input refused, valid input accepted, undocumented methods 405."""
    user, _, password = APP_KEY.partition(":")
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        f"{cluster.a.http}/openapi.json",
        "--checks=all",
        "--max-examples=100",
        "--seed=11",
        f"--auth={user}:{password}",
        "--request-timeout=10",
        # One worker: CPython 3.11.7's ast.parse (which Hypothesis calls to describe
        # lambdas) is not thread-safe and fails with "AST constructor recursion depth
        # mismatch" under several worker threads.
        "--workers=1",
        "--no-color",
    ]
    environment = dict(
        os.environ,
        SCHEMATHESIS_HOOKS="tests.integration.schemathesis_hooks",
        PYTHONPATH=str(ROOT),
    )
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=120, env=environment, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-3000:]
    assert "API Operations:" in result.stdout
