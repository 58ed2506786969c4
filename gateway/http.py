"""What the HTTP adapters (long-polling, REST) share: errors in the protocol's JSON shape
(docs/PROTOCOL.md 6.6) and bounded request bodies."""

from __future__ import annotations

import orjson
from aiohttp import HttpVersion11, hdrs, web

from gateway.metrics import METRICS
from realtime_protocol.errors import ErrorCode, ProtocolError, http_status_for
from shared.limits import Limit

__all__ = [
    "error_response",
    "expect_continue",
    "read_body",
    "refusal_response",
]


def error_response(code: ErrorCode, message: str, status: int | None = None) -> web.Response:
    """``{"error": {"message", "code", "statusCode"}}`` with the HTTP status for ``code``
    (or ``status``, where a transport fixes it, such as long-polling's 410)."""
    status = http_status_for(code) if status is None else status
    body = {"error": {"message": message, "code": int(code), "statusCode": status}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def refusal_response(error: ProtocolError, headers: dict[str, str] | None = None) -> web.Response:
    """``error_response`` for ``error``, counted when a limit refused the request."""
    if error.limit is not None:
        METRICS.rate_limited[error.limit].inc()
    response = error_response(error.code, error.message)
    if headers:
        response.headers.update(headers)
    return response


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body; ``ProtocolError`` 40001 as soon as it passes ``limit`` bytes (a
    declared length is checked first, chunked bodies as they arrive), so an oversized body
    is never buffered whole."""
    too_large = ProtocolError(
        ErrorCode.BAD_FRAME, f"body larger than {limit} bytes", limit=Limit.MESSAGE_SIZE
    )
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    body = bytearray()
    try:
        async for chunk in request.content.iter_any():
            body += chunk
            if len(body) > limit:
                raise too_large
    except ConnectionError:
        # The client left mid-body: an answer nobody reads, not a traceback (test_floods.py).
        raise ProtocolError(ErrorCode.BAD_FRAME, "connection lost while reading the body") from None
    return bytes(body)


async def expect_continue(request: web.Request) -> None:
    """The ``Expect`` handler of every route: aiohttp's default, except that an unknown value
    is refused (417) without being echoed. aiohttp formats it into the 417's text, and a
    value with bytes that are not ASCII then fails to encode: a 500 and a traceback (found by
    tests/integration/test_floods.py's handshake fuzzing)."""
    if request.version != HttpVersion11:
        return
    if request.headers.get(hdrs.EXPECT, "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        # Not part of the response's own size (aiohttp does the same).
        request.writer.output_size = 0
        return
    raise web.HTTPExpectationFailed(text="unknown Expect header")
