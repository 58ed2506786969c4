"""The gateway's NATS side: connection, stream bootstrap and serial-assigning publish.

Serials: each channel has its own subject in one stream. A publish carries
``Nats-Expected-Last-Subject-Sequence`` (the stream sequence of the channel's last message) and
the next serial in the ``Rt-Serial`` header, so JetStream stores it only if no other publisher
got in first; on conflict (error 10071) we re-read the channel's last message and retry.
Serials are therefore contiguous per channel across any number of gateways, and survive
restarts (they live in the stream). They also survive retention: a second stream (the tails
stream, ``<stream>_TAILS``) sources every stored message from the message stream, server-side,
with its subject moved to ``rt.tail.<app>.<channel>`` and one message kept per subject and no
age limit. When every message of a channel has aged out (or been discarded by the byte cap),
the next publish continues from the serial kept there instead of restarting at 1, so a client
holding an old cursor is never told about a different message with the same serial.

Within one gateway, publishes to one channel wait in a FIFO queue drained by one task: they
never conflict with each other and keep arrival order. What queues up while a store is in
flight leaves as one JetStream atomic batch (expected sequence on its first message, serials
tail+1, tail+2, ...), so a hot channel costs one round trip per group, not per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from gateway.metrics import METRICS
from nats_adapter.bootstrap import bootstrap
from nats_adapter.connect import connect
from nats_adapter.direct import direct_get
from nats_adapter.requests import ReplyMux, RequestTimeout
from realtime_protocol.binary_codec import encode_member
from realtime_protocol.errors import ErrorCode, ProtocolError
from realtime_protocol.frames import Message
from shared import subjects
from shared.settings import Settings
from shared.subjects import SERIAL_HEADER

__all__ = ["SERIAL_HEADER", "Broker", "dedup_id"]

log = logging.getLogger(__name__)

_WRONG_LAST_SEQUENCE = 10071
# A replicated stream answers a lost race with this code instead when the channel's previous
# store is still being replicated (nats-server: "wrong last sequence", no number). The fault
# suite found it refused as an error (50000) under R3 whenever two stores of a channel met.
_WRONG_LAST_SEQUENCE_CLUSTERED = 10164
# And a resend that arrives while its first attempt is still being replicated is refused
# with this one ("duplicate message id is in process"): that attempt may yet land, so it is
# handled like a conflict (look at the tail, back off, retry; the retry then finds the
# duplicate) instead of failing the publish.
_DUPLICATE_IN_PROCESS = 10158
_CONFLICTS = frozenset(
    {_WRONG_LAST_SEQUENCE, _WRONG_LAST_SEQUENCE_CLUSTERED, _DUPLICATE_IN_PROCESS}
)
# A duplicate's serial is read back by stream sequence; a replica that has not applied it
# yet answers "not found", so the read is retried (replicas catch up within milliseconds).
_SERIAL_READS = 20
_SERIAL_READ_WAIT_S = 0.05
_BATCH_HAS_DUPLICATE = 10201
_MAX_PUBLISH_ATTEMPTS = 100
_CACHED_CHANNELS = 100_000
# A group is sent as one atomic batch; JetStream caps batches at 1,000 messages.
_MAX_GROUP_MESSAGES = 256
_MAX_GROUP_BYTES = 512 * 1024
# After a client's store on a channel failed, its later publishes there are refused until it
# resent what failed, for at most this long (see ``_Fence``).
_FENCE_S = 5.0
_FENCES_PRUNED_ABOVE = 10_000


def dedup_id(app: str, channel: str, client_id: str, message_id: str) -> str:
    """The ``Nats-Msg-Id`` of a publish: one client cannot suppress another's message by
    reusing its id, and apps never collide (PROTOCOL.md section 9, item 9)."""
    return f"{app}\x1f{channel}\x1f{client_id}\x1f{message_id}"


@dataclass(frozen=True, slots=True)
class _ChannelTail:
    stream_sequence: int
    serial: int
    dedup_id: str = ""


@dataclass(slots=True)
class _Pending:
    """One durable publish waiting in its channel's queue."""

    payload: bytes
    dedup_id: str
    serial: asyncio.Future[int]
    client_id: str = ""


