"""Everything a gateway's connections share: settings, keys, NATS, fan-out, history."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from gateway.broker import Broker
from gateway.engines import HistorySource, LiveChannels, MessageBus, PresenceEngine
from gateway.fanout import ChannelRouter
from gateway.history_client import HistoryClient
from gateway.keys import KeyRegistry
from gateway.presence import PresenceService
from realtime_protocol.errors import ErrorCode, ProtocolError
from realtime_protocol.frames import ServerFrame
from shared.auth import Identity, Keyring
from shared.connection_ids import belongs_to_app, new_connection_id
from shared.limits import Limit
from shared.session import Limits, Session
from shared.settings import Settings

__all__ = ["ConnectionRegistry", "GatewayServices", "RegisteredConnection"]


class RegisteredConnection(Protocol):
    """What the registry needs of a connection: who it is, and closing it when a resume
    takes its id over."""

    @property
    def session(self) -> Session:
        """The connection's protocol state (identity, connection id)."""

    def send(self, frame: ServerFrame) -> None:
        """Queue a frame (a revoked key's ``err``)."""

    def close(self, code: int, reason: str) -> None:
        """Close the connection after what is queued."""


class ConnectionRegistry:
    """The live connections of this gateway (WebSocket and long-poll alike), by connection
    id, counted per app so that one app cannot take all of a gateway's connections
    (``max_per_app``, 0 = no cap)."""

    def __init__(self, max_per_app: int = 0) -> None:
        self.connections: dict[str, RegisteredConnection] = {}
        self.max_per_app = max_per_app
        # Registered connections per app; an entry goes at zero.
        self.per_app: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.connections)

    def admission_error(
        self, identity: Identity, predecessor: RegisteredConnection | None
    ) -> ProtocolError | None:
        """The refusal (unscoped 42900) of a new connection of ``identity``'s app when the
        app already holds ``max_per_app`` connections here, else None. A connection that
        takes over its ``predecessor`` (a resume) replaces it, so it is never refused: a
        reconnecting client at the cap gets its connection back."""
        if self.max_per_app <= 0 or predecessor is not None:
            return None
        if self.per_app.get(identity.app, 0) < self.max_per_app:
            return None
        return ProtocolError(
            ErrorCode.RATE_LIMITED,
            f"app has {self.max_per_app} connections on this gateway already, retry later",
            limit=Limit.CONNECTIONS_PER_APP,
        )

    def claim(self, resume_id: str, identity: Identity) -> tuple[str, RegisteredConnection | None]:
        """Choose the id of a new connection: the resumed one when allowed, else a fresh one.

        Returns the id and the connection it takes over (a half-open predecessor with the
        same app and clientId), if any. An id issued in another app is never reused (ids are
        bound to their app, ``shared.connection_ids``). An unusable resume id never fails the
        handshake.
        """
        if resume_id and belongs_to_app(resume_id, identity.app):
            holder = self.connections.get(resume_id)
            if holder is None:
                return resume_id, None
            held_by = holder.session.identity
            if held_by and (held_by.app, held_by.client_id) == (identity.app, identity.client_id):
                return resume_id, holder
        return new_connection_id(identity.app), None

    def add(self, connection_id: str, connection: RegisteredConnection) -> None:
        """Register ``connection`` under ``connection_id`` (replacing, and no longer
        counting, a predecessor that held the id)."""
        replaced = self.connections.get(connection_id)
        if replaced is not None:
            self._count(replaced, -1)
        self.connections[connection_id] = connection
        self._count(connection, 1)

    def remove(self, connection_id: str, connection: RegisteredConnection) -> None:
        """Forget ``connection`` if it still holds ``connection_id``."""
        if self.connections.get(connection_id) is connection:
            del self.connections[connection_id]
            self._count(connection, -1)

    def _count(self, connection: RegisteredConnection, delta: int) -> None:
        identity = connection.session.identity
        if identity is None:
            return
        count = self.per_app.get(identity.app, 0) + delta
        if count > 0:
            self.per_app[identity.app] = count
        else:
            self.per_app.pop(identity.app, None)


@dataclass
class GatewayServices:
    """Shared state of one gateway process."""

    settings: Settings
    keyring: Keyring
    broker: MessageBus
    router: LiveChannels
    history: HistorySource
    presence: PresenceEngine
    registry: ConnectionRegistry = field(default_factory=ConnectionRegistry)
    # The key registry's follower (None in tests that run without NATS).
    keys: KeyRegistry | None = None
    # Set on SIGTERM (gateway.drain): /readyz fails and new connections are refused while
    # the open ones are closed, spread over RT_DRAIN_S.
    draining: bool = False
    # Connections (of any transport, authenticated or not) that ended since start: the
    # gateway's full garbage collections follow it (gateway.main).
    finished_connections: int = 0

    def __post_init__(self) -> None:
        # The registry is built before the settings are at hand (a field default, or by
        # ``create``); its cap comes from them, however the services were put together.
        self.registry.max_per_app = self.settings.max_connections_per_app

    @classmethod
    def create(cls, settings: Settings) -> GatewayServices:
        """Wire the services for ``settings`` (call inside the running event loop)."""
        broker = Broker(settings)
        keyring = settings.keyring()
        registry = ConnectionRegistry()
        router = ChannelRouter(broker)
        return cls(
            settings=settings,
            keyring=keyring,
            broker=broker,
            router=router,
            history=HistoryClient(broker, router.newest_serial),
            presence=PresenceService(broker),
            registry=registry,
            keys=KeyRegistry(settings, keyring, broker, registry.connections.values),
        )

    @property
    def is_ready(self) -> bool:
        """True when handshakes can be decided: NATS is ready and the key registry loaded."""
        return self.broker.is_ready and (self.keys is None or self.keys.is_ready)

    @property
    def limits(self) -> Limits:
        """Per-connection limits from the settings."""
        settings = self.settings
        return Limits(
            keep_alive_ms=settings.keep_alive_ms,
            max_frame_bytes=settings.max_frame_bytes,
            max_batch_members=settings.max_batch_members,
            max_channels=settings.max_channels_per_connection,
            max_presence_data_bytes=settings.presence_max_data_bytes,
            publish_rate=settings.publish_rate,
            publish_burst=settings.publish_burst,
        )
