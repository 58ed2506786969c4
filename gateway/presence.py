"""Presence replicated through a JetStream KV bucket (issue 5).

- Each membership is one key ``<app>.<channel>.<connectionId>`` written with a per-key TTL
  (``RT_PRESENCE_TTL_S``); the gateway that owns the connection rewrites it every third of the
  TTL. If the gateway dies, nobody refreshes its keys: they expire, the bucket's limit markers
  tell every watcher, and watchers see ``leave`` within one TTL (default 20 s).
- A gateway watches a channel's keys (one KV watch per channel per gateway) only while a local
  connection watches its presence or is a member there; it keeps the channel's member set in
  memory (``shared.presence.ChannelMembers``), so snapshots and events cost no KV reads however
  many members or watchers there are, and ``leave`` carries the member's last data.
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
from nats.aio.msg import Msg
from nats.js.kv import KeyValue

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


class WatchReason:
    """Why a connection receives a channel's presence events (held as a set)."""

    EXPLICIT = "presSub"
    # JSON-era clients expect `sub` to deliver presence too (PROTOCOL.md 2.7).
    IMPLICIT = "sub"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class _WatchedChannel:
    members: ChannelMembers
    ready: asyncio.Future[None]
    watchers: dict[Connection, set[str]] = field(default_factory=dict)
    references: int = 0
    task: asyncio.Task[None] | None = None
    # Members this gateway admitted whose KV write the watch has not echoed yet: counted
    # against the member limit so that quick successive enters cannot overshoot it.
    admitted: set[str] = field(default_factory=set)


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
        self._kv: KeyValue | None = None
        # Channels each connection watches, so a close touches only those.
        self._watching: dict[Connection, set[str]] = {}
        # Tells our own resume announcements apart from other gateways'.
        self._instance = uuid.uuid4().hex

    # ---- lifecycle ----

    async def start(self) -> None:
        """Once NATS is ready: hear about resumes elsewhere, refresh our keys periodically."""
        await self.broker.ready.wait()
        nc = self.broker.client()
        await nc.subscribe(f"{RESUMED_SUBJECT}.>", cb=self._on_resumed_elsewhere)
        interval = max(0.5, self.settings.presence_ttl_s / 3)
        while True:
            await asyncio.sleep(interval)
            await self._refresh_all()

    async def _kv_handle(self) -> KeyValue:
        if self._kv is None:
            assert self.broker.js is not None
            self._kv = await self.broker.js.key_value(self.settings.presence_bucket)
        return self._kv

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- watching ----

    async def _watched(self, app: str, channel: str) -> _WatchedChannel:
        pattern = channel_pattern(app, channel)
        entry = self._channels.get(pattern)
        if entry is None:
            entry = _WatchedChannel(
                ChannelMembers(channel), asyncio.get_running_loop().create_future()
            )
            self._channels[pattern] = entry
            entry.task = asyncio.create_task(self._watch(pattern, entry))
        try:
            await asyncio.shield(entry.ready)
        except Exception:
            self._channels.pop(pattern, None)
            raise ProtocolError(ErrorCode.SERVER, "presence unavailable, retry") from None
        return entry

    async def _watch(self, pattern: str, entry: _WatchedChannel) -> None:
        try:
            kv = await self._kv_handle()
            watcher = await kv.watch(pattern)
        except Exception as error:
            if not entry.ready.done():
                entry.ready.set_exception(error)
                entry.ready.exception()
            return
        try:
            async for update in watcher:
                if update is None:
                    if not entry.ready.done():
                        entry.ready.set_result(None)
                    continue
                connection_id = update.key.rsplit(".", 1)[1]
                entry.admitted.discard(connection_id)
                if update.operation in ("DEL", "PURGE"):
                    event = entry.members.remove(connection_id, _now_ms())
                else:
                    try:
                        event = entry.members.put(MemberRecord.decode(update.value or b""))
                    except ValueError:
                        continue
                if event is not None and entry.ready.done():
                    self._dispatch(entry, event)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]
            raise

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
        if entry.task is not None:
            entry.task.cancel()

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
