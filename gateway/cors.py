"""CORS for the HTTP routes (long-polling and REST), so a page on another origin can use
them (docs/PROTOCOL.md section 9, item 28).

A browser sends a preflight ``OPTIONS`` before any long-poll request (its content type and
the ``foony-lp-session`` header are not "simple") and before REST calls that carry an
``Authorization`` header; without an answer, and without ``foony-lp-session`` exposed, it
hides the session token and every connect fails. WebSocket upgrades are not subject to
CORS and pass through untouched.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web

from shared.settings import split_list

__all__ = ["ALLOWED_HEADERS", "EXPOSED_HEADERS", "Cors"]

ALLOWED_HEADERS = "authorization, content-type, foony-lp-session"
EXPOSED_HEADERS = "foony-lp-session, link"
_ALLOWED_METHODS = "GET, POST, OPTIONS"
# Browsers cap this (Chromium at 2 h); 10 min saves most preflights of a busy page.
_PREFLIGHT_MAX_AGE_S = "600"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Cors:
    """Answers preflights and adds the CORS headers to every HTTP response.

    ``origins`` is ``RT_CORS_ORIGINS``: ``*`` (the default) allows any origin; otherwise a
    comma-separated list of exact origins (``https://app.example.com``), and requests from
    any other origin get no CORS headers, so the browser refuses them.
    """

    def __init__(self, origins: str) -> None:
        listed = split_list(origins)
        self.any_origin = "*" in listed
        self.origins = frozenset(listed)

    def allow_origin(self, origin: str) -> str | None:
        """The ``Access-Control-Allow-Origin`` value for ``origin``, None if refused."""
        if self.any_origin:
            return "*"
        return origin if origin in self.origins else None

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """The aiohttp middleware."""
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is None or request.headers.get(hdrs.UPGRADE, "").lower() == "websocket":
            return await handler(request)
        allowed = self.allow_origin(origin)
        if request.method == hdrs.METH_OPTIONS and hdrs.ACCESS_CONTROL_REQUEST_METHOD in (
            request.headers
        ):
            if allowed is None:
                return web.Response(status=403, text="origin not allowed\n")
            return web.Response(
                status=204,
                headers={
                    hdrs.ACCESS_CONTROL_ALLOW_ORIGIN: allowed,
                    hdrs.ACCESS_CONTROL_ALLOW_METHODS: _ALLOWED_METHODS,
                    hdrs.ACCESS_CONTROL_ALLOW_HEADERS: ALLOWED_HEADERS,
                    hdrs.ACCESS_CONTROL_MAX_AGE: _PREFLIGHT_MAX_AGE_S,
                    hdrs.VARY: "Origin",
                },
            )
        try:
            response = await handler(request)
        except web.HTTPException as error:  # aiohttp's own (413 and the like): headers too
            response = error
        if allowed is not None and not response.prepared:
            response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = allowed
            response.headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = EXPOSED_HEADERS
            response.headers[hdrs.VARY] = "Origin"
        if isinstance(response, web.HTTPException):
            raise response
        return response
