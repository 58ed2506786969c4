"""The REST API's pure core (``shared.rest``), the forwards history range, and the aiohttp
adapter in one process over the in-memory engines (no sockets to NATS)."""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator
from typing import Any

import jsonschema_rs
import jwt
import msgspec
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import create_app
from gateway.http import error_response
from gateway.services import GatewayServices
from realtime_protocol.binary_codec import encode_member, member_with_serial
from realtime_protocol.errors import ErrorCode, ProtocolError
from realtime_protocol.frames import BatchMember, Message
from shared import rest
from shared.auth import Keyring, mint_token, parse_api_key
from shared.capabilities import Capability
from shared.history import HistoryOp, HistoryResult, SerialRange, forwards_range
from shared.presence import MemberRecord
from shared.session import Limits
from shared.settings import Settings
from testing.memory_engines import MemoryBus, MemoryPresence

KEY = "app.main:secret"
LIMITED_KEY = "app.limited:other"
KEYRING = Keyring(
    [
        parse_api_key(KEY),
        parse_api_key(LIMITED_KEY, Capability.parse({"chat:*": ["subscribe", "publish"]})),
    ],
    token_max_ttl_s=24 * 3600,
)
LIMITS = Limits(max_batch_members=3)


def basic(key: str = KEY) -> str:
    return "Basic " + base64.b64encode(key.encode()).decode()


def bearer(client_id: str = "sub-1", cap: dict[str, list[str]] | None = None) -> str:
    key = KEYRING.get("app.main")
    assert key is not None
    capability = Capability.parse(cap) if cap is not None else key.capability
    return "Bearer " + mint_token(key, client_id, capability, 60_000, time.time()).token


def code_of(call: Any, *args: Any) -> int:
    with pytest.raises(ProtocolError) as caught:
        call(*args)
    return int(caught.value.code)


# ---- auth ----


def test_basic_and_bearer_credentials() -> None:
    caller = rest.authenticate(KEYRING, basic())
    assert (caller.identity.app, caller.identity.client_id, caller.by_token) == ("app", "", False)
    caller = rest.authenticate(KEYRING, bearer("alice"))
    assert (caller.identity.client_id, caller.by_token) == ("alice", True)
    assert rest.authenticate(KEYRING, "basic " + basic()[6:]).identity.key_name == "app.main"


@pytest.mark.parametrize(
    "header",
    [None, "", "Basic", "Basic !!!", basic("app.main:wrong"), basic("nokey"), "Token x", "Bearer "],
)
def test_bad_credentials_are_40101(header: str | None) -> None:
    assert code_of(rest.authenticate, KEYRING, header) == 40101


def test_expired_token_is_40102() -> None:
    key = KEYRING.get("app.main")
    assert key is not None
    old = mint_token(key, "x", key.capability, 1_000, time.time() - 10).token
    assert code_of(rest.authenticate, KEYRING, "Bearer " + old) == 40102


# ---- publish ----


def publish(body: Any, caller: rest.Caller | None = None, now_ms: int = 5) -> Message:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return rest.decode_publish(
        raw, "chat:1", caller or rest.authenticate(KEYRING, basic()), LIMITS, now_ms
    )


def test_single_message() -> None:
    message = publish({"name": "n", "data": {"a": [1, 2.5]}, "encoding": "e", "id": "m1"})
    assert message == Message(
        channel="chat:1",
        name="n",
        data=b'{"a":[1,2.5]}',
        message_id="m1",
        client_id="",
        timestamp=5,
        encoding="e",
    )
    assert publish({"name": "n", "data": None}).data == b"null"
    assert publish({"name": "n"}).data is None
    generated = publish({"name": "n", "id": None}).message_id
    nanos, _, suffix = generated.partition("-")
    assert nanos.isdigit() and len(suffix) == 8
    assert publish({"name": "n", "ephemeral": True}).ephemeral


