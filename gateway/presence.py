"""Presence replicated through a JetStream KV bucket (issue 5).

- Each membership is one key ``<app>.<channel>.<connectionId>`` written with a per-key TTL
  (``RT_PRESENCE_TTL_S``); the gateway that owns the connection rewrites it every third of the
  TTL. If the gateway dies, nobody refreshes its keys: they expire, the bucket's limit markers
  tell every watcher, and watchers see ``leave`` within one TTL (default 20 s).
- Each gateway follows the whole bucket through one ordered consumer (the feed) and keeps
  member sets only for channels a local connection watches or is a member of. A channel's
  set is read once when it is first needed (a batched direct get of its keys, no consumer),
  then kept current by the feed; snapshots and events cost no KV reads however many members
  or watchers there are, and ``leave`` carries the member's last data. One consumer per
  gateway, never one per channel: a client watching thousands of channels cannot exhaust
  the server's consumer limit for everyone.
- A connection that closes without a clean 1000 close keeps its memberships for
  ``RT_PRESENCE_GRACE_S`` (default 15 s). A reconnect with ``resumeConnectionId`` inside the
  grace takes them over with no leave/enter churn: on this gateway directly, on another one
  through ``rt.presence.resumed.<app>.<connectionId>``. Past the grace, the keys are deleted
  and watchers see ``leave``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import DeliverPolicy

from gateway.broker import Broker
from gateway.requests import RequestTimeout
from shared import binary_codec, json_codec
from shared.errors import ErrorCode, ProtocolError
from shared.frames import PresenceAction, PresenceEventFrame
from shared.presence import ChannelMembers, MemberRecord, channel_pattern, member_key
from shared.session import CLOSE_NORMAL

if TYPE_CHECKING:
    from gateway.connection import Connection

__all__ = ["PresenceService", "WatchReason"]

log = logging.getLogger(__name__)

RESUMED_SUBJECT = "rt.presence.resumed"

# Records per batched direct get when a channel's members are read.
_SNAPSHOT_PAGE = 1000
# A dead gateway's feed consumer is removed by the server after this long.
_FEED_INACTIVE_THRESHOLD_S = 60.0


class WatchReason:
    """Why a connection receives a channel's presence events (held as a set)."""

    EXPLICIT = "presSub"
    # JSON-era clients expect `sub` to deliver presence too (PROTOCOL.md 2.7).
    IMPLICIT = "sub"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _is_removal(headers: dict[str, str] | None) -> bool:
    """True for a delete, a purge, or a server marker (a key whose TTL ran out)."""
    if not headers:
        return False
    operation = headers.get("KV-Operation")
    if operation is not None:
        return operation in ("DEL", "PURGE")
    return headers.get("Nats-Marker-Reason") is not None


async def _direct_batch(
    nc: NatsClient, api: str, request: dict[str, object], wait_s: float
) -> tuple[list[Msg], int, int]:
    """One batched direct get: the messages, how many more match (``Nats-Num-Pending`` of
    the end-of-batch status) and the last sequence returned."""
    found: list[Msg] = []
    inbox = nc.new_inbox()
    done: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()

    async def on_reply(msg: Msg) -> None:
        headers = msg.headers or {}
        status = headers.get("Status")
        if status is None:
            found.append(msg)
        elif not done.done():
            if status in ("204", "404"):  # end of batch, or nothing matches
                done.set_result(
                    (
                        int(headers.get("Nats-Num-Pending", 0) or 0),
                        int(headers.get("Nats-Last-Sequence", 0) or 0),
                    )
                )
            else:
                done.set_exception(
                    ProtocolError(ErrorCode.SERVER, f"presence read failed: status {status}")
                )

    subscription = await nc.subscribe(inbox, cb=on_reply)
    try:
        await nc.publish(api, orjson.dumps(request), reply=inbox)
        pending, last = await asyncio.wait_for(done, wait_s)
    finally:
        with contextlib.suppress(Exception):
            await subscription.unsubscribe()
    return found, pending, last


