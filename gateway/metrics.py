"""Prometheus metrics of a gateway, served on ``/metrics``.

Counters are bumped once per batch of work (one fan-out, one publish), never per byte. Where
a labelled counter is bumped per request (errors, refusals), its children are bound once
here, so the hot path is one dict lookup and an increment, never a label lookup.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from shared.errors import ErrorCode
from shared.limits import Limit

__all__ = ["METRICS"]


class _Metrics:
    """The gateway's metric families, created once per process."""

    def __init__(self) -> None:
        self.connections = Gauge("realtime_connections", "Open client connections", ["transport"])
        self.deliveries = Counter("realtime_deliveries", "Live messages queued to connections")
        self.dropped = Counter(
            "realtime_dropped_deliveries", "Live messages dropped for slow connections"
        )
        self.publishes = Counter("realtime_publishes", "Publishes acked", ["kind"])
        # Bound once: bumped on every acked publish.
        self.published = {
            ephemeral: self.publishes.labels("ephemeral" if ephemeral else "stored")
            for ephemeral in (False, True)
        }
        self.errors = Counter("realtime_error_frames", "err frames sent", ["code"])
        # Every code the service sends, bound up front (codes are a closed set).
        self.error_frames = {int(code): self.errors.labels(str(int(code))) for code in ErrorCode}
        self.channels = Gauge("realtime_channels", "Channels with local subscribers")
        limited = Counter(
            "realtime_rate_limited",
            "Requests and connections refused by a limit (42900; 40001 for sizes), by limit",
            ["limit"],
        )
        # One child per limit, bound now: each is exported (as 0) from the start, and a
        # refusal costs no label lookup.
        self.rate_limited = {limit: limited.labels(limit.value) for limit in Limit}

    def error_frame(self, code: int) -> None:
        """Count one ``err`` frame with ``code``."""
        counter = self.error_frames.get(code)
        if counter is None:  # not a code of ours: a label lookup, off the hot path
            counter = self.errors.labels(str(code))
        counter.inc()


METRICS = _Metrics()
