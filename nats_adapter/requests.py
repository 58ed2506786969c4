"""A lean NATS request/reply multiplexer for the publish hot path.

nats-py's ``request`` draws a random token from the OS for every call and wraps each wait in
``asyncio.wait_for``; profiling the gateway under publish load put both among its top costs.
This keeps one wildcard reply subscription, numbers requests with a counter and times out
with one timer per request.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

__all__ = ["ReplyMux", "RequestTimeout"]


class RequestTimeout(Exception):
    """No reply arrived in time."""


class ReplyMux:
    """Requests over one NATS connection, replies routed by a per-request number.

    Timeouts are enforced by one sweep every ``SWEEP_S`` rather than a timer per request
    (a timer per request showed up at 6% of the gateway's CPU under publish load), so a
    request may outlive its timeout by up to one sweep.
    """

    SWEEP_S = 0.05

    def __init__(self, nc: NatsClient) -> None:
        self._nc = nc
        self._prefix = nc.new_inbox() + "."
        self._numbers = itertools.count(1)
        self._waiting: dict[str, tuple[asyncio.Future[Msg], float]] = {}
        self._subscription: Subscription | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Subscribe to the reply subjects and start expiring late requests."""
        self._subscription = await self._nc.subscribe(self._prefix + "*", cb=self._on_reply)
        self._sweeper = asyncio.create_task(self._sweep())

    async def _on_reply(self, msg: Msg) -> None:
        waiting = self._waiting.pop(msg.subject[len(self._prefix) :], None)
        if waiting is not None and not waiting[0].done():
            waiting[0].set_result(msg)

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.SWEEP_S)
            now = loop.time()
            # Oldest first (dicts keep insertion order); with the one timeout everybody uses,
            # deadlines grow along the dict, so the scan stops at the first live request.
            expired = []
            for token, (_, deadline) in self._waiting.items():
                if deadline >= now:
                    break
                expired.append(token)
            for token in expired:
                future, _ = self._waiting.pop(token)
                if not future.done():
                    future.set_exception(RequestTimeout())

    async def request(
        self,
        subject: str,
        payload: bytes,
        timeout: float,  # noqa: ASYNC109 - enforced by the sweep, see the class docstring
        headers: dict[str, Any] | None = None,
    ) -> Msg:
        """Publish ``payload`` to ``subject`` and wait for the reply."""
        token = str(next(self._numbers))
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Msg] = loop.create_future()
        self._waiting[token] = (future, loop.time() + timeout)
        try:
            await self._nc.publish(subject, payload, reply=self._prefix + token, headers=headers)
            return await future
        finally:
            self._waiting.pop(token, None)
