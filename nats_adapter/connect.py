"""Connecting to NATS with the options both services use, and retrying until it works."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import nats
from nats.aio.client import Client as NatsClient

from shared.settings import Settings

__all__ = ["connect", "connect_with_back_off", "flush"]

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
# How long the PING behind a timed-out ``flush`` may wait for its PONG (see ``flush``).
_FLUSH_BACKSTOP_S = 60
# The PINGs of ``flush`` calls that timed out, kept until their PONG (or the backstop).
_late_flushes: set[asyncio.Task[None]] = set()


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


async def flush(client: NatsClient, timeout: float) -> None:  # noqa: ASYNC109 - a NATS flush deadline
    """Wait until the server has processed everything written so far, or raise
    ``nats.errors.FlushTimeoutError`` after ``timeout`` seconds.

    Not ``client.flush(timeout)``: when that times out, nats-py 2.16 cancels the PING's
    future but leaves it queued, and the late PONG then raises InvalidStateError in the read
    loop, which ends it: the connection stops reading until pings declare it stale (found by
    issue 14's fault suite after a 1 s stall of a node). Here the PING keeps waiting in the
    background (up to a minute, far beyond the stale-connection pings), so its PONG is taken
    normally whenever it comes."""
    ping = asyncio.ensure_future(client.flush(timeout=_FLUSH_BACKSTOP_S))
    try:
        await asyncio.wait_for(asyncio.shield(ping), timeout)
    except TimeoutError:
        _late_flushes.add(ping)
        ping.add_done_callback(_forget_late_flush)
        raise nats.errors.FlushTimeoutError from None


def _forget_late_flush(ping: asyncio.Task[None]) -> None:
    _late_flushes.discard(ping)
    if not ping.cancelled():
        ping.exception()  # retrieved: a late failure is expected and already reported
