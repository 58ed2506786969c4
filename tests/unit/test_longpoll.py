"""The long-polling adapter and CORS, in one process: the real aiohttp app on loopback with the
in-memory engines (no nats-server). The SDK runs every interop scenario over long-polling
against real NATS in tests/interop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import LONG_POLL, create_app
from gateway.longpoll import SESSION_HEADER
from gateway.services import GatewayServices
from realtime_protocol import binary_codec
from realtime_protocol.frames import (
    AckFrame,
    AuthFrame,
    ClientFrame,
    ConnectedFrame,
    ErrorFrame,
    PingFrame,
    PongFrame,
    PresenceAction,
    PresenceEventFrame,
    PresenceFrame,
    PresenceSubscribeFrame,
    PublishFrame,
    ServerFrame,
    SubscribeFrame,
)
from shared.auth import Keyring, parse_api_key
from shared.settings import Settings
from testing.memory_engines import MemoryBus, MemoryPresence

KEY = "app1.main:secret-one"
GRACE_S = 0.3


def record(*frames: ClientFrame) -> bytes:
    return b"".join(
        binary_codec.frame_record(binary_codec.encode_client_frame(frame)) for frame in frames
    )


def decode(body: bytes) -> list[ServerFrame]:
    return [binary_codec.decode_server_record(item) for item in binary_codec.iter_records(body)]


@pytest.fixture
async def client() -> AsyncIterator[TestClient[Any, Any]]:
    bus = MemoryBus()
    services = GatewayServices(
        settings=Settings(longpoll_hold_s=0.5, longpoll_idle_s=0.6, cors_origins="*"),
        keyring=Keyring([parse_api_key(KEY)]),
        broker=bus,
        router=bus,
        history=bus,
        presence=MemoryPresence(grace_s=GRACE_S, max_members=10),
    )
    async with TestClient(TestServer(create_app(services))) as test_client:
        yield test_client


async def connect(client: TestClient[Any, Any], client_id: str = "c1") -> str:
    response = await client.post(
        "/lp/connect", data=record(AuthFrame(key=KEY, client_id=client_id))
    )
    assert response.status == 200
    [connected] = decode(await response.read())
    assert isinstance(connected, ConnectedFrame)
    return response.headers[SESSION_HEADER]


def presence(frames: list[ServerFrame]) -> list[tuple[PresenceAction, str]]:
    return [(f.action, f.client_id) for f in frames if isinstance(f, PresenceEventFrame)]


def names(header: str) -> set[str]:
    return {name.strip() for name in header.split(",")}


async def send(client: TestClient[Any, Any], token: str, *frames: ClientFrame) -> ClientResponse:
    return await client.post("/lp/send", data=record(*frames), headers={SESSION_HEADER: token})


async def poll(client: TestClient[Any, Any], token: str) -> tuple[int, list[ServerFrame]]:
    response = await client.post("/lp/poll", headers={SESSION_HEADER: token})
    body = await response.read()
    return response.status, decode(body) if response.status == 200 else []


async def test_connect_send_poll_round_trip_and_the_token_is_long(
    client: TestClient[Any, Any],
) -> None:
    token = await connect(client)
    assert len(token) >= 32  # 192 random bits, base64url
    assert (await send(client, token, SubscribeFrame(1, "room"), PingFrame())).status == 200
    status, frames = await poll(client, token)
    assert status == 200 and frames == [AckFrame(1), PongFrame()]
    await send(client, token, PublishFrame(2, "room", "n", b'"hi"', message_id="m1"))
    _, frames = await poll(client, token)
    kinds = sorted(type(frame).__name__ for frame in frames)
    assert kinds == ["AckFrame", "MessageFrame"]


async def test_refused_handshake_is_200_with_the_err_and_no_session(
    client: TestClient[Any, Any],
) -> None:
    response = await client.post("/lp/connect", data=record(AuthFrame(key="app1.main:wrong")))
    assert response.status == 200 and SESSION_HEADER not in response.headers
    [error] = decode(await response.read())
    assert isinstance(error, ErrorFrame) and error.code == 40101


async def test_unknown_or_ended_sessions_answer_410(client: TestClient[Any, Any]) -> None:
    assert (await poll(client, "not-a-session"))[0] == 410
    assert (await send(client, "not-a-session", PingFrame())).status == 410
    token = await connect(client)
    response = await client.post("/lp/disconnect", headers={SESSION_HEADER: token})
    assert response.status == 200
    assert (await poll(client, token))[0] == 410
    assert (await client.post("/lp/poll")).status == 410  # no header at all


async def test_a_held_poll_answers_when_a_frame_arrives(client: TestClient[Any, Any]) -> None:
    token = await connect(client)
    started = time.monotonic()
    held = asyncio.create_task(poll(client, token))
    await asyncio.sleep(0.1)
    await send(client, token, PingFrame())
    status, frames = await held
    assert status == 200 and frames == [PongFrame()]
    assert time.monotonic() - started < 0.4  # not the 0.5 s hold


async def test_an_empty_hold_ends_with_an_empty_200(client: TestClient[Any, Any]) -> None:
    token = await connect(client)
    started = time.monotonic()
    assert await poll(client, token) == (200, [])
    assert time.monotonic() - started >= 0.45


async def test_a_newer_poll_answers_the_older_one_empty_and_gets_the_frames(
    client: TestClient[Any, Any],
) -> None:
    token = await connect(client)
    older = asyncio.create_task(poll(client, token))
    await asyncio.sleep(0.1)
    newer = asyncio.create_task(poll(client, token))
    assert await older == (200, [])
    await send(client, token, PingFrame())
    assert await newer == (200, [PongFrame()])


async def test_an_abandoned_session_ends_and_its_presence_leaves_after_the_grace(
    client: TestClient[Any, Any],
) -> None:
    watcher = await connect(client, "watcher")
    await send(client, watcher, PresenceSubscribeFrame(1, "room"))
    assert (await poll(client, watcher))[1] == [AckFrame(1)]
    member = await connect(client, "member")
    await send(client, member, PresenceFrame(1, "room", PresenceAction.ENTER, b"1"))
    assert (await poll(client, member))[1] == [AckFrame(1)]
    _, frames = await poll(client, watcher)
    assert [
        (frame.action, frame.client_id) for frame in frames if isinstance(frame, PresenceEventFrame)
    ] == [(PresenceAction.ENTER, "member")]
    # The member never polls again: after the idle timeout (0.6 s) and the grace (0.3 s) it
    # leaves; the watcher, polling all along, sees it.
    events: list[PresenceEventFrame] = []
    deadline = time.monotonic() + 3
    while not events and time.monotonic() < deadline:
        _, frames = await poll(client, watcher)
        events += [frame for frame in frames if isinstance(frame, PresenceEventFrame)]
    assert [(event.action, event.client_id) for event in events] == [
        (PresenceAction.LEAVE, "member")
    ]
    assert (await poll(client, member))[0] == 410
    assert len(client.app[LONG_POLL]) == 1


async def test_a_deliberate_disconnect_leaves_presence_at_once(
    client: TestClient[Any, Any],
) -> None:
    watcher = await connect(client, "watcher")
    await send(client, watcher, PresenceSubscribeFrame(1, "room"))
    await poll(client, watcher)
    member = await connect(client, "member")
    await send(client, member, PresenceFrame(1, "room", PresenceAction.ENTER, b"1"))
    await poll(client, member)
    await poll(client, watcher)  # the enter
    await client.post("/lp/disconnect", headers={SESSION_HEADER: member})
    started = time.monotonic()
    _, frames = await poll(client, watcher)
    assert [
        (frame.action, frame.client_id) for frame in frames if isinstance(frame, PresenceEventFrame)
    ] == [(PresenceAction.LEAVE, "member")]
    assert time.monotonic() - started < GRACE_S


async def test_records_beyond_the_frame_limit_are_refused_one_by_one(
    client: TestClient[Any, Any],
) -> None:
    token = await connect(client)
    big = PublishFrame(1, "room", "n", b'"' + b"x" * (70 * 1024) + b'"', message_id="big")
    # A body with many small records is fine (the SDK coalesces what it queued); only the
    # oversized record is refused, with its request id.
    pings = [PingFrame() for _ in range(300)]
    assert (await send(client, token, *pings, big, SubscribeFrame(2, "room"))).status == 200
    _, frames = await poll(client, token)
    assert frames.count(PongFrame()) == 300
    errors = [frame for frame in frames if isinstance(frame, ErrorFrame)]
    assert [(error.code, error.id) for error in errors] == [(40001, 1)]
    assert AckFrame(2) in frames


async def test_cors_preflight_and_exposed_session_header(client: TestClient[Any, Any]) -> None:
    preflight = await client.options(
        "/lp/connect",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, foony-lp-session",
        },
    )
    assert preflight.status == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "*"
    allowed = {
        name.strip() for name in preflight.headers["Access-Control-Allow-Headers"].split(",")
    }
    assert {"content-type", "foony-lp-session", "authorization"} <= allowed
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    response = await client.post(
        "/lp/connect",
        data=record(AuthFrame(key=KEY)),
        headers={"Origin": "https://app.example"},
    )
    exposed = {
        name.strip() for name in response.headers["Access-Control-Expose-Headers"].split(",")
    }
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert {"foony-lp-session", "link"} <= exposed
    gone = await client.post("/lp/poll", headers={"Origin": "https://app.example"})
    assert gone.status == 410 and gone.headers["Access-Control-Allow-Origin"] == "*"


async def test_cors_with_an_origin_list_refuses_other_origins() -> None:
    bus = MemoryBus()
    services = GatewayServices(
        settings=Settings(cors_origins="https://good.example, https://also.example"),
        keyring=Keyring([parse_api_key(KEY)]),
        broker=bus,
        router=bus,
        history=bus,
        presence=MemoryPresence(grace_s=GRACE_S, max_members=10),
    )
    async with TestClient(TestServer(create_app(services))) as client:
        headers = {"Access-Control-Request-Method": "POST"}
        good = await client.options(
            "/lp/poll", headers={"Origin": "https://good.example", **headers}
        )
        assert good.headers["Access-Control-Allow-Origin"] == "https://good.example"
        assert "Origin" in good.headers["Vary"]
        bad = await client.options(
            "/lp/poll", headers={"Origin": "https://evil.example", **headers}
        )
        assert bad.status == 403 and "Access-Control-Allow-Origin" not in bad.headers
