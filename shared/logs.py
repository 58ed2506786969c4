"""Process-wide logging setup: one line per event, to stderr, and never a flood.

Lines are plain text, or with ``RT_LOG_FORMAT=json`` one JSON object each (for log
collectors that index fields instead of parsing text).

Anything a client can trigger at will (a malformed HTTP request, a failing request) is logged
through a rate limit: the first occurrence of a message template is written, repeats within
the interval are counted and reported with the next one that gets through.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

__all__ = ["JsonFormatter", "RateLimitFilter", "configure_logging"]

_TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

_DEFAULT_INTERVAL_S = 10.0


class RateLimitFilter(logging.Filter):
    """Passes a message template at most once per ``interval_s`` (per logger); counts the
    rest and says how many were suppressed when it next passes one. Records below
    ``min_level`` (debug output, asked for on purpose) pass untouched."""

    def __init__(
        self, interval_s: float = _DEFAULT_INTERVAL_S, min_level: int = logging.INFO
    ) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.min_level = min_level
        self._last: dict[tuple[str, str], float] = {}
        self._suppressed: dict[tuple[str, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        """Decide whether ``record`` is written (a logging.Filter hook)."""
        if record.levelno < self.min_level:
            return True  # debug output is asked for, one line per event, on purpose
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


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object on one line: ``time`` (ISO-8601, UTC), ``level``,
    ``logger``, ``message``, and ``exception`` (the traceback text) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON line (a logging.Formatter hook)."""
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # ASCII escapes keep every line writable whatever a client put into a message (lone
        # surrogates from undecodable bytes included); newlines are escaped, so one line.
        return json.dumps(entry)


def configure_logging(level: str, format: str = "text") -> None:
    """Log at ``level`` (a name such as ``INFO``) to stderr, as ``format``: ``text`` (timestamp,
    level, logger name, message) or ``json`` (see ``JsonFormatter``); else ``ValueError``."""
    formatters: dict[str, Callable[[], logging.Formatter]] = {
        "text": lambda: logging.Formatter(_TEXT_FORMAT),
        "json": JsonFormatter,
    }
    make_formatter = formatters.get(format.lower())
    if make_formatter is None:
        raise ValueError(f"log format {format!r}: expected text or json")
    stream = logging.StreamHandler()
    stream.setFormatter(make_formatter())
    logging.basicConfig(level=level.upper(), handlers=[stream])
    # nats-py logs every reconnect attempt at ERROR; our own retry loop reports it once.
    logging.getLogger("nats.aio.client").setLevel(logging.CRITICAL)
    # On the handlers, so that every logger's records pass through one rate limit.
    limit = RateLimitFilter()
    for handler in logging.getLogger().handlers:
        handler.addFilter(limit)
