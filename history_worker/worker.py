"""The history worker: answers ``hist``, ``fetch`` and resume queries over NATS
request/reply in a queue group, so any number of workers share the load."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from history_worker.index import SequenceIndex
from history_worker.metrics import WorkerMetrics, serve_metrics
from history_worker.store import ChannelBounds, StreamReader
from nats_adapter.connect import connect_with_back_off
from nats_adapter.requests import ReplyMux
from realtime_protocol.errors import ErrorCode, ProtocolError
from shared import history, subjects
from shared.history import HistoryOp, HistoryQuery, HistoryResult
from shared.settings import Settings
from shared.subjects import SERIAL_HEADER

__all__ = ["DEFAULT_REPLY_BUDGET", "REPLY_HEADROOM", "HistoryService", "run_history_worker"]

log = logging.getLogger(__name__)

_MAX_PAGE = 1000

REPLY_HEADROOM = 16 * 1024
"""Bytes of the connection's max payload left to NATS's framing and headers: a page's
encoded reply stays under ``max_payload - REPLY_HEADROOM``."""

DEFAULT_REPLY_BUDGET = 1024 * 1024 - REPLY_HEADROOM
"""The reply budget for NATS's default max payload (1 MiB)."""

# A page is read in chunks so that big messages are not all read only to be cut: the first
# chunk is the default hist page; later ones are sized from the bytes seen so far.
_FIRST_CHUNK = 100
# How long a query waits for a replica that is behind the stream's leader to catch up.
_CATCH_UP_S = 2.0


