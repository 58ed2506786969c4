"""Cutting a history page to a byte budget (issue 9): the encoded worker reply must fit in
NATS's max payload."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from history_worker.worker import send_result
from shared import history
from shared.history import (
    HistoryOp,
    HistoryQuery,
    HistoryResult,
    PageCut,
    cut_page,
    encoded_member_size,
)

# The reply is one flag byte, then the members.
OVERHEAD = 1


def test_everything_fits() -> None:
    for op in HistoryOp:
        assert cut_page([10, 10, 10], op, 31, flag=False) == PageCut(0, 3, False)
        assert cut_page([10, 10, 10], op, 31, flag=True) == PageCut(0, 3, True)


def test_hist_keeps_the_newest_that_fit_and_says_more() -> None:
    assert cut_page([10, 10, 10], HistoryOp.HISTORY, 30, flag=False) == PageCut(1, 3, True)
    assert cut_page([10, 10, 10], HistoryOp.HISTORY, 21, flag=False) == PageCut(1, 3, True)
    assert cut_page([10, 10, 10], HistoryOp.HISTORY, 20, flag=False) == PageCut(2, 3, True)
    # An older small member that would fit after a dropped big one is not kept: the page
    # stays contiguous.
    assert cut_page([1, 50, 10], HistoryOp.HISTORY, 30, flag=False) == PageCut(2, 3, True)


def test_fetch_and_resume_keep_the_oldest_prefix_and_their_flag() -> None:
    for op in (HistoryOp.FETCH, HistoryOp.RESUME):
        assert cut_page([10, 10, 10], op, 30, flag=True) == PageCut(0, 2, True)
        assert cut_page([10, 10, 10], op, 30, flag=False) == PageCut(0, 2, False)
        assert cut_page([10, 50, 1], op, 30, flag=True) == PageCut(0, 1, True)


def test_at_least_one_member_when_there_is_one() -> None:
    assert cut_page([100], HistoryOp.HISTORY, 10, flag=False) == PageCut(0, 1, False)
    assert cut_page([5, 100], HistoryOp.HISTORY, 10, flag=False) == PageCut(1, 2, True)
    assert cut_page([100, 5], HistoryOp.FETCH, 10, flag=True) == PageCut(0, 1, True)
    assert cut_page([], HistoryOp.HISTORY, 10, flag=False) == PageCut(0, 0, False)
    assert cut_page([], HistoryOp.FETCH, 10, flag=True) == PageCut(0, 0, True)


def test_encoded_member_size_matches_the_encoding() -> None:
    for length in (0, 1, 127, 128, 16_383, 16_384, 70_000):
        member = b"m" * length
        result = HistoryResult((member,), True)
        assert OVERHEAD + encoded_member_size(member) == len(history.encode_result(result))


@given(
    st.lists(st.integers(min_value=1, max_value=100), max_size=30),
    st.sampled_from(list(HistoryOp)),
    st.integers(min_value=0, max_value=1000),
    st.booleans(),
)
def test_cut_is_contiguous_fits_and_is_maximal(
    sizes: list[int], op: HistoryOp, budget: int, flag: bool
) -> None:
    cut = cut_page(sizes, op, budget, flag)
    kept = sizes[cut.start : cut.stop]
    assert 0 <= cut.start <= cut.stop <= len(sizes)
    if sizes:
        assert kept, "at least one member"
    if len(kept) > 1:
        assert OVERHEAD + sum(kept) <= budget
    if op is HistoryOp.HISTORY:
        assert cut.stop == len(sizes), "hist keeps the newest"
        assert cut.flag == (flag or cut.start > 0)
        if cut.start > 0:
            assert OVERHEAD + sum(sizes[cut.start - 1 :]) > budget, "one more would not fit"
    else:
        assert cut.start == 0, "fetch keeps the oldest"
        assert cut.flag == flag
        if cut.stop < len(sizes):
            assert OVERHEAD + sum(sizes[: cut.stop + 1]) > budget, "one more would not fit"


class FakeNats:
    """Records what the worker publishes; ``max_payload`` as a NATS server announces it."""

    def __init__(self, max_payload: int) -> None:
        self.max_payload = max_payload
        self.published: list[tuple[str, bytes, dict[str, str] | None]] = []

    async def publish(
        self, subject: str, payload: bytes, headers: dict[str, str] | None = None
    ) -> None:
        self.published.append((subject, payload, headers))


async def test_a_reply_above_max_payload_is_an_error_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    query = HistoryQuery(HistoryOp.HISTORY, "app", "chan", limit=10)
    nc = FakeNats(max_payload=100)
    fits = HistoryResult((b"m" * 50,), True, 7)
    await send_result(nc, "inbox.1", query, fits)  # type: ignore[arg-type]
    expected = ("inbox.1", history.encode_result(fits), {history.NEWEST_HEADER: "7"})
    assert nc.published == [expected]

    nc.published.clear()
    with caplog.at_level(logging.ERROR, logger="history_worker.worker"):
        await send_result(nc, "inbox.2", query, HistoryResult((b"m" * 100,), True))  # type: ignore[arg-type]
    [(subject, payload, headers)] = nc.published
    assert subject == "inbox.2" and payload == b""
    assert headers is not None and headers[history.ERROR_HEADER].startswith("50000 ")
    assert "history reply too large" in caplog.text and "app/chan" in caplog.text
