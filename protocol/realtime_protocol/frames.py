"""Frame types of the wire protocol (PROTOCOL.md section 2), shared by both codecs.

Every frame is an immutable dataclass named after its protocol frame. Payloads (``data``) are
kept as raw JSON text in ``bytes`` (``None`` = absent) so that binary connections forward them
byte for byte and JSON connections splice them into their output without re-parsing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

__all__ = [
    "AckFrame",
    "AuthFrame",
    "BatchMember",
    "BundleFrame",
    "ClientFrame",
    "ConnectedFrame",
    "ErrorFrame",
    "FetchFrame",
    "FetchResponseFrame",
    "HistoryFrame",
    "HistoryResponseFrame",
    "Message",
    "MessageFrame",
    "PingFrame",
    "PongFrame",
    "PresenceAction",
    "PresenceEventFrame",
    "PresenceFrame",
    "PresenceSubscribeFrame",
    "PresenceUnsubscribeFrame",
    "PublishFrame",
    "RequestFrame",
    "ServerFrame",
    "SubscribeFrame",
    "UnsubscribeFrame",
]


class PresenceAction(enum.IntEnum):
    """Presence transition, valued as its byte on the binary wire."""

    ENTER = 1
    LEAVE = 2
    UPDATE = 3


@dataclass(frozen=True, slots=True)
class BatchMember:
    """One message inside a client batch: its own name, payload and encoding."""

    name: str
    data: bytes | None
    encoding: str = ""


@dataclass(frozen=True, slots=True)
class Message:
    """A published message as stored and delivered: a single message or a whole batch.

    A batch (``members`` non-empty) has one id, one clientId, one timestamp and one serial;
    its top-level ``name``/``data``/``encoding`` are unused. ``serial`` is 0 for ephemeral
    messages.
    """

    channel: str
    name: str
    data: bytes | None
    message_id: str
    client_id: str
    timestamp: int
    encoding: str = ""
    serial: int = 0
    ephemeral: bool = False
    members: tuple[BatchMember, ...] = ()

    def with_serial(self, serial: int) -> Message:
        """This message with its stored serial (the stored form carries serial 0)."""
        return Message(
            self.channel,
            self.name,
            self.data,
            self.message_id,
            self.client_id,
            self.timestamp,
            self.encoding,
            serial,
            self.ephemeral,
            self.members,
        )


# ---- client to server ----


@dataclass(frozen=True, slots=True)
class AuthFrame:
    """``auth`` (opcode 1): the first frame of every connection."""

    token: str = ""
    key: str = ""
    client_id: str = ""
    resume_connection_id: str = ""
    version: int = 0


@dataclass(frozen=True, slots=True)
class SubscribeFrame:
    """``sub`` (2): start live delivery, optionally resuming after ``last_serial``."""

    id: int
    channel: str
    last_serial: int = 0
    # JSON-era clients resume by message id instead of serial (PROTOCOL.md 2.7).
    last_message_id: str = ""


@dataclass(frozen=True, slots=True)
class UnsubscribeFrame:
    """``unsub`` (3)."""

    id: int
    channel: str


@dataclass(frozen=True, slots=True)
class PublishFrame:
    """``pub`` (4): one message, or a batch when ``members`` is non-empty."""

    id: int
    channel: str
    name: str = ""
    data: bytes | None = None
    encoding: str = ""
    message_id: str = ""
    ephemeral: bool = False
    members: tuple[BatchMember, ...] = ()


@dataclass(frozen=True, slots=True)
class PresenceFrame:
    """``pres`` (5): enter, update or leave this connection's presence on a channel."""

    id: int
    channel: str
    action: PresenceAction
    data: bytes | None = None
    encoding: str = ""


@dataclass(frozen=True, slots=True)
class PresenceSubscribeFrame:
    """``presSub`` (6): snapshot of members, then live presence events."""

    id: int
    channel: str


@dataclass(frozen=True, slots=True)
class PresenceUnsubscribeFrame:
    """``presUnsub`` (7)."""

    id: int
    channel: str


@dataclass(frozen=True, slots=True)
class HistoryFrame:
    """``hist`` (8): a page of stored messages with serial below ``before`` (0 = newest)."""

    id: int
    channel: str
    limit: int = 0
    before: int = 0
    # JSON-era clients page by message id (PROTOCOL.md 2.7).
    start: str = ""


@dataclass(frozen=True, slots=True)
class FetchFrame:
    """``fetch`` (9): gap fill, stored messages with serial above ``from_serial``."""

    id: int
    channel: str
    from_serial: int


@dataclass(frozen=True, slots=True)
class PingFrame:
    """``ping`` (10)."""


# ---- server to client ----


@dataclass(frozen=True, slots=True)
class ConnectedFrame:
    """``connected`` (11): the handshake succeeded."""

    connection_id: str
    keep_alive_ms: int
    client_id: str


@dataclass(frozen=True, slots=True)
class AckFrame:
    """``ack`` (12). ``resumed`` is ``None`` when absent from the frame."""

    id: int
    seq: int = 0
    resumed: bool | None = None


@dataclass(frozen=True, slots=True)
class MessageFrame:
    """``msg`` (13) with one member, or opcode 19 when the message is a batch."""

    message: Message


@dataclass(frozen=True, slots=True)
class BundleFrame:
    """``msg`` (13) with several members of one channel, in ascending serial order."""

    messages: tuple[Message, ...]


@dataclass(frozen=True, slots=True)
class PresenceEventFrame:
    """``presEvt`` (14)."""

    action: PresenceAction
    timestamp: int
    channel: str
    client_id: str
    connection_id: str
    data: bytes | None = None
    encoding: str = ""


@dataclass(frozen=True, slots=True)
class ErrorFrame:
    """``err`` (15); ``id`` 0 means not scoped to a request."""

    code: int
    message: str
    id: int = 0


@dataclass(frozen=True, slots=True)
class PongFrame:
    """``pong`` (16)."""


@dataclass(frozen=True, slots=True)
class HistoryResponseFrame:
    """``histRes`` (17): messages oldest first; ``more`` when older ones exist."""

    id: int
    channel: str
    messages: tuple[Message, ...] = field(default=())
    more: bool = False


@dataclass(frozen=True, slots=True)
class FetchResponseFrame:
    """``fetchRes`` (18): messages oldest first; ``resumed`` false when the range aged out."""

    id: int
    channel: str
    messages: tuple[Message, ...] = field(default=())
    resumed: bool = True


ClientFrame = (
    AuthFrame
    | SubscribeFrame
    | UnsubscribeFrame
    | PublishFrame
    | PresenceFrame
    | PresenceSubscribeFrame
    | PresenceUnsubscribeFrame
    | HistoryFrame
    | FetchFrame
    | PingFrame
)
RequestFrame = (
    SubscribeFrame
    | UnsubscribeFrame
    | PublishFrame
    | PresenceFrame
    | PresenceSubscribeFrame
    | PresenceUnsubscribeFrame
    | HistoryFrame
    | FetchFrame
)
ServerFrame = (
    ConnectedFrame
    | AckFrame
    | MessageFrame
    | BundleFrame
    | PresenceEventFrame
    | ErrorFrame
    | PongFrame
    | HistoryResponseFrame
    | FetchResponseFrame
)
