"""One typed settings object, read from ``RT_*`` environment variables and CLI flags.

Every default works out of the box on a laptop. Flags override environment variables, which
override defaults. The table in README.md ("Configuration") lists the same fields.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from shared.auth import ApiKey, Keyring, parse_api_key

__all__ = ["DEV_API_KEY", "Settings"]

DEV_API_KEY = "dev.root:dev-secret"


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
    outbox_max_bytes: int = field(
        default=4 * 1024 * 1024,
        metadata=_env(
            "RT_OUTBOX_MAX_BYTES", "queued bytes per connection before dropping live messages"
        ),
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
    presence_bucket: str = field(
        default="rt_presence", metadata=_env("RT_PRESENCE_BUCKET", "KV bucket of presence")
    )
    presence_ttl_s: float = field(
        default=20.0,
        metadata=_env("RT_PRESENCE_TTL_S", "member keys expire this long after their gateway dies"),
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
    request_timeout_s: float = field(
        default=2.0, metadata=_env("RT_REQUEST_TIMEOUT_S", "NATS request timeout (history, acks)")
    )
    log_level: str = field(default="INFO", metadata=_env("RT_LOG_LEVEL", "logging level"))

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``environ`` (default ``os.environ``), then ``overrides``.

        ``None`` overrides are ignored, so unset CLI flags fall through to the environment.
        """
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for spec in dataclasses.fields(cls):
            raw = environ.get(spec.metadata["env"])
            if raw is not None and raw != "":
                kind = cast(Callable[[str], Any], type(spec.default))
                try:
                    values[spec.name] = kind(raw)
                except ValueError:
                    raise ValueError(
                        f"{spec.metadata['env']}={raw!r} is not a {type(spec.default).__name__}"
                    ) from None
        values.update({name: value for name, value in overrides.items() if value is not None})
        return cls(**values)

    def keys(self) -> list[ApiKey]:
        """Parse ``api_keys``; raise ``ValueError`` naming a malformed key."""
        return [parse_api_key(text) for text in self.api_keys.split(",") if text.strip()]

    def keyring(self) -> Keyring:
        """The keyring built from ``api_keys``."""
        return Keyring(self.keys(), self.token_max_ttl_s)
