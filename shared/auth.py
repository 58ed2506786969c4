"""Credentials: API keys ``appSlug.keyId:secret`` and HS256 JWTs (PROTOCOL.md section 4).

Pure functions over a ``Keyring`` built from settings; no I/O.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import jwt
import orjson
from jwt.warnings import InsecureKeyLengthWarning

from realtime_protocol.errors import ErrorCode, ProtocolError
from shared.capabilities import Capability

__all__ = [
    "DEFAULT_TOKEN_MAX_TTL_S",
    "LEGACY_KEY_ID",
    "ApiKey",
    "Identity",
    "Keyring",
    "MintedToken",
    "mint_token",
    "parse_api_key",
]

# Key secrets are the operator's choice (the SDK examples use short ones); pyjwt would warn on
# every verification with a secret under 32 bytes.
warnings.filterwarnings("ignore", category=InsecureKeyLengthWarning)

# The app slug becomes one NATS subject token, so it must not contain '.', '*', '>' or spaces.
_APP_SLUG = re.compile(r"[A-Za-z0-9_\-]{1,64}")


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One API key: ``name`` is ``appSlug.keyId``; the capability limits what it may do.

    Registry keys may expire (``expires_at``) and, after a rotation, accept their previous
    secret until ``previous_until`` (both Unix seconds)."""

    name: str
    secret: str
    capability: Capability
    expires_at: float | None = None
    previous_secret: str = ""
    previous_until: float = 0.0

    def secrets_at(self, now: float) -> tuple[str, ...]:
        """The secrets that authenticate at ``now`` (none once the key expired)."""
        if self.expires_at is not None and now >= self.expires_at:
            return ()
        if self.previous_secret and now < self.previous_until:
            return (self.secret, self.previous_secret)
        return (self.secret,)

    @property
    def app(self) -> str:
        """The app slug that scopes every channel this key touches."""
        return self.name.split(".", 1)[0]


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a connection is, once authenticated."""

    app: str
    client_id: str
    key_name: str
    capability: Capability
    expires_at: float | None = None


def parse_api_key(text: str, capability: Capability | None = None) -> ApiKey:
    """Parse ``appSlug.keyId:secret``; raise ``ValueError`` naming what is wrong."""
    name, separator, secret = text.strip().partition(":")
    if not separator or not secret:
        raise ValueError("an API key must look like appSlug.keyId:secret")
    app, dot, key_id = name.partition(".")
    if not dot or not key_id:
        raise ValueError(f"key name {name!r} must look like appSlug.keyId")
    if not _APP_SLUG.fullmatch(app):
        raise ValueError(f"app slug {app!r} may only contain A-Z a-z 0-9 '_' '-' (1-64)")
    return ApiKey(name, secret, capability or Capability.allow_all())


DEFAULT_TOKEN_MAX_TTL_S = 24 * 3600.0
# The key id legacy development tokens are attributed to (``appSlug.legacy``): they have no
# kid, and revocation, limits and logs need a key name.
LEGACY_KEY_ID = "legacy"
# Clock skew allowed between the token signer and the gateway when checking lifetimes.
_CLOCK_SKEW_S = 60.0


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class Keyring:
    """The API keys a gateway accepts, looked up by key name.

    Static keys (``RT_API_KEYS``, ``RT_KEYS_FILE``) are fixed; registry keys come and go
    while the gateway runs (``put``, ``remove``: the key registry's watcher calls them), and
    never shadow a static key of the same name. With a ``signing_key`` (``RT_TOKEN_SIGNING_KEY``)
    legacy development tokens are accepted too: no ``kid``, an ``app`` claim, signed with that
    server-wide secret (PROTOCOL.md 4.2, last paragraph).
    """

    def __init__(
        self,
        keys: Iterable[ApiKey],
        token_max_ttl_s: float = DEFAULT_TOKEN_MAX_TTL_S,
        signing_key: str = "",
    ) -> None:
        self._keys = {key.name: key for key in keys}
        self._static = frozenset(self._keys)
        self.token_max_ttl_s = token_max_ttl_s
        self.signing_key = signing_key

    def __len__(self) -> int:
        return len(self._keys)

    def get(self, name: str) -> ApiKey | None:
        """Return the key named ``name``, if configured."""
        return self._keys.get(name)

    def names(self) -> list[str]:
        """Every key name accepted now."""
        return list(self._keys)

    def put(self, key: ApiKey) -> bool:
        """Add or replace a registry key; False (and nothing changes) when a static key has
        that name."""
        if key.name in self._static:
            return False
        self._keys[key.name] = key
        return True

    def remove(self, name: str) -> ApiKey | None:
        """Forget a registry key (revoked); return it, None if unknown or static."""
        if name in self._static:
            return None
        return self._keys.pop(name, None)

    def authenticate_key(self, text: str, now: float | None = None) -> ApiKey:
        """Return the key matching the whole ``appSlug.keyId:secret`` string, else 40101
        (also for an expired key, or a previous secret past its rotation grace)."""
        name, _, secret = text.partition(":")
        key = self._keys.get(name)
        if key is not None:
            now = time.time() if now is None else now
            # compare_digest keeps the secret check constant-time.
            if any(_constant_time_equal(known, secret) for known in key.secrets_at(now)):
                return key
        raise ProtocolError(ErrorCode.BAD_AUTH, "invalid API key")

    def verify_token(
        self, token: str, now: float | None = None
    ) -> tuple[ApiKey, dict[str, object]]:
        """Verify an HS256 JWT signed by one of our keys (``kid``); return key and claims.

        A token with no ``kid`` is a legacy development token: accepted only with a
        ``signing_key``, for the app its ``app`` claim names (an allow-all key of that app
        stands for the signer). Raises ``ProtocolError`` 40102 when expired and 40101 for
        every other failure (a revoked or expired key included).
        """
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise ProtocolError(ErrorCode.BAD_AUTH, "malformed token") from None
        now = time.time() if now is None else now
        kid = header.get("kid")
        if kid is None and self.signing_key:
            claims = self._decode(token, (self.signing_key,))
            app = claims.get("app")
            if not isinstance(app, str) or not _APP_SLUG.fullmatch(app):
                raise ProtocolError(ErrorCode.BAD_AUTH, "legacy token needs a valid app claim")
            key = ApiKey(f"{app}.{LEGACY_KEY_ID}", self.signing_key, Capability.allow_all())
        else:
            key_or_none = self._keys.get(kid) if isinstance(kid, str) else None
            if key_or_none is None:
                raise ProtocolError(ErrorCode.BAD_AUTH, "token kid names no known key")
            key = key_or_none
            known = key.secrets_at(now)
            if not known:
                raise ProtocolError(ErrorCode.BAD_AUTH, "the token's key has expired")
            claims = self._decode(token, known)
        # Claim types are checked strictly: PyJWT accepts a string "exp", which would make a
        # token that never expires while connected.
        expires = claims.get("exp")
        if not _is_number(expires):
            raise ProtocolError(ErrorCode.BAD_AUTH, "token exp must be a number")
        for name in ("iat", "nbf"):
            if name in claims and not _is_number(claims[name]):
                raise ProtocolError(ErrorCode.BAD_AUTH, f"token {name} must be a number")
        assert isinstance(expires, int | float)
        if now >= expires:
            raise ProtocolError(ErrorCode.AUTH_EXPIRED, "token expired")
        issued = claims.get("iat")
        lifetime = expires - min(now, float(issued)) if isinstance(issued, int | float) else 0.0
        if max(expires - now, lifetime) > self.token_max_ttl_s + _CLOCK_SKEW_S:
            raise ProtocolError(
                ErrorCode.BAD_AUTH,
                f"token lifetime exceeds the {self.token_max_ttl_s:.0f} s maximum",
            )
        return key, claims

    @staticmethod
    def _decode(token: str, known_secrets: tuple[str, ...]) -> dict[str, object]:
        """The claims of ``token`` if one of ``known_secrets`` signed it (a rotated key
        still accepts its previous secret during the grace)."""
        error: jwt.PyJWTError | None = None
        for secret in known_secrets:
            try:
                return jwt.decode(
                    token,
                    secret,
                    algorithms=["HS256"],
                    # iat in the future is client clock skew, not forgery; exp is what matters.
                    options={"require": ["exp"], "verify_iat": False},
                    leeway=0,
                )
            except jwt.ExpiredSignatureError:
                raise ProtocolError(ErrorCode.AUTH_EXPIRED, "token expired") from None
            except jwt.PyJWTError as failure:
                error = failure
        raise ProtocolError(ErrorCode.BAD_AUTH, f"invalid token: {error}") from None

    def identify(self, token: str, key_text: str, client_id: str, assign_id: str) -> Identity:
        """Authenticate an ``auth`` frame's credential; ``assign_id`` is used when no id.

        Key auth takes the frame's ``clientId``; token auth takes ``sub`` and rejects a
        differing frame ``clientId``. A token without ``sub`` (or an empty one) gets a
        server-assigned clientId: its holder may not choose one the signer did not grant
        (PROTOCOL.md 4.6), so a frame ``clientId`` with it is refused. A token's capability
        must be within its key's.
        """
        if token:
            key, claims = self.verify_token(token)
            subject = claims.get("sub")
            if subject is not None and not isinstance(subject, str):
                raise ProtocolError(ErrorCode.BAD_AUTH, "token sub must be a string")
            if client_id and client_id != subject:
                raise ProtocolError(
                    ErrorCode.BAD_AUTH,
                    "clientId differs from the token's sub"
                    if subject
                    else "a token without sub cannot choose a clientId",
                )
            capability = key.capability
            if "cap" in claims:
                try:
                    capability = Capability.parse(claims["cap"])
                except ValueError as error:
                    raise ProtocolError(ErrorCode.BAD_AUTH, f"token cap: {error}") from None
                if not capability.is_subset_of(key.capability):
                    raise ProtocolError(
                        ErrorCode.BAD_AUTH, "token capability exceeds its key's capability"
                    )
            expires = claims["exp"]
            assert isinstance(expires, int | float)  # checked by verify_token
            return Identity(key.app, subject or assign_id, key.name, capability, float(expires))
        if key_text:
            key = self.authenticate_key(key_text)
            return Identity(key.app, client_id or assign_id, key.name, key.capability)
        raise ProtocolError(ErrorCode.BAD_AUTH, "auth frame carries neither token nor key")


def _constant_time_equal(left: str, right: str) -> bool:
    return hmac.compare_digest(left.encode(), right.encode())


@dataclass(frozen=True, slots=True)
class MintedToken:
    """A token signed by ``mint_token`` with its claims: ``issued_at``/``expires_at`` in
    seconds (``iat``/``exp``), ``capability`` as the JSON string in ``cap``."""

    token: str
    issued_at: int
    expires_at: int
    capability: str


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def mint_token(
    key: ApiKey, client_id: str, capability: Capability, ttl_ms: int, now: float
) -> MintedToken:
    """Sign a client token in the PROTOCOL.md 4.2 format, as the SDKs' own ``createJwt``
    does: header ``{"alg":"HS256","typ":"JWT","kid":<key name>}``, payload ``sub``, ``cap``
    (a JSON string), ``iat`` = ``now`` in whole seconds, ``exp = iat + ceil(ttl_ms / 1000)``,
    HMAC-SHA256 with the key's secret. Built by hand so the header keeps the documented field
    order; ``Keyring.verify_token`` accepts it (unit-tested)."""
    issued = int(now)
    expires = issued + -(-ttl_ms // 1000)
    cap = orjson.dumps(capability.document).decode()
    header = orjson.dumps({"alg": "HS256", "typ": "JWT", "kid": key.name})
    payload = orjson.dumps({"sub": client_id, "cap": cap, "iat": issued, "exp": expires})
    signing_input = f"{_b64url(header)}.{_b64url(payload)}"
    signature = hmac.new(key.secret.encode(), signing_input.encode("ascii"), hashlib.sha256)
    return MintedToken(f"{signing_input}.{_b64url(signature.digest())}", issued, expires, cap)
