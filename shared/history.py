"""History and gap-fill: the request/reply format between gateways and history workers, and
the pure range arithmetic both sides rely on (PROTOCOL.md 3.5 to 3.7).

Serials are contiguous per channel, so "newest N before X" and "everything after F" are serial
ranges; the worker only has to read them.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from realtime_protocol import binary_codec
from realtime_protocol.binary_codec import FrameDecodeError
from realtime_protocol.errors import ErrorCode, ProtocolError
from realtime_protocol.frames import Message

__all__ = [
    "ERROR_HEADER",
    "NEWEST_HEADER",
    "RESULT_OVERHEAD",
    "HistoryOp",
    "HistoryQuery",
    "HistoryResult",
    "PageCut",
    "SerialRange",
    "cut_page",
    "decode_query",
    "decode_result",
    "encode_query",
    "encode_result",
    "encoded_member_size",
    "fetch_range",
    "forwards_range",
    "history_range",
    "query_range",
    "resume_range",
    "strip_member_suffix",
]

ERROR_HEADER = "Rt-Error"
"""Header of a worker reply that failed: ``<code> <message>``."""

NEWEST_HEADER = "Rt-Newest"
"""Header of a worker reply: the channel's newest serial when the query was answered (a
resume keeps reading pages until it has replayed up to it). A header, not part of the body,
so gateways and workers of different versions understand each other during an upgrade."""

RESULT_OVERHEAD = 1
"""Bytes of an encoded result besides its members (the flag byte)."""


class HistoryOp(enum.StrEnum):
    """What a query asks for."""

    HISTORY = "hist"
    FETCH = "fetch"
    RESUME = "resume"
    # REST history oldest first (PROTOCOL.md section 9, item 15): the oldest ``limit``
    # records above ``from_serial`` and below ``before``.
    FORWARDS = "forwards"


@dataclass(frozen=True, slots=True)
class HistoryQuery:
    """A ``hist`` (newest ``limit`` below ``before``) or ``fetch`` (above ``from_serial``)."""

    op: HistoryOp
    app: str
    channel: str
    limit: int = 0
    before: int = 0
    from_serial: int = 0
    # Legacy JSON clients name a message instead of a serial (``lastMessageId``, ``start``).
    message_id: str = ""
    # A serial the asking gateway has already delivered live on this channel, so the stream
    # certainly holds it: a replica whose newest serial is lower is behind its leader (just
    # back from a partition) and must catch up before answering a resume or a fetch.
    at_least: int = 0


@dataclass(frozen=True, slots=True)
class HistoryResult:
    """Encoded message members (PROTOCOL.md 2.6, serials set) oldest first; ``flag`` is
    ``more`` for hist and ``resumed`` for fetch. Members stay encoded end to end, so a binary
    client's response is spliced together without decoding a single message."""

    members: tuple[bytes, ...]
    flag: bool
    newest: int = 0

    @property
    def messages(self) -> tuple[Message, ...]:
        """The members decoded (for JSON clients)."""
        return tuple(binary_codec.decode_member(member) for member in self.members)


@dataclass(frozen=True, slots=True)
class SerialRange:
    """Serials ``first`` to ``last`` inclusive (empty when ``last < first``) and the flag."""

    first: int
    last: int
    flag: bool

    @property
    def count(self) -> int:
        """Number of serials in the range."""
        return max(0, self.last - self.first + 1)


def history_range(oldest: int, newest: int, before: int, limit: int) -> SerialRange:
    """The page of ``hist``: the newest ``limit`` retained serials strictly below ``before``
    (0 = no bound); ``flag`` = more older retained serials exist.

    ``oldest``/``newest`` are the channel's retained serial bounds (0, 0 when empty).
    """
    if newest == 0:
        return SerialRange(1, 0, False)
    last = newest if before == 0 else min(newest, before - 1)
    first = max(oldest, last - limit + 1)
    if last < oldest:
        return SerialRange(1, 0, False)
    return SerialRange(first, last, first > oldest)


def fetch_range(oldest: int, newest: int, from_serial: int, cap: int) -> SerialRange:
    """The serials after ``from_serial``, at most ``cap`` of them (``fetch`` and resume).

    ``flag`` (resumed) is false when part of the range aged out (PROTOCOL.md 3.6); a cursor at
    or above ``newest`` is up to date: resumed, nothing to send (section 9, item 32).
    """
    if from_serial >= newest:
        return SerialRange(1, 0, True)
    if newest and from_serial < oldest - 1:
        return SerialRange(1, 0, False)
    first = from_serial + 1
    return SerialRange(first, min(newest, first + cap - 1), True)


def forwards_range(oldest: int, newest: int, after: int, before: int, limit: int) -> SerialRange:
    """The page of a forwards (oldest first) REST history read: the oldest ``limit`` retained
    serials above ``after`` and strictly below ``before`` (0 = no bound); ``flag`` = more
    retained serials follow the page inside that bound."""
    upper = newest if before == 0 else min(newest, before - 1)
    first = max(oldest, after + 1)
    if newest == 0 or first > upper:
        return SerialRange(1, 0, False)
    last = min(upper, first + limit - 1)
    return SerialRange(first, last, last < upper)


