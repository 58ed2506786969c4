"""The bounded, coalescing outbox."""

from __future__ import annotations

from gateway.outbox import Outbox


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
    outbox = Outbox(max_bytes=10, coalesce=True)
    assert outbox.offer(b"12345678")
    assert not outbox.offer(b"123")
    outbox.put(b"reply")
    assert outbox.dropped == 1 and not outbox.overflowed
    outbox.put(b"x" * 10)
    assert outbox.overflowed


async def test_close_drains_then_ends() -> None:
    outbox = Outbox(max_bytes=100, coalesce=True)
    outbox.put(b"last")
    outbox.close()
    outbox.put(b"ignored")
    assert await outbox.get() == [b"last"]
    assert await outbox.get() == []
