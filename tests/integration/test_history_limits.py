"""History limits (issue 9): replies paged by bytes so they always fit in NATS's max
payload, and the bounded scan of a legacy message-id cursor."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
import websockets

from history_worker import store
from history_worker.index import SequenceIndex
from history_worker.store import StreamReader
from history_worker.worker import HistoryService
from nats_adapter.requests import ReplyMux
from shared import history, subjects
from shared.history import HistoryOp, HistoryQuery, HistoryResult
from shared.settings import Settings
from tests.support import APP_KEY, Cluster, JsonClient, json_client

# 60,000 characters of JSON string per message: fits in one 64 KiB publish frame, and 18 or
# more of them add up to more than NATS's default 1 MiB max payload.
BIG_DATA_CHARS = 60_000
BIG_COUNT = 20


def channel_name(prefix: str) -> str:
    return f"{prefix}:{uuid.uuid4().hex[:10]}"


async def big_client(url: str) -> JsonClient:
    """A JSON client that accepts WebSocket messages of any size (a page of ~1 MiB of data is
    one ``histRes`` text message, above the ``websockets`` default limit of 1 MiB)."""
    client = JsonClient(await websockets.connect(url, compression=None, max_size=None))
    connected = await client.auth(key=APP_KEY, clientId="big")
    assert connected["t"] == "connected", connected
    return client


def big_data(index: int) -> str:
    return f"{index:04d}" + "x" * (BIG_DATA_CHARS - 4)


async def publish_big(client: JsonClient, channel: str, count: int) -> None:
    for index in range(1, count + 1):
        ack = await client.request(
            "pub", channel=channel, name="big", data=big_data(index), messageId=f"big-{index}"
        )
        assert ack["t"] == "ack" and ack["seq"] == index, ack


def serials(frame: dict[str, Any]) -> list[int]:
    return [message["seq"] for message in frame["messages"]]


@pytest.fixture(scope="module")
async def big_channel(cluster: Cluster) -> str:
    """A channel holding ``BIG_COUNT`` messages of ~60 KB each (more than 1 MiB in all)."""
    channel = channel_name("big")
    client = await big_client(cluster.a.url)
    await publish_big(client, channel, BIG_COUNT)
    await client.close()
    return channel


async def test_hist_pages_by_bytes_and_paging_collects_every_serial(
    cluster: Cluster, big_channel: str
) -> None:
    client = await big_client(cluster.a.url)
    # Default limit (100): the newest messages that fit, oldest first, more=true.
    page = await client.request("hist", channel=big_channel)
    assert page["t"] == "histRes", page
    first_page = serials(page)
    assert first_page and len(first_page) < BIG_COUNT
    assert first_page == list(range(BIG_COUNT - len(first_page) + 1, BIG_COUNT + 1))
    assert page["more"] is True
    assert all(m["data"] == big_data(m["seq"]) for m in page["messages"])
    # Paging on with before = the oldest serial returned collects every serial once.
    collected = first_page
    while page.get("more", False):  # JSON omits more=false
        page = await client.request("hist", channel=big_channel, before=collected[0])
        assert page["t"] == "histRes", page
        assert serials(page), page
        collected = serials(page) + collected
    assert collected == list(range(1, BIG_COUNT + 1))
    await client.close()


async def test_fetch_from_zero_returns_a_prefix_that_fits(
    cluster: Cluster, big_channel: str
) -> None:
    client = await big_client(cluster.b.url)
    fetched = await client.request("fetch", channel=big_channel, fromSerial=0)
    assert fetched["t"] == "fetchRes", fetched
    prefix = serials(fetched)
    assert prefix and prefix == list(range(1, len(prefix) + 1))
    assert len(prefix) < BIG_COUNT
    assert fetched["resumed"] is True
    assert all(m["data"] == big_data(m["seq"]) for m in fetched["messages"])
    # Fetching on from the last serial returned reaches the newest message.
    rest = await client.request("fetch", channel=big_channel, fromSerial=prefix[-1])
    assert rest["t"] == "fetchRes", rest
    assert serials(rest) == list(range(prefix[-1] + 1, BIG_COUNT + 1))
    await client.close()


async def test_resuming_sub_replays_a_prefix_then_acks(cluster: Cluster, big_channel: str) -> None:
    subscriber = await big_client(cluster.b.url)
    ack = await subscriber.request("sub", channel=big_channel, lastSerial=1)
    assert ack["t"] == "ack", ack
    assert ack["resumed"] is True
    replayed = [frame["seq"] for frame in subscriber.backlog if frame["t"] == "msg"]
    assert replayed and replayed == list(range(2, len(replayed) + 2))
    await subscriber.close()


# ---- the worker's service in this process, against the cluster's NATS ----

SMALL_COUNT = 30
SMALL_DATA_CHARS = 1_000


@pytest.fixture(scope="module")
async def small_channel(cluster: Cluster) -> str:
    """A channel of ``SMALL_COUNT`` messages of ~1 KB, ids ``s-1``, ``s-2``..."""
    channel = channel_name("small")
    client = await json_client(cluster.a.url)
    for index in range(1, SMALL_COUNT + 1):
        ack = await client.request(
            "pub", channel=channel, name="s", data="y" * SMALL_DATA_CHARS, messageId=f"s-{index}"
        )
        assert ack["seq"] == index, ack
    await client.close()
    return channel


class CountingReader(StreamReader):
    """A ``StreamReader`` that counts the messages its batched reads return, and its searches
    for a serial's stream sequence (what the index saves)."""

    read_count = 0
    search_count = 0

    async def sequence_of(self, subject: str, bounds: store.ChannelBounds, serial: int) -> int:
        self.search_count += 1
        return await super().sequence_of(subject, bounds, serial)

    async def _batch(
        self, subject: str, start_sequence: int, count: int, max_bytes: int = 0
    ) -> tuple[list[Any], int]:
        found, pending = await super()._batch(subject, start_sequence, count, max_bytes)
        self.read_count += len(found)
        return found, pending


