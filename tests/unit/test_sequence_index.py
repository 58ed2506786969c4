"""The worker's index of stream sequences by serial."""

from __future__ import annotations

from history_worker.index import SequenceIndex


def test_contiguous_serials_are_indexed() -> None:
    index = SequenceIndex(per_channel=10)
    for serial in range(1, 6):
        index.record("s", serial, 100 + serial * 7)
    assert index.sequences("s", 2, 4) == [114, 121, 128]
    assert index.sequences("s", 4, 6) is None  # serial 6 is not known
    assert index.sequences("other", 1, 1) is None


def test_gap_restarts_and_duplicates_are_ignored() -> None:
    index = SequenceIndex(per_channel=10)
    index.record("s", 1, 10)
    index.record("s", 2, 20)
    index.record("s", 2, 20)  # a duplicate delivery
    assert index.sequences("s", 1, 2) == [10, 20]
    index.record("s", 5, 50)  # we missed 3 and 4: a new run; the old one still answers
    index.record("s", 6, 60)
    assert index.sequences("s", 1, 2) == [10, 20]
    assert index.sequences("s", 5, 6) == [50, 60]
    assert index.sequences("s", 2, 5) is None  # spans the gap


def test_bounded_per_channel_and_in_channels() -> None:
    index = SequenceIndex(per_channel=4, max_entries=8)
    for serial in range(1, 20):
        index.record("s", serial, serial)
    assert index.sequences("s", 19, 19) == [19]
    assert index.sequences("s", 1, 1) is None
    known = index.sequences("s", 16, 19)
    assert known == [16, 17, 18, 19]
    for channel in "abcd":
        index.record(channel, 1, 1)
    index.record("e", 1, 1)  # over 8 entries in all: the least recently written goes
    assert index.sequences("s", 19, 19) is None and index.sequences("e", 1, 1) == [1]
