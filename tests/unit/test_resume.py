"""Resume gating decisions (shared/resume.py)."""

from __future__ import annotations

from shared.resume import ReplayGate, replay_start


def test_the_gate_releases_what_the_replay_did_not_cover_in_arrival_order() -> None:
    gate = ReplayGate[str](capacity=4)
    for serial, item in ((5, "a"), (0, "ephemeral"), (7, "b"), (6, "c"), (8, "dropped")):
        gate.hold(serial, item)
    assert gate.dropped == 1
    assert gate.release(last_sent=6) == ["ephemeral", "b"]
    assert gate.release(last_sent=0) == []  # released once


def test_where_a_replay_starts() -> None:
    assert replay_start(10, 0, 50, True, 1000) == 10
    assert replay_start(10, 0, 50, False, 1000) is None  # aged out / unknown cursor
    assert replay_start(10, 0, 50, True, 39) is None  # too far behind
    assert replay_start(10, 0, 50, True, 40) == 10
    assert replay_start(0, 31, 50, True, 1000) == 30  # a message-id cursor, resolved
    assert replay_start(0, 0, 50, True, 1000) == 50  # a message-id cursor at the newest
