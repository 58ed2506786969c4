"""What the client hands to applications: messages, presence events, state changes."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ChannelState",
    "ChannelStateChange",
    "ConnectionState",
    "ConnectionStateChange",
    "HistoryPage",
    "Message",
    "PresenceMessage",
]


class ConnectionState(enum.StrEnum):
    """Connection states, named as in the SDK (``connection.ts``)."""

    INITIALIZED = "initialized"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    SUSPENDED = "suspended"
    CLOSING = "closing"
    CLOSED = "closed"
    FAILED = "failed"


class ChannelState(enum.StrEnum):
    """Channel states, named as in the SDK (``channel.ts``)."""

    INITIALIZED = "initialized"
    ATTACHING = "attaching"
    ATTACHED = "attached"
    DETACHING = "detaching"
    DETACHED = "detached"
    SUSPENDED = "suspended"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class ConnectionStateChange:
    """One connection event. ``current == previous`` for a notice that changes no state (an
    unscoped ``err`` from the server, in ``reason``)."""

    current: ConnectionState
    previous: ConnectionState
    reason: BaseException | None = None
    retry_in: float | None = None
    """Seconds until the next connect attempt (``disconnected`` only)."""


@dataclass(frozen=True, slots=True)
class ChannelStateChange:
    """One channel event. ``resumed`` is true on an ``attached`` that resumed from the
    channel's serial with nothing missed; false there means messages may have been missed."""

    current: ChannelState
    previous: ChannelState
    resumed: bool = False
    reason: BaseException | None = None


@dataclass(frozen=True, slots=True)
class Message:
    """A message as delivered (live, replayed, fetched or from history).

    Batch members arrive as separate messages with ids ``<batch id>:<index>`` and no
    ``serial`` of their own (the batch's serial moves the channel's cursor). ``data`` is the
    decoded JSON value (decrypted when the channel has a cipher; ``encoding`` is then empty);
    ``serial`` is 0 for ephemeral messages.
    """

    channel: str
    name: str
    data: Any
    message_id: str
    client_id: str
    timestamp: int
    encoding: str = ""
    serial: int = 0
    ephemeral: bool = False


@dataclass(frozen=True, slots=True)
class PresenceMessage:
    """A presence event (``enter``, ``update``, ``leave``) or, from ``get()``, a current
    member (action ``present``). ``leave`` carries the member's last data."""

    action: str
    channel: str
    client_id: str
    connection_id: str
    data: Any
    timestamp: int
    encoding: str = ""


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """One page of a channel's history, oldest first; ``more`` when older messages exist.

    ``before`` is the serial to pass as ``before`` for the next (older) page (0 when there is
    none); ``Channel.history(before=page.before)`` or ``page_next`` fetch it.
    """

    messages: tuple[Message, ...]
    more: bool
    before: int
