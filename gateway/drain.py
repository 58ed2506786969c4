"""Graceful drain of a gateway on SIGTERM (docs/DESIGN.md, "Graceful drain").

A rolling deploy or a scale-down stops gateways with SIGTERM. Closing every client at once
makes them all reconnect in the same second (the SDKs wait 1 s, without jitter) onto the
remaining gateways, and a load balancer still routes new clients to the dying one until it
notices. So, in order:

1. ``/readyz`` answers 503 at once (``GatewayServices.draining``): the load balancer stops
   routing new connections here, while everything already here keeps being served.
2. New WebSocket upgrades and long-poll connects are refused (503, 50001); REST is served.
3. The open connections are closed spread evenly over ``RT_DRAIN_S`` (``close_schedule``).
   Each first waits for its publishes already sent to NATS (bounded), so their acks go out
   before the close. WebSockets close with 1001, long-poll sessions end abnormally (410 on
   the next poll): either way presence keeps the grace period, and the client resumes its
   connection id, channels and memberships on another gateway with no leave or enter.
4. The process exits (``gateway.main``).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Iterable
from typing import Protocol

from shared.session import CLOSE_GOING_AWAY

__all__ = ["TICK_S", "Drainable", "close_schedule", "drain_connections"]

log = logging.getLogger(__name__)

TICK_S = 0.05
"""Closes due within one tick are made together (one timer, not one per connection)."""


class Drainable(Protocol):
    """What a drain needs of a connection."""

    @property
    def is_closing(self) -> bool:
        """True once the connection was asked to close."""

    async def close_settled(self, code: int, reason: str, settle_s: float) -> None:
        """Close once the publishes in flight have their acks queued (at most ``settle_s``)."""


def close_schedule(count: int, window_s: float, tick_s: float = TICK_S) -> list[tuple[float, int]]:
    """When to close ``count`` connections so the closes spread evenly over ``window_s``.

    Returns ``(offset, how many)`` batches, offsets in seconds from the start of the drain,
    ascending, one batch per tick at most: connection ``i`` (from 0) closes at
    ``i * window_s / count`` rounded down to the tick. The first closes at once and the last
    ``window_s / count`` before the end, so the clients come back to the other gateways at
    a steady ``count / window_s`` per second. A window of 0 (or less) closes all at once.
    """
    if count <= 0:
        return []
    if window_s <= 0:
        return [(0.0, count)]
    ticks_per_close = window_s / count / tick_s
    batches: list[tuple[int, int]] = []  # (tick, how many)
    for index in range(count):
        # The epsilon keeps float error from moving a close that is due exactly on a tick
        # boundary into the tick before.
        tick = math.floor(index * ticks_per_close + 1e-9)
        if batches and batches[-1][0] == tick:
            batches[-1] = (tick, batches[-1][1] + 1)
        else:
            batches.append((tick, 1))
    return [(tick * tick_s, how_many) for tick, how_many in batches]


async def drain_connections(
    open_connections: Callable[[], Iterable[Drainable]],
    window_s: float,
    settle_s: float,
    reason: str = "server draining",
) -> int:
    """Close every connection ``open_connections`` lists, spread over ``window_s`` by
    ``close_schedule``, each after at most ``settle_s`` for its publishes in flight; return
    how many were closed. Connections that turn up meanwhile (a handshake that was under way
    when the drain began) are closed at the end."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    targets = [connection for connection in open_connections() if not connection.is_closing]
    closing: set[asyncio.Task[None]] = set()
    # Connections already handed a close (whose task may not have run yet), by identity.
    asked: set[int] = set()

    def close(connection: Drainable) -> None:
        if not connection.is_closing and id(connection) not in asked:
            asked.add(id(connection))
            closing.add(
                asyncio.create_task(connection.close_settled(CLOSE_GOING_AWAY, reason, settle_s))
            )

    position = 0
    for offset, count in close_schedule(len(targets), window_s):
        delay = started + offset - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        for connection in targets[position : position + count]:
            close(connection)
        position += count
    late = [
        connection
        for connection in open_connections()
        if not connection.is_closing and id(connection) not in asked
    ]
    for connection in late:
        close(connection)
    if closing:
        # close_settled is bounded by settle_s; the margin only guards against a bug there.
        await asyncio.wait(closing, timeout=settle_s + 1.0)
    return len(targets) + len(late)
