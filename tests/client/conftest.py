"""Fixtures for the Python client's tests: clients against the session cluster, closed at
the end of each test, and a TCP proxy that can withhold the server's replies."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from realtime_client import Realtime
from tests.support import APP_KEY, Cluster, TcpProxy

ClientFactory = Callable[..., Realtime]


def channel_name(prefix: str = "py") -> str:
    """A channel name no other test uses."""
    return f"{prefix}:{uuid.uuid4().hex[:12]}"


async def until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll ``predicate`` every 10 ms; fail after ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
async def make_client(cluster: Cluster) -> AsyncIterator[ClientFactory]:
    """``make_client(endpoint=..., **options)``: a ``Realtime`` (key auth on gateway A by
    default, quick reconnects) closed after the test."""
    clients: list[Realtime] = []

    def make(**options: Any) -> Realtime:
        if not {"key", "token", "auth_callback"} & options.keys():
            options["key"] = APP_KEY
        options.setdefault("endpoint", cluster.a.url)
        options.setdefault("initial_reconnect_delay", 0.1)
        options.setdefault("max_reconnect_delay", 0.5)
        client = Realtime(**options)
        clients.append(client)
        return client

    yield make
    await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)


@pytest.fixture
async def proxy(cluster: Cluster) -> AsyncIterator[TcpProxy]:
    """A cuttable proxy in front of gateway A."""
    running = TcpProxy(cluster.a.port)
    await running.start()
    yield running
    await running.close()
