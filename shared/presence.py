"""Presence state, without I/O: KV keys and values of members and gateway heartbeats, which
gateways are alive, and the per-channel member set that turns KV changes into ``presEvt``
frames (PROTOCOL.md 3.12).

Every gateway derives events from the same KV changes with the same rules, so watchers on
different gateways see the same transitions:

- a member record names the gateway that wrote it; it is written once per enter, update
  or leave and never refreshed. Liveness is the gateway's: one heartbeat key per gateway
  process, with a short TTL (issue 17);
- a record is visible while its gateway's heartbeat is alive (a record of the earlier
  layout names no gateway and is visible while its key exists); a record whose gateway is
  not alive is *parked*: kept, invisible, and visible again if the heartbeat comes back;
- a record that appears (or becomes visible) is an ``enter``; a record whose data or
  encoding changes is an ``update``; a rewrite with the same data and encoding (a
  reconnect's re-enter, a move to another gateway, a gateway re-asserting its members) is
  no event at all;
- a record that goes (deleted), or whose gateway's heartbeat goes (expired, or deleted on
  shutdown), is a ``leave`` carrying the member's last data and encoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from realtime_protocol.frames import PresenceAction, PresenceEventFrame

__all__ = [
    "HEARTBEAT_PATTERN",
    "ChannelMembers",
    "GatewayLiveness",
    "MemberRecord",
    "channel_pattern",
    "heartbeat_gateway",
    "heartbeat_key",
    "member_key",
    "parse_member_key",
]

# Heartbeat keys share the bucket with member keys: the feed that follows members follows
# them at no extra cost. '=' is legal in a KV key but never in an app slug, so no member
# key can start with this token.
_HEARTBEAT_TOKEN = "=gateway"
HEARTBEAT_PATTERN = f"{_HEARTBEAT_TOKEN}.*"
"""The KV key filter matching every gateway's heartbeat."""


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


def heartbeat_key(gateway: str) -> str:
    """The KV key of one gateway process's heartbeat."""
    return f"{_HEARTBEAT_TOKEN}.{gateway}"


def heartbeat_gateway(key: str) -> str | None:
    """The gateway a heartbeat key belongs to; None for any other key."""
    token, _, gateway = key.partition(".")
    if token != _HEARTBEAT_TOKEN or not gateway:
        return None
    return gateway


@dataclass(frozen=True, slots=True)
class MemberRecord:
    """What the KV holds for one member. ``gateway`` is the instance id of the gateway
    process that wrote it (empty in records of the earlier layout, whose keys expire)."""

    client_id: str
    connection_id: str
    data: bytes | None
    encoding: str
    timestamp: int
    gateway: str = ""

    def encode(self) -> bytes:
        """The KV value."""
        fields: dict[str, object] = {
            "clientId": self.client_id,
            "connectionId": self.connection_id,
            "data": None if self.data is None else self.data.decode(),
            "encoding": self.encoding,
            "timestamp": self.timestamp,
        }
        if self.gateway:
            fields["gateway"] = self.gateway
        return orjson.dumps(fields)

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
                str(fields.get("gateway") or ""),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"not a member record: {error}") from None

    def same_state(self, other: MemberRecord) -> bool:
        """True when ``other`` shows the same data and encoding (no event)."""
        return self.data == other.data and self.encoding == other.encoding


