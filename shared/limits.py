"""Rate limits without I/O: the token bucket, buckets per key, and the names of every limit.

A ``TokenBucket`` holds up to ``burst`` tokens and gains ``rate`` per second; an action that
costs ``n`` tokens is allowed when the bucket holds ``min(n, burst)``, and then takes all
``n``. So a cost above the burst (a publish batch with more members than the burst) is never
refused for ever: it passes once the bucket is full and leaves it in debt, paid back at
``rate`` before anything else passes. Over any window of ``T`` seconds at most
``burst + largest cost + rate * T`` tokens are spent, however the costs are shaped.

The clock is injected (seconds, monotonic), so every decision can be tested without waiting.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

__all__ = ["KeyedBuckets", "Limit", "TokenBucket"]


class Limit(enum.StrEnum):
    """Every limit a client can run into: the ``limit`` label of the gateway's
    ``realtime_rate_limited_total`` counter (a fixed set, so the label stays bounded)."""

    # Publishes (messages: a batch counts once per member) per second per connection.
    PUBLISH_RATE = "publish_rate"
    # REST publishes (messages) per second per API key, on each gateway.
    REST_PUBLISH_RATE = "rest_publish_rate"
    # Connections (WebSocket and long-poll) of one app on one gateway.
    CONNECTIONS_PER_APP = "connections_per_app"
    # Long-poll sessions of one app on one gateway.
    LONGPOLL_SESSIONS_PER_APP = "longpoll_sessions_per_app"
    # Connections (TCP, and long-poll sessions) from one client address.
    CONNECTIONS_PER_ADDRESS = "connections_per_address"
    # Channels one connection subscribes to or watches the presence of.
    CHANNELS_PER_CONNECTION = "channels_per_connection"
    # Presence members of one channel.
    PRESENCE_MEMBERS = "presence_members"
    # A frame, long-poll record or REST body above the size limit (answered 40001).
    MESSAGE_SIZE = "message_size"
    # A publish batch with too many members (answered 40001).
    BATCH_MEMBERS = "batch_members"
    # Presence data above its size limit (answered 40001).
    PRESENCE_DATA = "presence_data"


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` held (module docstring). Starts full."""

    __slots__ = ("_clock", "_updated", "burst", "rate", "tokens")

    def __init__(
        self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self._clock = clock
        self._updated = clock()

    def _refill(self, now: float) -> None:
        elapsed = now - self._updated
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        # A clock that went backwards (never, with a monotonic one) refills nothing.
        self._updated = max(self._updated, now)

    def take(self, cost: float = 1.0) -> bool:
        """Spend ``cost`` tokens if the bucket holds ``min(cost, burst)``; else change
        nothing and return False (a refused action costs nothing, so a client that keeps
        trying too fast is not locked out for longer)."""
        self._refill(self._clock())
        if self.tokens >= min(cost, self.burst):
            self.tokens -= cost
            return True
        return False

    def retry_after(self, cost: float = 1.0) -> float:
        """Seconds until ``take(cost)`` would pass (0 when it would pass now)."""
        self._refill(self._clock())
        missing = min(cost, self.burst) - self.tokens
        return max(0.0, missing / self.rate)

    @property
    def full(self) -> bool:
        """True when the bucket holds its whole burst (as a new one does)."""
        self._refill(self._clock())
        return self.tokens >= self.burst


class KeyedBuckets:
    """One ``TokenBucket`` per key (an API key name, say), created on first use.

    Buckets that have refilled completely are dropped whenever the map doubles past
    ``prune_above`` entries (a full bucket is exactly what a new one is, so nothing is
    forgotten): keys that come and go (created, revoked) leave nothing behind, at an
    amortised constant cost per call."""

    def __init__(
        self,
        rate: float,
        burst: float,
        clock: Callable[[], float] = time.monotonic,
        prune_above: int = 1024,
    ) -> None:
        TokenBucket(rate, burst, clock)  # validates rate and burst once, here
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self._prune_at = prune_above
        self._prune_above = prune_above

    def __len__(self) -> int:
        return len(self._buckets)

    def bucket(self, key: str) -> TokenBucket:
        """``key``'s bucket (a new, full one for a key not seen lately)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._prune_at:
                self._prune()
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, self._clock)
        return bucket

    def take(self, key: str, cost: float = 1.0) -> bool:
        """``TokenBucket.take`` on ``key``'s bucket."""
        return self.bucket(key).take(cost)

    def _prune(self) -> None:
        self._buckets = {key: bucket for key, bucket in self._buckets.items() if not bucket.full}
        # Next prune when the map has doubled again, so pruning stays amortised O(1).
        self._prune_at = max(self._prune_above, 2 * len(self._buckets))
