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


class HoldingProxy(TcpProxy):
    """A ``TcpProxy`` that can also hold back what the server sends (``hold = True``): the
    client's frames still reach the server, its acks do not reach the client, as when a
    network path dies one way first."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.hold = False

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(
            "127.0.0.1", self.target_port
        )
        self._writers.update((writer, upstream_writer))
        await asyncio.gather(
            self._forward(reader, upstream_writer, held=False),
            self._forward(upstream_reader, writer, held=True),
        )

    async def _forward(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, held: bool
    ) -> None:
        try:
            while data := await source.read(65536):
                if held and self.hold:
                    continue  # dropped: this connection is about to be cut anyway
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            sink.close()


@pytest.fixture
async def proxy(cluster: Cluster) -> AsyncIterator[HoldingProxy]:
    """A cuttable proxy in front of gateway A."""
    running = HoldingProxy(cluster.a.port)
    await running.start()
    yield running
    await running.close()
