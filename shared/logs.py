"""Process-wide logging setup: one line per event, to stderr."""

from __future__ import annotations

import logging

__all__ = ["configure_logging"]


def configure_logging(level: str) -> None:
    """Log at ``level`` (a name such as ``INFO``) with timestamps and the logger name."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    # nats-py logs every reconnect attempt at ERROR; our own retry loop reports it once.
    logging.getLogger("nats.aio.client").setLevel(logging.CRITICAL)
