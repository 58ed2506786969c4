"""The connection: WebSocket transport, handshake, state machine, reconnects, requests.

One supervisor task owns the socket. It connects (sending ``auth`` with the last connection
id as ``resumeConnectionId``), serves the socket until it drops, then waits a jittered
back-off and connects again, until ``close()``, ``suspend()``, a fatal auth error or
``auto_reconnect=False`` stops it. Everything else talks to it through ``request``,
``request_history``, ``request_fetch`` and ``publish``; channels register hooks to receive
their messages and presence events and to restore themselves after a reconnect.

Publishes are the one thing a dropped connection does not fail: each keeps the message id it
was given once, and is resent with a new request id after the reconnect, so the server's
deduplication makes it exactly-once (PROTOCOL.md 3.9).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import websockets
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as websocket_connect

from realtime_client.backoff import Backoff
from realtime_client.errors import ConnectionClosedError, RealtimeError, is_auth_error
from realtime_client.events import EventEmitter
from realtime_client.messages import ConnectionState, ConnectionStateChange
from realtime_protocol.binary_codec import (
    FrameDecodeError,
    decode_server_record,
    encode_client_frame,
    frame_record,
    iter_records,
)
from realtime_protocol.errors import ErrorCode
from realtime_protocol.frames import (
    AckFrame,
    AuthFrame,
    BundleFrame,
    ClientFrame,
    ConnectedFrame,
    ErrorFrame,
    FetchFrame,
    FetchResponseFrame,
    HistoryFrame,
    HistoryResponseFrame,
    MessageFrame,
    PingFrame,
    PresenceEventFrame,
    PublishFrame,
    RequestFrame,
    ServerFrame,
)

__all__ = [
    "DEFAULT_ENDPOINT",
    "AuthCallback",
    "Connection",
    "endpoint_to_websocket_url",
    "new_message_id",
]

logger = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "realtime.foony.io"
AUTH_CALLBACK_TIMEOUT_S = 15.0
MIN_PONG_DEADLINE_S = 0.25
MAX_PONG_DEADLINE_S = 10.0
# Records queued together leave as one WebSocket message (the server parses any number of
# records per message, at most 256, and checks a message's size whole against its frame
# limit, 64 KiB by default; 8 KiB stays well inside any sane setting).
MAX_RECORDS_PER_MESSAGE = 256
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
MAX_COALESCED_BYTES = 8192
CLOSE_HANDSHAKE_FAILED = 4001
CLOSE_KEEPALIVE_TIMEOUT = 4002

AuthCallback = Callable[[], "Awaitable[Any] | Any"]
"""Returns a token (``str``) or anything with a ``token`` attribute (``TokenDetails``), or an
awaitable of either; called before every connect attempt."""

RequestT = TypeVar("RequestT", bound=RequestFrame)
ResponseT = TypeVar("ResponseT", bound=ServerFrame)


def new_message_id() -> str:
    """A client message id in the SDKs' format, ``<unixMillis>-<8 lowercase hex>``."""
    return f"{time.time_ns() // 1_000_000}-{os.urandom(4).hex()}"


def endpoint_to_websocket_url(endpoint: str) -> str:
    """The WebSocket URL for ``endpoint`` (PROTOCOL.md 1.1; ``http(s)://`` maps as in Go)."""
    if endpoint.startswith(("ws://", "wss://")):
        return endpoint
    if endpoint.startswith("http://"):
        return "ws://" + endpoint.removeprefix("http://")
    if endpoint.startswith("https://"):
        return "wss://" + endpoint.removeprefix("https://")
    return f"wss://{endpoint}"


class ChannelHooks(Protocol):
    """What a channel gives the connection (``Channel`` implements it)."""

    def _on_message(self, frame: MessageFrame | BundleFrame) -> None: ...

    def _on_presence(self, frame: PresenceEventFrame) -> None: ...

    def _on_reconnected(self) -> None: ...


@dataclass(slots=True)
class _OutstandingPublish:
    frame: PublishFrame
    future: asyncio.Future[int]
    request_id: int | None = None


