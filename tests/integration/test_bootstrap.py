"""Gateways wait for NATS: not ready, clients told 50001, then ready once NATS appears."""

from __future__ import annotations

import asyncio
import time

from realtime_client import ConnectionState, Realtime, RealtimeError
from tests.support import (
    APP_KEY,
    JsonClient,
    free_port,
    http_status,
    start_nats,
    start_service,
    wait_for_port,
    wait_ready,
)


async def test_gateway_retries_until_nats_is_up() -> None:
    nats_port = free_port()
    gateways = [start_service("gateway", f"nats://127.0.0.1:{nats_port}") for _ in range(2)]
    nats = None
    clients: list[Realtime] = []
    try:
        for gateway in gateways:
            wait_for_port(gateway.port)
            assert http_status(f"{gateway.http}/healthz") == 200
            assert http_status(f"{gateway.http}/readyz") == 503
        client = await JsonClient.connect(gateways[0].url)
        reply = await client.auth(key="app1.main:secret-one")
        assert reply["t"] == "err" and reply["code"] == 50001, reply
        await client.close()
        # The Python client takes 50001 for what it is (not an auth error): it retries.
        early = Realtime(
            key=APP_KEY,
            endpoint=gateways[0].url,
            initial_reconnect_delay=0.1,
            max_reconnect_delay=0.5,
        )
        clients.append(early)
        connecting = asyncio.ensure_future(early.connect())
        refused = await early.connection.wait_for(ConnectionState.DISCONNECTED, timeout=5)
        assert isinstance(refused.reason, RealtimeError) and refused.reason.code == 50001

        nats = start_nats(nats_port)
        started = time.monotonic()
        # Both gateways bootstrap the same stream and bucket at once.
        for gateway in gateways:
            wait_ready(gateway.port, timeout=15)
        print(f"ready {time.monotonic() - started:.2f}s after NATS started")
        await asyncio.wait_for(connecting, 10)
        late = Realtime(key=APP_KEY, endpoint=gateways[1].url)
        clients.append(late)
        messages = await early.channels.get("boot").stream()
        assert await late.channels.get("boot").publish("n", 1) == 1
        assert (await messages.get(timeout=5)).data == 1
    finally:
        await asyncio.gather(*(client.close() for client in clients))
        for gateway in gateways:
            gateway.stop()
        if nats is not None:
            nats.stop()


async def test_gateway_refuses_to_start_without_keys() -> None:
    gateway = start_service("gateway", "nats://127.0.0.1:1", env={"RT_API_KEYS": ""})
    code = await asyncio.to_thread(gateway.process.wait, 10)
    assert code == 2
    assert "no API key configured" in gateway.log()
