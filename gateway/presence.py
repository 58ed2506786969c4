"""Presence replicated through a JetStream KV bucket (issue 5), with liveness per gateway
(issue 17).

- Each membership is one key ``<app>.<channel>.<connectionId>`` whose record names the
  gateway process that wrote it (its instance id, new at every start). It is written once
  per enter, update or leave and never refreshed, so idle members cost nothing.
- Liveness is the gateway's: one heartbeat key ``=gateway.<instance>`` per process, in the
  same bucket, written with a per-key TTL (``RT_PRESENCE_TTL_S``) every third of it. When
  it expires (a killed or cut-off gateway; the bucket's limit marker tells every watcher)
  or is deleted (a clean shutdown), every watcher sends ``leave`` (with the last data) for
  that gateway's members at once, and keeps their records *parked*: if the heartbeat comes
  back (a partition healed) they are visible again. One surviving gateway (the one whose
  instance id sorts first among the live heartbeats) then sweeps the bucket and deletes
  every record naming a gateway without a heartbeat; it also sweeps when it starts.
- A gateway whose heartbeat lapsed (its writes failed for a TTL, or it saw its own key go)
  re-asserts it and then rewrites its members' records: watchers see the leaves its absence
  implied and the enters of its return, nothing more.
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
  through ``rt.presence.resumed.<app>.<connectionId>`` (the client's re-enter there rewrites
  the records naming the new gateway). Past the grace, the keys are deleted and watchers
  see ``leave``.
- Records of the earlier layout (no gateway, a per-key TTL refreshed by the gateways of the
  previous release) stay visible while their key exists, so a rolling upgrade keeps every
  member visible.
- Failures heal and are logged (counts, never one line per message). A supervisor restarts
  the feed after a NATS reconnect (a restarted server has lost the feed's in-memory
  consumer, and a dropped link loses what was pushed meanwhile) or when its consumer is
  gone, re-asserts our heartbeat and records at once, re-reads the heartbeats, then
  re-reads every watched channel and tells watchers the difference as ordinary events. A
  leave that could not be written is retried with each heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError

from gateway.broker import Broker
from gateway.metrics import METRICS
from nats_adapter.direct import direct_batch
from nats_adapter.requests import RequestTimeout
from realtime_protocol import binary_codec, json_codec
from realtime_protocol.errors import ErrorCode, ProtocolError
from realtime_protocol.frames import PresenceAction, PresenceEventFrame, ServerFrame
from shared.limits import Limit
from shared.presence import (
    HEARTBEAT_PATTERN,
    ChannelMembers,
    GatewayLiveness,
    MemberRecord,
    channel_pattern,
    heartbeat_gateway,
    heartbeat_key,
    member_key,
)
from shared.session import CLOSE_NORMAL, Session

__all__ = ["PresenceClient", "PresenceService", "WatchReason"]

log = logging.getLogger(__name__)


class PresenceClient(Protocol):
    """What presence needs of a client connection (the gateway's ``Connection``, or a test
    double in the in-process tests): who it is, and a way to send it frames and close it."""

    @property
    def session(self) -> Session:
        """The connection's protocol state (identity, connection id)."""

    def send(self, frame: ServerFrame) -> None:
        """Queue ``frame`` for the client."""

    def send_encoded(self, binary: bytes, text: bytes) -> None:
        """Queue a frame already encoded for both codecs."""

    def close(self, code: int, reason: str) -> None:
        """Close the connection after what is queued."""


RESUMED_SUBJECT = "rt.presence.resumed"

# Records per batched direct get when a channel's members are read.
_SNAPSHOT_PAGE = 1000
# A dead gateway's feed consumer is removed by the server after this long.
_FEED_INACTIVE_THRESHOLD_S = 60.0
# How often the supervisor looks at the NATS connection: a reconnect restarts the feed, and
# until then the feed may be missing changes, so look often (it is a local check).
_SUPERVISE_TICK_S = 0.25
# How often it asks the server whether the feed's consumer still exists. nats-py notices a
# silent consumer only after two missed idle heartbeats (10 s or more), and silently.
_FEED_CHECK_S = 5.0
# Failed checks in a row (timeouts, errors other than "not found") that count as lost.
_FEED_CHECK_FAILURES = 3
# Waits between failed feed restarts.
_RESTART_DELAY_MIN_S = 0.2
_RESTART_DELAY_MAX_S = 5.0
# Failed writes in a row that end a rewrite pass: when the store is unreachable, every
# write would wait for its timeout, one after the other.
_REWRITE_FAILURES_IN_A_ROW = 3
# Deletes a sweep keeps in flight.
_SWEEP_PARALLEL = 64
# How long a clean shutdown waits for every record naming it to go (its connections left,
# or resumed elsewhere and re-entered there: the SDKs reconnect after 1 s) before deleting
# its heartbeat; past it, the heartbeat is left to expire.
_STOP_WAIT_S = 3.0


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


