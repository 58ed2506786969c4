"""The engines a gateway's connections use, as interfaces.

``Connection`` and the transports only call these; the NATS implementations (``Broker``,
``ChannelRouter``, ``HistoryClient``, ``PresenceService``) sit behind them, and the in-memory
ones in ``testing/memory_engines.py`` run the protocol's behaviour tests in one process
without sockets or nats-server (as Centrifuge's memory engine does for its node).
"""

from __future__ import annotations

from typing import Protocol

from gateway.fanout import Subscriber
from gateway.presence import PresenceClient
from realtime_protocol.frames import Message, PresenceAction
from shared.history import HistoryQuery, HistoryResult
from shared.presence import MemberRecord

__all__ = ["HistorySource", "LiveChannels", "MessageBus", "PresenceEngine"]


class MessageBus(Protocol):
    """Stores publishes with per-channel serials (and fans ephemeral ones out)."""

    @property
    def is_ready(self) -> bool:
        """True while publishes can be stored."""

    def start(self) -> None:
        """Begin connecting in the background."""

    async def close(self) -> None:
        """Stop and release the backend."""

    async def publish(self, app: str, message: Message) -> int:
        """Store ``message``; return its serial (0 if ephemeral; the original serial for a
        resent ``messageId``). Raise ``ProtocolError`` or ``TimeoutError`` on failure."""


class LiveChannels(Protocol):
    """Which local subscribers receive which channel's live messages."""

    def __len__(self) -> int:
        """Channels with local subscribers."""

    def subscription_count(self) -> int:
        """Subscriptions of local connections, all channels together."""

    async def add(self, app: str, channel: str, subscriber: Subscriber) -> None:
        """Deliver ``channel``'s live messages to ``subscriber`` from now on (returns once
        no message stored after the return can be missed)."""

    async def remove(self, app: str, channel: str, subscriber: Subscriber) -> None:
        """Stop delivering ``channel`` to ``subscriber``."""


class HistorySource(Protocol):
    """Answers ``hist``, ``fetch`` and resume queries."""

    async def query(self, query: HistoryQuery) -> HistoryResult:
        """The page ``query`` asks for; ``ProtocolError`` 50000 when unavailable."""


class PresenceEngine(Protocol):
    """Presence membership and events for the connections of one gateway."""

    async def start(self) -> None:
        """Run background work (heartbeat, watch) until cancelled."""

    async def stop(self) -> None:
        """Clean shutdown (after the connections closed): let watchers know this gateway's
        members are gone as soon as none can come back here."""

    async def subscribe(self, client: PresenceClient, app: str, channel: str, reason: str) -> None:
        """Start presence events for ``client`` (a snapshot first for an explicit one)."""

    async def members(self, app: str, channel: str) -> list[MemberRecord]:
        """The channel's current members, in no particular order (REST presence)."""

    def member_count(self) -> int:
        """Members of the channels this gateway follows (a metric)."""

    def unsubscribe(
        self, client: PresenceClient, app: str, channel: str, reasons: tuple[str, ...]
    ) -> None:
        """Stop events for ``reasons``; membership is untouched."""

    async def apply(
        self,
        client: PresenceClient,
        action: PresenceAction,
        channel: str,
        data: bytes | None,
        encoding: str,
    ) -> None:
        """Carry out a ``pres`` request."""

    async def leave_channel(self, client: PresenceClient, channel: str) -> None:
        """Leave ``channel`` if a member (``unsub``)."""

    def connection_closed(self, client: PresenceClient, graceful: bool) -> None:
        """Stop its events; leave now (clean close) or after the grace period."""

    def resumed(self, client: PresenceClient) -> None:
        """``client`` took over its predecessor's connection id: keep its memberships."""