def test_array_is_one_batch_with_the_first_id() -> None:
    message = publish(
        [
            {"name": "a", "data": 1, "id": "b1", "clientId": "k"},
            {"name": "b", "data": "x", "encoding": "e", "id": "ignored", "clientId": "k"},
        ]
    )
    assert (message.message_id, message.client_id, message.name, message.data) == (
        "b1",
        "k",
        "",
        None,
    )
    assert message.members == (BatchMember("a", b"1", ""), BatchMember("b", b'"x"', "e"))
    single = publish([{"name": "only"}])
    assert single.members == (BatchMember("only", None, ""),)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b"[]",
        b"7",
        b'"s"',
        b'{"name": 1}',
        b'{"nam": "typo"}',
        b'{"ephemeral": "yes"}',
        b'[{"name": "a"}, "b"]',
        b'[{"clientId": "a"}, {"clientId": "b"}]',
        b'[{"clientId": "a"}, {}]',
        b'[{"ephemeral": true}, {"ephemeral": false}]',
        b"[{}, {}, {}, {}]",  # above LIMITS.max_batch_members
        orjson.dumps({"id": "x" * 257}),
        b'{"data": ' + b"[" * 300 + b"]" * 300 + b"}",
        b'{"data": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    ],
)
def test_bad_bodies_are_40001(body: bytes) -> None:
    assert code_of(publish, body) == 40001


def test_client_id_rules() -> None:
    # Key auth names any clientId, per message (or none).
    assert publish({"name": "n", "clientId": "anyone"}).client_id == "anyone"
    token_caller = rest.authenticate(KEYRING, bearer("alice"))
    assert publish({"name": "n"}, token_caller).client_id == "alice"
    assert publish({"name": "n", "clientId": "alice"}, token_caller).client_id == "alice"
    assert code_of(publish, {"name": "n", "clientId": "mallory"}, token_caller) == 40300
    anonymous = rest.authenticate(KEYRING, bearer(""))
    assert publish({"name": "n"}, anonymous).client_id == ""
    assert code_of(publish, {"name": "n", "clientId": "me"}, anonymous) == 40300


def test_publish_result_omits_the_serial_of_ephemeral_messages() -> None:
    stored = publish({"name": "n", "id": "m"})
    assert orjson.loads(rest.encode_publish_result(stored, 7)) == {
        "channel": "chat:1",
        "messageId": "m",
        "serial": 7,
    }
    fleeting = publish({"name": "n", "id": "m", "ephemeral": True})
    assert orjson.loads(rest.encode_publish_result(fleeting, 0)) == {
        "channel": "chat:1",
        "messageId": "m",
    }


# ---- history ----


def stored(serial: int, *members: str, client_id: str = "", encoding: str = "") -> bytes:
    batch = tuple(
        BatchMember(name, orjson.dumps(name), "e" if name == "y" else "") for name in members
    )
    message = Message(
        channel="chat:1",
        name=f"m{serial}",
        data=orjson.dumps(serial),
        message_id=f"id{serial}",
        client_id=client_id,
        timestamp=1000 + serial,
        encoding=encoding,
        members=batch,
    )
    return member_with_serial(encode_member(message), serial)


def params(**query: str) -> rest.HistoryParams:
    return rest.decode_history_params(query)


def test_history_params_and_query() -> None:
    assert params() == rest.HistoryParams(100, None, 0, "backwards")
    assert params(limit="5", before="9", direction="forwards", other="x") == rest.HistoryParams(
        5, 9, 0, "forwards"
    )
    for bad in (
        {"limit": "0"},
        {"limit": "x"},
        {"before": "0"},
        {"after": "-1"},
        {"direction": "up"},
    ):
        assert code_of(rest.decode_history_params, bad) == 40001
    query = rest.history_query("app", "chat:1", params(limit="5000", before="9", after="2"))
    assert (query.op, query.limit, query.before) == (HistoryOp.HISTORY, 1000, 9)
    query = rest.history_query("app", "chat:1", params(direction="forwards", after="3", before="9"))
    assert (query.op, query.limit, query.from_serial, query.before) == (
        HistoryOp.FORWARDS,
        100,
        3,
        9,
    )


