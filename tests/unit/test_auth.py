"""API keys, JWTs and capabilities."""

from __future__ import annotations

import time

import jwt
import pytest

from realtime_protocol.errors import ProtocolError
from shared.auth import Keyring, parse_api_key
from shared.capabilities import Capability, Operation

KEYRING = Keyring([parse_api_key("app.k:secret")])


def token(secret: str = "secret", kid: str = "app.k", **claims: object) -> str:
    payload: dict[str, object] = {"exp": int(time.time()) + 60}
    payload.update(claims)
    return jwt.encode(payload, secret, algorithm="HS256", headers={"kid": kid})


@pytest.mark.parametrize(
    "text", ["nocolon", "app.k:", "noname:secret", ".k:secret", "a pp.k:s", "app*.k:s"]
)
def test_malformed_keys(text: str) -> None:
    with pytest.raises(ValueError):
        parse_api_key(text)


def test_key_auth() -> None:
    identity = KEYRING.identify("", "app.k:secret", "", "gen")
    assert (identity.app, identity.client_id) == ("app", "gen")
    with pytest.raises(ProtocolError) as caught:
        KEYRING.identify("", "app.k:wrong", "", "gen")
    assert caught.value.code == 40101


def test_token_auth_and_failures() -> None:
    identity = KEYRING.identify(token(sub="bob"), "", "", "gen")
    assert identity.client_id == "bob" and identity.expires_at
    cases = [
        (token(secret="other", sub="bob"), 40101),
        (token(kid="app.nope", sub="bob"), 40101),
        (token(sub="bob", exp=int(time.time()) - 1), 40102),
        (token(sub="bob", cap="{not json"), 40101),
        ("a.b.c", 40101),
    ]
    for text, code in cases:
        with pytest.raises(ProtocolError) as caught:
            KEYRING.identify(text, "", "", "gen")
        assert caught.value.code == code, text


def test_token_capability_must_be_within_the_key() -> None:
    keyring = Keyring([parse_api_key("app.k:secret", Capability({"chat:*": ["subscribe"]}))])
    within = keyring.identify(token(sub="u", cap='{"chat:1":["subscribe"]}'), "", "", "g")
    assert within.capability.document == {"chat:1": ["subscribe"]}
    with pytest.raises(ProtocolError):
        keyring.identify(token(sub="u", cap='{"chat:1":["publish"]}'), "", "", "g")
    with pytest.raises(ProtocolError):
        keyring.identify(token(sub="u", cap='{"*":["*"]}'), "", "", "g")


def test_capability_matching_and_codes() -> None:
    capability = Capability.parse('{"chat:*":["subscribe","publish"],"news":["history"]}')
    capability.check(Operation.PUBLISH, "chat:a:b", 1)
    with pytest.raises(ProtocolError) as caught:
        capability.check(Operation.PUBLISH, "chat", 1)
    assert caught.value.code == 40302
    with pytest.raises(ProtocolError) as caught:
        capability.check(Operation.SUBSCRIBE, "news", 1)
    assert caught.value.code == 40301
    Capability.allow_all().check(Operation.PRESENCE, "anything", 1)


@pytest.mark.parametrize(
    "claims",
    [
        {"exp": str(int(time.time()) + 3600)},  # PyJWT accepts it; it would never expire here
        {"exp": [int(time.time()) + 3600]},
        {"iat": "yesterday"},
        {"nbf": "0"},
    ],
)
def test_token_claims_must_have_strict_types(claims: dict[str, object]) -> None:
    with pytest.raises(ProtocolError) as caught:
        KEYRING.identify(token(sub="bob", **claims), "", "", "gen")
    assert caught.value.code == 40101


def test_token_lifetime_is_capped() -> None:
    keyring = Keyring([parse_api_key("app.k:secret")], token_max_ttl_s=3600)
    now = int(time.time())
    assert keyring.identify(token(sub="bob", iat=now, exp=now + 3600), "", "", "gen")
    for claims in ({"exp": now + 7200}, {"iat": now - 7000, "exp": now + 600}):
        with pytest.raises(ProtocolError) as caught:
            keyring.identify(token(sub="bob", **claims), "", "", "gen")
        assert caught.value.code == 40101 and "lifetime" in caught.value.message


def test_token_without_sub_gets_an_assigned_client_id_and_cannot_choose_one() -> None:
    identity = KEYRING.identify(token(), "", "", "assigned")
    assert identity.client_id == "assigned"
    identity = KEYRING.identify(token(sub=""), "", "", "assigned")
    assert identity.client_id == "assigned"
    with pytest.raises(ProtocolError) as caught:
        KEYRING.identify(token(), "", "mallory", "assigned")
    assert caught.value.code == 40101
