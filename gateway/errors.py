"""HTTP errors in the protocol's JSON shape (docs/PROTOCOL.md 6.6), for every HTTP route."""

from __future__ import annotations

import orjson
from aiohttp import web

from shared.errors import ErrorCode, http_status_for

__all__ = ["error_response"]


def error_response(code: ErrorCode, message: str, status: int | None = None) -> web.Response:
    """``{"error": {"message", "code", "statusCode"}}`` with the HTTP status for ``code``
    (or ``status``, where a transport fixes it, such as long-polling's 410)."""
    status = http_status_for(code) if status is None else status
    body = {"error": {"message": message, "code": int(code), "statusCode": status}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")
