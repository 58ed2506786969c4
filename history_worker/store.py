"""Reading one channel's stored messages from the stream by serial.

Serials are contiguous per channel and stream sequences grow with them, so the stream
sequence of serial S is found by a search over direct gets (interpolation, with bisection
as a guard), then one batched direct get reads the range forward.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.errors import APIError, NotFoundError

from nats_adapter.direct import direct_batch, direct_get
from nats_adapter.requests import ReplyMux, RequestTimeout
from realtime_protocol.binary_codec import decode_member, member_with_serial
from realtime_protocol.errors import ErrorCode, ProtocolError
from shared.history import encoded_member_size
from shared.subjects import SERIAL_HEADER

__all__ = ["FIND_WINDOW", "ChannelBounds", "StreamReader"]

_MAX_BATCH = 1000

FIND_WINDOW = 10_000
"""How many of a channel's newest serials a message-id cursor is looked for among."""


@dataclass(frozen=True, slots=True)
class _Stored:
    sequence: int
    serial: int


@dataclass(frozen=True, slots=True)
class ChannelBounds:
    """Oldest and newest retained message of a channel (serial 0 = channel empty)."""

    oldest: _Stored
    newest: _Stored


class StreamReader:
    """Direct-get reads over the message stream."""

    def __init__(
        self, nc: NatsClient, stream: str, timeout: float, requests: ReplyMux | None = None
    ) -> None:
        self._nc = nc
        self._stream = stream
        self._timeout = timeout
        self._requests = requests

    async def _direct(self, request: dict[str, object] | None, subject: str = "") -> Msg | None:
        return await direct_get(
            self._request, self._stream, self._timeout, subject=subject, request=request
        )

    async def _request(self, subject: str, payload: bytes, timeout: float) -> Msg:  # noqa: ASYNC109 - passed to nats-py
        return await self._nc.request(subject, payload, timeout=timeout)

    @staticmethod
    def _stored(msg: Msg) -> _Stored:
        headers = msg.headers or {}
        return _Stored(int(headers["Nats-Sequence"]), int(headers.get(SERIAL_HEADER, 0)))

    async def bounds(self, subject: str) -> ChannelBounds | None:
        """The channel's oldest and newest retained messages, or ``None`` when empty."""
        newest, oldest = await asyncio.gather(
            self._direct(None, subject), self._direct({"seq": 1, "next_by_subj": subject})
        )
        if newest is None or oldest is None:  # empty, or purged in between
            return None
        return ChannelBounds(self._stored(oldest), self._stored(newest))

    async def leader_newest_serial(self, subject: str) -> int:
        """The channel's newest serial as the stream's leader knows it (0 when empty).

        Direct gets are answered by any replica, and a replica that was cut off catches up
        only after it is back: for a moment it answers with an older newest serial. This
        read goes through the JetStream API, which only the leader answers; it costs a round
        trip through the leader, so ``HistoryService`` uses it only to confirm a cursor that
        seems to lie beyond the newest serial."""
        js = self._nc.jetstream(timeout=self._timeout)
        try:
            last = await js.get_last_msg(self._stream, subject)  # STREAM.MSG.GET, not direct
        except NotFoundError:
            return 0
        except APIError as error:
            raise ProtocolError(ErrorCode.SERVER, f"stream read failed: {error}") from None
        return int((last.headers or {}).get(SERIAL_HEADER, 0))

    async def sequence_of(self, subject: str, bounds: ChannelBounds, serial: int) -> int:
        """The stream sequence of ``serial`` (which must lie within ``bounds``)."""
        low, high = bounds.oldest, bounds.newest
        if serial <= low.serial:
            return low.sequence
        if serial >= high.serial:
            return high.sequence
        high_bound = high.sequence - 1
        for attempt in range(64):
            if low.sequence + 1 > high_bound:
                break
            if attempt % 2 == 0:  # interpolate: exact when the channel is evenly spread
                fraction = (serial - low.serial) / max(1, high.serial - low.serial)
                probe = low.sequence + max(1, int(fraction * (high.sequence - low.sequence)))
            else:
                probe = (low.sequence + 1 + high_bound) // 2
            probe = min(max(probe, low.sequence + 1), high_bound)
            found = await self._direct({"seq": probe, "next_by_subj": subject})
            if found is None:
                break
            stored = self._stored(found)
            if stored.serial == serial:
                return stored.sequence
            if stored.serial < serial:
                low = stored
            else:
                high, high_bound = stored, probe - 1
        # Fall back to the last known sequence below the target; the read skips forward.
        return low.sequence

    async def read(
        self,
        subject: str,
        start_sequence: int,
        first: int,
        last: int,
        max_bytes: int | None = None,
    ) -> list[bytes]:
        """Members with serials ``first..last``, reading forward from ``start_sequence``.

        With ``max_bytes``, the read stops after the member that takes the members' total
        ``encoded_member_size`` past ``max_bytes``: the caller sees what fits and that more
        was there, and a page of big messages is not read whole only to be cut.
        """
        messages: list[bytes] = []
        used = 0
        sequence = start_sequence
        while True:
            wanted = min(last - first + 1 - len(messages) + 1, _MAX_BATCH)
            # The server stops a batch once it has sent max_bytes (it counts subjects and
            # headers too, so never later than we would); 0 = its own default cap.
            cap = 0 if max_bytes is None else max(1, max_bytes - used + 1)
            batch, pending = await self._batch(subject, sequence, wanted, cap)
            for stored, data in batch:
                if stored.serial > last:
                    return messages
                if stored.serial < first:
                    continue  # sequence_of may start a little before the range
                member = member_with_serial(data, stored.serial)
                messages.append(member)
                used += encoded_member_size(member)
                if stored.serial == last or (max_bytes is not None and used > max_bytes):
                    return messages
            if not batch or not pending:
                return messages
            sequence = batch[-1][0].sequence + 1

    async def read_sequences(
        self, subject: str, sequences: list[int], first: int
    ) -> list[bytes] | None:
        """Messages at known stream ``sequences`` (serials ``first``, ``first + 1``, ...), all
        fetched at once; ``None`` when any is gone or is not what the index promised."""
        assert self._requests is not None
        api = f"$JS.API.DIRECT.GET.{self._stream}"
        try:
            replies = await asyncio.gather(
                *(
                    self._requests.request(api, orjson.dumps({"seq": sequence}), self._timeout)
                    for sequence in sequences
                )
            )
        except RequestTimeout:
            raise ProtocolError(ErrorCode.SERVER, "stream read timed out") from None
        messages = []
        for offset, reply in enumerate(replies):
            headers = reply.headers or {}
            serial = int(headers.get(SERIAL_HEADER, 0) or 0)
            if headers.get("Nats-Subject") != subject or serial != first + offset:
                return None
            messages.append(member_with_serial(reply.data, serial))
        return messages

    async def find_serial(self, subject: str, bounds: ChannelBounds, message_id: str) -> int:
        """The serial of the message whose id is ``message_id`` among the channel's newest
        ``FIND_WINDOW`` serials (0 if none).

        Only legacy JSON clients resume and page by message id, and nothing indexes ids, so
        this scans forward; the window bounds what an unknown or ancient id costs (at most
        ``FIND_WINDOW`` messages read) whatever the channel's retention.
        """
        newest = bounds.newest.serial
        first = max(bounds.oldest.serial, newest - FIND_WINDOW + 1)
        sequence = await self.sequence_of(subject, bounds, first)
        expected = first  # the next serial the scan should meet
        while expected <= newest:
            wanted = min(newest - expected + 1, _MAX_BATCH)
            batch, pending = await self._batch(subject, sequence, wanted)
            for stored, data in batch:
                if stored.serial > newest:
                    return 0  # published after the query began: not a cursor it can use
                expected = stored.serial + 1
                if stored.serial >= first and decode_member(data).message_id == message_id:
                    return stored.serial
            if not batch or not pending:
                return 0
            sequence = batch[-1][0].sequence + 1
        return 0

    async def _batch(
        self, subject: str, start_sequence: int, count: int, max_bytes: int = 0
    ) -> tuple[list[tuple[_Stored, bytes]], int]:
        """Up to ``count`` stored messages of ``subject`` from ``start_sequence`` on, in one
        batched direct get, and how many more of the subject's messages follow them.

        The server ends the batch with a status message whose ``Nats-Num-Pending`` says what
        is left: a batch can come back short because it hit ``max_bytes`` (or the server's
        own byte cap when 0), so a short batch alone does not mean the end of the channel.
        """
        request: dict[str, object] = {
            "seq": start_sequence,
            "next_by_subj": subject,
            "batch": count,
        }
        if max_bytes:
            request["max_bytes"] = max_bytes
        batch = await direct_batch(self._nc, self._stream, request, self._timeout)
        found = [(self._stored(msg), msg.data) for msg in batch.messages]
        pending = batch.pending
        return found, pending
