"""Resume gating, without I/O (PROTOCOL.md 3.5): what a resuming ``sub`` holds back, where
its replay starts, and what is released after it.

The adapter subscribes first and holds the channel's live records, replays what the client
missed in pages, then releases the held records the replay did not already cover, then acks
with ``resumed``: the client sees every serial after its cursor once, in order.
"""

from __future__ import annotations

from typing import Generic, TypeVar

__all__ = ["ReplayGate", "replay_start"]

Item = TypeVar("Item")


class ReplayGate(Generic[Item]):
    """Live records of one channel held while its replay is read; bounded, because a long
    replay of a busy channel must not hold unbounded memory (what does not fit is dropped
    and the client heals the gap with ``fetch``, like any overflow)."""

    __slots__ = ("_held", "capacity", "dropped")

    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self.dropped = 0
        self._held: list[tuple[int, Item]] = []

    def hold(self, serial: int, item: Item) -> None:
        """Keep ``item`` (serial 0: an ephemeral message) until the replay is done."""
        if len(self._held) < self.capacity:
            self._held.append((serial, item))
        else:
            self.dropped += 1

    def release(self, last_sent: int) -> list[Item]:
        """The held items to send after a replay that ended at ``last_sent``, in arrival
        order: ephemeral ones and those newer than the replay."""
        held, self._held = self._held, []
        return [item for serial, item in held if serial == 0 or serial > last_sent]


def replay_start(
    last_serial: int, first_replayed: int, newest: int, resumed: bool, max_records: int
) -> int | None:
    """The serial a replay continues from (the last one the client has), or ``None`` when
    the answer is ``resumed:false`` with nothing replayed.

    ``last_serial`` is the client's cursor (0 for a legacy message-id cursor, which the first
    page resolved: ``first_replayed`` is the serial of its first message, 0 if none);
    ``newest`` the channel's newest serial; ``resumed`` the first page's flag. A client more
    than ``max_records`` behind is not replayed to: it starts afresh."""
    if not resumed:
        return None
    if last_serial:
        cursor = last_serial
    elif first_replayed:
        cursor = first_replayed - 1
    else:
        cursor = newest
    if newest - cursor > max_records:
        return None
    return cursor
