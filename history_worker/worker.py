"""The history worker: answers ``hist``, ``fetch`` and resume queries over NATS
request/reply in a queue group, so any number of workers share the load."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from gateway.requests import ReplyMux
from history_worker.index import SequenceIndex
from history_worker.store import StreamReader
from shared import history, subjects
from shared.errors import ErrorCode, ProtocolError
from shared.history import HistoryOp, HistoryQuery, HistoryResult
from shared.settings import Settings
from shared.subjects import SERIAL_HEADER

__all__ = ["HistoryService", "run_history_worker"]

log = logging.getLogger(__name__)

_MAX_PAGE = 1000


class HistoryService:
    """Turns a query into a result by reading the stream."""

    def __init__(self, reader: StreamReader, index: SequenceIndex | None = None) -> None:
        self._reader = reader
        self._index = index

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
                return HistoryResult((), False)
            cursor = found
        if query.op is HistoryOp.HISTORY:
            span = history.history_range(oldest, newest, cursor, limit)
        elif query.op is HistoryOp.FETCH:
            span = history.fetch_range(oldest, newest, cursor, limit)
        else:
            span = history.resume_range(oldest, newest, cursor, limit)
        if not span.count or bounds is None:
            return HistoryResult((), span.flag)
        known = self._index.sequences(subject, span.first, span.last) if self._index else None
        if known is not None:
            indexed = await self._reader.read_sequences(subject, known, span.first)
            if indexed is not None:
                return HistoryResult(tuple(indexed), span.flag)
            assert self._index is not None
            self._index.forget(subject)
        start = await self._reader.sequence_of(subject, bounds, span.first)
        messages = await self._reader.read(subject, start, span.first, span.last)
        return HistoryResult(tuple(messages), span.flag)


async def _connect(settings: Settings) -> NatsClient:
    delay = 0.2
    while True:
        try:
            return await nats.connect(
                servers=settings.nats_url.split(","),
                name="realtime-history-worker",
                connect_timeout=2,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
            )
        except Exception as error:
            log.warning("NATS not reachable (%s); retrying in %.1fs", error, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def _fail(nc: NatsClient, reply: str, error: ProtocolError) -> None:
    header = f"{int(error.code)} {error.message}".replace("\r", " ").replace("\n", " ")
    await nc.publish(reply, b"", headers={history.ERROR_HEADER: header})


async def run_history_worker(settings: Settings, stop: asyncio.Event) -> None:
    """Serve history queries until ``stop`` is set."""
    nc = await _connect(settings)
    requests = ReplyMux(nc)
    await requests.start()
    index = SequenceIndex()
    reader = StreamReader(nc, settings.stream_name, settings.request_timeout_s, requests)
    service = HistoryService(reader, index)
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
        try:
            result = await service.answer(history.decode_query(msg.data))
        except ProtocolError as error:
            await _fail(nc, msg.reply, error)
            return
        except Exception as error:
            log.exception("history query failed")
            await _fail(nc, msg.reply, ProtocolError(ErrorCode.SERVER, f"history failed: {error}"))
            return
        await nc.publish(msg.reply, history.encode_result(result))

    subscription = await nc.subscribe(
        subjects.HISTORY_SUBJECT, queue=subjects.HISTORY_QUEUE, cb=on_query
    )
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
