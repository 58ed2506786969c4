"""The live fan-out when NATS stalls mid-subscribe (issue 14): a ``sub`` whose SUB could not
be flushed is refused, and the subscription it left behind must not keep delivering to the
refused subscriber, or the client's next ``sub`` doubles every message."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import nats
import pytest

from gateway.fanout import ChannelRouter, Delivery
from realtime_protocol import binary_codec
from realtime_protocol.frames import Message
from shared import subjects
from tests.support import start_nats


@dataclass
class _Settings:
    request_timeout_s: float = 1.0


@dataclass
class _Broker:
    """The two things the router asks of the broker: the NATS client and the timeout."""

    connection: nats.NATS
    settings: _Settings = field(default_factory=_Settings)

    def client(self) -> nats.NATS:
        return self.connection


@dataclass(eq=False)
class _Subscriber:
    wants_json: bool = False
    received: list[Delivery] = field(default_factory=list)

    def deliver(self, delivery: Delivery) -> None:
        self.received.append(delivery)


def stop_process(pid: int) -> None:
    """SIGSTOP ``pid`` and return once every one of its threads is stopped: ``kill`` returns
    before a busy multi-threaded process has stopped, and nats-server could still answer
    the PING written right after it (the test then saw no timeout, in two CI runs)."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    tasks = Path(f"/proc/{pid}/task")
    while time.monotonic() < deadline:
        states = []
        for task in tasks.iterdir():
            try:
                states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
            except FileNotFoundError:
                continue  # a thread that just ended
        if states and all(state in ("T", "t") for state in states):
            return
        time.sleep(0.001)
    raise TimeoutError(f"process {pid} did not stop")


async def test_a_subscribe_whose_flush_timed_out_leaves_no_live_subscription() -> None:
    server = start_nats()
    try:
        connection = await nats.connect(server.url, ping_interval=30)
        publisher = await nats.connect(server.url)
        router = ChannelRouter(_Broker(connection))  # type: ignore[arg-type]
        refused = _Subscriber()
        # A stalled server (a long GC pause): the SUB is written but the flush times out.
        stop_process(server.pid)
        try:
            with pytest.raises(nats.errors.TimeoutError):
                await router.add("app1", "stalled", refused)
        finally:
            os.kill(server.pid, signal.SIGCONT)
        assert len(router) == 0
        await connection.flush(timeout=5)
        # The server has now seen the SUB (and, with the fix, the UNSUB after it).
        member = binary_codec.encode_member(Message("stalled", "n", b"1", "m1", "pub", 1))
        await publisher.publish(subjects.live_subject("app1", "stalled"), member)
        await publisher.flush()
        await asyncio.sleep(0.3)
        assert refused.received == [], "a refused subscriber got live messages"
        # Subscribing again works and delivers once.
        again = _Subscriber()
        await router.add("app1", "stalled", again)
        await publisher.publish(subjects.live_subject("app1", "stalled"), member)
        await publisher.flush()
        for _ in range(50):
            if again.received:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        assert len(again.received) == 1 and refused.received == []
        await publisher.close()
        await connection.close()
    finally:
        server.stop()