class HistoryService:
    """Turns a query into a result by reading the stream.

    A result's encoding never exceeds ``max_reply_bytes``: NATS refuses a larger reply, so a
    page of big messages is cut (``shared.history.cut_page``) instead of lost.
    """

    def __init__(
        self,
        reader: StreamReader,
        index: SequenceIndex | None = None,
        max_reply_bytes: int = DEFAULT_REPLY_BUDGET,
    ) -> None:
        self._reader = reader
        self._index = index
        self.max_reply_bytes = max_reply_bytes

    @property
    def _room(self) -> int:
        """Bytes of members a reply can carry."""
        return self.max_reply_bytes - history.RESULT_OVERHEAD

    async def answer(self, query: HistoryQuery) -> HistoryResult:
        """Compute the result of ``query``."""
        subject = subjects.stored_subject(query.app, query.channel)
        bounds = await self._reader.bounds(subject)
        oldest = bounds.oldest.serial if bounds else 0
        newest = bounds.newest.serial if bounds else 0
        limit = min(query.limit or _MAX_PAGE, _MAX_PAGE)
        cursor = query.before if query.op is HistoryOp.HISTORY else query.from_serial
        if query.message_id:
            # Legacy JSON cursor: the serial of the named message; unknown ids page nothing
            # and resume nothing (resumed:false).
            found = 0
            if bounds is not None:
                message_id = history.strip_member_suffix(query.message_id)
                found = await self._reader.find_serial(subject, bounds, message_id)
            if not found:
                return HistoryResult((), False, newest)
            cursor = found
        floor = max(cursor, query.at_least)
        if newest < floor and query.op in (HistoryOp.RESUME, HistoryOp.FETCH):
            # The client (or its gateway) saw a serial beyond what this read found: either
            # the server lost it (resumed:false) or the replica that answered is behind,
            # just back from a partition (issue 14's partition fault).
            bounds = await self._caught_up_bounds(subject, bounds, cursor, query.at_least)
            oldest = bounds.oldest.serial if bounds else 0
            newest = bounds.newest.serial if bounds else 0
        span = history.query_range(query.op, oldest, newest, cursor, limit, query.before)
        if not span.count or bounds is None:
            return HistoryResult((), span.flag, newest)
        if query.op is HistoryOp.HISTORY:
            members = await self._read_newest(subject, bounds, span.first, span.last)
        else:
            members = await self._read_oldest(subject, bounds, span.first, span.last)
        sizes = [history.encoded_member_size(member) for member in members]
        cut = history.cut_page(sizes, query.op, self.max_reply_bytes, span.flag)
        flag = cut.flag
        if query.op is HistoryOp.FORWARDS and cut.stop - cut.start < span.count:
            # The read stopped at the byte budget (or members aged out meanwhile): the rest
            # of the span is the next page.
            flag = True
        return HistoryResult(tuple(members[cut.start : cut.stop]), flag, newest)

    async def _caught_up_bounds(
        self, subject: str, bounds: ChannelBounds | None, cursor: int, at_least: int
    ) -> ChannelBounds | None:
        """``bounds`` re-read until they reach ``at_least`` (a serial the gateway delivered
        live, so certainly stored) and, for a client cursor beyond both, the leader's newest
        serial (only the leader can tell a lost serial from a replica behind). A replica
        behind its leader catches up within moments of rejoining; if it has not after
        ``_CATCH_UP_S``, the query fails with 50000 (retry) rather than answering
        resumed:false or an empty gap fill, which would hide acked messages."""
        wanted = at_least
        if cursor > at_least:
            wanted = max(wanted, min(await self._reader.leader_newest_serial(subject), cursor))
        deadline = asyncio.get_running_loop().time() + _CATCH_UP_S
        while (bounds.newest.serial if bounds else 0) < wanted:
            if asyncio.get_running_loop().time() > deadline:
                raise ProtocolError(ErrorCode.SERVER, "history replica behind the leader, retry")
            await asyncio.sleep(0.05)
            bounds = await self._reader.bounds(subject)
        return bounds

    def _next_chunk(self, used: int, count: int) -> int:
        """How many more members probably fill the budget (plus one, to see it overflow),
        judging by the ``count`` members of ``used`` bytes read so far."""
        average = max(1, used // max(1, count))
        return max(1, (self._room - used) // average + 1)

    async def _read_range(
        self, subject: str, bounds: ChannelBounds, first: int, last: int
    ) -> list[bytes]:
        """Members ``first..last``: by known sequences when the index covers them, else by a
        search and a forward read."""
        known = self._index.sequences(subject, first, last) if self._index else None
        if known is not None:
            indexed = await self._reader.read_sequences(subject, known, first)
            if indexed is not None:
                return indexed
            assert self._index is not None
            self._index.forget(subject)
        start = await self._reader.sequence_of(subject, bounds, first)
        return await self._reader.read(subject, start, first, last)

    async def _read_newest(
        self, subject: str, bounds: ChannelBounds, first: int, last: int
    ) -> list[bytes]:
        """A ``hist`` page: members of ``first..last`` read in chunks from the newest end
        until they fill the budget (reads run forward only, so each chunk is a range)."""
        chunks: list[list[bytes]] = []
        used = count = 0
        high = last
        size = min(last - first + 1, _FIRST_CHUNK)
        while high >= first and used <= self._room:
            low = max(first, high - size + 1)
            chunk = await self._read_range(subject, bounds, low, high)
            chunks.append(chunk)
            used += sum(history.encoded_member_size(member) for member in chunk)
            count += len(chunk)
            if len(chunk) < high - low + 1:
                break  # the older ones aged out meanwhile: the page ends here
            high = low - 1
            size = self._next_chunk(used, count)
        return [member for chunk in reversed(chunks) for member in chunk]

    async def _read_oldest(
        self, subject: str, bounds: ChannelBounds, first: int, last: int
    ) -> list[bytes]:
        """A ``fetch`` or resume page: the members from ``first`` on until they fill the
        budget, by known sequences in chunks while the index covers them, then forward."""
        members: list[bytes] = []
        used = 0
        known = self._index.sequences(subject, first, last) if self._index else None
        if known is not None:
            position = 0
            size = min(len(known), _FIRST_CHUNK)
            while position < len(known) and used <= self._room:
                chunk = await self._reader.read_sequences(
                    subject, known[position : position + size], first + position
                )
                if chunk is None:
                    assert self._index is not None
                    self._index.forget(subject)
                    break  # the index was wrong: read the rest the slow way
                members += chunk
                used += sum(history.encoded_member_size(member) for member in chunk)
                position += len(chunk)
                size = self._next_chunk(used, len(members))
            else:  # no break: the index served the whole page (or the budget is full)
                return members
            first += position
        start = await self._reader.sequence_of(subject, bounds, first)
        members += await self._reader.read(subject, start, first, last, self._room - used)
        return members


async def _fail(nc: NatsClient, reply: str, error: ProtocolError) -> None:
    header = f"{int(error.code)} {error.message}".replace("\r", " ").replace("\n", " ")
    await nc.publish(reply, b"", headers={history.ERROR_HEADER: header})


async def send_result(
    nc: NatsClient, reply: str, query: HistoryQuery, result: HistoryResult
) -> bool:
    """Publish ``result`` as the reply to ``query``, or the error 50000 when its encoding is
    above the connection's max payload: NATS would refuse it and the gateway would only see
    a timeout, so the failure is logged and answered instead of lost. Returns False when the
    error was sent."""
    payload = history.encode_result(result)
    if len(payload) > nc.max_payload:
        log.error(
            "history reply too large: %s %s/%s, %d members, %d bytes > max payload %d",
            query.op.value,
            query.app,
            query.channel,
            len(result.members),
            len(payload),
            nc.max_payload,
        )
        await _fail(nc, reply, ProtocolError(ErrorCode.SERVER, "history reply too large"))
        return False
    await nc.publish(reply, payload, headers={history.NEWEST_HEADER: str(result.newest)})
    return True


async def run_history_worker(settings: Settings, stop: asyncio.Event) -> None:
    """Serve history queries until ``stop`` is set, and metrics on ``RT_METRICS_PORT``
    (from the start, so a worker waiting for NATS is seen as such)."""
    metrics = WorkerMetrics()
    serving: list[NatsClient] = []  # the client, once queries are being answered

    def connected() -> bool:
        return bool(serving) and serving[0].is_connected

    runner = await serve_metrics(metrics, settings.host, settings.metrics_port, connected)
    try:
        await _serve_queries(settings, stop, metrics, serving)
    finally:
        if runner is not None:
            await runner.cleanup()


async def _serve_queries(
    settings: Settings, stop: asyncio.Event, metrics: WorkerMetrics, serving: list[NatsClient]
) -> None:
    nc = await connect_with_back_off(settings, "realtime-history-worker")
    requests = ReplyMux(nc)
    await requests.start()
    index = SequenceIndex()
    reader = StreamReader(nc, settings.stream_name, settings.request_timeout_s, requests)
    # A reply must fit in what this server accepts (max_payload, 1 MiB by default).
    service = HistoryService(reader, index, nc.max_payload - REPLY_HEADROOM)
    live_prefix = len(subjects.LIVE_PREFIX)

    async def on_live(msg: Msg) -> None:
        headers = msg.headers
        if headers and SERIAL_HEADER in headers and "Nats-Sequence" in headers:
            # rt.live.<app>.<channel> -> rt.msg.<app>.<channel>
            app_and_channel = msg.subject[live_prefix:]
            index.record(
                subjects.STORED_PREFIX + app_and_channel,
                int(headers[SERIAL_HEADER]),
                int(headers["Nats-Sequence"]),
            )

    # Every worker learns every stored message's position; ephemeral messages (no serial)
    # are skipped. A worker that cannot keep up only loses index entries, not correctness.
    await nc.subscribe(subjects.LIVE_WILDCARD, cb=on_live)

    async def on_query(msg: Msg) -> None:
        if not msg.reply:
            return
        started = time.perf_counter()
        counter = metrics.unknown_requests  # until the query decodes
        try:
            try:
                query = history.decode_query(msg.data)
                counter = metrics.requests[query.op]
                result = await service.answer(query)
            except ProtocolError as error:
                metrics.errors.inc()
                await _fail(nc, msg.reply, error)
                return
            except Exception as error:
                metrics.errors.inc()
                log.exception("history query failed")
                await _fail(
                    nc, msg.reply, ProtocolError(ErrorCode.SERVER, f"history failed: {error}")
                )
                return
            if not await send_result(nc, msg.reply, query, result):
                metrics.errors.inc()
        finally:
            counter.inc()
            metrics.seconds.observe(time.perf_counter() - started)

    subscription = await nc.subscribe(
        subjects.HISTORY_SUBJECT, queue=subjects.HISTORY_QUEUE, cb=on_query
    )
    serving.append(nc)
    # As in the gateway: no cyclic-GC scans of start-up objects, fewer young collections.
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    log.info("history worker serving %s", subjects.HISTORY_SUBJECT)
    try:
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await subscription.unsubscribe()
        with contextlib.suppress(Exception):
            await nc.drain()