@dataclass
class _WatchedChannel:
    members: ChannelMembers
    ready: asyncio.Future[None]
    watchers: dict[PresenceClient, set[str]] = field(default_factory=dict)
    references: int = 0
    # Members this gateway admitted whose KV write the feed has not echoed yet: counted
    # against the member limit so that quick successive enters cannot overshoot it.
    admitted: set[str] = field(default_factory=set)
    # Changes the feed delivers while the members are being read (the first load, or a
    # re-sync; None otherwise), and the highest stream sequence the last read covered:
    # changes at or below it are in it.
    buffered: list[_Change] | None = field(default_factory=list)
    snapshot_sequence: int = 0


def _member_set(
    channel: str, changes: list[_Change], liveness: GatewayLiveness
) -> tuple[ChannelMembers, int]:
    """The members a read of a channel's keys shows (records of gateways not alive parked),
    and the highest stream sequence it covered."""
    current = ChannelMembers(channel)
    covered = 0
    for change in changes:
        covered = max(covered, change.sequence)
        if change.removed:
            current.remove(change.connection_id, 0)
            continue
        with contextlib.suppress(ValueError):
            record = MemberRecord.decode(change.value)
            current.put(record, liveness.is_alive(record.gateway))
    return current, covered


def _loaded(entry: _WatchedChannel) -> bool:
    """True once the channel's first read succeeded (its set is kept current since)."""
    return entry.ready.done() and entry.ready.exception() is None


@dataclass(frozen=True, slots=True)
class _Change:
    """One KV change of a member key, as the feed or the snapshot read delivers it."""

    sequence: int
    connection_id: str
    removed: bool
    value: bytes


@dataclass(frozen=True, slots=True)
class _Stored:
    """The last record of one key, as a read of the bucket returns it."""

    key: str
    sequence: int
    removed: bool
    value: bytes