def resume_range(oldest: int, newest: int, last_serial: int, cap: int) -> SerialRange:
    """The replay of a resuming ``sub``: like ``fetch_range``, except that a cursor above the
    channel's newest serial means the server lost state the client saw: not resumed
    (PROTOCOL.md 3.5)."""
    if last_serial > newest:
        return SerialRange(1, 0, False)
    return fetch_range(oldest, newest, last_serial, cap)


@dataclass(frozen=True, slots=True)
class PageCut:
    """The members ``start:stop`` of a page to send, and the reply's flag."""

    start: int
    stop: int
    flag: bool


def encoded_member_size(member: bytes) -> int:
    """Bytes ``member`` takes in an encoded result (its length prefix included)."""
    return len(binary_codec.uvarint(len(member))) + len(member)


def cut_page(sizes: Sequence[int], op: HistoryOp, budget: int, flag: bool) -> PageCut:
    """Which members of a page (their ``encoded_member_size``, oldest first) fit in an encoded
    result of at most ``budget`` bytes, given the page's ``flag``.

    A reply above NATS's max payload cannot be sent at all, so a page is cut, never dropped:
    ``hist`` keeps the newest members that fit and answers ``more`` when it drops any (the
    client pages on below the oldest one returned); ``fetch`` and resume keep the oldest
    contiguous prefix that fits with their flag unchanged (the client asks again from the last
    serial it got); a forwards read keeps that prefix too (the worker then answers ``more``).
    At least one member is kept when there is one: a stored message is smaller than the max
    payload, since NATS accepted it.
    """
    room = budget - RESULT_OVERHEAD
    used = 0
    if op is HistoryOp.HISTORY:
        start = len(sizes)
        while start > 0 and (start == len(sizes) or used + sizes[start - 1] <= room):
            used += sizes[start - 1]
            start -= 1
        return PageCut(start, len(sizes), flag or start > 0)
    stop = 0
    while stop < len(sizes) and (stop == 0 or used + sizes[stop] <= room):
        used += sizes[stop]
        stop += 1
    return PageCut(0, stop, flag)


def query_range(
    op: HistoryOp, oldest: int, newest: int, cursor: int, limit: int, before: int = 0
) -> SerialRange:
    """The serials ``op`` answers with, ``cursor`` being ``before`` for a ``hist`` and the
    client's last serial for a ``fetch``, a resume or a forwards read (whose upper bound is
    ``before``)."""
    if op is HistoryOp.HISTORY:
        return history_range(oldest, newest, cursor, limit)
    if op is HistoryOp.FORWARDS:
        return forwards_range(oldest, newest, cursor, before, limit)
    if op is HistoryOp.FETCH:
        return fetch_range(oldest, newest, cursor, limit)
    return resume_range(oldest, newest, cursor, limit)


def strip_member_suffix(message_id: str) -> str:
    """A batch member's id is ``<batchId>:<index>``; the stored record has ``batchId``."""
    base, colon, index = message_id.rpartition(":")
    return base if colon and index.isdigit() and base else message_id


def encode_query(query: HistoryQuery) -> bytes:
    """Encode a query for the NATS request."""
    return orjson.dumps(
        {
            "op": query.op.value,
            "app": query.app,
            "channel": query.channel,
            "limit": query.limit,
            "before": query.before,
            "fromSerial": query.from_serial,
            "messageId": query.message_id,
            "atLeast": query.at_least,
        }
    )


def decode_query(data: bytes) -> HistoryQuery:
    """Decode a query; raise ``ProtocolError`` 40001 when malformed."""
    try:
        value = orjson.loads(data)
        return HistoryQuery(
            HistoryOp(value["op"]),
            str(value["app"]),
            str(value["channel"]),
            int(value.get("limit", 0)),
            int(value.get("before", 0)),
            int(value.get("fromSerial", 0)),
            str(value.get("messageId", "")),
            int(value.get("atLeast", 0)),
        )
    except (orjson.JSONDecodeError, KeyError, ValueError, TypeError) as error:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"malformed history query: {error}") from None


def encode_result(result: HistoryResult) -> bytes:
    """Encode a result: a flag byte, then each message as a length-prefixed member."""
    parts = [b"\x01" if result.flag else b"\x00"]
    parts += [binary_codec.frame_record(member) for member in result.members]
    return b"".join(parts)


def decode_result(data: bytes) -> HistoryResult:
    """Decode a worker's result; raise ``ProtocolError`` 50000 when malformed."""
    try:
        if not data:
            raise FrameDecodeError("empty history result")
        members = tuple(binary_codec.iter_records(data[1:]))
    except FrameDecodeError as error:
        raise ProtocolError(ErrorCode.SERVER, f"bad history result: {error.message}") from None
    return HistoryResult(members, data[0] == 1)
