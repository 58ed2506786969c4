"""Connecting to NATS with the options both services use, and retrying until it works."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import nats
from nats.aio.client import Client as NatsClient

from shared.settings import Settings

__all__ = ["connect", "connect_with_back_off"]

log = logging.getLogger(__name__)

_FIRST_RETRY_S = 0.2
_LONGEST_RETRY_S = 5.0
# A connection whose server stopped answering (a partition, a paused or wedged node) is
# given up after this many unanswered pings this often, and the client reconnects to another
# node. nats-py's defaults (2 minutes, 2 pings) left a gateway whose node was partitioned
# away stuck for 6 minutes, publishes failing and /readyz still 200 (issue 14's fault suite,
# docs/GUARANTEES.md); with these it moves within about 8 s.
_PING_INTERVAL_S = 2
_MAX_OUTSTANDING_PINGS = 3


async def connect(
    settings: Settings,
    name: str,
    error_cb: Callable[[Exception], Awaitable[None]] | None = None,
    disconnected_cb: Callable[[], Awaitable[None]] | None = None,
    reconnected_cb: Callable[[], Awaitable[None]] | None = None,
) -> NatsClient:
    """One connection attempt to ``settings.nats_urls``; once connected the client
    reconnects by itself forever (every 0.5 s), as a service must."""
    callbacks: dict[str, object] = {
        key: value
        for key, value in (
            ("error_cb", error_cb),
            ("disconnected_cb", disconnected_cb),
            ("reconnected_cb", reconnected_cb),
        )
        if value is not None
    }
    client: NatsClient = await nats.connect(
        servers=settings.nats_urls,
        name=name,
        connect_timeout=2,
        allow_reconnect=True,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        ping_interval=_PING_INTERVAL_S,
        max_outstanding_pings=_MAX_OUTSTANDING_PINGS,
        **callbacks,
    )
    return client


async def connect_with_back_off(settings: Settings, name: str) -> NatsClient:
    """``connect``, retried with exponential back-off (0.2 s doubling to 5 s) until NATS
    answers; each failure is logged once."""
    delay = _FIRST_RETRY_S
    while True:
        try:
            return await connect(settings, name)
        except Exception as error:
            log.warning("NATS not reachable (%s); retrying in %.1fs", error, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _LONGEST_RETRY_S)
