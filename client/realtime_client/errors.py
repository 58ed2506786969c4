"""Errors the client raises: every one is a ``RealtimeError`` carrying a protocol code."""

from __future__ import annotations

from realtime_protocol.errors import ErrorCode

__all__ = [
    "ConnectionClosedError",
    "QueueOverflowError",
    "RealtimeError",
    "RestError",
    "is_auth_error",
    "is_capability_error",
]


class RealtimeError(Exception):
    """A failure with a protocol error code (docs/PROTOCOL.md section 7.2).

    ``code`` is the server's code when the server refused something (``err`` frames, REST
    error bodies) and a client-side code otherwise (50000 for local failures such as a closed
    connection). ``status_code`` is the HTTP status for REST errors, else the status that the
    protocol maps the code to.
    """

    def __init__(self, message: str, code: int = ErrorCode.SERVER, status_code: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.code = int(code)
        self.status_code = status_code or _status_for(self.code)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, code={self.code})"


class ConnectionClosedError(RealtimeError):
    """The request could not complete: the connection dropped, was closed, or failed.

    Publishes are not failed by a dropped connection (they are resent, exactly once, after the
    reconnect); only ``close()``, ``suspend()`` and a ``failed`` connection fail them.
    """


class QueueOverflowError(RealtimeError):
    """A subscription's bounded queue filled up because its reader fell behind; messages
    after the ones already read were dropped."""


class RestError(RealtimeError):
    """A REST call failed; ``status_code`` is the HTTP status of the answer."""


def is_capability_error(error: BaseException) -> bool:
    """True for the 40300..40399 refusals, which the SDKs treat as terminal for a channel."""
    return isinstance(error, RealtimeError) and 40300 <= error.code < 40400


def is_auth_error(code: int) -> bool:
    """True for the handshake codes that mean the credential itself is bad or expired."""
    return code in (ErrorCode.BAD_AUTH, ErrorCode.AUTH_EXPIRED)


def _status_for(code: int) -> int:
    hundreds = code // 100
    return hundreds if 400 <= hundreds < 600 else 500
