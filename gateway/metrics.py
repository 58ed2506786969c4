"""Prometheus metrics of a gateway, served on ``/metrics``.

Counters are bumped once per batch of work (one fan-out, one publish), never per byte.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

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
        self.errors = Counter("realtime_error_frames", "err frames sent", ["code"])
        self.channels = Gauge("realtime_channels", "Channels with local subscribers")


METRICS = _Metrics()