@pytest.fixture
async def reader(cluster: Cluster) -> AsyncIterator[CountingReader]:
    nc = await nats.connect(cluster.nats.url)
    requests = ReplyMux(nc)
    await requests.start()
    yield CountingReader(nc, Settings.load().stream_name, 2.0, requests)
    await nc.close()


async def full_index(reader: StreamReader, subject: str) -> SequenceIndex:
    """An index that knows every message of ``subject`` (as a worker that saw them live)."""
    index = SequenceIndex()
    found, _ = await reader._batch(subject, 1, 1000)
    for stored, _data in found:
        index.record(subject, stored.serial, stored.sequence)
    return index


def query(op: HistoryOp, channel: str, **fields: Any) -> HistoryQuery:
    return HistoryQuery(op, "app1", channel, **fields)


def member_serials(result: HistoryResult) -> list[int]:
    return [message.serial for message in result.messages]


@pytest.mark.parametrize("reading", ["stream", "index", "index-wrong"])
async def test_service_cuts_pages_to_its_byte_budget(
    reader: CountingReader, small_channel: str, reading: str
) -> None:
    """Every way a page is read gives the same pages: searching the stream (no index), one
    direct get per message from the index, and an index that is wrong (sequences shifted by
    one), which must be noticed and forgotten, never served."""
    subject = subjects.stored_subject("app1", small_channel)
    index = await full_index(reader, subject) if reading != "stream" else None
    if reading == "index-wrong":
        assert index is not None
        shifted = SequenceIndex()
        for serial in range(1, SMALL_COUNT + 1):
            known = index.sequences(subject, serial, serial)
            assert known is not None
            shifted.record(subject, serial, known[0] + 1)
        index = shifted
    budget = 5_000  # four or so of the ~1 KB messages
    service = HistoryService(reader, index, max_reply_bytes=budget)
    reader.read_count = reader.search_count = 0

    async def ask(op: HistoryOp, **fields: Any) -> HistoryResult:
        result = await service.answer(query(op, small_channel, **fields))
        assert len(history.encode_result(result)) <= budget
        return result

    # hist: newest first page, then pages down to serial 1, each serial once.
    page = await ask(HistoryOp.HISTORY, limit=100)
    assert 1 < len(page.members) < SMALL_COUNT and page.flag
    collected = member_serials(page)
    assert collected == list(range(SMALL_COUNT - len(collected) + 1, SMALL_COUNT + 1))
    while page.flag:
        page = await ask(HistoryOp.HISTORY, limit=100, before=collected[0])
        assert page.members
        collected = member_serials(page) + collected
    assert collected == list(range(1, SMALL_COUNT + 1))
    # The count limit still applies when the bytes would allow more.
    assert member_serials(await ask(HistoryOp.HISTORY, limit=2)) == [SMALL_COUNT - 1, SMALL_COUNT]

    # fetch and resume: prefixes, resumed, and fetching on reaches the newest.
    for op in (HistoryOp.FETCH, HistoryOp.RESUME):
        fetched: list[int] = []
        while not fetched or fetched[-1] < SMALL_COUNT:
            result = await ask(op, limit=1000, from_serial=fetched[-1] if fetched else 0)
            assert result.flag and 1 < len(result.members) < SMALL_COUNT
            fetched += member_serials(result)
        assert fetched == list(range(1, SMALL_COUNT + 1))

    # A budget below one message: still one message, the newest (hist) or the next (fetch).
    service.max_reply_bytes = 10
    single = await service.answer(query(HistoryOp.HISTORY, small_channel, limit=100))
    assert member_serials(single) == [SMALL_COUNT] and single.flag
    single = await service.answer(query(HistoryOp.FETCH, small_channel, limit=1000, from_serial=4))
    assert member_serials(single) == [5] and single.flag
    if reading == "index":
        assert reader.read_count == 0, "every page came from the index's direct gets"
        assert reader.search_count == 0, "no serial was searched for"
    if reading == "index-wrong":
        assert reader.search_count > 0
        assert index is not None and index.sequences(subject, 1, 1) is None, "forgotten"