def test_backwards_page_is_the_reverse_of_forwards_with_a_link() -> None:
    result = HistoryResult((stored(4, client_id="c", encoding="enc"), stored(5, "x", "y")), True)
    body, link = rest.history_page("chat:1", params(limit="2"), result)
    items = orjson.loads(body)
    assert [(i["id"], i["name"], i["serial"]) for i in items] == [
        ("id5", "y", 5),
        ("id5", "x", 5),
        ("id4", "m4", 4),
    ]
    assert items[2] == {
        "id": "id4",
        "name": "m4",
        "data": 4,
        "timestamp": 1004,
        "clientId": "c",
        "encoding": "enc",
        "serial": 4,
    }
    assert items[0]["encoding"] == "e" and "encoding" not in items[1]
    assert "clientId" not in items[0]
    assert link == '</channels/chat%3A1/messages?before=4&limit=2>; rel="next"'
    forwards, link = rest.history_page(
        "chat:1", params(limit="2", direction="forwards", before="9"), result
    )
    assert orjson.loads(forwards) == list(reversed(items))
    assert link == (
        '</channels/chat%3A1/messages?direction=forwards&after=5&limit=2&before=9>; rel="next"'
    )


def test_last_pages_have_no_link() -> None:
    result = HistoryResult((stored(1), stored(2)), False)
    for direction in ("backwards", "forwards"):
        assert rest.history_page("c", params(direction=direction), result)[1] is None
    assert rest.history_page("c", params(), HistoryResult((), True)) == (b"[]", None)


def test_backwards_after_bound_cuts_the_page_and_the_link() -> None:
    result = HistoryResult((stored(3), stored(4), stored(5)), True)
    body, link = rest.history_page("c", params(limit="3", after="3"), result)
    assert [item["serial"] for item in orjson.loads(body)] == [5, 4]
    assert link is None  # nothing newer than 3 is left below 4
    body, link = rest.history_page("c", params(limit="3", after="1"), result)
    assert link == '</channels/c/messages?before=3&limit=3&after=1>; rel="next"'


def test_forwards_range() -> None:
    assert forwards_range(1, 10, 0, 0, 3) == SerialRange(1, 3, True)
    assert forwards_range(1, 10, 3, 0, 3) == SerialRange(4, 6, True)
    assert forwards_range(1, 10, 7, 0, 3) == SerialRange(8, 10, False)
    assert forwards_range(5, 10, 0, 0, 3) == SerialRange(5, 7, True)  # from the oldest retained
    assert forwards_range(1, 10, 0, 4, 3) == SerialRange(1, 3, False)  # before is exclusive
    assert forwards_range(1, 10, 0, 5, 3) == SerialRange(1, 3, True)
    assert forwards_range(1, 10, 10, 0, 3).count == 0
    assert forwards_range(1, 10, 3, 4, 3).count == 0
    assert forwards_range(0, 0, 0, 0, 3).count == 0


# ---- presence ----


def test_presence_filters_order_and_limit() -> None:
    records = [
        MemberRecord("bob", "c2", b'{"x":1}', "e", 10),
        MemberRecord("ann", "c9", None, "", 11),
        MemberRecord("bob", "c1", b"2", "", 12),
    ]
    everyone = orjson.loads(rest.presence_page(records, rest.decode_presence_params({})))
    assert [(m["clientId"], m["connectionId"]) for m in everyone] == [
        ("ann", "c9"),
        ("bob", "c1"),
        ("bob", "c2"),
    ]
    assert everyone[0] == {
        "clientId": "ann",
        "connectionId": "c9",
        "action": "present",
        "timestamp": 11,
    }
    assert everyone[2] == {
        "clientId": "bob",
        "connectionId": "c2",
        "action": "present",
        "data": {"x": 1},
        "encoding": "e",
        "timestamp": 10,
    }

    def page(**query: str) -> list[str]:
        chosen = rest.presence_page(records, rest.decode_presence_params(query))
        return [m["connectionId"] for m in orjson.loads(chosen)]

    assert page(clientId="bob") == ["c1", "c2"]
    assert page(connectionId="c9") == ["c9"]
    assert page(clientId="bob", limit="1") == ["c1"]
    assert page(clientId="nobody") == []
    assert code_of(rest.decode_presence_params, {"limit": "0"}) == 40001


