"""Gateways wait for NATS: not ready, clients told 50001, then ready once NATS appears."""

from __future__ import annotations

import asyncio
import time

from tests.support import (
    JsonClient,
    free_port,
    http_status,
    json_client,
    start_nats,
    start_service,
    wait_for_port,
    wait_ready,
)


async def test_gateway_retries_until_nats_is_up() -> None:
    nats_port = free_port()
    gateways = [start_service("gateway", f"nats://127.0.0.1:{nats_port}") for _ in range(2)]
    nats = None
    try:
        for gateway in gateways:
            wait_for_port(gateway.port)
            assert http_status(f"{gateway.http}/healthz") == 200
            assert http_status(f"{gateway.http}/readyz") == 503
        client = await JsonClient.connect(gateways[0].url)
        reply = await client.auth(key="app1.main:secret-one")
        assert reply["t"] == "err" and reply["code"] == 50001, reply
        await client.close()

        nats = start_nats(nats_port)
        started = time.monotonic()
        # Both gateways bootstrap the same stream and bucket at once.
        for gateway in gateways:
            wait_ready(gateway.port, timeout=15)
        print(f"ready {time.monotonic() - started:.2f}s after NATS started")
        clients = [await json_client(g.url) for g in gateways]
        ack = await clients[0].request("sub", channel="boot")
        assert ack["t"] == "ack"
        ack = await clients[1].request("pub", channel="boot", name="n", data=1, messageId="b")
        assert ack["seq"] == 1
        assert (await clients[0].receive_until("msg"))["data"] == 1
        for client in clients:
            await client.close()
    finally:
        for gateway in gateways:
            gateway.stop()
        if nats is not None:
            nats.stop()


async def test_gateway_refuses_to_start_without_keys() -> None:
    gateway = start_service("gateway", "nats://127.0.0.1:1", env={"RT_API_KEYS": ""})
    code = await asyncio.to_thread(gateway.process.wait, 10)
    assert code == 2
    assert "no API key configured" in gateway.log()
