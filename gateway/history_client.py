"""The gateway's side of history: NATS requests to the history workers' queue group."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from gateway.broker import Broker
from gateway.metrics import METRICS
from shared import history, subjects
from shared.errors import ErrorCode, ProtocolError
from shared.history import HistoryOp, HistoryQuery, HistoryResult

__all__ = ["HistoryClient"]


class HistoryClient:
    """Asks a history worker; never reads the stream itself."""

    def __init__(self, broker: Broker, newest_seen: Callable[[str, str], int]) -> None:
        self._broker = broker
        self._newest_seen = newest_seen

    async def query(self, query: HistoryQuery) -> HistoryResult:
        """Return the worker's answer; ``ProtocolError`` 50000 when none answers in time."""
        if query.op in (HistoryOp.RESUME, HistoryOp.FETCH):
            seen = self._newest_seen(query.app, query.channel)
            if seen > query.at_least:
                query = dataclasses.replace(query, at_least=seen)
        nc = self._broker.client()
        started = time.perf_counter()
        try:
            reply = await nc.request(
                subjects.HISTORY_SUBJECT,
                history.encode_query(query),
                timeout=self._broker.settings.request_timeout_s,
            )
        except (TimeoutError, NoRespondersError, NatsTimeoutError):
            METRICS.history_errors.inc()
            raise ProtocolError(ErrorCode.SERVER, "history service did not answer") from None
        finally:
            METRICS.history_seconds.observe(time.perf_counter() - started)
        failure = reply.headers.get(history.ERROR_HEADER) if reply.headers else None
        if failure:
            METRICS.history_errors.inc()
            code_text, _, message = failure.partition(" ")
            try:
                code = ErrorCode(int(code_text))
            except ValueError:
                code = ErrorCode.SERVER
            raise ProtocolError(code, message or "history request failed")
        result = history.decode_result(reply.data)
        newest = reply.headers.get(history.NEWEST_HEADER) if reply.headers else None
        if newest and newest.isdigit():
            result = HistoryResult(result.members, result.flag, int(newest))
        return result