# ---- tokens ----


def test_minted_token_is_the_protocol_format_and_verifies() -> None:
    key = parse_api_key("myapp.key1:s3cret")
    capability = Capability.parse({"chat:*": ["subscribe"]})
    minted = mint_token(key, "user-1", capability, 90_500, 1_700_000_000.9)
    header, payload, _signature = minted.token.split(".")
    assert "=" not in minted.token  # base64url without padding

    def unpadded(part: str) -> bytes:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))

    assert unpadded(header) == b'{"alg":"HS256","typ":"JWT","kid":"myapp.key1"}'
    assert orjson.loads(unpadded(payload)) == {
        "sub": "user-1",
        "cap": '{"chat:*":["subscribe"]}',
        "iat": 1_700_000_000,
        "exp": 1_700_000_091,  # iat + ceil(90.5 s)
    }
    assert (minted.issued_at, minted.expires_at) == (1_700_000_000, 1_700_000_091)
    assert minted.capability == '{"chat:*":["subscribe"]}'
    # An independent verifier (PyJWT) accepts the signature; a wrong secret does not.
    claims = jwt.decode(minted.token, "s3cret", algorithms=["HS256"], options={"verify_exp": False})
    assert claims["sub"] == "user-1"
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(minted.token, "other", algorithms=["HS256"], options={"verify_exp": False})
    # And so do the gateways.
    keyring = Keyring([key])
    fresh = mint_token(key, "user-1", capability, 60_000, time.time())
    identity = keyring.identify(fresh.token, "", "", "")
    assert (identity.client_id, identity.capability.document) == (
        "user-1",
        {"chat:*": ["subscribe"]},
    )


def grant(
    body: dict[str, Any],
    header: str | None = None,
    key_name: str = "app.main",
    now: float = 1_700_000_000.4,
) -> Any:
    caller = rest.authenticate(KEYRING, header or basic())
    request = rest.decode_token_request(orjson.dumps(body))
    return orjson.loads(rest.grant_token(KEYRING, caller, key_name, request, now))


def test_token_request_defaults_and_the_token_verifies() -> None:
    details = grant({"clientId": "u1"})
    assert details["keyName"] == "app.main" and details["clientId"] == "u1"
    assert details["issued"] == 1_700_000_000_000
    assert details["expires"] == 1_700_003_600_000
    assert details["capability"] == '{"*":["*"]}'
    now = time.time()
    fresh = grant({"clientId": "u1"}, now=now)
    key, claims = KEYRING.verify_token(fresh["token"])
    assert key.name == "app.main" and claims["sub"] == "u1" and claims["cap"] == '{"*":["*"]}'
    assert (claims["iat"], claims["exp"]) == (int(now), int(now) + 3600)
    assert KEYRING.identify(fresh["token"], "", "", "").client_id == "u1"


def test_token_ttl_is_clamped_and_rounded_up_to_seconds() -> None:
    assert grant({"clientId": "u", "ttl": 10**15})["expires"] == 1_700_000_000_000 + 86_400_000
    assert grant({"clientId": "u", "ttl": 1})["expires"] == 1_700_000_001_000
    assert grant({"clientId": "u", "ttl": 1500.0})["expires"] == 1_700_000_002_000
    short = Keyring([parse_api_key(KEY)], token_max_ttl_s=600)
    caller = rest.authenticate(short, basic())
    request = rest.decode_token_request(b'{"clientId": "u"}')
    details = orjson.loads(rest.grant_token(short, caller, "app.main", request, 1000.0))
    assert details["expires"] - details["issued"] == 600_000  # what this gateway accepts