@dataclass
class _WatchedChannel:
    members: ChannelMembers
    ready: asyncio.Future[None]
    watchers: dict[Connection, set[str]] = field(default_factory=dict)
    references: int = 0
    # Members this gateway admitted whose KV write the feed has not echoed yet: counted
    # against the member limit so that quick successive enters cannot overshoot it.
    admitted: set[str] = field(default_factory=set)
    # Changes the feed delivered while the snapshot was read (None once it is loaded), and
    # the highest stream sequence the snapshot covered: changes at or below it are in it.
    buffered: list[_Change] | None = field(default_factory=list)
    snapshot_sequence: int = 0


@dataclass(frozen=True, slots=True)
class _Change:
    """One KV change of a member key, as the feed or the snapshot read delivers it."""

    sequence: int
    connection_id: str
    removed: bool
    value: bytes


@dataclass
class _Owned:
    """Memberships of one connection id that this gateway keeps alive."""

    app: str
    client_id: str
    connection: Connection | None
    memberships: dict[str, MemberRecord] = field(default_factory=dict)  # by channel
    leave_timer: asyncio.TimerHandle | None = None


class PresenceService:
    """Presence for one gateway: KV writes for local members, KV watches for watchers."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.settings = broker.settings
        self._channels: dict[str, _WatchedChannel] = {}
        self._owned: dict[str, _Owned] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._key_prefix = f"$KV.{self.settings.presence_bucket}."
        self._feed: Subscription | None = None
        self._feed_ready = asyncio.Event()
        # Channels each connection watches, so a close touches only those.
        self._watching: dict[Connection, set[str]] = {}
        # Tells our own resume announcements apart from other gateways'.
        self._instance = uuid.uuid4().hex

    # ---- lifecycle ----

    async def start(self) -> None:
        """Once NATS is ready: hear about resumes elsewhere, follow the bucket's changes,
        refresh our keys periodically."""
        await self.broker.ready.wait()
        nc = self.broker.client()
        await nc.subscribe(f"{RESUMED_SUBJECT}.>", cb=self._on_resumed_elsewhere)
        await self._start_feed()
        interval = max(0.5, self.settings.presence_ttl_s / 3)
        while True:
            await asyncio.sleep(interval)
            await self._refresh_all()

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- watching ----

    async def _start_feed(self) -> None:
        """One ordered consumer over the whole bucket, from now on: every gateway hears every
        presence change once and keeps only those of channels it watches. Its cost does not
        grow with the number of channels watched (one NATS consumer per gateway, never one
        per channel, which let one client exhaust the server's consumer limit)."""
        js = self.broker.js
        assert js is not None
        bucket = self.settings.presence_bucket
        self._key_prefix = f"$KV.{bucket}."
        self._feed = await js.subscribe(
            f"$KV.{bucket}.>",
            stream=f"KV_{bucket}",
            cb=self._on_change,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.NEW,
            inactive_threshold=_FEED_INACTIVE_THRESHOLD_S,
        )
        self._feed_ready.set()

    async def _on_change(self, msg: Msg) -> None:
        key = msg.subject[len(self._key_prefix) :]
        split = key.rfind(".")
        entry = self._channels.get(key[:split] + ".*")
        if entry is None:
            return  # a channel nobody here watches: the common case, kept cheap
        change = _Change(
            msg.metadata.sequence.stream, key[split + 1 :], _is_removal(msg.headers), msg.data
        )
        if entry.buffered is not None:
            entry.buffered.append(change)
            return
        event = self._apply(entry, change)
        if event is not None:
            self._dispatch(entry, event)

    @staticmethod
    def _apply(entry: _WatchedChannel, change: _Change) -> PresenceEventFrame | None:
        if change.sequence <= entry.snapshot_sequence:
            return None  # already part of the snapshot
        entry.admitted.discard(change.connection_id)
        if change.removed:
            return entry.members.remove(change.connection_id, _now_ms())
        try:
            return entry.members.put(MemberRecord.decode(change.value))
        except ValueError:
            return None

    async def _watched(self, app: str, channel: str) -> _WatchedChannel:
        pattern = channel_pattern(app, channel)
        entry = self._channels.get(pattern)
        if entry is None:
            entry = _WatchedChannel(
                ChannelMembers(channel), asyncio.get_running_loop().create_future()
            )
            self._channels[pattern] = entry
            self._spawn(self._load(pattern, entry))
        try:
            await asyncio.shield(entry.ready)
        except Exception:
            if self._channels.get(pattern) is entry:
                del self._channels[pattern]
            raise ProtocolError(ErrorCode.SERVER, "presence unavailable, retry") from None
        return entry

    async def _load(self, pattern: str, entry: _WatchedChannel) -> None:
        """Read the channel's current members (the last record of each key, by a batched
        direct get), then apply the changes the feed delivered meanwhile that the read did
        not cover. No consumer is created."""
        try:
            if not self._feed_ready.is_set():
                raise ProtocolError(ErrorCode.BOOTSTRAP, "presence not ready, retry later")
            covered = 0
            for change in await self._read_members(pattern):
                covered = max(covered, change.sequence)
                self._apply(entry, change)
            entry.snapshot_sequence = covered
            for change in entry.buffered or ():
                self._apply(entry, change)
            entry.buffered = None
        except Exception as error:
            if not entry.ready.done():
                entry.ready.set_exception(error)
                entry.ready.exception()  # mark retrieved: other waiters get it too
            return
        entry.ready.set_result(None)

    async def _read_members(self, pattern: str) -> list[_Change]:
        """Every retained record of the keys matching ``pattern`` (the bucket keeps one per
        key), oldest first, paged through batched direct gets."""
        nc = self.broker.client()
        api = f"$JS.API.DIRECT.GET.KV_{self.settings.presence_bucket}"
        subject = f"{self._key_prefix}{pattern}"
        changes: list[_Change] = []
        sequence = 1
        while True:
            page, pending, last = await _direct_batch(
                nc,
                api,
                {"seq": sequence, "next_by_subj": subject, "batch": _SNAPSHOT_PAGE},
                self.settings.request_timeout_s,
            )
            for msg in page:
                headers = msg.headers or {}
                key = headers.get("Nats-Subject", "")
                changes.append(
                    _Change(
                        int(headers.get("Nats-Sequence", 0)),
                        key.rsplit(".", 1)[-1],
                        _is_removal(headers),
                        msg.data,
                    )
                )
            if not pending or not page:
                return changes
            sequence = last + 1

    def _dispatch(self, entry: _WatchedChannel, event: PresenceEventFrame) -> None:
        if not entry.watchers:
            return
        binary = binary_codec.frame_record(binary_codec.encode_server_frame(event))
        text = json_codec.encode_server_text(event)
        for connection in entry.watchers:
            connection.send_encoded(binary, text)

    def _release(self, app: str, channel: str) -> None:
        pattern = channel_pattern(app, channel)
        entry = self._channels.get(pattern)
        if entry is None or entry.watchers or entry.references > 0:
            return
        del self._channels[pattern]

    async def subscribe(self, connection: Connection, app: str, channel: str, reason: str) -> None:
        """Start presence events for ``connection``; an explicit ``presSub`` first gets the
        snapshot (one ``enter`` per member), atomically with the start of live events."""
        entry = await self._watched(app, channel)
        reasons = entry.watchers.setdefault(connection, set())
        self._watching.setdefault(connection, set()).add(channel)
        if reason == WatchReason.EXPLICIT:
            for event in entry.members.snapshot():
                connection.send(event)
        reasons.add(reason)

    def unsubscribe(
        self, connection: Connection, app: str, channel: str, reasons: tuple[str, ...]
    ) -> None:
        """Stop events for ``reasons`` (membership is untouched)."""
        entry = self._channels.get(channel_pattern(app, channel))
        if entry is None or connection not in entry.watchers:
            return
        held = entry.watchers[connection]
        held.difference_update(reasons)
        if not held:
            del entry.watchers[connection]
            watched = self._watching.get(connection)
            if watched is not None:
                watched.discard(channel)
                if not watched:
                    del self._watching[connection]
            self._release(app, channel)

    # ---- membership ----

    async def apply(
        self,
        connection: Connection,
        action: PresenceAction,
        channel: str,
        data: bytes | None,
        encoding: str,
    ) -> None:
        """Carry out a ``pres`` request of ``connection``."""
        identity = connection.session.identity
        assert identity is not None
        connection_id = connection.session.connection_id
        owned = self._owned.get(connection_id)
        if owned is None or owned.connection is not connection:
            owned = self._adopt(connection, identity.app, identity.client_id)
        current = owned.memberships.get(channel)
        if action is PresenceAction.LEAVE:
            if current is not None:
                await self._leave(owned, connection_id, channel)
            return
        if current is not None and current.data == data and current.encoding == encoding:
            return  # a re-enter with the same data: no write, no event
        if current is None:
            entry = await self._watched(identity.app, channel)
            limit = self.settings.presence_max_members
            known = entry.members.members
            if connection_id not in known and len(known.keys() | entry.admitted) >= limit:
                raise ProtocolError(
                    ErrorCode.RATE_LIMITED, f"channel {channel!r} has {limit} members already"
                )
            entry.admitted.add(connection_id)
            entry.references += 1
        record = MemberRecord(identity.client_id, connection_id, data, encoding, _now_ms())
        owned.memberships[channel] = record
        try:
            await self._write(identity.app, channel, record)
        except ProtocolError:
            if current is None:  # not a member after all: give the slot back
                del owned.memberships[channel]
                watched = self._channels.get(channel_pattern(identity.app, channel))
                if watched is not None:
                    watched.admitted.discard(connection_id)
                self._unreference(identity.app, channel)
            else:
                owned.memberships[channel] = current
            raise

    def _adopt(self, connection: Connection, app: str, client_id: str) -> _Owned:
        owned = _Owned(app, client_id, connection)
        self._owned[connection.session.connection_id] = owned
        return owned

    async def leave_channel(self, connection: Connection, channel: str) -> None:
        """Leave ``channel`` if a member (``unsub`` does this, PROTOCOL.md section 9 item 5)."""
        owned = self._owned.get(connection.session.connection_id)
        if owned is not None and owned.connection is connection and channel in owned.memberships:
            await self._leave(owned, connection.session.connection_id, channel)

    async def _leave(self, owned: _Owned, connection_id: str, channel: str) -> None:
        del owned.memberships[channel]
        try:
            await self._delete(owned.app, channel, connection_id)
        finally:
            self._unreference(owned.app, channel)

    def _unreference(self, app: str, channel: str) -> None:
        entry = self._channels.get(channel_pattern(app, channel))
        if entry is not None:
            entry.references -= 1
            self._release(app, channel)

    # ---- connection life ----

    def connection_closed(self, connection: Connection, graceful: bool) -> None:
        """Stop its watchers; leave its channels now (clean close) or after the grace."""
        app = self._app_of(connection)
        for channel in self._watching.pop(connection, ()):
            entry = self._channels.get(channel_pattern(app or "", channel))
            if entry is not None and entry.watchers.pop(connection, None) is not None and app:
                self._release(app, channel)
        connection_id = connection.session.connection_id
        owned = self._owned.get(connection_id)
        if owned is None or owned.connection is not connection:
            return
        owned.connection = None
        grace = self.settings.presence_grace_s
        if graceful or grace <= 0:
            self._spawn(self._leave_all(connection_id, owned))
        else:
            owned.leave_timer = asyncio.get_running_loop().call_later(
                grace, lambda: self._spawn(self._leave_all(connection_id, owned))
            )

    @staticmethod
    def _app_of(connection: Connection) -> str | None:
        identity = connection.session.identity
        return identity.app if identity is not None else None

    async def _leave_all(self, connection_id: str, owned: _Owned) -> None:
        if self._owned.get(connection_id) is not owned or owned.connection is not None:
            return  # resumed meanwhile
        del self._owned[connection_id]
        for channel in list(owned.memberships):
            with contextlib.suppress(Exception):
                await self._leave(owned, connection_id, channel)

    def resumed(self, connection: Connection) -> None:
        """``connection`` reuses its predecessor's id: take its memberships over, here or
        from whichever gateway holds them, without leave or enter."""
        identity = connection.session.identity
        assert identity is not None
        connection_id = connection.session.connection_id
        owned = self._owned.get(connection_id)
        if owned is not None and (owned.app, owned.client_id) == (identity.app, identity.client_id):
            if owned.leave_timer is not None:
                owned.leave_timer.cancel()
                owned.leave_timer = None
            owned.connection = connection
            return
        if self.broker.is_ready:
            self._spawn(self._announce_resume(identity.app, identity.client_id, connection_id))

    async def _announce_resume(self, app: str, client_id: str, connection_id: str) -> None:
        with contextlib.suppress(Exception):
            await self.broker.client().publish(
                f"{RESUMED_SUBJECT}.{app}.{connection_id}",
                orjson.dumps({"clientId": client_id, "gateway": self._instance}),
            )

    async def _on_resumed_elsewhere(self, msg: Msg) -> None:
        # rt.presence.resumed.<app>.<connectionId>: the announcing client's app.
        app, _, connection_id = msg.subject[len(RESUMED_SUBJECT) + 1 :].rpartition(".")
        owned = self._owned.get(connection_id)
        if owned is None or owned.app != app:
            return  # never let a client of another app end this connection
        with contextlib.suppress(orjson.JSONDecodeError, KeyError):
            announcement = orjson.loads(msg.data)
            if announcement["gateway"] == self._instance:
                return
            if announcement["clientId"] != owned.client_id:
                return
            if (
                owned.connection is not None
                and owned.connection.session.connection_id == connection_id
            ):
                # Our copy of the connection is half-open: the client is elsewhere now.
                stale = owned.connection
                owned.connection = None
                stale.close(CLOSE_NORMAL, "resumed on another gateway")
            if owned.leave_timer is not None:
                owned.leave_timer.cancel()
            # The keys stay; the new gateway refreshes them once the client re-enters.
            del self._owned[connection_id]
            for channel in owned.memberships:
                self._unreference(owned.app, channel)

    # ---- KV writes ----

    async def _refresh_all(self) -> None:
        for owned in list(self._owned.values()):
            for channel, record in list(owned.memberships.items()):
                with contextlib.suppress(Exception):
                    await self._write(owned.app, channel, record)

    async def _write(self, app: str, channel: str, record: MemberRecord) -> None:
        ttl = max(1, round(self.settings.presence_ttl_s))
        await self._kv_request(
            member_key(app, channel, record.connection_id), record.encode(), {"Nats-TTL": f"{ttl}s"}
        )

    async def _delete(self, app: str, channel: str, connection_id: str) -> None:
        # The delete marker expires too, so departed members leave nothing behind.
        headers = {
            "KV-Operation": "DEL",
            "Nats-TTL": f"{max(1, round(self.settings.presence_ttl_s))}s",
        }
        await self._kv_request(member_key(app, channel, connection_id), b"", headers)

    async def _kv_request(self, key: str, value: bytes, headers: dict[str, str]) -> None:
        requests = self.broker.requests
        if requests is None:
            raise ProtocolError(ErrorCode.BOOTSTRAP, "presence store not ready, retry later")
        subject = f"$KV.{self.settings.presence_bucket}.{key}"
        try:
            reply = await requests.request(subject, value, self.settings.request_timeout_s, headers)
        except RequestTimeout:
            raise ProtocolError(ErrorCode.SERVER, "presence store did not answer") from None
        answer = orjson.loads(reply.data) if reply.data else {}
        if "error" in answer:
            raise ProtocolError(ErrorCode.SERVER, f"presence not stored: {answer['error']}")
