"""Presence state, without I/O: KV keys and values of members, and the per-channel member
set that turns KV changes into ``presEvt`` frames (PROTOCOL.md 3.12).

Every gateway derives events from the same KV changes with the same rules, so watchers on
different gateways see the same transitions:

- a key that appears is an ``enter``; a key whose data or encoding changes is an ``update``;
  a rewrite with the same data and encoding (a TTL refresh, a reconnect's re-enter) is no
  event at all;
- a key that goes (deleted, or expired after its gateway died) is a ``leave`` carrying the
  member's last data and encoding, which the member set remembers.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from realtime_protocol.frames import PresenceAction, PresenceEventFrame

__all__ = ["ChannelMembers", "MemberRecord", "channel_pattern", "member_key", "parse_member_key"]


def _channel_token(channel: str) -> str:
    # KV keys allow [-/_=.a-zA-Z0-9]; channel names add ':' and never contain '='.
    return channel.replace(":", "=")


def member_key(app: str, channel: str, connection_id: str) -> str:
    """The KV key of one connection's membership of a channel."""
    return f"{app}.{_channel_token(channel)}.{connection_id}"


def channel_pattern(app: str, channel: str) -> str:
    """The KV key filter matching every member of a channel."""
    return f"{app}.{_channel_token(channel)}.*"


def parse_member_key(key: str) -> tuple[str, str, str]:
    """(app, channel, connection id) of a member key."""
    app, token, connection_id = key.split(".", 2)
    return app, token.replace("=", ":"), connection_id


@dataclass(frozen=True, slots=True)
class MemberRecord:
    """What the KV holds for one member."""

    client_id: str
    connection_id: str
    data: bytes | None
    encoding: str
    timestamp: int

    def encode(self) -> bytes:
        """The KV value."""
        return orjson.dumps(
            {
                "clientId": self.client_id,
                "connectionId": self.connection_id,
                "data": None if self.data is None else self.data.decode(),
                "encoding": self.encoding,
                "timestamp": self.timestamp,
            }
        )

    @classmethod
    def decode(cls, value: bytes) -> MemberRecord:
        """Parse a KV value; raise ``ValueError`` when it is not one of ours."""
        try:
            fields = orjson.loads(value)
            data = fields["data"]
            return cls(
                str(fields["clientId"]),
                str(fields["connectionId"]),
                None if data is None else str(data).encode(),
                str(fields["encoding"]),
                int(fields["timestamp"]),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"not a member record: {error}") from None

    def same_state(self, other: MemberRecord) -> bool:
        """True when ``other`` shows the same data and encoding (no event)."""
        return self.data == other.data and self.encoding == other.encoding


class ChannelMembers:
    """The members of one channel as this gateway knows them."""

    __slots__ = ("channel", "members")

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.members: dict[str, MemberRecord] = {}

    def __len__(self) -> int:
        return len(self.members)

    def put(self, record: MemberRecord) -> PresenceEventFrame | None:
        """Apply a key write; return the event it means, if any."""
        previous = self.members.get(record.connection_id)
        self.members[record.connection_id] = record
        if previous is None:
            return self._event(PresenceAction.ENTER, record, record.timestamp)
        if previous.same_state(record):
            return None
        return self._event(PresenceAction.UPDATE, record, record.timestamp)

    def remove(self, connection_id: str, timestamp: int) -> PresenceEventFrame | None:
        """Apply a key removal; return the ``leave`` (with the last data), if it was a member."""
        previous = self.members.pop(connection_id, None)
        if previous is None:
            return None
        return self._event(PresenceAction.LEAVE, previous, timestamp)

    def snapshot(self) -> list[PresenceEventFrame]:
        """One ``enter`` per current member, with its data and last-change time."""
        return [
            self._event(PresenceAction.ENTER, record, record.timestamp)
            for record in self.members.values()
        ]

    def _event(
        self, action: PresenceAction, record: MemberRecord, timestamp: int
    ) -> PresenceEventFrame:
        return PresenceEventFrame(
            action,
            timestamp,
            self.channel,
            record.client_id,
            record.connection_id,
            record.data,
            record.encoding,
        )