def test_token_capability_must_be_within_the_key() -> None:
    limited = basic(LIMITED_KEY)
    details = grant(
        {"clientId": "u", "capability": {"chat:x": ["publish"]}},
        limited,
        "app.limited",
        time.time(),
    )
    identity = KEYRING.identify(details["token"], "", "", "")
    assert identity.capability.document == {"chat:x": ["publish"]}
    as_string = grant(
        {"clientId": "u", "capability": '{"chat:*": ["subscribe"]}'}, limited, "app.limited"
    )
    assert orjson.loads(as_string["capability"]) == {"chat:*": ["subscribe"]}
    assert grant({"clientId": "u"}, limited, "app.limited")["capability"] == (
        '{"chat:*":["subscribe","publish"]}'
    )
    for capability in ({"chat:*": ["history"]}, {"*": ["subscribe"]}, {"other": ["publish"]}):
        with pytest.raises(ProtocolError) as caught:
            grant({"clientId": "u", "capability": capability}, limited, "app.limited")
        assert caught.value.code == ErrorCode.CAPABILITY


def test_token_requests_need_the_key_itself() -> None:
    for header, key_name in ((basic(), "app.limited"), (bearer(), "app.main")):
        with pytest.raises(ProtocolError) as caught:
            grant({"clientId": "u"}, header, key_name)
        assert caught.value.code == ErrorCode.FORBIDDEN


@pytest.mark.parametrize(
    "body",
    [
        b"{",
        b"[]",
        b"{}",
        b'{"clientId": ""}',
        b'{"clientId": 1}',
        b'{"clientId": "u", "ttl": 0}',
        b'{"clientId": "u", "ttl": 1.5}',
        b'{"clientId": "u", "ttl": "60"}',
        b'{"clientId": "u", "capability": "{nope"}',
        b'{"clientId": "u", "capability": "[1]"}',
        b'{"clientId": "u", "capability": {"a": "subscribe"}}',
        b'{"clientId": "u", "extra": true}',
    ],
)
def test_bad_token_requests_are_40001(body: bytes) -> None:
    def run() -> None:
        request = rest.decode_token_request(body)
        rest.grant_token(KEYRING, rest.authenticate(KEYRING, basic()), "app.main", request, 0.0)

    assert code_of(run) == 40001


# ---- OpenAPI: the document describes what the encoders produce ----