async def test_fetch_reads_little_more_than_it_sends(
    reader: CountingReader, small_channel: str
) -> None:
    service = HistoryService(reader, None, max_reply_bytes=5_000)
    result = await service.answer(query(HistoryOp.FETCH, small_channel, limit=1000, from_serial=0))
    assert 1 < len(result.members) < 6
    # Locating serial 1 reads nothing in batches; the forward read stops at the budget.
    assert reader.read_count <= len(result.members) + 2


async def test_message_id_cursor_is_looked_for_among_the_newest_serials_only(
    reader: CountingReader, small_channel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store, "FIND_WINDOW", 5)
    subject = subjects.stored_subject("app1", small_channel)
    bounds = await reader.bounds(subject)
    assert bounds is not None
    assert await reader.find_serial(subject, bounds, f"s-{SMALL_COUNT}") == SMALL_COUNT
    assert await reader.find_serial(subject, bounds, f"s-{SMALL_COUNT - 4}") == SMALL_COUNT - 4
    assert await reader.find_serial(subject, bounds, f"s-{SMALL_COUNT - 5}") == 0
    assert await reader.find_serial(subject, bounds, "s-3") == 0
    # An unknown id costs at most the window.
    reader.read_count = 0
    assert await reader.find_serial(subject, bounds, "unknown") == 0
    assert reader.read_count <= 5

    service = HistoryService(reader, None)
    old = await service.answer(query(HistoryOp.HISTORY, small_channel, message_id="s-3"))
    assert old == HistoryResult((), False, SMALL_COUNT)
    gone = await service.answer(query(HistoryOp.RESUME, small_channel, message_id="s-3"))
    assert gone == HistoryResult((), False, SMALL_COUNT), "resumed false"
    recent = await service.answer(
        query(HistoryOp.HISTORY, small_channel, limit=2, message_id=f"s-{SMALL_COUNT - 1}")
    )
    assert member_serials(recent) == [SMALL_COUNT - 3, SMALL_COUNT - 2]
    resumed = await service.answer(
        query(HistoryOp.RESUME, small_channel, limit=100, message_id=f"s-{SMALL_COUNT - 2}")
    )
    assert member_serials(resumed) == [SMALL_COUNT - 1, SMALL_COUNT] and resumed.flag
