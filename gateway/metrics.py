"""Prometheus metrics of a gateway, served on ``/metrics`` (every family: docs/METRICS.md).

Cost rules, because a fan-out to 1,000 connections costs ~0.7 us of gateway CPU per delivery
and prometheus_client's ``inc`` (a lock) costs about half that:
- nothing is bumped per delivery: the router counts a fan-out once (``Tally`` += subscribers);
- labelled children are bound once here, so a bump is a dict lookup and an increment, never a
  label lookup;
- the hottest counters (deliveries, bytes, drops) and histograms (publish ack, delivery lag)
  are plain Python numbers (``Tally``, ``FastHistogram``; one event loop thread bumps them,
  so no lock is needed) exported by a collector when scraped;
- values that already exist elsewhere (channels, subscriptions, presence members, NATS
  connected) are read when scraped (``app.metrics``), not maintained on every change.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from realtime_protocol.errors import ErrorCode
from realtime_protocol.frames import PresenceAction
from shared.limits import Limit

__all__ = [
    "ACK_BUCKETS",
    "LAG_BUCKETS",
    "METRICS",
    "PROTOCOLS",
    "TRANSPORTS",
    "FastHistogram",
    "Tally",
]

TRANSPORTS = ("websocket", "long-polling")
PROTOCOLS = ("json", "binary")
# Publish acks are a JetStream round trip (~1 ms on a LAN) plus queueing behind the
# channel's earlier publishes; a store conflict adds a tail read and a back-off.
ACK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Publish-to-fan-out lag spans milliseconds (healthy) to seconds (a backed-up NATS link).
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
HISTORY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Tally:
    """A counter kept as a plain int (``value += n``), exported when scraped: for counts
    bumped on the fan-out path, where a locked increment would be a measurable share."""

    __slots__ = ("documentation", "name", "value")

    def __init__(self, name: str, documentation: str) -> None:
        self.name = name
        self.documentation = documentation
        self.value = 0

    def metric(self) -> Metric:
        """The counter family as Prometheus exposes it (``<name>_total``)."""
        return CounterMetricFamily(self.name, self.documentation, value=self.value)


class FastHistogram:
    """A histogram of plain numbers (bucket counts, sum), exported when scraped: an
    observation is one bisect and two additions, several times cheaper than
    prometheus_client's locked buckets."""

    __slots__ = ("bounds", "counts", "documentation", "name", "total")

    def __init__(self, name: str, documentation: str, bounds: Sequence[float]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = tuple(bounds)
        # One count per bound, plus the +Inf bucket; not cumulative until exported.
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        """Record one observation (Prometheus buckets are ``le``: inclusive upper bounds)."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def metric(self) -> Metric:
        """The histogram family with cumulative ``le`` buckets."""
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
        return HistogramMetricFamily(
            self.name, self.documentation, buckets=buckets, sum_value=self.total
        )


class _PlainCollector(Collector):
    """Exports ``Tally`` and ``FastHistogram`` values to the registry when scraped."""

    def __init__(self, sources: Iterable[Tally | FastHistogram]) -> None:
        self.sources = tuple(sources)

    def collect(self) -> Iterator[Metric]:
        """The current values."""
        for source in self.sources:
            yield source.metric()

    def describe(self) -> Iterator[Metric]:
        """The families (names checked for clashes when registering)."""
        return self.collect()


class _Metrics:
    """The gateway's metric families, created once per process."""

    def __init__(self) -> None:
        # ---- connections ----
        connections = Gauge(
            "realtime_connections",
            "Authenticated client connections, by transport and wire protocol",
            ["transport", "protocol"],
        )
        # Bound once: (transport, is JSON) -> child, bumped at each handshake and close.
        self.connections = {
            (transport, protocol == "json"): connections.labels(transport, protocol)
            for transport in TRANSPORTS
            for protocol in PROTOCOLS
        }
        opened = Counter(
            "realtime_connections_opened",
            "Client connections accepted (WebSocket upgrades, long-poll connects), by transport",
            ["transport"],
        )
        self.opened = {transport: opened.labels(transport) for transport in TRANSPORTS}
        self.auth_failures_family = Counter(
            "realtime_auth_failures",
            "Refused handshakes and REST credentials, by error code",
            ["code"],
        )
        self.auth_failures = {
            int(code): self.auth_failures_family.labels(str(int(code))) for code in ErrorCode
        }
        self.subscriptions = Gauge(
            "realtime_subscriptions", "Channel subscriptions of this gateway's connections"
        )
        self.channels = Gauge("realtime_channels", "Channels with local subscribers")
        # ---- messages ----
        published = Counter(
            "realtime_messages_published",
            "Messages published through this gateway (batch members counted), by kind",
            ["kind"],
        )
        # Bound once: ephemeral -> child, bumped on every acked publish.
        self.published = {
            ephemeral: published.labels("ephemeral" if ephemeral else "stored")
            for ephemeral in (False, True)
        }
        self.publish_errors = Counter(
            "realtime_publish_errors", "Publishes that failed in the backend (answered 5xxxx)"
        )
        self.deliveries = Tally(
            "realtime_messages_delivered", "Live messages queued to connections"
        )
        self.received_bytes = Tally(
            "realtime_received_bytes",
            "Bytes of protocol frames received (WebSocket messages, long-poll and REST bodies)",
        )
        self.sent_bytes = Tally(
            "realtime_sent_bytes",
            "Bytes of protocol frames and REST bodies queued to clients (framing and HTTP "
            "headers excluded)",
        )
        self.publish_ack = FastHistogram(
            "realtime_publish_ack_seconds",
            "From a publish received to its ack queued (or REST answer)",
            ACK_BUCKETS,
        )
        self.delivery_lag = FastHistogram(
            "realtime_delivery_lag_seconds",
            "From a stored message's timestamp to its fan-out on this gateway (once per fan-out)",
            LAG_BUCKETS,
        )
        self.dropped = Tally(
            "realtime_dropped_deliveries",
            "Live messages dropped for connections whose send queue was full",
        )
        self.slow_consumer_disconnects = Counter(
            "realtime_slow_consumer_disconnects",
            "Connections closed because their send queue passed twice the bound (1013)",
        )
        # ---- refusals and errors ----
        limited = Counter(
            "realtime_rate_limited",
            "Requests and connections refused by a limit (42900; 40001 for sizes), by limit",
            ["limit"],
        )
        # One child per limit, bound now: each is exported (as 0) from the start, and a
        # refusal costs no label lookup.
        # Keyed by the limit's name (a str: ProtocolError.limit comes from the protocol package).
        self.rate_limited: dict[str, Counter] = {
            limit.value: limited.labels(limit.value) for limit in Limit
        }
        self.errors = Counter("realtime_error_frames", "err frames sent", ["code"])
        # Every code the service sends, bound up front (codes are a closed set).
        self.error_frames = {int(code): self.errors.labels(str(int(code))) for code in ErrorCode}
        # ---- NATS ----
        self.nats_connected = Gauge(
            "realtime_nats_connected", "1 while connected to NATS with the streams in place"
        )
        self.nats_reconnects = Counter("realtime_nats_reconnects", "Reconnections to NATS")
        # ---- presence ----
        self.presence_members = Gauge(
            "realtime_presence_members", "Presence members of the channels this gateway follows"
        )
        events = Counter(
            "realtime_presence_events",
            "Presence events derived by this gateway (once per change, whatever the watchers)",
            ["action"],
        )
        self.presence_events = {
            action: events.labels(action.name.lower()) for action in PresenceAction
        }
        # ---- history ----
        self.history_seconds = Histogram(
            "realtime_history_request_seconds",
            "History requests to the workers (hist, fetch, resume pages, REST), until answered",
            buckets=HISTORY_BUCKETS,
        )
        self.history_errors = Counter(
            "realtime_history_errors", "History requests unanswered in time or answered an error"
        )
        # ---- lifecycle ----
        self.draining = Gauge("realtime_draining", "1 while the gateway drains (after SIGTERM)")
        REGISTRY.register(
            _PlainCollector(
                (
                    self.deliveries,
                    self.received_bytes,
                    self.sent_bytes,
                    self.dropped,
                    self.publish_ack,
                    self.delivery_lag,
                )
            )
        )

    def error_frame(self, code: int) -> None:
        """Count one ``err`` frame with ``code``."""
        counter = self.error_frames.get(code)
        if counter is None:  # not a code of ours: a label lookup, off the hot path
            counter = self.errors.labels(str(code))
        counter.inc()

    def auth_failure(self, code: int) -> None:
        """Count one refused handshake or REST credential with ``code``."""
        counter = self.auth_failures.get(code)
        if counter is None:
            counter = self.auth_failures_family.labels(str(code))
        counter.inc()


METRICS = _Metrics()
