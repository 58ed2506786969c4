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
    """Requests over one NATS connection, replies routed by a per-request number."""

    def __init__(self, nc: NatsClient) -> None:
        self._nc = nc
        self._prefix = nc.new_inbox() + "."
        self._numbers = itertools.count(1)
        self._waiting: dict[str, asyncio.Future[Msg]] = {}
        self._subscription: Subscription | None = None

    async def start(self) -> None:
        """Subscribe to the reply subjects."""
        self._subscription = await self._nc.subscribe(self._prefix + "*", cb=self._on_reply)

    async def _on_reply(self, msg: Msg) -> None:
        future = self._waiting.pop(msg.subject[len(self._prefix) :], None)
        if future is not None and not future.done():
            future.set_result(msg)

    async def request(
        self,
        subject: str,
        payload: bytes,
        timeout: float,  # noqa: ASYNC109 - one timer per request is the point of this class
        headers: dict[str, Any] | None = None,
    ) -> Msg:
        """Publish ``payload`` to ``subject`` and wait for the reply."""
        token = str(next(self._numbers))
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Msg] = loop.create_future()
        self._waiting[token] = future
        timer = loop.call_later(timeout, _expire, future)
        try:
            await self._nc.publish(subject, payload, reply=self._prefix + token, headers=headers)
            return await future
        finally:
            timer.cancel()
            self._waiting.pop(token, None)


def _expire(future: asyncio.Future[Msg]) -> None:
    if not future.done():
        future.set_exception(RequestTimeout())
