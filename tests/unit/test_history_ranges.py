"""Serial range arithmetic of hist, fetch and resume (PROTOCOL.md 3.5 to 3.7)."""

from __future__ import annotations

from shared.history import SerialRange, fetch_range, history_range, resume_range


def test_history_pages_backward() -> None:
    assert history_range(1, 10, 0, 3) == SerialRange(8, 10, True)
    assert history_range(1, 10, 8, 3) == SerialRange(5, 7, True)
    assert history_range(1, 10, 3, 5) == SerialRange(1, 2, False)
    assert history_range(5, 10, 0, 100) == SerialRange(5, 10, False)
    assert history_range(0, 0, 0, 10).count == 0
    assert history_range(5, 10, 5, 10).count == 0


def test_fetch_and_resume() -> None:
    assert fetch_range(1, 10, 7, 100) == SerialRange(8, 10, True)
    assert fetch_range(1, 10, 10, 100) == SerialRange(1, 0, True)
    assert fetch_range(1, 10, 12, 100) == SerialRange(1, 0, True)
    assert fetch_range(5, 10, 3, 100) == SerialRange(1, 0, False)
    assert fetch_range(5, 10, 4, 100) == SerialRange(5, 10, True)
    assert fetch_range(1, 10, 0, 4) == SerialRange(1, 4, True)
    assert resume_range(1, 10, 12, 100) == SerialRange(1, 0, False)
    assert resume_range(1, 10, 10, 100) == SerialRange(1, 0, True)