@dataclass(slots=True)
class _Fence:
    """Per-connection order through a failure. When a client's store on a channel fails, the
    publishes it sent after that one may already be on their way; stored, they would
    overtake the failed one, whose resend then lands after them (issue 14: failing what is
    queued behind is not enough, a publish arriving a moment later was stored first). So
    the client's later publishes on the channel are refused too, until it has resent every
    publish that failed (a resend, same messageId, passes), or ``_FENCE_S`` after the last
    failure, so that a client that never resends (the SDK rejects the publish instead) is
    not refused for long."""

    failed: set[str]
    until: float


class _ChannelQueue:
    """Publishes waiting for one channel, in arrival order, drained by one task at a time."""

    __slots__ = ("draining", "waiting")

    def __init__(self) -> None:
        self.waiting: deque[_Pending] = deque()
        self.draining = False


class Broker:
    """Owns the NATS connection of one gateway; ``ready`` is set once streams exist."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.nc: NatsClient | None = None
        self.js: JetStreamContext | None = None
        self.ready = asyncio.Event()
        self._tails: OrderedDict[str, _ChannelTail] = OrderedDict()
        self._queues: dict[str, _ChannelQueue] = {}
        self._fences: dict[tuple[str, str], _Fence] = {}  # by (subject, clientId)
        self._drains: set[asyncio.Task[None]] = set()
        self.requests: ReplyMux | None = None
        self._task: asyncio.Task[None] | None = None

    # ---- lifecycle ----

    def start(self) -> None:
        """Connect and bootstrap in the background, retrying until NATS is reachable."""
        self._task = asyncio.create_task(self._connect_forever(), name="nats-connect")

    async def _connect_forever(self) -> None:
        delay = 0.2
        while True:
            try:
                await self._connect_once()
                return
            except Exception as error:
                log.warning(
                    "NATS not ready (%s: %s); retrying in %.1fs", type(error).__name__, error, delay
                )
                if self.nc is not None:
                    with contextlib.suppress(Exception):
                        await self.nc.close()
                    self.nc = None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _connect_once(self) -> None:
        async def on_error(error: Exception) -> None:
            log.warning("NATS error: %s", error)

        async def on_disconnected() -> None:
            log.warning("NATS disconnected")

        async def on_reconnected() -> None:
            METRICS.nats_reconnects.inc()
            log.info("NATS reconnected")

        self.nc = await connect(
            self.settings,
            "realtime-gateway",
            error_cb=on_error,
            disconnected_cb=on_disconnected,
            reconnected_cb=on_reconnected,
        )
        self.js = self.nc.jetstream(timeout=self.settings.request_timeout_s)
        await bootstrap(self.js, self.settings)
        self.requests = ReplyMux(self.nc)
        await self.requests.start()
        self.ready.set()
        log.info("NATS connected and streams ready (%s)", self.settings.nats_url)

    async def close(self) -> None:
        """Stop connecting and drain the NATS connection."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await self.nc.drain()

    @property
    def is_ready(self) -> bool:
        """True while connected with the streams in place."""
        return self.ready.is_set() and self.nc is not None and self.nc.is_connected

    def connection_epoch(self) -> tuple[NatsClient, int] | None:
        """The current client and its reconnect count while connected and ready, else None:
        a change means the server may have lost consumers (presence restarts its feed)."""
        nc = self.nc
        if nc is None or not nc.is_connected or not self.ready.is_set():
            return None
        return nc, int(nc.stats["reconnects"])

    def jetstream(self) -> JetStreamContext:
        """The JetStream context, or ``ProtocolError`` 50001 when not ready."""
        if self.js is None or not self.is_ready:
            raise ProtocolError(ErrorCode.BOOTSTRAP, "message backend not ready, retry later")
        return self.js

    def request_mux(self) -> ReplyMux:
        """The lean request multiplexer, or ``ProtocolError`` 50001 when not ready."""
        if self.requests is None:
            raise ProtocolError(ErrorCode.BOOTSTRAP, "message backend not ready, retry later")
        return self.requests

    def client(self) -> NatsClient:
        """The connected NATS client, or ``ProtocolError`` 50001 when not ready."""
        if self.nc is None or not self.is_ready:
            raise ProtocolError(ErrorCode.BOOTSTRAP, "message backend not ready, retry later")
        return self.nc

    # ---- publishing ----

    async def publish(self, app: str, message: Message) -> int:
        """Store ``message`` (or fan it out, if ephemeral); return its serial (0 if none).

        A resend of an already stored ``message_id`` returns the original serial.
        """
        payload = encode_member(message)
        if message.ephemeral:
            await self.client().publish(subjects.live_subject(app, message.channel), payload)
            return 0
        subject = subjects.stored_subject(app, message.channel)
        message_dedup_id = dedup_id(app, message.channel, message.client_id, message.message_id)
        if self._fenced(subject, message.client_id, message_dedup_id):
            raise ProtocolError(
                ErrorCode.SERVER,
                "not stored: an earlier publish of yours on this channel failed; resend it first",
            )
        try:
            self.client()  # 50001 while NATS is away: a failure like any other, so fenced
        except ProtocolError:
            self._fence(subject, message.client_id, message_dedup_id)
            raise
        queue = self._queues.get(subject)
        if queue is None:
            # Nothing in flight for this channel here: store inline, without a task.
            queue = self._queues[subject] = _ChannelQueue()
            queue.draining = True
            try:
                return await self._store(subject, payload, message_dedup_id)
            except BaseException:
                self._fence(subject, message.client_id, message_dedup_id)
                self._fail_behind(subject, queue)
                raise
            finally:
                self._hand_off(subject, queue)
        pending = _Pending(
            payload,
            message_dedup_id,
            asyncio.get_running_loop().create_future(),
            message.client_id,
        )
        queue.waiting.append(pending)
        if not queue.draining:
            queue.draining = True
            self._hand_off(subject, queue)
        return await pending.serial

    def _hand_off(self, subject: str, queue: _ChannelQueue) -> None:
        """Give what queued up meanwhile to a drain task, or retire the idle queue."""
        if queue.waiting:
            task = asyncio.create_task(self._drain(subject, queue))
            self._drains.add(task)
            task.add_done_callback(self._drains.discard)
        else:
            queue.draining = False
            if self._queues.get(subject) is queue:
                del self._queues[subject]

    async def _drain(self, subject: str, queue: _ChannelQueue) -> None:
        """Store the channel's queued publishes, each group in one round trip, until none
        are left. Whatever queues up while a group is in flight forms the next group."""
        try:
            while queue.waiting:
                group = _take_group(queue.waiting)
                try:
                    if len(group) == 1:
                        serials = [await self._store(subject, group[0].payload, group[0].dedup_id)]
                    else:
                        serials = await self._store_batch(subject, group)
                except Exception as error:
                    for pending in group:
                        self._fence(subject, pending.client_id, pending.dedup_id)
                        if not pending.serial.done():
                            pending.serial.set_exception(error)
                    self._fail_behind(subject, queue)
                    continue
                for pending, serial in zip(group, serials, strict=True):
                    if not pending.serial.done():
                        pending.serial.set_result(serial)
        finally:
            queue.draining = False
            if self._queues.get(subject) is queue and not queue.waiting:
                del self._queues[subject]

    async def _store_batch(self, subject: str, group: list[_Pending]) -> list[int]:
        """Store ``group`` as one atomic batch: all or none, serials ``tail+1 ..``.

        Only the first message carries the expected-sequence check (JetStream allows it only
        there), which is enough: the batch commits atomically. A resend inside the group makes
        JetStream reject the whole batch (10201); then each is stored alone, which reports
        duplicates properly.
        """
        nc = self.client()
        last_index = len(group) - 1
        for attempt in range(_MAX_PUBLISH_ATTEMPTS):
            tail = self._tails.get(subject) or await self._load_tail(subject)
            batch_id = uuid.uuid4().hex
            for index, pending in enumerate(group):
                headers = {
                    "Nats-Msg-Id": pending.dedup_id,
                    SERIAL_HEADER: str(tail.serial + 1 + index),
                    "Nats-Batch-Id": batch_id,
                    "Nats-Batch-Sequence": str(index + 1),
                }
                if index == 0:
                    headers["Nats-Expected-Last-Subject-Sequence"] = str(tail.stream_sequence)
                if index < last_index:
                    await nc.publish(subject, pending.payload, headers=headers)
                    continue
                headers["Nats-Batch-Commit"] = "1"
                answer = await self._request_ack(subject, pending.payload, headers)
            error = answer.get("error")
            if error is None:
                last_serial = tail.serial + len(group)
                self._remember(
                    subject, _ChannelTail(int(answer["seq"]), last_serial, group[-1].dedup_id)
                )
                return list(range(tail.serial + 1, last_serial + 1))
            code = error.get("err_code")
            if code == _BATCH_HAS_DUPLICATE:
                return [await self._store(subject, p.payload, p.dedup_id) for p in group]
            if code not in _CONFLICTS:
                raise ProtocolError(ErrorCode.SERVER, f"batch not stored: {error}")
            # Someone else stored first, or our commit did land and its reply was lost.
            self._tails.pop(subject, None)
            fresh = await self._load_tail(subject)
            if fresh.dedup_id == group[-1].dedup_id:
                return list(range(fresh.serial - last_index, fresh.serial + 1))
            await _back_off(attempt)
        raise ProtocolError(ErrorCode.SERVER, "channel too contended, publish not stored")

    async def _store(self, subject: str, payload: bytes, message_dedup_id: str) -> int:
        for attempt in range(_MAX_PUBLISH_ATTEMPTS):
            tail = self._tails.get(subject) or await self._load_tail(subject)
            if tail.dedup_id == message_dedup_id:
                # A resend of the channel's newest message (its ack was lost): JetStream's
                # dedup forgets ids after the window, the tail does not.
                return tail.serial
            serial = tail.serial + 1
            headers = {
                "Nats-Msg-Id": message_dedup_id,
                "Nats-Expected-Last-Subject-Sequence": str(tail.stream_sequence),
                SERIAL_HEADER: str(serial),
            }
            answer = await self._request_ack(subject, payload, headers)
            error = answer.get("error")
            if error is None:
                if answer.get("duplicate"):
                    return await self._serial_at(int(answer["seq"]))
                self._remember(subject, _ChannelTail(int(answer["seq"]), serial, message_dedup_id))
                return serial
            if error.get("err_code") not in _CONFLICTS:
                raise ProtocolError(ErrorCode.SERVER, f"publish not stored: {error}")
            # Another publisher stored first, or our earlier attempt did and its ack was
            # lost (the sequence check runs before dedup): look at the channel's tail.
            self._tails.pop(subject, None)
            fresh = await self._load_tail(subject)
            if fresh.dedup_id == message_dedup_id:
                return fresh.serial
            await _back_off(attempt)
        raise ProtocolError(ErrorCode.SERVER, "channel too contended, publish not stored")

    async def _request_ack(
        self, subject: str, payload: bytes, headers: dict[str, str]
    ) -> dict[str, Any]:
        """Publish into the stream and return its JSON ack. A lost ack reads as a sequence
        conflict, whose handling (look at the channel's tail) is exactly what a lost ack
        needs."""
        assert self.requests is not None
        try:
            reply = await self.requests.request(
                subject, payload, self.settings.request_timeout_s, headers
            )
            answer: dict[str, Any] = orjson.loads(reply.data)
        except (RequestTimeout, orjson.JSONDecodeError):
            return {"error": {"err_code": _WRONG_LAST_SEQUENCE}}
        if reply.headers and reply.headers.get("Status") == "503":
            raise ProtocolError(ErrorCode.BOOTSTRAP, "message stream not available")
        return answer

    async def _load_tail(self, subject: str) -> _ChannelTail:
        reply = await self._direct_get(self.settings.stream_name, subject=subject)
        if reply is None:
            # Nothing retained: a new channel, or one whose messages all aged out. The tails
            # stream remembers the last serial of the latter; stream sequence 0 still tells
            # JetStream to expect an empty subject.
            serial = await self._retained_serial(subject) if self.settings.channels_can_empty else 0
            tail = _ChannelTail(0, serial)
        else:
            headers = reply.headers or {}
            tail = _ChannelTail(
                int(headers["Nats-Sequence"]),
                int(headers.get(SERIAL_HEADER, 0)),
                headers.get("Nats-Msg-Id", ""),
            )
        self._remember(subject, tail)
        return tail

    async def _retained_serial(self, subject: str) -> int:
        """The last serial the tails stream kept for the channel of ``subject`` (0: none)."""
        tail = subjects.TAIL_PREFIX + subject[len(subjects.STORED_PREFIX) :]
        stream = subjects.tails_stream(self.settings.stream_name)
        reply = await self._direct_get(stream, subject=tail)
        return int(((reply.headers or {}) if reply else {}).get(SERIAL_HEADER, 0) or 0)

    async def _serial_at(self, stream_sequence: int) -> int:
        """The serial of the message at ``stream_sequence`` (a duplicate's original). Direct
        gets are answered by any replica, and one that is behind (a node back from a crash
        or a partition) does not have it yet: ask again rather than ack serial 0, which the
        fault suite caught after a partition healed."""
        for _ in range(_SERIAL_READS):
            reply = await self._direct_get(
                self.settings.stream_name, request={"seq": stream_sequence}
            )
            serial = int(((reply.headers or {}) if reply else {}).get(SERIAL_HEADER, 0))
            if serial:
                return serial
            await asyncio.sleep(_SERIAL_READ_WAIT_S)
        raise ProtocolError(ErrorCode.SERVER, "stored, but its serial is not readable yet; resend")

    async def _direct_get(
        self, stream: str, *, subject: str = "", request: dict[str, object] | None = None
    ) -> Msg | None:
        assert self.requests is not None
        try:
            return await direct_get(
                self.requests.request,
                stream,
                self.settings.request_timeout_s,
                subject=subject,
                request=request,
            )
        except RequestTimeout:
            raise ProtocolError(ErrorCode.SERVER, "message stream did not answer") from None

    # ---- per-connection order through failures ----

    def _fence(self, subject: str, client_id: str, message_dedup_id: str) -> None:
        """``message_dedup_id`` of ``client_id`` failed on ``subject``: hold its later ones."""
        if not client_id:
            return  # anonymous REST publishes: no connection whose order to keep
        now = asyncio.get_running_loop().time()
        key = (subject, client_id)
        fence = self._fences.get(key)
        if fence is None or fence.until <= now:
            if len(self._fences) >= _FENCES_PRUNED_ABOVE:
                for stale in [k for k, f in self._fences.items() if f.until <= now]:
                    del self._fences[stale]
            fence = self._fences[key] = _Fence(set(), 0.0)
        fence.failed.add(message_dedup_id)
        fence.until = now + _FENCE_S

    def _fenced(self, subject: str, client_id: str, message_dedup_id: str) -> bool:
        """True when this publish must be refused: its client has publishes on ``subject``
        that failed and were not resent yet (a resend of one of them passes)."""
        key = (subject, client_id)
        fence = self._fences.get(key)
        if fence is None:
            return False
        if fence.until <= asyncio.get_running_loop().time():
            del self._fences[key]
            return False
        if message_dedup_id not in fence.failed:
            return True
        fence.failed.discard(message_dedup_id)
        if not fence.failed:
            del self._fences[key]
        return False

    def _fail_behind(self, subject: str, queue: _ChannelQueue) -> None:
        """A store failed (a NATS node died, the stream was unavailable): fail everything
        queued behind it on the channel too. Stored later, they would overtake the failed
        publish, whose resend would then land after them; failed (and fenced), they are
        resent by the client in order (docs/GUARANTEES.md, per-connection order)."""
        while queue.waiting:
            pending = queue.waiting.popleft()
            if not pending.serial.done():
                self._fence(subject, pending.client_id, pending.dedup_id)
                pending.serial.set_exception(
                    ProtocolError(
                        ErrorCode.SERVER,
                        "not stored: an earlier publish on this channel failed; resend in order",
                    )
                )

    def _remember(self, subject: str, tail: _ChannelTail) -> None:
        self._tails[subject] = tail
        self._tails.move_to_end(subject)
        if len(self._tails) > _CACHED_CHANNELS:
            self._tails.popitem(last=False)


async def _back_off(attempt: int) -> None:
    """After losing a race for a channel's tail: gateways that retry in lockstep would keep
    colliding, so wait a random, growing moment (at most 50 ms); meanwhile more publishes
    queue up and the next try stores them all in one batch."""
    if attempt:
        await asyncio.sleep(random.uniform(0, min(0.05, 0.0005 * 2**attempt)))


def _take_group(waiting: deque[_Pending]) -> list[_Pending]:
    group = [waiting.popleft()]
    size = len(group[0].payload)
    while waiting and len(group) < _MAX_GROUP_MESSAGES:
        size += len(waiting[0].payload)
        if size > _MAX_GROUP_BYTES:
            break
        group.append(waiting.popleft())
    return group
