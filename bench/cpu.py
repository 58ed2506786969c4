"""CPU seconds consumed by processes, from /proc (Linux)."""

from __future__ import annotations

import os

__all__ = ["cpu_seconds"]

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by ``pid`` (0.0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # Fields after the command name: state is [0], utime [11], stime [12].
    return (int(fields[11]) + int(fields[12])) / _TICKS
