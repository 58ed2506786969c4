"""The gateway's side of history: NATS requests to the history workers' queue group."""

from __future__ import annotations

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from gateway.broker import Broker
from shared import history, subjects
from shared.errors import ErrorCode, ProtocolError
from shared.history import HistoryQuery, HistoryResult

__all__ = ["HistoryClient"]


class HistoryClient:
    """Asks a history worker; never reads the stream itself."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker

    async def query(self, query: HistoryQuery) -> HistoryResult:
        """Return the worker's answer; ``ProtocolError`` 50000 when none answers in time."""
        nc = self._broker.client()
        try:
            reply = await nc.request(
                subjects.HISTORY_SUBJECT,
                history.encode_query(query),
                timeout=self._broker.settings.request_timeout_s,
            )
        except (TimeoutError, NoRespondersError, NatsTimeoutError):
            raise ProtocolError(ErrorCode.SERVER, "history service did not answer") from None
        failure = reply.headers.get(history.ERROR_HEADER) if reply.headers else None
        if failure:
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
