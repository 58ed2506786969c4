"""One typed settings object, read from ``RT_*`` environment variables and CLI flags.

Every default works out of the box on a laptop. Flags override environment variables, which
override defaults. The table in README.md ("Configuration") lists the same fields.

Environment values are parsed by the field's type: booleans take true/false, 1/0, yes/no,
on/off; durations (float fields named ``*_s``) take plain seconds or a number with a unit
(``500ms``, ``10s``, ``5m``, ``2h``, ``1d``); lists stay comma-separated strings, read
through ``split_list``. Anything unparsable is a ``ValueError`` naming the variable.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Self

from shared.auth import ApiKey, Keyring, parse_api_key
from shared.keys import load_keys_file

__all__ = [
    "DEV_API_KEY",
    "DEV_KEYS_SECRET",
    "DEV_TOKEN_SIGNING_KEY",
    "LOG_FORMATS",
    "Settings",
    "parse_bool",
    "parse_duration",
    "parse_float",
    "parse_int",
    "split_list",
]

DEV_API_KEY = "dev.root:dev-secret"
# What `realtime dev` uses unless told otherwise: the SDK examples' legacy token secret, and a
# key-registry secret. Printed at start; never for production.
DEV_TOKEN_SIGNING_KEY = "local-dev-key"
DEV_KEYS_SECRET = "dev-keys-secret"
LOG_FORMATS = ("text", "json")

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})
_DURATION = re.compile(r"(?P<number>[0-9]*\.?[0-9]+)\s*(?P<unit>ms|s|m|h|d)", re.IGNORECASE)
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_bool(text: str) -> bool:
    """``true``/``1``/``yes``/``on`` or ``false``/``0``/``no``/``off``, any case; else
    ``ValueError`` (``bool("false")`` is true, so a plain cast would accept anything)."""
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError("expected a boolean: true/false, 1/0, yes/no or on/off")


def parse_int(text: str) -> int:
    """A decimal integer (sign allowed); else ``ValueError``."""
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError("expected an integer") from None


def parse_float(text: str) -> float:
    """A finite decimal number; else ``ValueError`` (``nan`` and ``inf`` included)."""
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError("expected a number") from None
    if not math.isfinite(value):
        raise ValueError("expected a finite number")
    return value


def parse_duration(text: str) -> float:
    """Seconds from plain seconds (``2.5``) or a number with a unit (``500ms``, ``10s``,
    ``5m``, ``2h``, ``1d``); a negative or non-finite duration is a ``ValueError``."""
    stripped = text.strip()
    match = _DURATION.fullmatch(stripped)
    if match is not None:
        seconds = float(match["number"]) * _UNIT_SECONDS[match["unit"].lower()]
    else:
        try:
            seconds = float(stripped)
        except ValueError:
            raise ValueError(
                "expected a duration: seconds, or a number with ms, s, m, h or d"
            ) from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError("expected a duration of zero or more")
    return seconds


def split_list(text: str) -> list[str]:
    """The items of a comma-separated setting, whitespace stripped and empty items dropped
    (``"a, b,"`` is ``["a", "b"]``)."""
    return [item for item in (part.strip() for part in text.split(",")) if item]


def _parser(name: str, kind: object) -> Callable[[str], Any]:
    """How the field ``name`` of type ``kind`` reads an environment value."""
    if kind is bool:
        return parse_bool
    if kind is int:
        return parse_int
    if kind is float:
        return parse_duration if name.endswith("_s") else parse_float
    if kind is str:
        return str
    raise TypeError(f"setting {name} has type {kind!r}, which has no environment parser")


def _env(name: str, help_text: str) -> dict[str, str]:
    return {"env": name, "help": help_text}


@dataclass(frozen=True)
class Settings:
    """Configuration of a gateway, a history worker or the dev cluster."""

    host: str = field(default="127.0.0.1", metadata=_env("RT_HOST", "address the gateway binds"))
    port: int = field(default=8080, metadata=_env("RT_PORT", "port of WebSocket + HTTP"))
    nats_url: str = field(
        default="nats://127.0.0.1:4222",
        metadata=_env("RT_NATS_URL", "NATS server URL(s), comma-separated"),
    )
    api_keys: str = field(
        default="", metadata=_env("RT_API_KEYS", "comma-separated appSlug.keyId:secret keys")
    )
    keep_alive_ms: int = field(
        default=15_000, metadata=_env("RT_KEEP_ALIVE_MS", "ping interval told to clients")
    )
    auth_timeout_s: float = field(
        default=10.0, metadata=_env("RT_AUTH_TIMEOUT_S", "close sockets that send no auth by then")
    )
    header_timeout_s: float = field(
        default=10.0,
        metadata=_env("RT_HEADER_TIMEOUT_S", "close connections whose request head is late"),
    )
    max_connections_per_address: int = field(
        default=0,
        metadata=_env("RT_MAX_CONNECTIONS_PER_ADDRESS", "TCP connections per client IP, 0 = any"),
    )
    max_frame_bytes: int = field(
        default=64 * 1024, metadata=_env("RT_MAX_FRAME_BYTES", "largest accepted client frame")
    )
    max_batch_members: int = field(
        default=1000, metadata=_env("RT_MAX_BATCH_MEMBERS", "largest accepted publish batch")
    )
    max_channels_per_connection: int = field(
        default=1000, metadata=_env("RT_MAX_CHANNELS", "subscriptions per connection")
    )
    publish_rate: float = field(
        default=100.0,
        metadata=_env(
            "RT_PUBLISH_RATE", "messages per second one connection may publish, 0 = no limit"
        ),
    )
    publish_burst: int = field(
        default=1000,
        metadata=_env("RT_PUBLISH_BURST", "messages a connection may publish at once"),
    )
    rest_publish_rate: float = field(
        default=1000.0,
        metadata=_env(
            "RT_REST_PUBLISH_RATE", "REST messages per second per API key per gateway, 0 = any"
        ),
    )
    rest_publish_burst: int = field(
        default=2000,
        metadata=_env("RT_REST_PUBLISH_BURST", "REST messages one API key may publish at once"),
    )
    max_connections_per_app: int = field(
        default=0,
        metadata=_env("RT_MAX_CONNECTIONS_PER_APP", "connections per app per gateway, 0 = any"),
    )
    max_longpoll_sessions_per_app: int = field(
        default=0,
        metadata=_env(
            "RT_MAX_LONGPOLL_SESSIONS_PER_APP", "long-poll sessions per app per gateway, 0 = any"
        ),
    )
    outbox_max_bytes: int = field(
        default=4 * 1024 * 1024,
        metadata=_env(
            "RT_OUTBOX_MAX_BYTES", "queued bytes per connection before dropping live messages"
        ),
    )
    longpoll_hold_s: float = field(
        default=25.0,
        metadata=_env("RT_LONGPOLL_HOLD_S", "longest a long-poll is held with nothing to send"),
    )
    longpoll_idle_s: float = field(
        default=45.0,
        metadata=_env("RT_LONGPOLL_IDLE_S", "end a long-poll session this long without a poll"),
    )
    cors_origins: str = field(
        default="*",
        metadata=_env("RT_CORS_ORIGINS", "origins allowed on /lp/* and REST, comma-separated"),
    )
    stream_name: str = field(
        default="RT_MESSAGES", metadata=_env("RT_STREAM", "JetStream stream holding messages")
    )
    stream_replicas: int = field(
        default=1, metadata=_env("RT_STREAM_REPLICAS", "replicas of the stream and KV bucket")
    )
    duplicate_window_s: float = field(
        default=120.0, metadata=_env("RT_DEDUP_WINDOW_S", "exactly-once window for messageId")
    )
    retention_max_age_s: float = field(
        default=24 * 3600.0, metadata=_env("RT_RETENTION_MAX_AGE_S", "age after which messages go")
    )
    retention_max_messages_per_channel: int = field(
        default=10_000, metadata=_env("RT_RETENTION_MAX_PER_CHANNEL", "messages kept per channel")
    )
    retention_max_bytes: int = field(
        default=-1, metadata=_env("RT_RETENTION_MAX_BYTES", "stream size cap, -1 = none")
    )
    resume_max_records: int = field(
        default=0,
        metadata=_env(
            "RT_RESUME_MAX_RECORDS",
            "most messages a resume replays (0 = per-channel retention); beyond: resumed:false",
        ),
    )
    presence_bucket: str = field(
        default="rt_presence", metadata=_env("RT_PRESENCE_BUCKET", "KV bucket of presence")
    )
    presence_ttl_s: float = field(
        default=20.0,
        metadata=_env(
            "RT_PRESENCE_TTL_S",
            "a gateway's presence heartbeat lasts this long (rewritten every third of it); "
            "its members leave within it after the gateway dies",
        ),
    )
    presence_grace_s: float = field(
        default=15.0,
        metadata=_env("RT_PRESENCE_GRACE_S", "memberships kept for a quick reconnect"),
    )
    presence_max_members: int = field(
        default=5000, metadata=_env("RT_PRESENCE_MAX_MEMBERS", "members per channel")
    )
    presence_max_data_bytes: int = field(
        default=8 * 1024, metadata=_env("RT_PRESENCE_MAX_DATA_BYTES", "presence data per member")
    )
    token_max_ttl_s: float = field(
        default=24 * 3600.0,
        metadata=_env("RT_TOKEN_MAX_TTL_S", "longest token lifetime accepted (exp - iat)"),
    )
    keys_file: str = field(
        default="",
        metadata=_env("RT_KEYS_FILE", "JSON file of static keys with capabilities"),
    )
    keys_bucket: str = field(
        default="rt_keys", metadata=_env("RT_KEYS_BUCKET", "KV bucket of the key registry")
    )
    keys_secret: str = field(
        default="",
        metadata=_env("RT_KEYS_SECRET", "seals registry key secrets; registry off when empty"),
    )
    key_rotation_grace_s: float = field(
        default=3600.0,
        metadata=_env("RT_KEY_ROTATION_GRACE_S", "old secret still accepted after a rotation"),
    )
    token_signing_key: str = field(
        default="",
        metadata=_env("RT_TOKEN_SIGNING_KEY", "server-wide secret of legacy dev tokens"),
    )
    request_timeout_s: float = field(
        default=2.0, metadata=_env("RT_REQUEST_TIMEOUT_S", "NATS request timeout (history, acks)")
    )
    drain_s: float = field(
        default=10.0,
        metadata=_env(
            "RT_DRAIN_S", "on SIGTERM, close a gateway's clients spread over this long, then exit"
        ),
    )
    metrics_port: int = field(
        default=9091,
        metadata=_env("RT_METRICS_PORT", "port of a history worker's /metrics (0 = off)"),
    )
    log_level: str = field(default="INFO", metadata=_env("RT_LOG_LEVEL", "logging level"))
    log_format: str = field(
        default="text",
        metadata=_env("RT_LOG_FORMAT", "log lines as text, or json (one object per line)"),
    )

    def __post_init__(self) -> None:
        # Checked here so a flag, the environment and dataclasses.replace are all caught early,
        # before the process has started anything.
        if self.log_format.lower() not in LOG_FORMATS:
            raise ValueError(f"RT_LOG_FORMAT={self.log_format!r}: expected text or json")
        for rate, burst, names in (
            (self.publish_rate, self.publish_burst, ("RT_PUBLISH_RATE", "RT_PUBLISH_BURST")),
            (
                self.rest_publish_rate,
                self.rest_publish_burst,
                ("RT_REST_PUBLISH_RATE", "RT_REST_PUBLISH_BURST"),
            ),
        ):
            if rate < 0:
                raise ValueError(f"{names[0]}={rate!r}: expected 0 (no limit) or more")
            if rate > 0 and burst < 1:
                raise ValueError(f"{names[1]}={burst!r}: expected 1 or more")

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Self:
        """Build settings from ``environ`` (default ``os.environ``), then ``overrides``.

        ``None`` overrides are ignored, so unset CLI flags fall through to the environment.
        """
        environ = os.environ if environ is None else environ
        # The resolved annotations, not type(default): a subclass may declare any field.
        kinds = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for spec in dataclasses.fields(cls):
            variable = spec.metadata["env"]
            raw = environ.get(variable)
            if raw is not None and raw != "":
                try:
                    values[spec.name] = _parser(spec.name, kinds[spec.name])(raw)
                except ValueError as error:
                    raise ValueError(f"{variable}={raw!r}: {error}") from None
        values.update({name: value for name, value in overrides.items() if value is not None})
        return cls(**values)

    @property
    def nats_urls(self) -> list[str]:
        """The NATS server URLs of ``nats_url``, as a list (what ``nats.connect`` takes)."""
        return split_list(self.nats_url)

    @property
    def channels_can_empty(self) -> bool:
        """True when retention can remove every message of a channel (an age limit or a
        byte cap): only then is a channel's last serial kept apart (the tails stream), so
        serials continue instead of restarting at 1. A count limit alone always keeps the
        newest messages, and the tails stream's cost is saved."""
        return self.retention_max_age_s > 0 or self.retention_max_bytes > 0

    def keys(self) -> list[ApiKey]:
        """The static keys: ``api_keys`` (allow-all) and those of ``keys_file`` (with their
        capabilities); raise ``ValueError`` naming a malformed key."""
        keys = [parse_api_key(text) for text in split_list(self.api_keys)]
        if self.keys_file:
            keys += load_keys_file(self.keys_file)
        return keys

    def keyring(self) -> Keyring:
        """The keyring of the static keys (the registry adds its keys while running)."""
        return Keyring(self.keys(), self.token_max_ttl_s, self.token_signing_key)
