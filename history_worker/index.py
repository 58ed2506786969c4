"""Where each recent message of a channel sits in the stream, learnt from live traffic.

The stream holds every channel, so a quiet channel's messages are spread over all of it and
reading them with one forward scan (``next_by_subj``) walks the whole stream: 20 ms and
more per page at a million messages. Knowing each message's stream sequence turns a page
into independent lookups by sequence, which cost the same for quiet and busy channels.

The worker learns the sequences from the stream's republished live messages (which carry
``Nats-Sequence`` and our serial). What it has not seen (before it started, or a gap) it does
not claim to know, and such a page is read the slow way.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict

__all__ = ["SequenceIndex"]


class _Channel:
    __slots__ = ("first_serial", "sequences")

    def __init__(self, first_serial: int) -> None:
        self.first_serial = first_serial
        self.sequences = array("Q")


class SequenceIndex:
    """Stream sequences of the newest ``per_channel`` serials of channels, at most
    ``max_entries`` in all (8 bytes each; the least recently written channels are forgotten
    first). The default per channel matches the default retention, so every retained message
    of a channel can be indexed; the default total is 64 MB."""

    def __init__(self, per_channel: int = 10_000, max_entries: int = 8_000_000) -> None:
        self.per_channel = per_channel
        self.max_entries = max_entries
        self._entries: OrderedDict[str, _Channel] = OrderedDict()
        self._total = 0

    def __len__(self) -> int:
        return len(self._entries)

    def record(self, subject: str, serial: int, sequence: int) -> None:
        """Note that ``serial`` of the channel ``subject`` is at stream ``sequence``."""
        entry = self._entries.get(subject)
        if entry is None or serial != entry.first_serial + len(entry.sequences):
            if entry is not None and serial < entry.first_serial + len(entry.sequences):
                return  # a replayed or duplicate delivery: already known
            # New channel, or a gap (we missed messages): start over from here.
            if entry is not None:
                self._total -= len(entry.sequences)
            entry = _Channel(serial)
            self._entries[subject] = entry
        else:
            self._entries.move_to_end(subject)
        entry.sequences.append(sequence)
        self._total += 1
        excess = len(entry.sequences) - self.per_channel
        if excess > self.per_channel // 4:
            del entry.sequences[:excess]
            entry.first_serial += excess
            self._total -= excess
        while self._total > self.max_entries and len(self._entries) > 1:
            _, forgotten = self._entries.popitem(last=False)
            self._total -= len(forgotten.sequences)

    def sequences(self, subject: str, first: int, last: int) -> list[int] | None:
        """Sequences of serials ``first..last``, or ``None`` unless all are known."""
        entry = self._entries.get(subject)
        if entry is None or first < entry.first_serial:
            return None
        end = last - entry.first_serial + 1
        if end > len(entry.sequences):
            return None
        return list(entry.sequences[first - entry.first_serial : end])

    def forget(self, subject: str) -> None:
        """Drop what is known of a channel (a lookup found it stale)."""
        entry = self._entries.pop(subject, None)
        if entry is not None:
            self._total -= len(entry.sequences)