@dataclass
class _Owned:
    """Memberships of one connection id that this gateway keeps alive."""

    app: str
    client_id: str
    connection: PresenceClient | None
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
        self._feed: JetStreamContext.PushSubscription | None = None
        # Identifies the current feed: deliveries of a replaced one are dropped.
        self._feed_token = object()
        # Set once the first feed runs: channels are read only from then on.
        self._feed_ready = asyncio.Event()
        # Feeds started so far: a member read that overlapped a restart is done again.
        self._generation = 0
        # Feed checks in a row that got no answer.
        self._check_failures = 0
        # Channels each connection watches, so a close touches only those.
        self._watching: dict[PresenceClient, set[str]] = {}
        # This process's id: it names our heartbeat and our member records, and tells our
        # own resume announcements apart from other gateways'.
        self._instance = uuid.uuid4().hex
        self._started_ms = _now_ms()
        # Whose heartbeats are alive (ours included, once the feed echoes it).
        self._liveness = GatewayLiveness()
        # When our heartbeat was last written (monotonic), and whether it may have lapsed
        # since (we saw it go): then our records are rewritten after the next heartbeat.
        self._last_beat = 0.0
        self._reassert = False
        # Set by ``stop``: no more heartbeats, and our heartbeat going is no news.
        self._stopping = False
        # Leaves (app, channel, connection id) whose delete failed: retried with every
        # heartbeat, since nothing else would ever remove those records while we live.
        self._unwritten_leaves: set[tuple[str, str, str]] = set()
        self._sweeping = False
        self._sweep_again = False
        # Memberships handed over to another gateway by a resume whose records may still
        # name us (connection id -> app, channels), until the feed shows them rewritten.
        self._handed_over: dict[str, tuple[str, set[str]]] = {}

    @property
    def instance(self) -> str:
        """This gateway process's id, as its heartbeat and member records name it."""
        return self._instance

    # ---- lifecycle ----

    async def start(self) -> None:
        """Once NATS is ready: hear about resumes elsewhere, follow the bucket's changes (and
        keep following them, see ``_supervise``), write our heartbeat periodically."""
        await self.broker.ready.wait()
        while True:
            try:
                # A core subscription: nats-py renews it on every reconnect.
                await self.broker.client().subscribe(
                    f"{RESUMED_SUBJECT}.>", cb=self._on_resumed_elsewhere
                )
                break
            except Exception as error:
                log.warning("presence: resume announcements not heard yet (%s), retrying", error)
                await asyncio.sleep(1.0)
        supervisor = asyncio.create_task(self._supervise(), name="presence-feed")
        try:
            interval = max(0.5, self.settings.presence_ttl_s / 3)
            while True:
                await asyncio.sleep(interval)
                if self._stopping:
                    return
                if not self._feed_ready.is_set():
                    continue  # the supervisor writes the first heartbeat
                if not self.broker.is_ready:
                    log.warning(
                        "presence heartbeat skipped, NATS not connected: %d member records "
                        "are re-asserted once it is back",
                        sum(len(owned.memberships) for owned in self._owned.values()),
                    )
                    continue
                try:
                    await self._beat()
                except Exception as error:
                    log.warning(
                        "presence heartbeat not written (%s: %s); retrying in %.1fs",
                        type(error).__name__,
                        error,
                        interval,
                    )
        finally:
            supervisor.cancel()

    async def stop(self) -> None:
        """Clean shutdown: no more heartbeats; once no member record names this gateway any
        more (each connection left, or resumed on another gateway and re-entered there;
        waiting at most ``_STOP_WAIT_S``), delete the heartbeat so that watchers need not
        wait for it to expire. Otherwise it is left to expire, within the TTL: members
        still in their grace leave then, and a client that comes back meanwhile re-enters
        through another gateway first, with no leave."""
        self._stopping = True
        for _ in range(round(_STOP_WAIT_S / 0.05)):
            if not self._owned and not self._handed_over:
                break
            await asyncio.sleep(0.05)
        if self._owned or self._handed_over:
            log.info(
                "presence: %d connections still hold memberships here (%d resumed elsewhere "
                "but not re-entered yet); they leave when the heartbeat expires (%.0fs) "
                "unless they re-enter elsewhere first",
                len(self._owned) + len(self._handed_over),
                len(self._handed_over),
                self.settings.presence_ttl_s,
            )
            return
        if not self.broker.is_ready or not self._feed_ready.is_set():
            return
        try:
            await self._kv_request(heartbeat_key(self._instance), b"", self._delete_headers())
        except Exception as error:
            log.warning("presence heartbeat not deleted (%s); it expires by itself", error)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- the feed and its supervision ----

    async def _supervise(self) -> None:
        """Keep one working feed, and the watched channels exact, whatever happens to NATS.

        nats-py's ordered consumer repairs gaps itself (it recreates its consumer from the
        last stream sequence it delivered), but only once two idle heartbeats went missing,
        without telling anyone, and from the first sequence of the stream when it has
        delivered nothing yet. So the feed is replaced, and every watched channel re-read:
        - after every NATS reconnect: a restarted nats-server has lost the consumer (nats-py
          makes it in memory), and over a dropped link the server pushed changes nobody got;
        - when the server no longer knows the consumer (deleted, or cleaned up).
        nats-py has no way to add a reconnect callback to a connected client, so the
        supervisor watches the client's reconnect count instead.
        """
        loop = asyncio.get_running_loop()
        seen: tuple[NatsClient, int] | None = None
        retry: str | None = None  # why the last restart was needed, until one succeeds
        next_check = 0.0
        delay = _RESTART_DELAY_MIN_S
        while True:
            epoch = self.broker.connection_epoch()
            if epoch is not None:
                connection = epoch
                reason = retry
                if reason is None:
                    if self._feed is None:
                        reason = "start"
                    elif connection != seen:
                        reason = "reconnected"
                    elif loop.time() >= next_check:
                        next_check = loop.time() + _FEED_CHECK_S
                        reason = await self._check_feed()
                if reason is not None:
                    try:
                        await self._restart_feed(reason)
                    except Exception as error:
                        # Feed, keys and re-read are all done again at the next attempt.
                        log.warning(
                            "presence feed not restarted (%s: %s); retrying in %.1fs",
                            type(error).__name__,
                            error,
                            delay,
                        )
                        retry = reason
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, _RESTART_DELAY_MAX_S)
                        continue
                    seen, retry = connection, None
                    delay = _RESTART_DELAY_MIN_S
                    next_check = loop.time() + _FEED_CHECK_S
            await asyncio.sleep(_SUPERVISE_TICK_S)

    async def _check_feed(self) -> str | None:
        """Why the feed must be replaced, or None while its consumer exists."""
        feed = self._feed
        if feed is None:
            return "not running"
        try:
            await feed.consumer_info()
        except NotFoundError:
            return "consumer gone"
        except Exception as error:
            # Unsure (a timeout, a server busy recovering): give it a few more checks.
            self._check_failures += 1
            if self._check_failures < _FEED_CHECK_FAILURES:
                return None
            return f"{self._check_failures} checks failed, last: {type(error).__name__} {error}"
        self._check_failures = 0
        return None

    async def _restart_feed(self, reason: str) -> None:
        """Replace the feed, rewrite our keys, then re-read every watched channel."""
        watched = sum(1 for entry in self._channels.values() if _loaded(entry))
        if reason == "start":
            log.info("presence feed starting")
        elif reason == "reconnected":
            log.warning(
                "NATS reconnected: restarting the presence feed, re-reading %d watched channels",
                watched,
            )
        else:
            log.warning(
                "presence feed consumer lost (%s): restarting it, re-reading %d watched channels",
                reason,
                watched,
            )
        started = time.monotonic()
        old, self._feed = self._feed, None
        self._feed_token = object()  # from now on, whatever the old feed delivers is dropped
        if old is not None:
            # Stops nats-py's heartbeat and flow-control tasks too, so that it does not
            # recreate the old consumer behind our back.
            with contextlib.suppress(Exception):
                await old.unsubscribe()
        self._check_failures = 0
        await self._start_feed()
        # Our heartbeat before anything else (and, after an outage, our records: the
        # heartbeat may have expired and a sweep deleted them), so that watchers see no
        # leave and enter for members that never went. Then who else is alive.
        await self._beat(rewrite=reason != "start")
        await self._scan_heartbeats()
        self._feed_ready.set()
        if reason == "start":
            if self._is_sweeper():
                # Records of gateways that died while none was left to sweep them.
                self._spawn(self._sweep())
            return
        channels, events = await self._resync_all()
        log.info(
            "presence re-synced %d channels in %.2fs: %d enter, %d update, %d leave",
            channels,
            time.monotonic() - started,
            events[PresenceAction.ENTER],
            events[PresenceAction.UPDATE],
            events[PresenceAction.LEAVE],
        )

    async def _start_feed(self) -> None:
        """One ordered consumer over the whole bucket, from now on: every gateway hears every
        presence change once and keeps only those of channels it watches. Its cost does not
        grow with the number of channels watched (one NATS consumer per gateway, never one
        per channel, which let one client exhaust the server's consumer limit)."""
        js = self.broker.jetstream()
        bucket = self.settings.presence_bucket
        self._key_prefix = f"$KV.{bucket}."
        token = self._feed_token

        async def on_change(msg: Msg) -> None:
            if self._feed_token is token:
                self._on_change(msg)

        self._feed = await js.subscribe(
            f"$KV.{bucket}.>",
            stream=f"KV_{bucket}",
            cb=on_change,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.NEW,
            inactive_threshold=_FEED_INACTIVE_THRESHOLD_S,
        )
        self._generation += 1

    async def _resync_all(self) -> tuple[int, Counter[PresenceAction]]:
        """Re-read every loaded channel (one at a time: after a server restart every gateway
        does this at once) and send watchers the difference; channels still loading re-read
        by themselves. Returns how many channels, and the events sent by action."""
        channels = 0
        events: Counter[PresenceAction] = Counter()
        for pattern, entry in list(self._channels.items()):
            if not _loaded(entry) or self._channels.get(pattern) is not entry:
                continue  # still loading (it re-reads by itself), or released meanwhile
            events.update(event.action for event in await self._sync(pattern, entry))
            channels += 1
        return channels, events

    # ---- watching ----

    def _on_change(self, msg: Msg) -> None:
        key = msg.subject[len(self._key_prefix) :]
        if key[0] == "=":
            gateway = heartbeat_gateway(key)
            if gateway is not None:
                self._on_heartbeat(gateway, msg.metadata.sequence.stream, _is_removal(msg.headers))
            return
        split = key.rfind(".")
        entry = self._channels.get(key[:split] + ".*")
        if entry is None:
            return  # a channel nobody here watches: the common case, kept cheap
        change = _Change(
            msg.metadata.sequence.stream, key[split + 1 :], _is_removal(msg.headers), msg.data
        )
        if change.removed:
            self._restore_if_ours(entry.members.channel, change.connection_id)
        if change.connection_id in self._handed_over:
            self._settle_handover(entry.members.channel, change)
        if entry.buffered is not None:
            entry.buffered.append(change)
            return
        event = self._apply(entry, change)
        if event is not None:
            self._dispatch(entry, event)

    def _restore_if_ours(self, channel: str, connection_id: str) -> None:
        """A record of a membership we still hold was deleted, and not by us (our leaves
        forget the membership first): a sweep that took us for dead (our heartbeat lapsed,
        or a stale read). Write it again, so that the member is not lost for as long as we
        live; watchers saw a leave and see an enter."""
        owned = self._owned.get(connection_id)
        record = owned.memberships.get(channel) if owned is not None else None
        if owned is None or record is None or self._stopping:
            return

        async def restore() -> None:
            if (
                self._owned.get(connection_id) is not owned
                or owned.memberships.get(channel) is not record
            ):
                return  # left or moved meanwhile
            try:
                await self._write(owned.app, channel, record)
            except Exception as error:
                self._reassert = True  # rewritten after the next heartbeat
                log.warning("presence: a deleted record not restored yet (%s)", error)

        self._spawn(restore())

    def _apply(self, entry: _WatchedChannel, change: _Change) -> PresenceEventFrame | None:
        if change.sequence <= entry.snapshot_sequence:
            return None  # already part of the snapshot
        entry.admitted.discard(change.connection_id)
        if change.removed:
            return entry.members.remove(change.connection_id, _now_ms())
        try:
            record = MemberRecord.decode(change.value)
        except ValueError:
            return None
        return entry.members.put(record, self._liveness.is_alive(record.gateway), _now_ms())

    # ---- gateway liveness ----

    def _on_heartbeat(self, gateway: str, sequence: int, removed: bool) -> None:
        alive = self._liveness.apply(gateway, sequence, removed)
        if alive is not None:
            self._gateway_changed(gateway, alive)

    def _gateway_changed(self, gateway: str, alive: bool) -> None:
        """A gateway's heartbeat came or went: its members enter or leave on every channel
        followed here (parked records are kept for its return)."""
        now = _now_ms()
        events = channels = 0
        for entry in list(self._channels.values()):
            changed = (
                entry.members.gateway_up(gateway)
                if alive
                else entry.members.gateway_down(gateway, now)
            )
            if changed:
                channels += 1
                events += len(changed)
                for event in changed:
                    self._dispatch(entry, event)
        if alive:
            if events:
                log.info(
                    "presence: gateway %s is back: %d members re-entered on %d channels",
                    gateway,
                    events,
                    channels,
                )
            return
        log.info(
            "presence: gateway %s%s is gone: %d members left on %d channels",
            gateway,
            " (this one)" if gateway == self._instance else "",
            events,
            channels,
        )
        if gateway == self._instance:
            if not self._stopping:
                # Our heartbeat lapsed (writes failed for a TTL, or NATS lost it): watchers
                # saw our members leave. Come back at once, records included.
                self._reassert = True
                self._spawn(self._beat_logged())
        elif self._is_sweeper():
            self._spawn(self._sweep())

    def _is_sweeper(self) -> bool:
        """True when this gateway is the one that deletes dead gateways' records: the
        first live heartbeat by instance id (every gateway agrees once the feed settles,
        and two sweeping at once only repeat each other's deletes)."""
        alive = self._liveness.alive
        return bool(alive) and min(alive) == self._instance

    async def _beat(self, rewrite: bool = False) -> None:
        """Write our heartbeat; then our member records if it may have lapsed since the
        last one (or ``rewrite``), and the leaves that could not be written before."""
        ttl = self._ttl_seconds()
        value = orjson.dumps({"gateway": self._instance, "started": self._started_ms})
        await self._kv_request(heartbeat_key(self._instance), value, {"Nats-TTL": f"{ttl}s"})
        now = time.monotonic()
        lapsed = self._reassert or now - self._last_beat >= ttl
        self._last_beat = now
        if lapsed or rewrite:
            self._reassert = False
            await self._rewrite_all()
        if self._unwritten_leaves:
            await self._retry_leaves()

    async def _beat_logged(self) -> None:
        try:
            await self._beat()
        except Exception as error:
            # The next tick tries again (``_reassert`` stays set).
            log.warning("presence heartbeat not re-asserted (%s); retrying at the next tick", error)

    async def _scan_heartbeats(self) -> None:
        """Read every heartbeat key and bring our view of who is alive up to date (after a
        start or an outage, when the feed's history is not enough)."""
        found = {}
        for stored in await self._read(HEARTBEAT_PATTERN):
            gateway = heartbeat_gateway(stored.key)
            if gateway is not None and not stored.removed:
                found[gateway] = stored.sequence
        for gateway, alive in self._liveness.reconcile(found):
            self._gateway_changed(gateway, alive)

    async def _sweep(self) -> None:
        """Delete every member record that names a gateway without a heartbeat (one pass
        over the bucket; a gateway loss during it asks for another)."""
        if self._sweeping:
            self._sweep_again = True
            return
        self._sweeping = True
        try:
            again = True
            while again:
                self._sweep_again = False
                await self._sweep_once()
                again = self._sweep_again
        except Exception as error:
            log.warning(
                "presence sweep failed (%s: %s); the next gateway loss or start sweeps again",
                type(error).__name__,
                error,
            )
        finally:
            self._sweeping = False

    async def _sweep_once(self) -> None:
        started = time.monotonic()
        stored = await self._read(">")
        # One pass in stream order: a heartbeat rewritten during the read moves ahead of
        # the cursor and is still read, so every gateway alive throughout is seen; one
        # that starts meanwhile writes its heartbeat before any record.
        alive = set()
        for item in stored:
            gateway = heartbeat_gateway(item.key)
            if gateway is not None and not item.removed:
                alive.add(gateway)
        stale = []
        for item in stored:
            if item.removed or item.key[0] == "=":
                continue
            with contextlib.suppress(ValueError):
                gateway = MemberRecord.decode(item.value).gateway
                # Dead by the read and by our feed (which follows the stream leader in
                # order; a direct get may be answered by a replica that lags behind).
                if gateway and gateway not in alive and not self._liveness.is_alive(gateway):
                    stale.append(item)
        if not stale:
            return
        deleted = changed = 0
        for first in range(0, len(stale), _SWEEP_PARALLEL):
            results = await asyncio.gather(
                *(
                    # Only if the record is still the one read: a gateway coming back may
                    # have rewritten it meanwhile.
                    self._kv_request(item.key, b"", self._delete_headers(item.sequence))
                    for item in stale[first : first + _SWEEP_PARALLEL]
                ),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, ProtocolError) and "sequence" in result.message:
                    changed += 1
                elif isinstance(result, BaseException):
                    raise result
                else:
                    deleted += 1
        log.info(
            "presence sweep: %d records of gone gateways deleted (%d rewritten meanwhile, "
            "kept) in %.2fs, %d keys read",
            deleted,
            changed,
            time.monotonic() - started,
            len(stored),
        )

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
        """Read the channel's current members for the first time (no watcher yet, so the
        events ``_sync`` derives go nowhere). No consumer is created."""
        try:
            if not self._feed_ready.is_set():
                raise ProtocolError(ErrorCode.BOOTSTRAP, "presence not ready, retry later")
            await self._sync(pattern, entry)
        except Exception as error:
            if not entry.ready.done():
                entry.ready.set_exception(error)
                entry.ready.exception()  # mark retrieved: other waiters get it too
            return
        entry.ready.set_result(None)

    async def _sync(self, pattern: str, entry: _WatchedChannel) -> list[PresenceEventFrame]:
        """Bring ``entry`` to the channel's current members and tell its watchers: the
        members that are gone ``leave`` (with their last data), the new ones ``enter``,
        changed data is an ``update``, exactly as if the feed had delivered the changes.

        The members are read by batched direct gets (the last record of each key); the
        changes the feed delivers meanwhile are buffered and applied afterwards if their
        stream sequence is above the highest one the read covered. A read that overlapped a
        feed restart may have missed a change nobody delivers, so it is done again.
        Returns the events sent.
        """
        if entry.buffered is None:
            entry.buffered = []
        try:
            while True:
                generation = self._generation
                changes = await self._read_members(pattern)
                if generation == self._generation:
                    break
        except BaseException:
            # The entry stays as it was; what the feed delivered meanwhile is applied live.
            self._flush(entry)
            raise
        current, covered = _member_set(entry.members.channel, changes, self._liveness)
        now = _now_ms()
        events: list[PresenceEventFrame | None] = [
            entry.members.remove(connection_id, now)
            for connection_id in list(entry.members.members)
            if connection_id not in current.members
        ]
        for record in current.members.values():
            entry.admitted.discard(record.connection_id)
            events.append(entry.members.put(record))
        for connection_id in current.parked:
            entry.admitted.discard(connection_id)
        entry.members.parked = current.parked
        entry.snapshot_sequence = covered
        sent = [event for event in events if event is not None]
        for event in sent:
            self._dispatch(entry, event)
        return sent + self._flush(entry)

    def _flush(self, entry: _WatchedChannel) -> list[PresenceEventFrame]:
        """Apply and send the changes buffered while ``entry`` was read; return the events."""
        buffered, entry.buffered = entry.buffered or [], None
        sent = []
        for change in buffered:
            event = self._apply(entry, change)
            if event is not None:
                self._dispatch(entry, event)
                sent.append(event)
        return sent

    async def _read_members(self, pattern: str) -> list[_Change]:
        """Every retained record of the member keys matching ``pattern``, oldest first."""
        return [
            _Change(item.sequence, item.key.rsplit(".", 1)[-1], item.removed, item.value)
            for item in await self._read(pattern)
        ]

    async def _read(self, pattern: str) -> list[_Stored]:
        """Every retained record of the keys matching ``pattern`` (the bucket keeps one per
        key), oldest first, paged through batched direct gets."""
        nc = self.broker.client()
        stream = f"KV_{self.settings.presence_bucket}"
        prefix = f"$KV.{self.settings.presence_bucket}."
        subject = f"{prefix}{pattern}"
        found: list[_Stored] = []
        sequence = 1
        while True:
            page = await direct_batch(
                nc,
                stream,
                {"seq": sequence, "next_by_subj": subject, "batch": _SNAPSHOT_PAGE},
                self.settings.request_timeout_s,
            )
            for msg in page.messages:
                headers = msg.headers or {}
                found.append(
                    _Stored(
                        headers.get("Nats-Subject", "")[len(prefix) :],
                        int(headers.get("Nats-Sequence", 0)),
                        _is_removal(headers),
                        msg.data,
                    )
                )
            if not page.pending or not page.messages:
                return found
            sequence = page.last_sequence + 1

    def _dispatch(self, entry: _WatchedChannel, event: PresenceEventFrame) -> None:
        if entry.ready.done():  # a channel's first read finds its members: no news
            METRICS.presence_events[event.action].inc()
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

    async def subscribe(
        self, connection: PresenceClient, app: str, channel: str, reason: str
    ) -> None:
        """Start presence events for ``connection``; an explicit ``presSub`` first gets the
        snapshot (one ``enter`` per member), atomically with the start of live events."""
        entry = await self._watched(app, channel)
        reasons = entry.watchers.setdefault(connection, set())
        self._watching.setdefault(connection, set()).add(channel)
        if reason == WatchReason.EXPLICIT:
            for event in entry.members.snapshot():
                connection.send(event)
        reasons.add(reason)

    def member_count(self) -> int:
        """Members of the channels this gateway follows (read when scraped)."""
        return sum(len(entry.members.members) for entry in self._channels.values())

    async def members(self, app: str, channel: str) -> list[MemberRecord]:
        """The channel's current members (REST presence): from memory when this gateway
        follows the channel, else one read of its keys, the batched direct gets a first
        ``presSub`` snapshot uses. Nothing is kept after such a read: a REST caller is no
        watcher, and keeping the channel would make the feed apply its changes forever."""
        pattern = channel_pattern(app, channel)
        entry = self._channels.get(pattern)
        if entry is not None and _loaded(entry):
            return list(entry.members.members.values())
        current, _ = _member_set(channel, await self._read_members(pattern), self._liveness)
        return list(current.members.values())

    def unsubscribe(
        self, connection: PresenceClient, app: str, channel: str, reasons: tuple[str, ...]
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
        connection: PresenceClient,
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
                    ErrorCode.RATE_LIMITED,
                    f"channel {channel!r} has {limit} members already",
                    limit=Limit.PRESENCE_MEMBERS,
                )
            entry.admitted.add(connection_id)
            entry.references += 1
        record = MemberRecord(
            identity.client_id, connection_id, data, encoding, _now_ms(), self._instance
        )
        owned.memberships[channel] = record
        self._unwritten_leaves.discard((identity.app, channel, connection_id))
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

    def _adopt(self, connection: PresenceClient, app: str, client_id: str) -> _Owned:
        owned = _Owned(app, client_id, connection)
        self._owned[connection.session.connection_id] = owned
        return owned

    async def leave_channel(self, connection: PresenceClient, channel: str) -> None:
        """Leave ``channel`` if a member (``unsub`` does this, PROTOCOL.md section 9 item 5)."""
        owned = self._owned.get(connection.session.connection_id)
        if owned is not None and owned.connection is connection and channel in owned.memberships:
            await self._leave(owned, connection.session.connection_id, channel)

    async def _leave(self, owned: _Owned, connection_id: str, channel: str) -> None:
        del owned.memberships[channel]
        try:
            await self._delete(owned.app, channel, connection_id)
        except Exception:
            # Nothing else removes a record while its gateway lives: retried with the
            # heartbeats until it is written.
            self._unwritten_leaves.add((owned.app, channel, connection_id))
            raise
        finally:
            self._unreference(owned.app, channel)

    async def _retry_leaves(self) -> None:
        for app, channel, connection_id in list(self._unwritten_leaves):
            owned = self._owned.get(connection_id)
            if owned is None or channel not in owned.memberships:  # not re-entered meanwhile
                try:
                    await self._delete(app, channel, connection_id)
                except Exception:
                    return  # the next heartbeat tries again
            self._unwritten_leaves.discard((app, channel, connection_id))

    def _unreference(self, app: str, channel: str) -> None:
        entry = self._channels.get(channel_pattern(app, channel))
        if entry is not None:
            entry.references -= 1
            self._release(app, channel)

    # ---- connection life ----

    def connection_closed(self, connection: PresenceClient, graceful: bool) -> None:
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
    def _app_of(connection: PresenceClient) -> str | None:
        identity = connection.session.identity
        return identity.app if identity is not None else None

    async def _leave_all(self, connection_id: str, owned: _Owned) -> None:
        if self._owned.get(connection_id) is not owned or owned.connection is not None:
            return  # resumed meanwhile
        del self._owned[connection_id]
        channels = list(owned.memberships)
        failed = 0
        last_error: Exception | None = None
        for channel in channels:
            if failed and not self.broker.is_ready:
                # NATS is away: don't wait for a timeout per channel; the heartbeats retry.
                del owned.memberships[channel]
                self._unwritten_leaves.add((owned.app, channel, connection_id))
                self._unreference(owned.app, channel)
                failed += 1
                continue
            try:
                await self._leave(owned, connection_id, channel)
            except Exception as error:
                failed += 1
                last_error = error
        if failed:
            log.warning(
                "presence: %d of %d leaves not written (%s); retried with each heartbeat",
                failed,
                len(channels),
                last_error,
            )

    def resumed(self, connection: PresenceClient) -> None:
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
        try:
            await self.broker.client().publish(
                f"{RESUMED_SUBJECT}.{app}.{connection_id}",
                orjson.dumps({"clientId": client_id, "gateway": self._instance}),
            )
        except Exception as error:
            # Only the hand-over is lost: the old gateway deletes the keys when its grace
            # ends and the client's re-enter here writes them again, a leave and an enter.
            log.warning("presence: resume not announced (%s)", error)

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
            # The records stay; the client's re-enter on the new gateway rewrites them
            # naming that gateway. Until the feed shows that, they still name us: the
            # channels stay followed (their references kept) and our heartbeat must not be
            # deleted (``stop``). Those never re-entered go after the grace.
            del self._owned[connection_id]
            previous = self._handed_over.get(connection_id)
            channels = set(owned.memberships)
            if previous is not None:
                for channel in channels & previous[1]:
                    self._unreference(owned.app, channel)  # already held once
                channels |= previous[1]
            self._handed_over[connection_id] = (owned.app, channels)
            self._spawn(self._release_unclaimed(owned.app, connection_id))

    def _settle_handover(self, channel: str, change: _Change) -> None:
        """The feed shows a handed-over record rewritten by another gateway (or deleted):
        it no longer names us."""
        app, channels = self._handed_over[change.connection_id]
        if channel not in channels:
            return
        if not change.removed:
            try:
                if MemberRecord.decode(change.value).gateway == self._instance:
                    return
            except ValueError:
                return
        channels.discard(channel)
        if not channels:
            del self._handed_over[change.connection_id]
        self._unreference(app, channel)

    async def _release_unclaimed(self, app: str, connection_id: str) -> None:
        """After a resume elsewhere, delete the records the client did not re-enter there
        within the grace (they still name this gateway, which would keep them forever)."""
        await asyncio.sleep(max(1.0, self.settings.presence_grace_s))
        handed = self._handed_over.pop(connection_id, None)
        if handed is None:
            return  # all re-entered elsewhere (or released by an earlier hand-over's task)
        channels = handed[1]
        for channel in channels:
            self._unreference(app, channel)
        released = 0
        try:
            for channel in channels:
                owned = self._owned.get(connection_id)
                if owned is not None and channel in owned.memberships:
                    continue  # resumed back here
                for item in await self._read(member_key(app, channel, connection_id)):
                    if item.removed:
                        continue
                    with contextlib.suppress(ValueError):
                        if MemberRecord.decode(item.value).gateway == self._instance:
                            await self._kv_request(
                                item.key, b"", self._delete_headers(item.sequence)
                            )
                            released += 1
        except Exception as error:
            log.warning("presence: records of a resumed connection not released (%s)", error)
        if released:
            log.info("presence: %d memberships not re-entered after a resume elsewhere", released)

    # ---- KV writes ----

    async def _rewrite_all(self) -> None:
        """Rewrite every member record this gateway holds: after our heartbeat lapsed or NATS
        came back, a sweep may have deleted them. Watchers see nothing for a record that is
        still there. Records not rewritten now are tried again after the next heartbeat."""
        keys = [
            (owned, channel, record)
            for owned in self._owned.values()
            for channel, record in owned.memberships.items()
        ]
        if not keys:
            return
        failed = untried = in_a_row = 0
        last_error: Exception | None = None
        for index, (owned, channel, record) in enumerate(keys):
            if (
                self._owned.get(record.connection_id) is not owned
                or owned.memberships.get(channel) is not record
            ):
                continue  # left, changed or resumed elsewhere meanwhile: don't undo that
            try:
                await self._write(owned.app, channel, record)
                in_a_row = 0
            except Exception as error:
                failed += 1
                in_a_row += 1
                last_error = error
                # Unreachable store: each write would wait for its timeout; try next tick.
                if in_a_row >= _REWRITE_FAILURES_IN_A_ROW or not self.broker.is_ready:
                    untried = len(keys) - index - 1
                    break
        if failed:
            self._reassert = True
            log.warning(
                "presence: %d of %d member records not rewritten (%s), %d not tried; "
                "retrying after the next heartbeat",
                failed,
                len(keys),
                last_error,
                untried,
            )

    def _ttl_seconds(self) -> int:
        return max(1, round(self.settings.presence_ttl_s))

    async def _write(self, app: str, channel: str, record: MemberRecord) -> None:
        # No TTL: the record lives until a leave, or until its gateway's heartbeat goes.
        await self._kv_request(member_key(app, channel, record.connection_id), record.encode(), {})

    def _delete_headers(self, expected_sequence: int = 0) -> dict[str, str]:
        # The delete marker expires, so departed members leave nothing behind. With an
        # expected sequence the delete happens only if the key was not written since.
        headers = {"KV-Operation": "DEL", "Nats-TTL": f"{self._ttl_seconds()}s"}
        if expected_sequence:
            headers["Nats-Expected-Last-Subject-Sequence"] = str(expected_sequence)
        return headers

    async def _delete(self, app: str, channel: str, connection_id: str) -> None:
        await self._kv_request(member_key(app, channel, connection_id), b"", self._delete_headers())

    async def _kv_request(self, key: str, value: bytes, headers: dict[str, str]) -> None:
        requests = self.broker.request_mux()
        subject = f"$KV.{self.settings.presence_bucket}.{key}"
        try:
            reply = await requests.request(subject, value, self.settings.request_timeout_s, headers)
        except RequestTimeout:
            raise ProtocolError(ErrorCode.SERVER, "presence store did not answer") from None
        answer = orjson.loads(reply.data) if reply.data else {}
        if "error" in answer:
            raise ProtocolError(ErrorCode.SERVER, f"presence not stored: {answer['error']}")
