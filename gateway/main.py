"""Running one gateway process: HTTP/WebSocket server plus its NATS connection."""

from __future__ import annotations

import asyncio
import gc
import logging
import time

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gateway.app import LONG_POLL, create_app
from gateway.connection import Connection
from gateway.drain import drain_connections
from gateway.guard import ConnectionGuard
from gateway.metrics import METRICS
from gateway.services import GatewayServices
from shared.logs import RateLimitFilter
from shared.session import CLOSE_GOING_AWAY
from shared.settings import Settings

__all__ = ["run_gateway"]

log = logging.getLogger(__name__)

_SHUTDOWN_GRACE_S = 2.0
_GC_THRESHOLD_YOUNG = 50_000
# A full collection once more connections ended than are open now, and at least this many
# (checked every _GC_CHECK_S), or after _GC_IDLE_S when fewer did
# (gateway.main._collect_after_closes).
_GC_AFTER_CLOSES = 1_000
_GC_CHECK_S = 2.0
_GC_IDLE_S = 60.0


class _OneLineBadRequests(logging.Filter):
    """aiohttp logs a malformed request (bad request line, bad headers) with a ten-line
    traceback; the peer caused it, so one line with the reason is all an operator needs
    (and the handlers' rate limit keeps a flood of them to one line per interval)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            record.msg = "malformed HTTP request: %s"
            record.args = (" ".join(str(error).split())[:200],)
            record.exc_info = None
            record.exc_text = None
        return True


async def drain(services: GatewayServices) -> None:
    """Stop taking connections and close the open ones spread over ``RT_DRAIN_S``
    (``gateway.drain``); ``/readyz`` answers 503 from the first instant."""
    services.draining = True
    METRICS.draining.set(1)
    settings = services.settings
    registry = services.registry
    started = time.monotonic()
    log.info(
        "draining: /readyz answers 503, %d connections close over %.1fs",
        len(registry),
        settings.drain_s,
    )

    def open_connections() -> list[Connection]:
        return [c for c in registry.connections.values() if isinstance(c, Connection)]

    # A publish in flight ends within a NATS request timeout (stored, or answered 50000).
    closed = await drain_connections(open_connections, settings.drain_s, settings.request_timeout_s)
    log.info("drained %d connections in %.1fs", closed, time.monotonic() - started)


async def _collect_after_closes(services: GatewayServices) -> None:
    """A full collection once more connections have gone than are open now (and at least
    ``_GC_AFTER_CLOSES``), or every ``_GC_IDLE_S`` when any have. A closed connection is a
    reference cycle (its Connection, Session, outbox, aiohttp's request and the tracebacks
    of aiohttp's end-of-stream exceptions, about 12 KiB), which only a full collection
    frees, and the thresholds above make those rare: 10,000 connections coming and going
    left ~120 MiB behind each time (tests/integration/test_floods.py). A collection costs
    time in proportion to the live heap, which grows with the open connections; waiting
    for as many closes as there are open connections keeps its cost per closed connection
    constant (a fixed 1,000 cost 17% of a gateway's CPU in a 10,000-client reconnect
    storm, bench/reconnect.py) and the garbage at most the size of the live connections."""
    collected_at = 0  # services.finished_connections at the last collection
    idle_rounds = 0
    while True:
        await asyncio.sleep(_GC_CHECK_S)
        idle_rounds += 1
        gone = services.finished_connections - collected_at
        enough = max(_GC_AFTER_CLOSES, len(services.registry))
        if gone >= enough or (gone and idle_rounds * _GC_CHECK_S >= _GC_IDLE_S):
            gc.collect()
            collected_at = services.finished_connections
            idle_rounds = 0


async def run_gateway(settings: Settings, stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set, then drain (``drain``) and exit; if cancelled instead,
    close every connection with 1001 at once."""
    # Malformed requests come from peers at will, and aiohttp logs them at debug level:
    # one short line, rate-limited even there.
    server_log = logging.getLogger("aiohttp.server")
    server_log.addFilter(_OneLineBadRequests())
    server_log.addFilter(RateLimitFilter(min_level=logging.DEBUG))
    services = GatewayServices.create(settings)
    services.broker.start()
    presence = asyncio.create_task(services.presence.start(), name="presence")
    keys = asyncio.create_task(services.keys.start(), name="keys") if services.keys else None
    guard = ConnectionGuard(settings.header_timeout_s, settings.max_connections_per_address)
    app = create_app(services)
    app.middlewares.append(guard.middleware)
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=_SHUTDOWN_GRACE_S,
    )
    await runner.setup()
    server = runner.server
    assert server is not None  # set by setup()
    # What web.TCPSite.start does, with the guard in front of aiohttp's protocol factory. A
    # deep accept queue: reconnect storms (a gateway restart, a network blip) arrive at once.
    listener = await asyncio.get_running_loop().create_server(
        guard.protocols(server),
        settings.host,
        settings.port,
        reuse_address=True,
        backlog=4096,
    )
    # Long-lived objects (modules, settings, the app) need no cyclic GC scans; and a fan-out
    # allocates many short-lived objects, so collect young generations less often: full
    # collections were the main source of multi-millisecond delivery stalls.
    gc.freeze()
    gc.set_threshold(_GC_THRESHOLD_YOUNG, 20, 100)
    collector = asyncio.create_task(_collect_after_closes(services), name="gc")
    log.info(
        "gateway listening on ws://%s:%d (%d API keys)",
        settings.host,
        settings.port,
        len(services.keyring),
    )
    try:
        await stop.wait()
        await drain(services)
    finally:
        for connection in list(services.registry.connections.values()):
            connection.close(CLOSE_GOING_AWAY, "server shutting down")
        await app[LONG_POLL].close_all()
        await asyncio.sleep(0.1)  # let writers flush their close frames
        listener.close()  # no new connections while the open ones are shut down
        await runner.cleanup()
        # Before NATS goes: delete our heartbeat once no membership can come back here.
        await services.presence.stop()
        presence.cancel()
        collector.cancel()
        if keys is not None:
            keys.cancel()
        await services.broker.close()
