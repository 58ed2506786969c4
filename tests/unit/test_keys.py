"""Registry records, sealed secrets, rotation, expiry, the keys file and legacy development
tokens, without NATS (issue 12 items 1, 2 and 4)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jwt
import pytest

from realtime_protocol.errors import ProtocolError
from shared.auth import ApiKey, Keyring, parse_api_key
from shared.capabilities import Capability
from shared.keys import SecretBox, decode_record, encode_record, load_keys_file, new_key

NOW = 1_800_000_000.0


def test_a_sealed_secret_opens_only_with_the_same_master_and_for_the_same_key() -> None:
    box = SecretBox("master-one")
    sealed = box.seal("app.k1", "s3cret")
    assert "s3cret" not in sealed and box.open("app.k1", sealed) == "s3cret"
    assert box.seal("app.k1", "s3cret") != sealed  # a fresh nonce every time
    with pytest.raises(ValueError):
        SecretBox("master-two").open("app.k1", sealed)
    with pytest.raises(ValueError):
        box.open("app.k2", sealed)  # moved onto another key's record
    with pytest.raises(ValueError):
        SecretBox("")


def test_records_round_trip_and_the_stored_value_holds_no_secret() -> None:
    box = SecretBox("master")
    capability = Capability.parse({"chat:*": ["subscribe"]})
    record = new_key("app", capability, "web", expires_in_s=60, now=NOW).rotated(30, NOW + 1)
    stored = encode_record(record, box)
    assert record.secret.encode() not in stored
    assert record.previous_secret.encode() not in stored
    decoded = decode_record(stored, box)
    assert decoded.name == record.name and decoded.secret == record.secret
    assert decoded.previous_secret == record.previous_secret
    assert decoded.previous_until == NOW + 31 and decoded.expires_at == NOW + 60
    assert decoded.capability.document == {"chat:*": ["subscribe"]}
    assert decoded.label == "web"
    with pytest.raises(ValueError):
        decode_record(b"{not json", box)
    with pytest.raises(ValueError):
        decode_record(stored, SecretBox("other"))


def test_new_keys_are_random_and_valid() -> None:
    first, second = new_key("app", now=NOW), new_key("app", now=NOW)
    assert first.name != second.name and first.secret != second.secret
    assert parse_api_key(first.text).name == first.name
    assert len(first.secret) >= 32
    with pytest.raises(ValueError):
        new_key("bad.slug")


def test_rotation_grace_and_expiry_decide_which_secrets_authenticate() -> None:
    record = new_key("app", now=NOW).rotated(10, NOW)
    key = record.api_key()
    keyring = Keyring([])
    assert keyring.put(key)
    new_text, old_text = record.text, f"{record.name}:{record.previous_secret}"
    assert keyring.authenticate_key(new_text, now=NOW + 5) is key
    assert keyring.authenticate_key(old_text, now=NOW + 5) is key
    with pytest.raises(ProtocolError) as refused:
        keyring.authenticate_key(old_text, now=NOW + 10)
    assert refused.value.code == 40101
    expiring = ApiKey("app.e", "secret", Capability.allow_all(), expires_at=NOW)
    keyring.put(expiring)
    with pytest.raises(ProtocolError):
        keyring.authenticate_key("app.e:secret", now=NOW)


def test_tokens_signed_with_the_previous_secret_verify_during_the_grace_only() -> None:
    record = new_key("app", now=NOW).rotated(10, NOW)
    keyring = Keyring([], token_max_ttl_s=3600)
    keyring.put(record.api_key())
    claims = {"sub": "u", "iat": int(NOW), "exp": int(NOW) + 60}
    old_token = jwt.encode(claims, record.previous_secret, headers={"kid": record.name})
    key, verified = keyring.verify_token(old_token, now=NOW + 5)
    assert key.name == record.name and verified["sub"] == "u"
    with pytest.raises(ProtocolError) as refused:
        keyring.verify_token(old_token, now=NOW + 11)
    assert refused.value.code == 40101


def test_registry_keys_never_shadow_static_ones_and_removal_revokes() -> None:
    static = parse_api_key("app.static:one")
    keyring = Keyring([static])
    assert not keyring.put(ApiKey("app.static", "two", Capability.allow_all()))
    assert keyring.authenticate_key("app.static:one") is static
    assert keyring.remove("app.static") is None  # static keys stay
    dynamic = ApiKey("app.dynamic", "three", Capability.allow_all())
    assert keyring.put(dynamic) and keyring.remove("app.dynamic") is dynamic
    with pytest.raises(ProtocolError):
        keyring.authenticate_key("app.dynamic:three")


def test_legacy_development_tokens_need_the_signing_key_and_an_app() -> None:
    now = time.time()
    claims = {"sub": "dev", "app": "demo", "iat": int(now), "exp": int(now) + 60}
    token = jwt.encode(claims, "local-dev-key")
    keyring = Keyring([], signing_key="local-dev-key")
    identity = keyring.identify(token, "", "", "assigned")
    assert (identity.app, identity.client_id, identity.key_name) == ("demo", "dev", "demo.legacy")
    assert identity.capability.document == {"*": ["*"]}
    narrowed = jwt.encode({**claims, "cap": '{"a:*":["subscribe"]}'}, "local-dev-key")
    assert keyring.identify(narrowed, "", "", "x").capability.document == {"a:*": ["subscribe"]}
    for bad in (
        jwt.encode(claims, "wrong-key"),
        jwt.encode({**claims, "app": "bad.app"}, "local-dev-key"),
        jwt.encode({k: v for k, v in claims.items() if k != "app"}, "local-dev-key"),
    ):
        with pytest.raises(ProtocolError) as refused:
            keyring.identify(bad, "", "", "x")
        assert refused.value.code == 40101
    with pytest.raises(ProtocolError):  # off without a signing key
        Keyring([]).identify(token, "", "", "x")


def test_the_keys_file_gives_static_keys_capabilities(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(
        json.dumps(
            [
                {"key": "app.reader:secret", "capability": {"news:*": ["subscribe"]}},
                {"key": "app.admin:other"},
            ]
        )
    )
    reader, admin = load_keys_file(str(path))
    assert reader.capability.document == {"news:*": ["subscribe"]}
    assert admin.capability.document == {"*": ["*"]}
    for broken, complaint in (
        ("{}", "JSON array"),
        ('[{"capability": {}}]', "entry 0"),
        ('[{"key": "no-colon"}]', "entry 0"),
        ('[{"key": "a.b:c", "capability": 3}]', "entry 0"),
        ("[", str(path)),
    ):
        path.write_text(broken)
        with pytest.raises(ValueError, match=complaint):
            load_keys_file(str(path))
