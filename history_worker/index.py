"""Where each recent message of a channel sits in the stream, learnt from live traffic.

The stream holds every channel, so a quiet channel's messages are spread over all of it and
reading them with one forward scan (``next_by_subj``) walks the whole stream: 20 ms and
more per page at a million messages. Knowing each message's stream sequence turns a page
into independent lookups by sequence, which cost the same for quiet and busy channels.

The worker learns the sequences from the stream's republished live messages (which carry
``Nats-Sequence`` and our serial). What it has not seen (before it started, or a gap when it
fell behind) it does not claim to know: a channel's index is a list of contiguous runs, and a
page is served from the index only when one run covers it; otherwise it is read the slow way.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict

__all__ = ["SequenceIndex"]


class _Run:
    """Stream sequences of the contiguous serials ``first_serial``, ``first_serial + 1``..."""

    __slots__ = ("first_serial", "sequences")

    def __init__(self, first_serial: int) -> None:
        self.first_serial = first_serial
        self.sequences = array("Q")

    @property
    def end(self) -> int:
        """One past the last serial of the run."""
        return self.first_serial + len(self.sequences)


class SequenceIndex:
    """Stream sequences of the newest ``per_channel`` serials of channels, at most
    ``max_entries`` in all (8 bytes each, so 64 MB by default; the least recently written
    channels are forgotten first). The total is the real bound; the per-channel cap only keeps
    one runaway channel from evicting all the others."""

    def __init__(self, per_channel: int = 1_000_000, max_entries: int = 8_000_000) -> None:
        self.per_channel = per_channel
        self.max_entries = max_entries
        self._channels: OrderedDict[str, list[_Run]] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self._total = 0

    def __len__(self) -> int:
        return len(self._channels)

    def record(self, subject: str, serial: int, sequence: int) -> None:
        """Note that ``serial`` of the channel ``subject`` is at stream ``sequence``."""
        runs = self._channels.get(subject)
        if runs is None:
            runs = self._channels[subject] = []
            self._sizes[subject] = 0
        else:
            self._channels.move_to_end(subject)
        if runs and serial < runs[-1].end:
            return  # a replayed or duplicate delivery: already known
        if not runs or serial != runs[-1].end:
            runs.append(_Run(serial))  # first sight, or a gap: a new run
        runs[-1].sequences.append(sequence)
        self._sizes[subject] += 1
        self._total += 1
        excess = self._sizes[subject] - self.per_channel
        if excess > self.per_channel // 4:
            self._trim(subject, runs, excess)
        while self._total > self.max_entries and len(self._channels) > 1:
            oldest, _ = self._channels.popitem(last=False)
            self._total -= self._sizes.pop(oldest)

    def _trim(self, subject: str, runs: list[_Run], count: int) -> None:
        """Drop the ``count`` oldest entries of a channel."""
        while count > 0 and runs:
            run = runs[0]
            if len(run.sequences) <= count:
                count -= len(run.sequences)
                self._sizes[subject] -= len(run.sequences)
                self._total -= len(run.sequences)
                runs.pop(0)
            else:
                del run.sequences[:count]
                run.first_serial += count
                self._sizes[subject] -= count
                self._total -= count
                count = 0

    def sequences(self, subject: str, first: int, last: int) -> list[int] | None:
        """Sequences of serials ``first..last``, or ``None`` unless one run has them all."""
        for run in reversed(self._channels.get(subject, ())):
            if run.first_serial <= first and last < run.end:
                offset = run.first_serial
                return list(run.sequences[first - offset : last - offset + 1])
        return None

    def forget(self, subject: str) -> None:
        """Drop what is known of a channel (a lookup found it stale)."""
        if self._channels.pop(subject, None) is not None:
            self._total -= self._sizes.pop(subject)
