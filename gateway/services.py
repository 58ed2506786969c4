"""Everything a gateway's connections share: settings, keys, NATS, fan-out, history."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from gateway.broker import Broker
from gateway.engines import HistorySource, LiveChannels, MessageBus, PresenceEngine
from gateway.fanout import ChannelRouter
from gateway.history_client import HistoryClient
from gateway.presence import PresenceService
from shared.auth import Identity, Keyring
from shared.connection_ids import belongs_to_app, new_connection_id
from shared.session import Limits, Session
from shared.settings import Settings

__all__ = ["ConnectionRegistry", "GatewayServices", "RegisteredConnection"]


class RegisteredConnection(Protocol):
    """What the registry needs of a connection: who it is, and closing it when a resume
    takes its id over."""

    @property
    def session(self) -> Session:
        """The connection's protocol state (identity, connection id)."""

    def close(self, code: int, reason: str) -> None:
        """Close the connection after what is queued."""


class ConnectionRegistry:
    """The live connections of this gateway, by connection id."""

    def __init__(self) -> None:
        self.connections: dict[str, RegisteredConnection] = {}

    def __len__(self) -> int:
        return len(self.connections)

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
        """Register ``connection`` under ``connection_id``."""
        self.connections[connection_id] = connection

    def remove(self, connection_id: str, connection: RegisteredConnection) -> None:
        """Forget ``connection`` if it still holds ``connection_id``."""
        if self.connections.get(connection_id) is connection:
            del self.connections[connection_id]


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

    @classmethod
    def create(cls, settings: Settings) -> GatewayServices:
        """Wire the services for ``settings`` (call inside the running event loop)."""
        broker = Broker(settings)
        return cls(
            settings=settings,
            keyring=settings.keyring(),
            broker=broker,
            router=ChannelRouter(broker),
            history=HistoryClient(broker),
            presence=PresenceService(broker),
        )

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
        )