class GatewayLiveness:
    """Which gateways' heartbeats are alive, from the changes of their keys.

    Changes come from two places (the feed, and reads of the heartbeat keys) in no fixed
    order between them, so each is applied only if its stream sequence is newer than the
    last one applied for that gateway. Sequences of gone gateways are kept (one small
    entry per gateway process ever seen): a late, older write must not revive one.
    """

    __slots__ = ("_alive", "_sequence")

    def __init__(self) -> None:
        self._alive: set[str] = set()
        self._sequence: dict[str, int] = {}

    def is_alive(self, gateway: str) -> bool:
        """True when ``gateway``'s heartbeat is alive; always for records of the earlier
        layout (no gateway), whose own key expires instead."""
        return not gateway or gateway in self._alive

    @property
    def alive(self) -> frozenset[str]:
        """The gateways whose heartbeat is alive."""
        return frozenset(self._alive)

    def apply(self, gateway: str, sequence: int, removed: bool) -> bool | None:
        """Apply a heartbeat write or removal; return True when ``gateway`` came alive,
        False when it went, None when nothing changed (or the change is older than one
        already applied)."""
        if sequence <= self._sequence.get(gateway, 0):
            return None
        self._sequence[gateway] = sequence
        if removed:
            if gateway not in self._alive:
                return None
            self._alive.discard(gateway)
            return False
        if gateway in self._alive:
            return None
        self._alive.add(gateway)
        return True

    def reconcile(self, found: dict[str, int]) -> list[tuple[str, bool]]:
        """Apply a read of every heartbeat key (gateway -> stream sequence): the ones found
        are alive; a gateway believed alive but absent is gone, unless the change that made
        it alive is newer than everything the read covered. Returns the transitions."""
        covered = max(found.values(), default=0)
        transitions: list[tuple[str, bool]] = []
        for gateway, sequence in found.items():
            if self.apply(gateway, sequence, removed=False):
                transitions.append((gateway, True))
        for gateway in sorted(self._alive - found.keys()):
            if self._sequence.get(gateway, 0) <= covered:
                self._alive.discard(gateway)
                self._sequence[gateway] = covered
                transitions.append((gateway, False))
        return transitions


class ChannelMembers:
    """The members of one channel as this gateway knows them: the visible ones, and the
    parked records of gateways whose heartbeat is not alive."""

    __slots__ = ("channel", "members", "parked")

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.members: dict[str, MemberRecord] = {}
        self.parked: dict[str, MemberRecord] = {}

    def __len__(self) -> int:
        return len(self.members)

    def put(
        self, record: MemberRecord, alive: bool = True, timestamp: int = 0
    ) -> PresenceEventFrame | None:
        """Apply a key write (``alive``: whether its gateway's heartbeat is); return the
        event it means, if any (a ``leave`` at ``timestamp`` when a visible member's record
        now names a gateway that is not alive)."""
        connection_id = record.connection_id
        if not alive:
            self.parked[connection_id] = record
            return self.remove_visible(connection_id, timestamp)
        self.parked.pop(connection_id, None)
        previous = self.members.get(connection_id)
        self.members[connection_id] = record
        if previous is None:
            return self._event(PresenceAction.ENTER, record, record.timestamp)
        if previous.same_state(record):
            return None
        return self._event(PresenceAction.UPDATE, record, record.timestamp)

    def remove(self, connection_id: str, timestamp: int) -> PresenceEventFrame | None:
        """Apply a key removal; return the ``leave`` (with the last data), if it was a
        visible member."""
        self.parked.pop(connection_id, None)
        return self.remove_visible(connection_id, timestamp)

    def remove_visible(self, connection_id: str, timestamp: int) -> PresenceEventFrame | None:
        """Forget a visible member (its record stays parked, if it is); return its leave."""
        previous = self.members.pop(connection_id, None)
        if previous is None:
            return None
        return self._event(PresenceAction.LEAVE, previous, timestamp)

    def gateway_down(self, gateway: str, timestamp: int) -> list[PresenceEventFrame]:
        """``gateway``'s heartbeat went: park its members; one ``leave`` each."""
        gone = [r for r in self.members.values() if r.gateway == gateway]
        events = []
        for record in gone:
            del self.members[record.connection_id]
            self.parked[record.connection_id] = record
            events.append(self._event(PresenceAction.LEAVE, record, timestamp))
        return events

    def gateway_up(self, gateway: str) -> list[PresenceEventFrame]:
        """``gateway``'s heartbeat is back: its parked members are visible again; one
        ``enter`` each."""
        back = [r for r in self.parked.values() if r.gateway == gateway]
        events = []
        for record in back:
            del self.parked[record.connection_id]
            self.members[record.connection_id] = record
            events.append(self._event(PresenceAction.ENTER, record, record.timestamp))
        return events

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
