"""Prometheus metrics of a history worker, served on its own port (``RT_METRICS_PORT``).

The worker has a registry of its own, not prometheus_client's global one: ``realtime dev``
runs a gateway and a worker in one process, and both export ``realtime_nats_connected``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from shared.history import HistoryOp

__all__ = ["WorkerMetrics", "serve_metrics"]

log = logging.getLogger(__name__)

# A page is ~2.5 ms when the index covers it, ~20 ms when it must search (docs/DESIGN.md).
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class WorkerMetrics:
    """The worker's metric families, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        requests = Counter(
            "realtime_history_worker_requests",
            "History queries answered (errors included), by op",
            ["op"],
            registry=self.registry,
        )
        # Bound once: a query costs a dict lookup, no label lookup.
        self.requests = {op: requests.labels(op.value) for op in HistoryOp}
        self.unknown_requests = requests.labels("unknown")
        self.seconds = Histogram(
            "realtime_history_worker_request_seconds",
            "From a query received to its answer published",
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.errors = Counter(
            "realtime_history_worker_errors",
            "Queries answered with an error (bad query, failed read, reply too large)",
            registry=self.registry,
        )
        self.nats_connected = Gauge(
            "realtime_nats_connected", "1 while connected to NATS", registry=self.registry
        )

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)


async def serve_metrics(
    metrics: WorkerMetrics, host: str, port: int, nats_connected: Callable[[], bool]
) -> web.AppRunner | None:
    """Serve ``/metrics`` (and ``/healthz``, ``/readyz`` for probes) on ``host:port``;
    return the runner to clean up, or None when ``port`` is 0 or cannot be bound (logged:
    queries matter more than their metrics, so the worker goes on without them)."""
    if port <= 0:
        return None

    async def exposition(request: web.Request) -> web.Response:
        metrics.nats_connected.set(1 if nats_connected() else 0)
        return web.Response(
            body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        if nats_connected():
            return web.Response(text="ready\n")
        return web.Response(status=503, text="NATS not connected\n")

    app = web.Application()
    app.router.add_get("/metrics", exposition)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_address=True).start()
    except OSError as error:
        log.error("history worker metrics not served on %s:%d: %s", host, port, error)
        await runner.cleanup()
        return None
    log.info("history worker metrics on http://%s:%d/metrics", host, port)
    return runner
