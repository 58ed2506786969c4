"""Protocol error codes (PROTOCOL.md section 7.2) and the one exception the core raises."""

from __future__ import annotations

import enum

__all__ = ["ErrorCode", "ProtocolError", "http_status_for"]


class ErrorCode(enum.IntEnum):
    """The error codes the SDKs understand; the SDKs decide retry vs. give up on them."""

    BAD_FRAME = 40001
    BAD_AUTH = 40101
    AUTH_EXPIRED = 40102
    FORBIDDEN = 40300
    CAPABILITY = 40301
    CHANNEL_DENIED = 40302
    NOT_FOUND = 40400
    RATE_LIMITED = 42900
    SERVER = 50000
    BOOTSTRAP = 50001


_HTTP_STATUS = {
    ErrorCode.BAD_FRAME: 400,
    ErrorCode.BAD_AUTH: 401,
    ErrorCode.AUTH_EXPIRED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.CAPABILITY: 403,
    ErrorCode.CHANNEL_DENIED: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.SERVER: 500,
    ErrorCode.BOOTSTRAP: 503,
}


def http_status_for(code: ErrorCode) -> int:
    """Return the HTTP status that carries ``code`` on the REST and long-poll routes."""
    return _HTTP_STATUS[code]


class ProtocolError(Exception):
    """A request or frame broke a protocol rule; becomes an ``err`` frame with ``code``.

    ``request_id`` is the id of the request it answers (0 when the error is not scoped to a
    request, for example an undecodable frame). ``limit`` names the server limit that refused
    the request, if one did (a ``shared.limits.Limit`` value): the gateway counts it
    (``realtime_rate_limited_total``); it never goes on the wire, and clients leave it unset.
    """

    def __init__(
        self, code: ErrorCode, message: str, request_id: int = 0, limit: str | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id
        self.limit = limit

    def __repr__(self) -> str:
        return f"ProtocolError({self.code.value}, {self.message!r}, request_id={self.request_id})"
