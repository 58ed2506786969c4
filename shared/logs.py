"""Process-wide logging setup: one line per event, to stderr, and never a flood.

Anything a client can trigger at will (a malformed HTTP request, a failing request) is logged
through a rate limit: the first occurrence of a message template is written, repeats within
the interval are counted and reported with the next one that gets through.
"""

from __future__ import annotations

import logging
import time

__all__ = ["RateLimitFilter", "configure_logging"]

_DEFAULT_INTERVAL_S = 10.0


class RateLimitFilter(logging.Filter):
    """Passes a message template at most once per ``interval_s`` (per logger); counts the
    rest and says how many were suppressed when it next passes one."""

    def __init__(self, interval_s: float = _DEFAULT_INTERVAL_S) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._last: dict[tuple[str, str], float] = {}
        self._suppressed: dict[tuple[str, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        """Decide whether ``record`` is written (a logging.Filter hook)."""
        key = (record.name, str(record.msg))
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        if len(self._last) > 1000:  # templates are few; never let the table grow unbounded
            self._last.clear()
        self._last[key] = now
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            record.msg = f"{record.msg} ({suppressed} similar suppressed)"
        return True


def configure_logging(level: str) -> None:
    """Log at ``level`` (a name such as ``INFO``) with timestamps and the logger name."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    # nats-py logs every reconnect attempt at ERROR; our own retry loop reports it once.
    logging.getLogger("nats.aio.client").setLevel(logging.CRITICAL)
    # On the handlers, so that every logger's records pass through one rate limit.
    limit = RateLimitFilter()
    for handler in logging.getLogger().handlers:
        handler.addFilter(limit)
