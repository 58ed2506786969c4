"""The gateway's aiohttp application: WebSocket on any path, health, readiness and metrics
on one port (the SDK derives its long-polling and REST URLs from the WebSocket endpoint)."""

from __future__ import annotations

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.cors import Cors
from gateway.http import error_response, expect_continue
from gateway.longpoll import LongPollSessions
from gateway.metrics import METRICS
from gateway.rest import add_rest_routes
from gateway.services import GatewayServices
from gateway.websocket import serve_websocket
from gateway.websocket_writer import FlushScheduler
from realtime_protocol.errors import ErrorCode

__all__ = ["LONG_POLL", "SERVICES", "create_app", "error_response"]

SERVICES = web.AppKey("services", GatewayServices)
WRITE_SCHEDULER = web.AppKey("write_scheduler", FlushScheduler)
LONG_POLL = web.AppKey("long_poll", LongPollSessions)


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process serves HTTP."""
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    """Readiness: 200 only while NATS is connected, the streams and buckets exist and the key
    registry is loaded, and the gateway is not draining."""
    services = request.app[SERVICES]
    if services.draining:
        return web.Response(status=503, text="draining\n")
    if services.is_ready:
        return web.Response(text="ready\n")
    return web.Response(status=503, text="NATS or the key registry not ready\n")


async def metrics(request: web.Request) -> web.Response:
    """Prometheus exposition; gauges whose value lives elsewhere are read now."""
    services = request.app[SERVICES]
    METRICS.channels.set(len(services.router))
    METRICS.subscriptions.set(services.router.subscription_count())
    METRICS.presence_members.set(services.presence.member_count())
    METRICS.nats_connected.set(1 if services.broker.is_ready else 0)
    METRICS.draining.set(1 if services.draining else 0)
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


# Long-poll requests of a session still open: its keep-alive connection stays until the
# drain reaches the session (closing it would send the next poll, through the load
# balancer, to another gateway at once, and every session would move in the same second).
_SESSION_PATHS = frozenset(("/lp/send", "/lp/poll"))


def _closing_connections_while_draining(services: GatewayServices) -> Middleware:
    """While draining, answer HTTP requests with ``Connection: close``, so that a client's
    next request opens a new connection, which the load balancer sends to a ready gateway
    (keep-alive would bring REST callers and refused connects back here until the exit)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        if (
            services.draining
            and not response.prepared  # a WebSocket: its own close is the drain's
            and not (request.path in _SESSION_PATHS and response.status == 200)
        ):
            response.force_close()
        return response

    return middleware


async def root(request: web.Request) -> web.StreamResponse:
    """WebSocket upgrades on any path (PROTOCOL.md section 9, item 1); 404 otherwise."""
    if request.headers.get(hdrs.UPGRADE, "").lower() == "websocket":
        return await serve_websocket(request, request.app[SERVICES], request.app[WRITE_SCHEDULER])
    return error_response(ErrorCode.NOT_FOUND, f"no route {request.method} {request.path}")


def create_app(services: GatewayServices) -> web.Application:
    """Build the application around ``services``."""
    app = web.Application(
        middlewares=[
            Cors(services.settings.cors_origins).middleware,
            _closing_connections_while_draining(services),
        ]
    )
    app[SERVICES] = services
    app[WRITE_SCHEDULER] = FlushScheduler()
    long_poll = app[LONG_POLL] = LongPollSessions(services)
    long_poll.add_routes(app)
    app.router.add_get("/healthz", healthz, expect_handler=expect_continue)
    app.router.add_get("/readyz", readyz, expect_handler=expect_continue)
    app.router.add_get("/metrics", metrics, expect_handler=expect_continue)
    add_rest_routes(app, services, root)
    app.router.add_route("*", "/{tail:.*}", root, expect_handler=expect_continue)
    return app
