"""Token minting on the client side (``auth.ts``'s ``createJwt``): HS256 JWTs signed with an
API key's secret, in the exact format the server verifies (PROTOCOL.md 4.2)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import time
from collections.abc import Mapping, Sequence

import orjson

__all__ = ["Capability", "create_jwt", "split_api_key"]

Capability = Mapping[str, Sequence[str]]
DEFAULT_TTL_S = 3600.0


def split_api_key(key: str) -> tuple[str, str]:
    """``appSlug.keyId:secret`` as ``(key name, secret)``; ``ValueError`` when malformed."""
    name, colon, secret = key.partition(":")
    if not name or not colon or not secret:
        raise ValueError('malformed API key (expected "appSlug.publicKeyId:privateKey")')
    if "." not in name:
        raise ValueError('malformed API key name (expected "appSlug.publicKeyId")')
    return name, secret


def _base64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def create_jwt(
    key: str,
    client_id: str,
    capability: Capability | str | None = None,
    ttl: float = DEFAULT_TTL_S,
) -> str:
    """A token for ``client_id`` signed with ``key``, valid ``ttl`` seconds.

    ``capability`` (an object or its JSON text) defaults to everything (``{"*":["*"]}``); the
    server refuses tokens whose capability is not within the key's. Mint tokens on a trusted
    backend: whoever holds the key can sign anything.
    """
    if ttl <= 0:
        raise ValueError("ttl must be positive")
    key_name, secret = split_api_key(key)
    if capability is None:
        capability = {"*": ["*"]}
    cap = capability if isinstance(capability, str) else orjson.dumps(capability).decode()
    now = int(time.time())
    header = {"alg": "HS256", "typ": "JWT", "kid": key_name}
    payload = {"sub": client_id, "cap": cap, "iat": now, "exp": now + math.ceil(ttl)}
    signing_input = f"{_base64url(orjson.dumps(header))}.{_base64url(orjson.dumps(payload))}"
    signature = hmac.new(secret.encode(), signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{_base64url(signature)}"
