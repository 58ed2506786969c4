"""Log rate limiting: what a client can trigger at will must not flood the log."""

from __future__ import annotations

import logging

from shared.logs import RateLimitFilter


def record(message: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("gateway.x", logging.INFO, __file__, 1, message, args, None)


def test_a_template_passes_once_per_interval_then_reports_what_it_suppressed() -> None:
    limit = RateLimitFilter(interval_s=3600)
    assert limit.filter(record("bad request from %s", "a"))
    assert not any(limit.filter(record("bad request from %s", str(n))) for n in range(50))
    assert limit.filter(record("another message"))  # templates are limited separately
    limit.interval_s = 0
    passed = record("bad request from %s", "b")
    assert limit.filter(passed)
    assert "(50 similar suppressed)" in passed.getMessage()
