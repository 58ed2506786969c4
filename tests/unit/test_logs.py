"""Log rate limiting: what a client can trigger at will must not flood the log."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from shared.logs import RateLimitFilter, configure_logging


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


@contextlib.contextmanager
def fresh_root_logger() -> Iterator[None]:
    """The root logger as in a new process (no handlers) while the block runs; pytest's
    handlers and the levels configure_logging changes are put back afterwards."""
    root = logging.getLogger()
    nats_logger = logging.getLogger("nats.aio.client")
    saved = (root.handlers[:], root.level, nats_logger.level)
    root.handlers.clear()
    try:
        yield
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        nats_logger.setLevel(saved[2])


def test_json_logging_writes_one_object_per_line_with_time_level_logger_message(
    capsys: pytest.CaptureFixture[str],
) -> None:
    log = logging.getLogger("gateway.json_test")
    with fresh_root_logger():
        configure_logging("info", "json")
        log.info("hello %s", "world")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("request failed")
        log.debug("below the level")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2  # the traceback stays inside its line
    first, second = (json.loads(line) for line in lines)
    assert first == {
        "time": first["time"],
        "level": "INFO",
        "logger": "gateway.json_test",
        "message": "hello world",
    }
    written = datetime.fromisoformat(first["time"])
    assert written.utcoffset() == timedelta(0)
    assert abs((datetime.now(UTC) - written).total_seconds()) < 60
    assert (second["level"], second["message"]) == ("ERROR", "request failed")
    assert second["exception"].startswith("Traceback")
    assert "RuntimeError: boom" in second["exception"]


def test_json_logging_keeps_the_rate_limit(capsys: pytest.CaptureFixture[str]) -> None:
    log = logging.getLogger("gateway.json_limit_test")
    with fresh_root_logger():
        configure_logging("INFO", "json")
        for attempt in range(5):
            log.warning("bad request from %s", attempt)
    lines = capsys.readouterr().err.splitlines()
    assert [json.loads(line)["message"] for line in lines] == ["bad request from 0"]


def test_an_unknown_log_format_is_refused() -> None:
    with fresh_root_logger():
        with pytest.raises(ValueError, match="'xml'"):
            configure_logging("INFO", "xml")
        assert logging.getLogger().handlers == []


def test_debug_records_pass_untouched_unless_asked() -> None:
    limit = RateLimitFilter(interval_s=3600)
    debug = [
        logging.LogRecord("gateway.x", logging.DEBUG, __file__, 1, "opened %s", (n,), None)
        for n in range(3)
    ]
    assert all(limit.filter(record) for record in debug)
    strict = RateLimitFilter(interval_s=3600, min_level=logging.DEBUG)
    assert [strict.filter(record) for record in debug] == [True, False, False]
