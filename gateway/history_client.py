"""The gateway's side of history: NATS requests to the history workers' queue group."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable

from gateway.broker import Broker
from gateway.metrics import METRICS
from nats_adapter.requests import RequestTimeout
from realtime_protocol.errors import ErrorCode, ProtocolError
from shared import history, subjects
from shared.history import HistoryOp, HistoryQuery, HistoryResult

__all__ = ["HistoryClient"]


class HistoryClient:
    """Asks a history worker; never reads the stream itself.

    Identical resume and gap-fetch queries in flight at the same time share one request: in
    a reconnect storm the clients of a channel resume from the same serial, and 10,000 of
    them on 100 channels need far fewer worker requests (bench/reconnect.py). Joining a
    request sent before this client's live subscription began is safe because the query
    carries ``at_least``, the newest serial this gateway had delivered live on the channel
    when it was made, and is part of the key: a joiner's key matches only if nothing newer
    was delivered since, and the worker answers with ``newest >= at_least``. So everything
    delivered live before the joiner subscribed is in the shared replay, and everything
    after reaches the joiner live. ``hist`` and forwards reads are never shared: an answer
    read before a client's request could miss what that client had just published.
    Results are immutable, so sharing one is safe.
    """

    def __init__(self, broker: Broker, newest_seen: Callable[[str, str], int]) -> None:
        self._broker = broker
        self._newest_seen = newest_seen
        self._in_flight: dict[HistoryQuery, asyncio.Future[HistoryResult]] = {}

    async def query(self, query: HistoryQuery) -> HistoryResult:
        """Return the worker's answer; ``ProtocolError`` 50000 when none answers in time."""
        if query.op not in (HistoryOp.RESUME, HistoryOp.FETCH):
            return await self._ask(query)
        seen = self._newest_seen(query.app, query.channel)
        if seen > query.at_least:
            query = dataclasses.replace(query, at_least=seen)
        shared = self._in_flight.get(query)
        if shared is not None:
            return await asyncio.shield(shared)
        future: asyncio.Future[HistoryResult] = asyncio.get_running_loop().create_future()
        self._in_flight[query] = future
        try:
            result = await self._ask(query)
        except BaseException as error:
            future.set_exception(error)
            future.exception()  # retrieved: the waiters (if any) get it too
            raise
        finally:
            del self._in_flight[query]
        future.set_result(result)
        return result

    async def _ask(self, query: HistoryQuery) -> HistoryResult:
        self._broker.client()  # 50001 while NATS is away
        started = time.perf_counter()
        try:
            reply = await self._broker.request_mux().request(
                subjects.HISTORY_SUBJECT,
                history.encode_query(query),
                self._broker.settings.request_timeout_s,
            )
        except RequestTimeout:
            METRICS.history_errors.inc()
            raise ProtocolError(ErrorCode.SERVER, "history service did not answer") from None
        finally:
            METRICS.history_seconds.observe(time.perf_counter() - started)
        headers = reply.headers or {}
        if headers.get("Status") == "503":  # no worker subscribed (NATS's no-responders)
            METRICS.history_errors.inc()
            raise ProtocolError(ErrorCode.SERVER, "history service did not answer")
        failure = headers.get(history.ERROR_HEADER)
        if failure:
            METRICS.history_errors.inc()
            code_text, _, message = failure.partition(" ")
            try:
                code = ErrorCode(int(code_text))
            except ValueError:
                code = ErrorCode.SERVER
            raise ProtocolError(code, message or "history request failed")
        result = history.decode_result(reply.data)
        newest = headers.get(history.NEWEST_HEADER)
        if newest and newest.isdigit():
            result = HistoryResult(result.members, result.flag, int(newest))
        return result
