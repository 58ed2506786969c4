"""Per-connection publish order through store failures (gateway/broker.py, issue 14): the
fence that refuses a client's later publishes on a channel until it resent the ones that
failed. The store is replaced by a script, so no NATS is needed; the fault suite proves the
same end to end (tests/faults)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway import broker as broker_module
from gateway.broker import Broker
from realtime_protocol.errors import ErrorCode, ProtocolError
from realtime_protocol.frames import Message
from shared.settings import Settings


class ScriptedBroker(Broker):
    """A broker whose stores succeed or fail as told, recording what was stored."""

    def __init__(self) -> None:
        super().__init__(Settings())
        self.failing: set[str] = set()  # message ids whose store fails
        self.stored: list[str] = []
        self.gate: asyncio.Event | None = None  # when set, stores wait for it

    def client(self) -> Any:
        return object()

    async def _store(self, subject: str, payload: bytes, message_dedup_id: str) -> int:
        if self.gate is not None:
            await self.gate.wait()
        message_id = message_dedup_id.rsplit("\x1f", 1)[-1]
        if message_id in self.failing:
            raise ProtocolError(ErrorCode.SERVER, "publish not stored")
        self.stored.append(message_id)
        return len(self.stored)


def message(message_id: str, client_id: str = "alice", channel: str = "room") -> Message:
    return Message(channel, "n", b"1", message_id, client_id, 0)


async def test_a_later_publish_of_the_client_is_refused_until_the_failed_one_is_resent() -> None:
    broker = ScriptedBroker()
    broker.failing.add("m1")
    with pytest.raises(ProtocolError):
        await broker.publish("app", message("m1"))
    # m2 was sent before the client heard of m1's failure: stored now, it would overtake m1.
    with pytest.raises(ProtocolError, match="resend it first"):
        await broker.publish("app", message("m2"))
    # Another client, and another channel of this client, are not held.
    assert await broker.publish("app", message("x1", client_id="bob")) == 1
    assert await broker.publish("app", message("y1", channel="other")) == 2
    broker.failing.clear()
    # The client resends in order: m1 passes the fence, then m2.
    assert await broker.publish("app", message("m1")) == 3
    assert await broker.publish("app", message("m2")) == 4
    assert broker.stored == ["x1", "y1", "m1", "m2"]


async def test_what_was_queued_behind_a_failed_store_fails_and_is_fenced() -> None:
    broker = ScriptedBroker()
    broker.failing.add("m1")
    broker.gate = asyncio.Event()
    first = asyncio.create_task(broker.publish("app", message("m1")))
    await asyncio.sleep(0)
    queued = asyncio.create_task(broker.publish("app", message("m2")))
    await asyncio.sleep(0)
    broker.gate.set()
    for task in (first, queued):
        with pytest.raises(ProtocolError):
            await task
    broker.failing.clear()
    # m3 (new) is refused while m1 and m2 are not resent; resending them lifts the fence.
    with pytest.raises(ProtocolError, match="resend it first"):
        await broker.publish("app", message("m3"))
    assert await broker.publish("app", message("m1")) == 1
    assert await broker.publish("app", message("m2")) == 2
    assert await broker.publish("app", message("m3")) == 3


async def test_the_fence_ends_by_itself_for_a_client_that_never_resends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(broker_module, "_FENCE_S", 0.05)
    broker = ScriptedBroker()
    broker.failing.add("m1")
    with pytest.raises(ProtocolError):
        await broker.publish("app", message("m1"))
    await asyncio.sleep(0.1)
    assert await broker.publish("app", message("m2")) == 1


async def test_nats_not_ready_is_a_failure_like_any_other() -> None:
    broker = ScriptedBroker()

    def not_ready() -> Any:
        raise ProtocolError(ErrorCode.BOOTSTRAP, "message backend not ready, retry later")

    broker.client = not_ready  # type: ignore[method-assign]
    with pytest.raises(ProtocolError):
        await broker.publish("app", message("m1"))
    del broker.client  # NATS is back
    with pytest.raises(ProtocolError, match="resend it first"):
        await broker.publish("app", message("m2"))
    assert await broker.publish("app", message("m1")) == 1
