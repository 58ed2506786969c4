"""Reconnect back-off: exponential, capped, with jitter.

The SDKs wait ``min(initial * 2**attempt, maximum)`` with no jitter, so every client that
lost the same gateway comes back at the same instants. This client spreads each delay
uniformly over ``[(1 - jitter) * delay, delay]``: never longer than the SDK would wait, and
reconnect storms are smeared over half of each step by default.
"""

from __future__ import annotations

import random

__all__ = ["Backoff"]


class Backoff:
    """Delays (seconds) between reconnect attempts; ``reset()`` after a successful connect."""

    def __init__(
        self,
        initial: float = 1.0,
        maximum: float = 30.0,
        jitter: float = 0.5,
        generator: random.Random | None = None,
    ) -> None:
        if initial <= 0 or maximum < initial:
            raise ValueError("back-off needs 0 < initial <= maximum")
        if not 0.0 <= jitter <= 1.0:
            raise ValueError("jitter must be within [0, 1]")
        self.initial = initial
        self.maximum = maximum
        self.jitter = jitter
        self.attempt = 0
        self._random = generator or random.Random()

    def ceiling(self, attempt: int) -> float:
        """The un-jittered delay before attempt number ``attempt`` (0-based): the SDK's."""
        # min() before the power would overflow for very long outages.
        return min(self.initial * 2.0 ** min(attempt, 64), self.maximum)

    def next(self) -> float:
        """The delay before the next attempt; advances the attempt counter."""
        ceiling = self.ceiling(self.attempt)
        self.attempt += 1
        return ceiling * (1.0 - self.jitter * self._random.random())

    def reset(self) -> None:
        """Start again from ``initial`` (called once a connection is established)."""
        self.attempt = 0