class _Slots:
    """A FIFO counting semaphore with O(1) release (``asyncio.Semaphore`` scans its
    waiters on every release, quadratic with thousands of publishers waiting)."""

    def __init__(self, count: int) -> None:
        if count < 1:
            raise ValueError("max_outstanding_publishes must be at least 1")
        self._free = count
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def __aenter__(self) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._release()  # granted and cancelled at once: pass the slot on
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        self._release()

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot moves to the waiter
                return
        self._free += 1


class _Fatal(Exception):
    """The handshake failed in a way no retry can fix (bad static credential)."""

    def __init__(self, error: RealtimeError) -> None:
        super().__init__(error.message)
        self.error = error


class Connection(EventEmitter[ConnectionState, ConnectionStateChange]):
    """A Realtime connection with the SDK's states and events (``connection.ts``).

    Listen with ``on(listener, *states)``; each event is a ``ConnectionStateChange``. An
    unscoped server ``err`` is emitted as an event whose ``current`` and ``previous`` are the
    unchanged state and whose ``reason`` is the ``RealtimeError``.
    """

    def __init__(
        self,
        *,
        endpoint: str = DEFAULT_ENDPOINT,
        key: str | None = None,
        token: str | None = None,
        auth_callback: AuthCallback | None = None,
        client_id: str | None = None,
        auto_reconnect: bool = True,
        initial_reconnect_delay: float = 1.0,
        max_reconnect_delay: float = 30.0,
        reconnect_jitter: float = 0.5,
        queue_messages: bool = True,
        connect_timeout: float = 15.0,
        max_outstanding_publishes: int = 10_000,
    ) -> None:
        if sum(1 for method in (key, token, auth_callback) if method) != 1:
            raise ValueError("pass exactly one of key, token or auth_callback")
        super().__init__()
        self.endpoint = endpoint
        self.url = endpoint_to_websocket_url(endpoint)
        self._key = key
        self._token = token
        self._auth_callback = auth_callback
        self._requested_client_id = client_id
        self.auto_reconnect = auto_reconnect
        self.queue_messages = queue_messages
        self.connect_timeout = connect_timeout
        self.backoff = Backoff(initial_reconnect_delay, max_reconnect_delay, reconnect_jitter)
        self._state = ConnectionState.INITIALIZED
        self._connection_id: str | None = None
        self._client_id: str | None = None
        self._next_request_id = 1
        self._pending: dict[int, asyncio.Future[ServerFrame]] = {}
        self._outstanding: dict[str, _OutstandingPublish] = {}
        self._publish_request_ids: dict[int, str] = {}
        # Bounded: a publisher faster than the acks waits here instead of growing memory.
        self._publish_slots = _Slots(max_outstanding_publishes)
        self._channels: dict[str, ChannelHooks] = {}
        self._socket: ClientConnection | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._has_connected = False
        self._renew_now = False
        self._last_received = 0.0
        self._failure: RealtimeError | None = None
        self._outbox: list[bytes] = []
        self._outbox_ready = asyncio.Event()
        self._resume_gate: asyncio.Event = asyncio.Event()
        self._resume_gate.set()
        self.keep_alive_ms = 0

    # ---- public state ----

    @property
    def state(self) -> ConnectionState:
        """The current state."""
        return self._state

    @property
    def connection_id(self) -> str | None:
        """The server's id for this connection (kept across reconnects as the resume id)."""
        return self._connection_id

    @property
    def client_id(self) -> str | None:
        """The client id the server resolved (token ``sub``, the key's ``client_id``, or one
        it assigned); ``None`` before the first connect."""
        return self._client_id

    def _will_reconnect(self) -> bool:
        """True while a dropped connection comes back by itself (not closed, failed,
        suspended, nor without auto-reconnect)."""
        return self.auto_reconnect and self._state not in (
            ConnectionState.CLOSING,
            ConnectionState.CLOSED,
            ConnectionState.FAILED,
            ConnectionState.SUSPENDED,
        )

    # ---- lifecycle ----

    async def connect(self, timeout: float | None = None) -> None:
        """Connect (or wait for the running attempt) until ``connected``.

        Retries with back-off while the failures are transient; raises ``RealtimeError`` when
        the connection ends ``failed`` (a bad static credential), ``closed`` or ``suspended``
        meanwhile, and ``TimeoutError`` after ``timeout`` seconds (it keeps trying then).
        """
        self._resume_gate.set()
        if self._state is ConnectionState.CONNECTED:
            return
        self._start()
        await self._wait_connected(timeout)

    async def close(self) -> None:
        """Close for good: pending requests and unacked publishes fail, nothing reconnects."""
        if self._state in (ConnectionState.CLOSED, ConnectionState.INITIALIZED):
            self._set_state(ConnectionState.CLOSED)
            self._fail_everything(ConnectionClosedError("connection closed"))
            return
        self._set_state(ConnectionState.CLOSING)
        await self._stop_supervisor()
        self._set_state(ConnectionState.CLOSED)
        self._fail_everything(ConnectionClosedError("connection closed"))

    async def suspend(self) -> None:
        """Disconnect on purpose (close code 1000) until ``connect()`` is called again.

        Pending requests and unacked publishes fail; requests made meanwhile wait for the
        next ``connect()``. Channels and presence are restored then, as after a drop.
        """
        if self._state in (
            ConnectionState.SUSPENDED,
            ConnectionState.CLOSING,
            ConnectionState.CLOSED,
            ConnectionState.FAILED,
        ):
            return
        self._resume_gate.clear()
        await self._stop_supervisor()
        self._set_state(ConnectionState.SUSPENDED)
        self._fail_everything(ConnectionClosedError("connection suspended"))

    def _start(self) -> None:
        if self._supervisor is not None and not self._supervisor.done():
            return
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    async def _stop_supervisor(self) -> None:
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None and not supervisor.done():
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor

    async def _wait_connected(self, timeout: float | None) -> None:
        ended = (ConnectionState.FAILED, ConnectionState.CLOSED, ConnectionState.SUSPENDED)
        async with asyncio.timeout(timeout):
            while self._state is not ConnectionState.CONNECTED:
                change = await self.wait_for(ConnectionState.CONNECTED, *ended)
                if change.current in ended:
                    raise _as_realtime_error(change.reason, f"connection {change.current}")

    async def _ensure_connected(self) -> None:
        """Wait until connected, connecting if nothing is running (as the SDK does)."""
        while self._state is not ConnectionState.CONNECTED:
            if self._state in (ConnectionState.CLOSING, ConnectionState.CLOSED):
                raise ConnectionClosedError("connection closed")
            if self._state is ConnectionState.FAILED:
                raise self._failure or ConnectionClosedError("connection failed")
            if not self._resume_gate.is_set():
                await self._resume_gate.wait()
                continue
            await self.connect()

    def _set_state(
        self,
        state: ConnectionState,
        reason: BaseException | None = None,
        retry_in: float | None = None,
    ) -> None:
        previous = self._state
        if previous is state and reason is None:
            return
        self._state = state
        self._emit(state, ConnectionStateChange(state, previous, reason, retry_in))

    def _fail_everything(self, error: RealtimeError) -> None:
        self._fail_pending(error)
        self._publish_request_ids.clear()
        outstanding = list(self._outstanding.values())
        self._outstanding.clear()
        for item in outstanding:
            if not item.future.done():
                item.future.set_exception(error)

    def _fail_pending(self, error: RealtimeError) -> None:
        pending = list(self._pending.values())
        self._pending.clear()
        for future in pending:
            if not future.done():
                future.set_exception(error)

    # ---- the supervisor ----

    async def _supervise(self) -> None:
        while True:
            self._set_state(ConnectionState.CONNECTING)
            reason: BaseException
            try:
                socket, frames = await self._open()
            except _Fatal as fatal:
                self._failure = fatal.error
                self._set_state(ConnectionState.FAILED, fatal.error)
                self._fail_everything(fatal.error)
                return
            except Exception as error:
                # Any failure of one attempt (network, handshake, a raising auth_callback)
                # is retried; only close(), suspend() and _Fatal end the loop.
                reason = error
            else:
                reason = await self._serve(socket, frames)
            self._socket = None
            self._fail_pending(ConnectionClosedError(f"connection lost: {reason}"))
            # Unacked publishes stay: they are resent with their message ids after the
            # reconnect (or failed at once when no reconnect will come).
            self._publish_request_ids.clear()
            for item in self._outstanding.values():
                item.request_id = None
            if not self.auto_reconnect or not self.queue_messages:
                self._fail_everything(ConnectionClosedError(f"connection lost: {reason}"))
            if not self.auto_reconnect:
                self._set_state(ConnectionState.DISCONNECTED, reason)
                return
            # A token that expired mid-connection is renewed at once, not after a back-off.
            delay = 0.0 if self._renew_now else self.backoff.next()
            self._renew_now = False
            self._set_state(ConnectionState.DISCONNECTED, reason, retry_in=delay)
            await asyncio.sleep(delay)

    async def _auth_frame(self) -> AuthFrame:
        resume = self._connection_id or ""
        if self._key:
            return AuthFrame(
                key=self._key,
                client_id=self._requested_client_id or "",
                resume_connection_id=resume,
            )
        if self._token:
            return AuthFrame(token=self._token, resume_connection_id=resume)
        assert self._auth_callback is not None
        async with asyncio.timeout(AUTH_CALLBACK_TIMEOUT_S):
            result = self._auth_callback()
            if inspect.isawaitable(result):
                result = await result
        token = result if isinstance(result, str) else getattr(result, "token", None)
        if not isinstance(token, str) or not token:
            raise RealtimeError("auth_callback returned no token", ErrorCode.BAD_AUTH)
        return AuthFrame(token=token, resume_connection_id=resume)

    async def _open(self) -> tuple[ClientConnection, list[ServerFrame]]:
        """Dial, authenticate, and return the socket with the handshake's frames."""
        auth = await self._auth_frame()
        async with asyncio.timeout(self.connect_timeout):
            socket = await websocket_connect(
                self.url,
                # Liveness is the protocol's own ping/pong (keepAliveMs), as in the SDKs.
                ping_interval=None,
                compression=None,
                # Server pages stay near 1 MiB; the cap bounds what one message can cost.
                max_size=MAX_MESSAGE_BYTES,
                open_timeout=None,
                close_timeout=1.0,
            )
            try:
                await socket.send(frame_record(encode_client_frame(auth)))
                first = await socket.recv()
            except BaseException:
                await _abort(socket)
                raise
        frames = _decode(first) if isinstance(first, bytes) else []
        if not frames:
            await _close(socket, CLOSE_HANDSHAKE_FAILED, "bad auth response")
            raise RealtimeError("failed to parse auth response", ErrorCode.BAD_FRAME)
        head = frames[0]
        if isinstance(head, ConnectedFrame):
            return socket, frames
        await _close(socket, CLOSE_HANDSHAKE_FAILED, "auth error")
        if isinstance(head, ErrorFrame):
            error = RealtimeError(f"auth failed: {head.code} {head.message}", head.code)
            if is_auth_error(head.code) and self._auth_callback is None:
                raise _Fatal(error)
            raise error
        raise RealtimeError(f"unexpected first frame: {type(head).__name__}", ErrorCode.BAD_FRAME)

    async def _serve(self, socket: ClientConnection, frames: list[ServerFrame]) -> BaseException:
        """Run one established connection until it ends; return why it ended."""
        connected = frames[0]
        assert isinstance(connected, ConnectedFrame)
        self._socket = socket
        self._connection_id = connected.connection_id
        self._client_id = connected.client_id
        self.keep_alive_ms = connected.keep_alive_ms
        self.backoff.reset()
        self._last_received = time.monotonic()
        self._outbox.clear()  # frames for the previous socket are void (publishes are resent)
        self._set_state(ConnectionState.CONNECTED)
        loop = asyncio.get_running_loop()
        helpers = [
            loop.create_task(self._keep_alive(connected.keep_alive_ms)),
            loop.create_task(self._write(socket)),
        ]
        try:
            for frame in frames[1:]:
                self._handle(frame)
            if self._has_connected:
                for channel in list(self._channels.values()):
                    channel._on_reconnected()
            self._has_connected = True
            for item in list(self._outstanding.values()):
                if item.request_id is None:
                    self._send_publish(item)
            async for message in socket:
                self._last_received = time.monotonic()
                if isinstance(message, bytes):
                    for frame in _decode(message):
                        self._handle(frame)
            return _closed_reason(socket)
        except websockets.ConnectionClosed:
            return _closed_reason(socket)
        except OSError as error:
            return error
        finally:
            self._socket = None
            for helper in helpers:
                helper.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            self._outbox.clear()
            if socket.state is not websockets.State.CLOSED:
                await _close(socket, 1000, "client close")

    async def _write(self, socket: ClientConnection) -> None:
        """Send queued records in order, coalescing what queued up meanwhile into one
        message: a burst of publishes costs one WebSocket write, not one each."""
        outbox = self._outbox
        with contextlib.suppress(websockets.ConnectionClosed):
            while True:
                await self._outbox_ready.wait()
                self._outbox_ready.clear()
                while outbox:
                    count, size = 0, 0
                    for record in outbox:
                        if count == MAX_RECORDS_PER_MESSAGE or (
                            count and size + len(record) > MAX_COALESCED_BYTES
                        ):
                            break
                        count += 1
                        size += len(record)
                    message = outbox[0] if count == 1 else b"".join(outbox[:count])
                    del outbox[:count]
                    await socket.send(message)

    async def _keep_alive(self, keep_alive_ms: int) -> None:
        """Ping every ``keepAliveMs``; drop the socket (4002) when nothing at all arrives
        within ``clamp(keepAliveMs, 250 ms, 10 s)`` of a ping (PROTOCOL.md 1.5)."""
        if keep_alive_ms <= 0:
            return
        interval = keep_alive_ms / 1000
        deadline = min(max(interval, MIN_PONG_DEADLINE_S), MAX_PONG_DEADLINE_S)
        socket = self._socket
        with contextlib.suppress(ConnectionClosedError):
            while socket is not None:
                await asyncio.sleep(interval)
                sent_at = time.monotonic()
                self._send(PingFrame())
                await asyncio.sleep(deadline)
                if self._last_received < sent_at:
                    logger.info("keep-alive timeout on %s; reconnecting", self.url)
                    await _close(socket, CLOSE_KEEPALIVE_TIMEOUT, "keep-alive timeout")
                    return

    # ---- frames in ----

    def _handle(self, frame: ServerFrame) -> None:
        if isinstance(frame, MessageFrame):
            channel = self._channels.get(frame.message.channel)
            if channel is not None:
                channel._on_message(frame)
        elif isinstance(frame, AckFrame):
            future = self._pending.pop(frame.id, None)
            if future is not None:
                if not future.done():
                    future.set_result(frame)
            else:
                self._settle_publish(frame.id, frame.seq, None)
        elif isinstance(frame, BundleFrame):
            channel = self._channels.get(frame.messages[0].channel)
            if channel is not None:
                channel._on_message(frame)
        elif isinstance(frame, PresenceEventFrame):
            channel = self._channels.get(frame.channel)
            if channel is not None:
                channel._on_presence(frame)
        elif isinstance(frame, HistoryResponseFrame | FetchResponseFrame):
            future = self._pending.pop(frame.id, None)
            if future is not None and not future.done():
                future.set_result(frame)
        elif isinstance(frame, ErrorFrame):
            self._handle_error(frame)

    def _handle_error(self, frame: ErrorFrame) -> None:
        error = RealtimeError(f"server error {frame.code}: {frame.message}", frame.code)
        if frame.id:
            future = self._pending.pop(frame.id, None)
            if future is not None:
                if not future.done():
                    future.set_exception(error)
                return
            if self._settle_publish(frame.id, 0, error):
                return
        if frame.code == ErrorCode.AUTH_EXPIRED and self._auth_callback is not None:
            # The server closes right after this notice; reconnect with a fresh token at once.
            self._renew_now = True
        self._set_state(self._state, error)

    def _settle_publish(self, request_id: int, serial: int, error: RealtimeError | None) -> bool:
        message_id = self._publish_request_ids.pop(request_id, None)
        if message_id is None:
            return False
        item = self._outstanding.pop(message_id, None)
        if item is not None and not item.future.done():
            if error is None:
                item.future.set_result(serial)
            else:
                item.future.set_exception(error)
        return True

    # ---- frames out ----

    def _take_request_id(self) -> int:
        request_id = self._next_request_id
        self._next_request_id += 1
        return request_id

    def _send(self, frame: ClientFrame) -> None:
        """Queue ``frame`` for the current socket's writer (order is kept)."""
        if self._socket is None:
            raise ConnectionClosedError("not connected")
        self._outbox.append(frame_record(encode_client_frame(frame)))
        self._outbox_ready.set()

    async def _exchange(self, make: Callable[[int], RequestT]) -> ServerFrame:
        await self._ensure_connected()
        request_id = self._take_request_id()
        future: asyncio.Future[ServerFrame] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            self._send(make(request_id))
        except ConnectionClosedError:
            self._pending.pop(request_id, None)
            raise
        try:
            # The supervisor fails every pending request when it notices a drop.
            return await future
        finally:
            self._pending.pop(request_id, None)

    async def request(self, make: Callable[[int], RequestT]) -> AckFrame:
        """Send the frame ``make(request_id)`` once connected and wait for its ``ack``.

        Raises ``RealtimeError`` with the server's code on ``err``, and
        ``ConnectionClosedError`` when the connection drops first.
        """
        response = await self._exchange(make)
        assert isinstance(response, AckFrame)
        return response

    async def request_history(self, make: Callable[[int], HistoryFrame]) -> HistoryResponseFrame:
        """Send a ``hist`` frame and wait for its ``histRes``."""
        response = await self._exchange(make)
        assert isinstance(response, HistoryResponseFrame)
        return response

    async def request_fetch(self, make: Callable[[int], FetchFrame]) -> FetchResponseFrame:
        """Send a ``fetch`` frame and wait for its ``fetchRes``."""
        response = await self._exchange(make)
        assert isinstance(response, FetchResponseFrame)
        return response

    async def publish(self, frame: PublishFrame) -> int:
        """Publish ``frame`` (its ``id`` and ``message_id`` are assigned here) until acked.

        Returns the serial the server stored it under (0 when ephemeral). While the
        connection is down the publish is queued (``queue_messages``) and sent after the
        reconnect; one that was in flight is resent with the same message id, so the server
        stores it once. At most ``max_outstanding_publishes`` wait for acks at a time; more
        publishers wait for a slot.
        """
        queueable = self._state in (
            ConnectionState.INITIALIZED,
            ConnectionState.CONNECTING,
            ConnectionState.DISCONNECTED,
        )
        if self._state is not ConnectionState.CONNECTED and not (self.queue_messages and queueable):
            raise ConnectionClosedError(f"cannot publish while {self._state}")
        async with self._publish_slots:
            frame = dataclasses.replace(frame, message_id=new_message_id())
            future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            item = _OutstandingPublish(frame, future)
            self._outstanding[frame.message_id] = item
            try:
                if self._state is ConnectionState.CONNECTED:
                    self._send_publish(item)
                else:
                    self._start()
                return await future
            finally:
                if not future.done() or future.cancelled():
                    self._outstanding.pop(frame.message_id, None)

    def _send_publish(self, item: _OutstandingPublish) -> None:
        request_id = self._take_request_id()
        try:
            self._send(dataclasses.replace(item.frame, id=request_id))
        except ConnectionClosedError:
            return  # resent after the reconnect
        item.request_id = request_id
        self._publish_request_ids[request_id] = item.frame.message_id

    def _register_channel(self, name: str, channel: ChannelHooks) -> None:
        self._channels[name] = channel

    def _unregister_channel(self, name: str) -> None:
        self._channels.pop(name, None)


def _decode(message: bytes) -> list[ServerFrame]:
    """Every decodable record of ``message``: like the SDKs, skip a record that does not
    decode and stop at a broken length prefix."""
    frames: list[ServerFrame] = []
    try:
        for record in iter_records(message):
            try:
                frames.append(decode_server_record(record))
            except FrameDecodeError:
                continue
    except FrameDecodeError:
        pass
    return frames


def _closed_reason(socket: ClientConnection) -> RealtimeError:
    code = socket.close_code
    reason = socket.close_reason or ""
    text = f"websocket closed: {code} {reason}".rstrip() if code else "websocket closed"
    return ConnectionClosedError(text, ErrorCode.SERVER)


def _as_realtime_error(reason: BaseException | None, fallback: str) -> RealtimeError:
    if isinstance(reason, RealtimeError):
        return reason
    return ConnectionClosedError(fallback if reason is None else f"{fallback}: {reason}")


async def _close(socket: ClientConnection, code: int, reason: str) -> None:
    with contextlib.suppress(Exception):
        await socket.close(code, reason)


async def _abort(socket: ClientConnection) -> None:
    socket.transport.abort()
    with contextlib.suppress(Exception):
        await socket.wait_closed()
