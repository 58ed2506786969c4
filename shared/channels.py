"""Channel name rules (PROTOCOL.md section 7.1)."""

from __future__ import annotations

import re

from realtime_protocol.errors import ErrorCode, ProtocolError

__all__ = ["MAX_CHANNEL_LENGTH", "is_valid_channel", "validate_channel"]

MAX_CHANNEL_LENGTH = 255

# ASCII letters, digits, ':', '-', '_'; never starts with ':'. These characters are also all
# legal inside one NATS subject token, which is why a channel maps to a single token.
_CHANNEL = re.compile(r"[A-Za-z0-9\-_][A-Za-z0-9:\-_]{0,254}")


def is_valid_channel(channel: str) -> bool:
    """Tell whether ``channel`` is a legal channel name."""
    return _CHANNEL.fullmatch(channel) is not None


def validate_channel(channel: str, request_id: int = 0) -> str:
    """Return ``channel`` unchanged, or raise ``ProtocolError`` 40001 naming the problem."""
    if is_valid_channel(channel):
        return channel
    if not channel:
        reason = "channel name is empty"
    elif len(channel) > MAX_CHANNEL_LENGTH:
        reason = f"channel name is longer than {MAX_CHANNEL_LENGTH} characters"
    elif channel.startswith(":"):
        reason = "channel name must not start with ':'"
    else:
        reason = "channel name may only contain A-Z a-z 0-9 ':' '-' '_'"
    raise ProtocolError(
        ErrorCode.BAD_FRAME, f"invalid channel {channel[:64]!r}: {reason}", request_id
    )
