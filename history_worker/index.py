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
    """Stream sequences of the newest ``per_channel`` serials of up to ``channels`` channels
    (least recently written channels are forgotten first). 8 bytes per message."""

    def __init__(self, per_channel: int = 1000, channels: int = 100_000) -> None:
        self.per_channel = per_channel
        self.channels = channels
        self._entries: OrderedDict[str, _Channel] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def record(self, subject: str, serial: int, sequence: int) -> None:
        """Note that ``serial`` of the channel ``subject`` is at stream ``sequence``."""
        entry = self._entries.get(subject)
        if entry is None or serial != entry.first_serial + len(entry.sequences):
            if entry is not None and serial < entry.first_serial + len(entry.sequences):
                return  # a replayed or duplicate delivery: already known
            # New channel, or a gap (we missed messages): start over from here.
            entry = _Channel(serial)
            self._entries[subject] = entry
            if len(self._entries) > self.channels:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(subject)
        entry.sequences.append(sequence)
        excess = len(entry.sequences) - self.per_channel
        if excess > self.per_channel // 4:
            del entry.sequences[:excess]
            entry.first_serial += excess

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
        self._entries.pop(subject, None)
