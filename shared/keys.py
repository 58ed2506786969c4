"""API keys kept in the key registry (a NATS KV bucket), and the static keys file, without I/O.

A registry record holds the key's name (``appSlug.keyId``), its secret, capability, label,
creation time, optional expiry, and, after a rotation, the previous secret with the moment it
stops working. The secrets are sealed with AES-256-GCM under a key derived (HKDF-SHA256) from
``RT_KEYS_SECRET``, with the key name as associated data: a dump of the bucket reveals names,
capabilities and labels but no secret, and a sealed secret copied onto another key's record
does not open. What protects what is written up in docs/SECURITY.md.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shared.auth import ApiKey, parse_api_key
from shared.capabilities import Capability

__all__ = [
    "KeyRecord",
    "SecretBox",
    "decode_record",
    "encode_record",
    "load_keys_file",
    "new_key",
]

_SEALED_PREFIX = "v1:"
_NONCE_BYTES = 12
# Long enough that guessing is hopeless (192 bits), short enough to paste.
_SECRET_BYTES = 24
_KEY_ID_BYTES = 6


class SecretBox:
    """Seals and opens key secrets with a key derived from ``RT_KEYS_SECRET``."""

    def __init__(self, master_secret: str) -> None:
        if not master_secret:
            raise ValueError("RT_KEYS_SECRET is not set: the key registry needs it")
        derived = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=b"realtime key registry v1"
        ).derive(master_secret.encode())
        self._aead = AESGCM(derived)

    def seal(self, name: str, secret: str) -> str:
        """``secret`` encrypted and bound to the key ``name``."""
        nonce = secrets.token_bytes(_NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, secret.encode(), name.encode())
        return _SEALED_PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode()

    def open(self, name: str, sealed: str) -> str:
        """The secret sealed for ``name``; ``ValueError`` if it was sealed under another
        master secret, for another key, or tampered with."""
        if not sealed.startswith(_SEALED_PREFIX):
            raise ValueError("unknown sealed-secret format")
        try:
            raw = base64.urlsafe_b64decode(sealed[len(_SEALED_PREFIX) :])
            plain = self._aead.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], name.encode())
        except (InvalidTag, ValueError):
            raise ValueError(f"cannot open the secret of {name}: wrong RT_KEYS_SECRET?") from None
        return plain.decode()


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One registry key, with its secret in the clear (only ever in memory)."""

    name: str
    secret: str
    capability: Capability
    label: str = ""
    created_at: float = 0.0
    expires_at: float | None = None
    previous_secret: str = ""
    previous_until: float = 0.0

    @property
    def app(self) -> str:
        """The app slug of the key."""
        return self.name.split(".", 1)[0]

    @property
    def text(self) -> str:
        """The key as clients use it: ``appSlug.keyId:secret``."""
        return f"{self.name}:{self.secret}"

    def api_key(self) -> ApiKey:
        """The ``ApiKey`` the gateways authenticate with."""
        return ApiKey(
            self.name,
            self.secret,
            self.capability,
            expires_at=self.expires_at,
            previous_secret=self.previous_secret,
            previous_until=self.previous_until,
        )

    def rotated(self, grace_s: float, now: float) -> KeyRecord:
        """A new secret; the current one keeps working for ``grace_s`` seconds."""
        return replace(
            self,
            secret=secrets.token_urlsafe(_SECRET_BYTES),
            previous_secret=self.secret if grace_s > 0 else "",
            previous_until=now + grace_s if grace_s > 0 else 0.0,
        )

    def describe(self, now: float) -> dict[str, Any]:
        """What ``realtime keys list`` shows: everything but the secrets."""
        return {
            "name": self.name,
            "label": self.label,
            "capability": self.capability.document,
            "created_at": _iso(self.created_at),
            "expires_at": _iso(self.expires_at) if self.expires_at else None,
            "expired": bool(self.expires_at and self.expires_at <= now),
            "previous_secret_until": _iso(self.previous_until)
            if self.previous_secret and self.previous_until > now
            else None,
        }


def new_key(
    app: str,
    capability: Capability | None = None,
    label: str = "",
    expires_in_s: float | None = None,
    now: float | None = None,
) -> KeyRecord:
    """A fresh key for ``app`` with a random id and secret; ``ValueError`` for a bad slug."""
    now = time.time() if now is None else now
    key_id = "k" + secrets.token_hex(_KEY_ID_BYTES)
    secret = secrets.token_urlsafe(_SECRET_BYTES)
    parsed = parse_api_key(f"{app}.{key_id}:{secret}")  # validates the slug's characters
    if parsed.app != app:
        raise ValueError(f"app slug {app!r} may only contain A-Z a-z 0-9 '_' '-' (1-64)")
    return KeyRecord(
        parsed.name,
        secret,
        capability or Capability.allow_all(),
        label,
        now,
        now + expires_in_s if expires_in_s else None,
    )


def encode_record(record: KeyRecord, box: SecretBox) -> bytes:
    """The bucket value of ``record``: JSON, secrets sealed."""
    value: dict[str, Any] = {
        "name": record.name,
        "secret": box.seal(record.name, record.secret),
        "capability": record.capability.document,
        "label": record.label,
        "created_at": record.created_at,
        "expires_at": record.expires_at,
    }
    if record.previous_secret:
        value["previous_secret"] = box.seal(record.name, record.previous_secret)
        value["previous_until"] = record.previous_until
    return orjson.dumps(value)


def decode_record(data: bytes, box: SecretBox) -> KeyRecord:
    """Parse a bucket value; ``ValueError`` for anything malformed or unopenable."""
    try:
        value = orjson.loads(data)
        name = value["name"]
        if not isinstance(name, str):
            raise ValueError("name must be a string")
        parse_api_key(f"{name}:x")  # validates the name
        expires_at = value.get("expires_at")
        previous = value.get("previous_secret") or ""
        return KeyRecord(
            name,
            box.open(name, value["secret"]),
            Capability.parse(value.get("capability") or {"*": ["*"]}),
            str(value.get("label") or ""),
            float(value.get("created_at") or 0.0),
            float(expires_at) if expires_at is not None else None,
            box.open(name, previous) if previous else "",
            float(value.get("previous_until") or 0.0),
        )
    except (KeyError, TypeError, orjson.JSONDecodeError) as error:
        raise ValueError(f"malformed key record: {error}") from None


def load_keys_file(path: str) -> list[ApiKey]:
    """Static keys with capabilities from ``RT_KEYS_FILE``: a JSON array of
    ``{"key": "appSlug.keyId:secret", "capability": {...}}`` (capability optional: allow
    all). ``ValueError`` naming the entry that is wrong."""
    try:
        entries = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"RT_KEYS_FILE {path}: {error}") from None
    if not isinstance(entries, list):
        raise ValueError(f"RT_KEYS_FILE {path}: expected a JSON array of keys")
    keys = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
            raise ValueError(f'RT_KEYS_FILE {path}: entry {index} needs a "key" string')
        try:
            capability = Capability.parse(entry["capability"]) if "capability" in entry else None
            keys.append(parse_api_key(entry["key"], capability))
        except ValueError as error:
            raise ValueError(f"RT_KEYS_FILE {path}: entry {index}: {error}") from None
    return keys


def _iso(moment: float | None) -> str | None:
    if moment is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment))
