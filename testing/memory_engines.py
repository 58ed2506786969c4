"""In-memory engines (``gateway.engines``) for fast tests of the protocol's behaviour:
``Session`` + ``Connection`` + these, in one process, with no sockets and no nats-server.

They keep the contracts the NATS engines keep (contiguous serials per channel, exactly-once
per ``messageId``, stored-then-delivered, history ranges from ``shared.history``, presence
transitions from ``shared.presence``, the grace period) in the simplest way. They never
replace the real-NATS integration tests and the SDK interop tests.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from gateway.fanout import Delivery, Subscriber
from gateway.presence import PresenceClient, WatchReason
from realtime_protocol import binary_codec, json_codec
from realtime_protocol.binary_codec import decode_member, encode_member, member_with_serial
from realtime_protocol.errors import ErrorCode, ProtocolError
from realtime_protocol.frames import Message, PresenceAction, PresenceEventFrame
from shared import history
from shared.history import HistoryOp, HistoryQuery, HistoryResult
from shared.limits import Limit
from shared.presence import ChannelMembers, MemberRecord

__all__ = ["MemoryBus", "MemoryPresence"]


def _now_ms() -> int:
    return int(asyncio.get_running_loop().time() * 1000)


class MemoryBus:
    """Message bus, live channels and history source in one: a list of stored members per
    channel. ``fail_history`` makes every history query fail (50000), as when no worker
    answers."""

    def __init__(self, max_per_channel: int = 10_000) -> None:
        self.max_per_channel = max_per_channel
        self.fail_history = False
        self._stored: dict[tuple[str, str], list[bytes]] = {}
        self._newest: dict[tuple[str, str], int] = {}
        self._serials: dict[tuple[str, str, str, str], int] = {}
        self._subscribers: dict[tuple[str, str], set[Subscriber]] = {}

    # ---- MessageBus ----

    @property
    def is_ready(self) -> bool:
        """Always ready."""
        return True

    def start(self) -> None:
        """Nothing to connect."""

    async def close(self) -> None:
        """Nothing to release."""

    async def publish(self, app: str, message: Message) -> int:
        """Store and deliver ``message`` (deliver only, if ephemeral)."""
        key = (app, message.channel)
        if message.ephemeral:
            self._deliver(key, Delivery(message))
            return 0
        dedup = (app, message.channel, message.client_id, message.message_id)
        if dedup in self._serials:
            return self._serials[dedup]
        serial = self._newest.get(key, 0) + 1
        self._newest[key] = serial
        self._serials[dedup] = serial
        stored = self._stored.setdefault(key, [])
        stored.append(member_with_serial(encode_member(message), serial))
        del stored[: max(0, len(stored) - self.max_per_channel)]
        self._deliver(key, Delivery(message.with_serial(serial)))
        return serial

    def _deliver(self, key: tuple[str, str], delivery: Delivery) -> None:
        for subscriber in list(self._subscribers.get(key, ())):
            subscriber.deliver(delivery)

    # ---- LiveChannels ----

    def __len__(self) -> int:
        return len(self._subscribers)

    def subscription_count(self) -> int:
        """Subscriptions, all channels together."""
        return sum(len(subscribers) for subscribers in self._subscribers.values())

    async def add(self, app: str, channel: str, subscriber: Subscriber) -> None:
        """Deliver the channel to ``subscriber``."""
        self._subscribers.setdefault((app, channel), set()).add(subscriber)

    async def remove(self, app: str, channel: str, subscriber: Subscriber) -> None:
        """Stop delivering the channel to ``subscriber``."""
        subscribers = self._subscribers.get((app, channel))
        if subscribers is not None:
            subscribers.discard(subscriber)
            if not subscribers:
                del self._subscribers[(app, channel)]

    # ---- HistorySource ----

    async def query(self, query: HistoryQuery) -> HistoryResult:
        """The page ``query`` asks for, by the same range rules as the history worker."""
        if self.fail_history:
            raise ProtocolError(ErrorCode.SERVER, "history service did not answer")
        key = (query.app, query.channel)
        stored = self._stored.get(key, [])
        newest = self._newest.get(key, 0)
        oldest = newest - len(stored) + 1 if stored else 0
        cursor = query.before if query.op is HistoryOp.HISTORY else query.from_serial
        if query.message_id:
            wanted = history.strip_member_suffix(query.message_id)
            found = [
                oldest + index
                for index, member in enumerate(stored)
                if decode_member(member).message_id == wanted
            ]
            if not found:
                return HistoryResult((), False, newest)
            cursor = found[0]
        limit = query.limit or 1000
        span = history.query_range(query.op, oldest, newest, cursor, limit, query.before)
        if not span.count:
            return HistoryResult((), span.flag, newest)
        page = stored[span.first - oldest : span.last - oldest + 1]
        return HistoryResult(tuple(page), span.flag, newest)


@dataclass
class _Channel:
    members: ChannelMembers
    watchers: dict[PresenceClient, set[str]] = field(default_factory=dict)


@dataclass
class _Owned:
    app: str
    client_id: str
    client: PresenceClient | None
    channels: dict[str, MemberRecord] = field(default_factory=dict)
    leave_timer: asyncio.TimerHandle | None = None


class MemoryPresence:
    """Presence of one gateway with no store behind it: the same transitions, snapshot,
    grace period and resume takeover as ``PresenceService``, kept in dictionaries."""

    def __init__(self, grace_s: float = 15.0, max_members: int = 5000) -> None:
        self.grace_s = grace_s
        self.max_members = max_members
        self._channels: dict[tuple[str, str], _Channel] = {}
        self._owned: dict[str, _Owned] = {}

    async def start(self) -> None:
        """Nothing runs in the background."""

    async def stop(self) -> None:
        """Nothing to announce: this presence lives and dies with the process (its members
        have no gateway liveness to lose)."""

    def _channel(self, app: str, channel: str) -> _Channel:
        return self._channels.setdefault((app, channel), _Channel(ChannelMembers(channel)))

    async def subscribe(self, client: PresenceClient, app: str, channel: str, reason: str) -> None:
        """Start events for ``client``; an explicit presSub gets the snapshot first."""
        entry = self._channel(app, channel)
        if reason == WatchReason.EXPLICIT:
            for event in entry.members.snapshot():
                client.send(event)
        entry.watchers.setdefault(client, set()).add(reason)

    def member_count(self) -> int:
        """Members of every channel."""
        return sum(len(entry.members.members) for entry in self._channels.values())

    async def members(self, app: str, channel: str) -> list[MemberRecord]:
        """The channel's current members."""
        entry = self._channels.get((app, channel))
        return [] if entry is None else list(entry.members.members.values())

    def unsubscribe(
        self, client: PresenceClient, app: str, channel: str, reasons: tuple[str, ...]
    ) -> None:
        """Stop events for ``reasons``."""
        entry = self._channels.get((app, channel))
        if entry is None or client not in entry.watchers:
            return
        entry.watchers[client].difference_update(reasons)
        if not entry.watchers[client]:
            del entry.watchers[client]

    async def apply(
        self,
        client: PresenceClient,
        action: PresenceAction,
        channel: str,
        data: bytes | None,
        encoding: str,
    ) -> None:
        """Enter, update or leave ``channel`` for ``client``."""
        identity = client.session.identity
        assert identity is not None
        connection_id = client.session.connection_id
        owned = self._owned.get(connection_id)
        if owned is None or owned.client is not client:
            owned = self._owned[connection_id] = _Owned(identity.app, identity.client_id, client)
        entry = self._channel(identity.app, channel)
        if action is PresenceAction.LEAVE:
            if owned.channels.pop(channel, None) is not None:
                self._emit(entry, entry.members.remove(connection_id, _now_ms()))
            return
        if connection_id not in entry.members.members and len(entry.members) >= self.max_members:
            raise ProtocolError(
                ErrorCode.RATE_LIMITED,
                f"channel {channel!r} has {self.max_members} members",
                limit=Limit.PRESENCE_MEMBERS,
            )
        record = MemberRecord(identity.client_id, connection_id, data, encoding, _now_ms())
        owned.channels[channel] = record
        self._emit(entry, entry.members.put(record))

    async def leave_channel(self, client: PresenceClient, channel: str) -> None:
        """Leave ``channel`` if a member."""
        owned = self._owned.get(client.session.connection_id)
        if owned is not None and owned.client is client and channel in owned.channels:
            await self.apply(client, PresenceAction.LEAVE, channel, None, "")

    def connection_closed(self, client: PresenceClient, graceful: bool) -> None:
        """Stop its events; leave now or after the grace period."""
        for entry in self._channels.values():
            entry.watchers.pop(client, None)
        connection_id = client.session.connection_id
        owned = self._owned.get(connection_id)
        if owned is None or owned.client is not client:
            return
        owned.client = None
        if graceful or self.grace_s <= 0:
            self._leave_all(connection_id, owned)
        else:
            owned.leave_timer = asyncio.get_running_loop().call_later(
                self.grace_s, self._leave_all, connection_id, owned
            )

    def _leave_all(self, connection_id: str, owned: _Owned) -> None:
        if self._owned.get(connection_id) is not owned or owned.client is not None:
            return  # resumed meanwhile
        del self._owned[connection_id]
        for channel in owned.channels:
            entry = self._channel(owned.app, channel)
            self._emit(entry, entry.members.remove(connection_id, _now_ms()))

    def resumed(self, client: PresenceClient) -> None:
        """Take the predecessor's memberships over, without leave or enter."""
        identity = client.session.identity
        assert identity is not None
        owned = self._owned.get(client.session.connection_id)
        if owned is not None and (owned.app, owned.client_id) == (
            identity.app,
            identity.client_id,
        ):
            if owned.leave_timer is not None:
                owned.leave_timer.cancel()
            owned.client = client

    @staticmethod
    def _emit(entry: _Channel, event: PresenceEventFrame | None) -> None:
        if event is None:
            return
        binary = binary_codec.frame_record(binary_codec.encode_server_frame(event))
        text = json_codec.encode_server_text(event)
        for watcher in entry.watchers:
            watcher.send_encoded(binary, text)
