"""NATS subject names. Every channel subject is scoped by app slug, so apps never meet.

A channel name is one subject token (its characters exclude '.', '*', '>' and spaces) and so
is an app slug (checked when keys are parsed).
"""

from __future__ import annotations

__all__ = [
    "HISTORY_QUEUE",
    "HISTORY_SUBJECT",
    "LIVE_PREFIX",
    "LIVE_WILDCARD",
    "SERIAL_HEADER",
    "STORED_PREFIX",
    "TAIL_PREFIX",
    "live_subject",
    "stored_subject",
    "stream_subjects",
    "tail_subject",
    "tails_stream",
]

PREFIX = "rt"

HISTORY_SUBJECT = f"{PREFIX}.rpc.history"
"""Request/reply subject of the history workers (``hist`` and ``fetch``)."""

HISTORY_QUEUE = "history-workers"

SERIAL_HEADER = "Rt-Serial"
"""Header carrying a stored message's per-channel serial (set at publish, kept by the stream
and by its republish)."""


STORED_PREFIX = f"{PREFIX}.msg."
LIVE_PREFIX = f"{PREFIX}.live."
LIVE_WILDCARD = f"{LIVE_PREFIX}>"
TAIL_PREFIX = f"{PREFIX}.tail."


def stored_subject(app: str, channel: str) -> str:
    """Subject a durable publish goes to; the stream captures ``rt.msg.>``."""
    return f"{STORED_PREFIX}{app}.{channel}"


def live_subject(app: str, channel: str) -> str:
    """Subject of live delivery: the stream republishes stored messages here, and ephemeral
    messages are published here directly (they are never stored)."""
    return f"{LIVE_PREFIX}{app}.{channel}"


def stream_subjects() -> tuple[str, str]:
    """(stream subjects, republish destination) for the message stream."""
    return f"{PREFIX}.msg.>", f"{PREFIX}.live.>"


def tail_subject(app: str, channel: str) -> str:
    """Subject of a channel's last stored message in the tails stream, which keeps it after
    retention has removed it from the message stream (so serials never restart)."""
    return f"{TAIL_PREFIX}{app}.{channel}"


def tails_stream(message_stream: str) -> str:
    """Name of the tails stream that belongs to ``message_stream``."""
    return f"{message_stream}_TAILS"
