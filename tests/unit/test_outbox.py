"""The bounded, coalescing outbox."""

from __future__ import annotations

import asyncio

from gateway.outbox import ITEM_OVERHEAD_BYTES, Outbox


async def test_binary_records_coalesce_within_message_bound() -> None:
    outbox = Outbox(max_bytes=1000, coalesce=True, max_message_bytes=10)
    for record in (b"aaaa", b"bbbb", b"cccc", b"dddddddddddd"):
        outbox.put(record)
    assert await outbox.get() == [b"aaaabbbb", b"cccc", b"dddddddddddd"]


async def test_json_frames_stay_separate() -> None:
    outbox = Outbox(max_bytes=1000, coalesce=False)
    outbox.put(b"{}")
    outbox.put(b"[]")
    assert await outbox.get() == [b"{}", b"[]"]


async def test_live_deliveries_drop_when_full_but_replies_do_not() -> None:
    outbox = Outbox(max_bytes=10 + 2 * ITEM_OVERHEAD_BYTES, coalesce=True)
    assert outbox.offer(b"12345678")
    assert not outbox.offer(b"123")
    outbox.put(b"reply")
    assert outbox.dropped == 1 and not outbox.overflowed
    outbox.put(b"x" * 200)
    assert outbox.overflowed


async def test_size_counts_what_an_item_holds_not_just_its_length() -> None:
    outbox = Outbox(max_bytes=1000, coalesce=True)
    for _ in range(10):
        outbox.put(b"x")
    assert outbox.size == 10 * (1 + ITEM_OVERHEAD_BYTES)


async def test_overflow_discards_the_queue_and_calls_back_once() -> None:
    calls = []
    outbox = Outbox(max_bytes=1000, coalesce=True)
    outbox.on_overflow = lambda: calls.append(outbox.size)
    while not outbox.overflowed:
        outbox.put(b"y" * 100)
    assert calls == [0] and not outbox.pending
    outbox.put(b"more")  # nothing is queued after an overflow
    assert not outbox.pending and calls == [0]


async def test_a_reader_waits_while_backed_up_and_resumes_once_drained() -> None:
    outbox = Outbox(max_bytes=1000, coalesce=True)
    outbox.put(b"z" * 600)
    assert outbox.backed_up
    waiter = asyncio.create_task(outbox.wait_drained())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    outbox.take()
    await asyncio.wait_for(waiter, 1)
    outbox.put(b"z" * 600)
    waiter = asyncio.create_task(outbox.wait_drained())
    await asyncio.sleep(0.01)
    outbox.close()  # closing releases the reader too
    await asyncio.wait_for(waiter, 1)


async def test_close_drains_then_ends() -> None:
    outbox = Outbox(max_bytes=100, coalesce=True)
    outbox.put(b"last")
    outbox.close()
    outbox.put(b"ignored")
    assert await outbox.get() == [b"last"]
    assert await outbox.get() == []