def validator(name: str) -> Any:
    document = rest.openapi_document(Limits())
    return jsonschema_rs.validator_for(
        {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
    )


def test_document_shape() -> None:
    document = rest.openapi_document(LIMITS)
    assert document["openapi"].startswith("3.")
    assert set(document["paths"]) == {
        "/time",
        "/channels/{channel}/messages",
        "/channels/{channel}/presence",
        "/keys/{keyName}/requestToken",
    }
    body = document["paths"]["/channels/{channel}/messages"]["post"]["requestBody"]
    [array] = [s for s in body["content"]["application/json"]["schema"]["anyOf"] if "items" in s]
    assert (array["minItems"], array["maxItems"]) == (1, LIMITS.max_batch_members)
    names = [
        p["name"] for p in document["paths"]["/channels/{channel}/messages"]["get"]["parameters"]
    ]
    assert names == ["limit", "before", "after", "direction"]
    assert document["paths"]["/time"]["get"]["security"] == []
    orjson.dumps(document)  # serialisable as served


def test_encoded_responses_match_the_document() -> None:
    result = HistoryResult((stored(4, client_id="c", encoding="e"), stored(5, "x", "y")), False)
    items = orjson.loads(rest.history_page("chat:1", params(), result)[0])
    history_item = validator("HistoryItem")
    for item in items:
        history_item.validate(item)
    members = [MemberRecord("a", "c1", b'{"x":1}', "e", 1), MemberRecord("b", "c2", None, "", 2)]
    presence_item = validator("PresenceItem")
    for member in orjson.loads(rest.presence_page(members, rest.PresenceParams())):
        presence_item.validate(member)
    publish_result = validator("PublishResult")
    publish_result.validate(orjson.loads(rest.encode_publish_result(publish({"name": "n"}), 3)))
    validator("TokenDetails").validate(grant({"clientId": "u"}))
    error = error_response(ErrorCode.CAPABILITY, "denied")
    assert isinstance(error.body, bytes)
    validator("ErrorBody").validate(orjson.loads(error.body))
    with pytest.raises(jsonschema_rs.ValidationError):
        history_item.validate({**items[0], "serial": "5"})


def test_request_schemas_agree_with_the_decoders() -> None:
    """What the document calls a valid publish body the decoder accepts, and the reverse."""
    publish_body = jsonschema_rs.validator_for(
        {
            **rest.openapi_document(LIMITS)["paths"]["/channels/{channel}/messages"]["post"][
                "requestBody"
            ]["content"]["application/json"]["schema"],
            "components": rest.openapi_document(LIMITS)["components"],
        }
    )
    samples: list[Any] = [
        {"name": "n", "data": [1, {"a": None}]},
        {"clientId": None, "id": None, "ephemeral": None, "encoding": None},
        [{"name": "a"}, {"name": "b"}, {"name": "c"}],
        [],
        [{}, {}, {}, {}],
        {"name": 1},
        {"unknown": 1},
        {"id": "x" * 257},
        "text",
    ]
    for sample in samples:
        try:
            publish(sample)
            accepted = True
        except ProtocolError:
            accepted = False
        assert publish_body.is_valid(sample) == accepted, sample
    assert msgspec.json.decode(b'{"clientId":"u"}', type=rest.TokenRequest).clientId == "u"


# ---- the adapter over the in-memory engines ----


@pytest.fixture
async def client() -> AsyncIterator[TestClient[Any, Any]]:
    bus = MemoryBus()
    services = GatewayServices(
        settings=Settings(),
        keyring=KEYRING,
        broker=bus,
        router=bus,
        history=bus,
        presence=MemoryPresence(),
    )
    async with TestClient(TestServer(create_app(services))) as test_client:
        yield test_client


async def test_adapter_publish_history_and_presence(client: TestClient[Any, Any]) -> None:
    headers = {"Authorization": basic()}
    for value in range(3):
        response = await client.post(
            "/channels/chat%3A1/messages", json={"name": "n", "data": value}, headers=headers
        )
        assert response.status == 201
        assert (await response.json())["serial"] == value + 1
    response = await client.get("/channels/chat%3A1/messages?limit=2", headers=headers)
    assert [item["data"] for item in await response.json()] == [2, 1]
    assert response.headers["Link"] == '</channels/chat%3A1/messages?before=2&limit=2>; rel="next"'
    response = await client.get("/channels/chat%3A1/presence", headers=headers)
    assert response.status == 200 and await response.json() == []
    response = await client.get("/time")
    assert isinstance((await response.json())[0], int)
    document = await (await client.get("/openapi.json")).json()
    assert document == orjson.loads(orjson.dumps(rest.openapi_document(Limits())))


async def test_adapter_errors_are_json(client: TestClient[Any, Any]) -> None:
    headers = {"Authorization": basic(LIMITED_KEY)}
    cases = [
        ("GET", "/channels/chat%3A1/messages", {}, 401, 40101),
        ("GET", "/channels/chat%3A1/messages", headers, 403, 40301),
        ("GET", "/channels/other/presence", headers, 403, 40302),
        ("GET", "/channels/bad.name/messages", headers, 400, 40001),
        ("DELETE", "/channels/chat%3A1/messages", headers, 405, 40400),
        ("GET", "/no/such/route", headers, 404, 40400),
    ]
    for method, path, sent, status, code in cases:
        response = await client.request(method, path, headers=sent)
        body = await response.json()
        assert (response.status, body["error"]["code"], body["error"]["statusCode"]) == (
            status,
            code,
            status,
        ), (method, path, body)
    response = await client.post(
        "/channels/chat%3A1/messages",
        data=b'{"name": "n", "data": "' + b"x" * 70_000 + b'"}',
        headers=headers,
    )
    assert response.status == 400 and (await response.json())["error"]["code"] == 40001
