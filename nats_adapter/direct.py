"""JetStream direct gets (``$JS.API.DIRECT.GET.<stream>``): reading stored messages by
sequence or subject without a consumer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from realtime_protocol.errors import ErrorCode, ProtocolError

__all__ = ["DirectBatch", "Requester", "direct_api", "direct_batch", "direct_get"]

Requester = Callable[[str, bytes, float], Awaitable[Msg]]
"""Sends one request (subject, payload, timeout) and returns the reply: the gateway's
multiplexer or a plain ``nc.request``."""


def direct_api(stream: str) -> str:
    """The direct-get API subject of ``stream``."""
    return f"$JS.API.DIRECT.GET.{stream}"


async def direct_get(
    send: Requester,
    stream: str,
    timeout: float,  # noqa: ASYNC109 - the requester enforces it
    *,
    subject: str = "",
    request: dict[str, object] | None = None,
) -> Msg | None:
    """One direct get: the last message on ``subject`` or what ``request`` selects (by
    ``seq`` / ``next_by_subj``). None when nothing matches; any other status is
    ``ProtocolError`` 50000 (a timeout is the requester's to raise)."""
    api = direct_api(stream)
    if request is None:
        reply = await send(f"{api}.{subject}", b"", timeout)
    else:
        reply = await send(api, orjson.dumps(request), timeout)
    status = reply.headers.get("Status") if reply.headers else None
    if status == "404":
        return None
    if status:
        raise ProtocolError(ErrorCode.SERVER, f"stream read failed: status {status}")
    return reply


class DirectBatch:
    """What one batched direct get returned: the messages, how many more match after them
    (``Nats-Num-Pending`` of the end-of-batch status; a batch can come back short because it
    hit a byte cap, so a short batch alone does not mean the end) and the last sequence."""

    __slots__ = ("last_sequence", "messages", "pending")

    def __init__(self, messages: list[Msg], pending: int, last_sequence: int) -> None:
        self.messages = messages
        self.pending = pending
        self.last_sequence = last_sequence


async def direct_batch(
    nc: NatsClient, stream: str, request: dict[str, object], wait_s: float
) -> DirectBatch:
    """One batched direct get (``request`` holds ``seq``/``next_by_subj``/``batch`` and
    perhaps ``max_bytes``). Nothing matching is an empty batch; any other status, or no
    end of batch within ``wait_s``, is ``ProtocolError`` 50000."""
    found: list[Msg] = []
    inbox = nc.new_inbox()
    done: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()

    async def on_reply(msg: Msg) -> None:
        headers = msg.headers or {}
        status = headers.get("Status")
        if status is None:
            found.append(msg)
        elif not done.done():
            if status in ("204", "404"):  # end of batch, or nothing from that sequence on
                done.set_result(
                    (
                        int(headers.get("Nats-Num-Pending", 0) or 0),
                        int(headers.get("Nats-Last-Sequence", 0) or 0),
                    )
                )
            else:
                done.set_exception(
                    ProtocolError(ErrorCode.SERVER, f"stream read failed: status {status}")
                )

    subscription = await nc.subscribe(inbox, cb=on_reply)
    try:
        await nc.publish(direct_api(stream), orjson.dumps(request), reply=inbox)
        try:
            pending, last = await asyncio.wait_for(done, wait_s)
        except TimeoutError:
            raise ProtocolError(ErrorCode.SERVER, "stream read timed out") from None
    finally:
        with contextlib.suppress(Exception):
            await subscription.unsubscribe()
    return DirectBatch(found, pending, last)
