"""The REST API on the gateway's port (PROTOCOL.md section 6): a thin aiohttp adapter
around ``shared.rest``, which holds every rule, schema and encoding.

Routes: ``GET /time``, ``POST``/``GET /channels/{channel}/messages``,
``GET /channels/{channel}/presence``, ``POST /keys/{keyName}/requestToken`` and
``GET /openapi.json``. Publishes go through the same ``MessageBus`` as WebSocket publishes,
history through the history workers, presence through the presence engine.

Every failure answers the protocol's JSON error body (``gateway.http.error_response``),
never aiohttp's plain-text pages: validation 400/40001, credentials 401, capability 403,
NATS not ready 503/50001, backend timeouts and anything unexpected 500/50000, a key's
publish rate exceeded 429/42900 (``RT_REST_PUBLISH_RATE``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from nats.errors import Error as NatsError

from gateway.http import error_response, expect_continue, read_body, refusal_response
from gateway.metrics import METRICS
from gateway.services import GatewayServices
from nats_adapter.requests import RequestTimeout
from realtime_protocol.errors import ErrorCode, ProtocolError
from shared import rest
from shared.capabilities import Operation
from shared.channels import validate_channel
from shared.limits import KeyedBuckets
from shared.logs import RateLimitFilter

__all__ = ["RestApi", "add_rest_routes"]

log = logging.getLogger(__name__)
# Failures come in bursts when NATS is away: one line per interval is enough.
log.addFilter(RateLimitFilter())

_JSON = "application/json"
# A token request body is a clientId, a ttl and a capability: small.
_MAX_TOKEN_REQUEST_BYTES = 16 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    METRICS.sent_bytes.value += len(body)
    return web.Response(status=status, body=body, content_type=_JSON, headers=headers)


def _answering_errors(handler: Handler) -> Handler:
    """Turn every failure of ``handler`` into the protocol's JSON error."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ProtocolError as error:
            return refusal_response(error)
        except HttpProcessingError as error:  # a body cut short or badly chunked
            return error_response(ErrorCode.BAD_FRAME, f"malformed request body: {error.message}")
        except ConnectionError:
            raise  # the client went away: nobody to answer
        except (TimeoutError, RequestTimeout, NatsError) as error:
            log.warning("REST %s %s: backend failed: %r", request.method, request.path, error)
            return error_response(ErrorCode.SERVER, "backend did not answer, retry")
        except Exception:
            log.exception("REST %s %s failed", request.method, request.path)
            return error_response(ErrorCode.SERVER, "internal error")

    return guarded


def _channel(request: web.Request) -> str:
    # aiohttp has percent-decoded the segment (chat%3A1 -> chat:1).
    return validate_channel(request.match_info["channel"])


class RestApi:
    """The REST handlers of one gateway."""

    def __init__(self, services: GatewayServices) -> None:
        self.services = services
        self.limits = services.limits
        self._openapi = orjson.dumps(rest.openapi_document(self.limits))
        settings = services.settings
        # Per API key, on this gateway (None: RT_REST_PUBLISH_RATE=0, no limit).
        self.publish_buckets: KeyedBuckets | None = None
        if settings.rest_publish_rate > 0:
            self.publish_buckets = KeyedBuckets(
                settings.rest_publish_rate, settings.rest_publish_burst
            )

    def _caller(self, request: web.Request) -> rest.Caller:
        try:
            return rest.authenticate(self.services.keyring, request.headers.get(hdrs.AUTHORIZATION))
        except ProtocolError as error:
            METRICS.auth_failure(int(error.code))
            raise

    def _require_ready(self) -> None:
        if not self.services.is_ready:
            raise ProtocolError(ErrorCode.BOOTSTRAP, "message backend not ready, retry later")

    async def time(self, request: web.Request) -> web.Response:
        """``GET /time``: ``[<ms>]``, no auth."""
        return _json(rest.encode_time(time.time_ns() // 1_000_000))

    async def openapi(self, request: web.Request) -> web.Response:
        """``GET /openapi.json``: the OpenAPI document of these routes, no auth."""
        return _json(self._openapi)

    async def publish(self, request: web.Request) -> web.Response:
        """``POST /channels/{channel}/messages``: one message or one atomic batch."""
        received = time.perf_counter()
        caller = self._caller(request)
        channel = _channel(request)
        identity = caller.identity
        identity.capability.check(Operation.PUBLISH, channel)
        # The frame limit of a WebSocket publish: the same message fits either way.
        body = await read_body(request, self.limits.max_frame_bytes)
        METRICS.received_bytes.value += len(body)
        message = rest.decode_publish(body, channel, caller, self.limits)
        self._require_ready()
        if self.publish_buckets is not None:
            refusal = rest.publish_refusal(self.publish_buckets, caller, message)
            if refusal is not None:
                error, wait_s = refusal
                return refusal_response(error, {hdrs.RETRY_AFTER: str(wait_s)})
        try:
            serial = await self.services.broker.publish(identity.app, message)
        except (ProtocolError, TimeoutError, RequestTimeout, NatsError):
            METRICS.publish_errors.inc()
            raise  # answered by _answering_errors
        METRICS.published[message.ephemeral].inc(len(message.members) or 1)
        METRICS.publish_ack.observe(time.perf_counter() - received)
        return _json(rest.encode_publish_result(message, serial), status=201)

    async def history(self, request: web.Request) -> web.Response:
        """``GET /channels/{channel}/messages``: one page, ``Link`` to the next."""
        caller = self._caller(request)
        channel = _channel(request)
        identity = caller.identity
        identity.capability.check(Operation.HISTORY, channel)
        params = rest.decode_history_params(request.query)
        self._require_ready()
        result = await self.services.history.query(
            rest.history_query(identity.app, channel, params)
        )
        body, link = rest.history_page(channel, params, result)
        return _json(body, headers={hdrs.LINK: link} if link else None)

    async def presence(self, request: web.Request) -> web.Response:
        """``GET /channels/{channel}/presence``: the current members, one page."""
        caller = self._caller(request)
        channel = _channel(request)
        identity = caller.identity
        # Reading members is what presSub does: presence or subscribe (section 9, item 11).
        identity.capability.allows_any((Operation.PRESENCE, Operation.SUBSCRIBE), channel, 0)
        params = rest.decode_presence_params(request.query)
        self._require_ready()
        records = await self.services.presence.members(identity.app, channel)
        return _json(rest.presence_page(records, params))

    async def request_token(self, request: web.Request) -> web.Response:
        """``POST /keys/{keyName}/requestToken``: a token minted from the key."""
        caller = self._caller(request)
        body = await read_body(request, _MAX_TOKEN_REQUEST_BYTES)
        METRICS.received_bytes.value += len(body)
        token_request = rest.decode_token_request(body)
        details = rest.grant_token(
            self.services.keyring, caller, request.match_info["keyName"], token_request, time.time()
        )
        return _json(details)


def _method_not_allowed(allowed: list[str]) -> Handler:
    allow = ", ".join(allowed)

    async def handler(request: web.Request) -> web.Response:
        response = error_response(
            ErrorCode.NOT_FOUND, f"{request.method} is not allowed here (use {allow})", 405
        )
        response.headers[hdrs.ALLOW] = allow
        return response

    return handler


def _websocket_first(handler: Handler, websocket: Handler) -> Handler:
    """``handler``, except that a WebSocket upgrade goes to ``websocket``: upgrades are
    accepted on every path (PROTOCOL.md section 9, item 1), these included."""

    async def route(request: web.Request) -> web.StreamResponse:
        if request.headers.get(hdrs.UPGRADE, "").lower() == "websocket":
            return await websocket(request)
        return await handler(request)

    return route


def add_rest_routes(app: web.Application, services: GatewayServices, websocket: Handler) -> None:
    """Register the REST routes on ``app`` (before its catch-all route); ``websocket``
    serves upgrades that arrive on these paths."""
    api = RestApi(services)
    routes: dict[str, dict[str, Handler]] = {
        "/time": {hdrs.METH_GET: api.time},
        "/openapi.json": {hdrs.METH_GET: api.openapi},
        "/channels/{channel}/messages": {
            hdrs.METH_POST: _answering_errors(api.publish),
            hdrs.METH_GET: _answering_errors(api.history),
        },
        "/channels/{channel}/presence": {hdrs.METH_GET: _answering_errors(api.presence)},
        "/keys/{keyName}/requestToken": {hdrs.METH_POST: _answering_errors(api.request_token)},
    }
    for path, handlers in routes.items():
        resource = app.router.add_resource(path)
        for method, handler in handlers.items():
            resource.add_route(
                method, _websocket_first(handler, websocket), expect_handler=expect_continue
            )
            if method == hdrs.METH_GET:
                resource.add_route(hdrs.METH_HEAD, handler, expect_handler=expect_continue)
        # Any other method is answered 405 with Allow, not the catch-all's 404 (a route for
        # any method is matched after the others). A preflight OPTIONS never gets there:
        # the CORS middleware answers it first.
        allowed = sorted(handlers) + ([hdrs.METH_HEAD] if hdrs.METH_GET in handlers else [])
        resource.add_route(
            hdrs.METH_ANY, _method_not_allowed(allowed), expect_handler=expect_continue
        )
