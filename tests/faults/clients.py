"""The fault suite's clients: JSON-protocol WebSocket clients that behave like the SDKs
(PROTOCOL.md 1.7 and 3.4) and record everything they do and see in a ``History``.

- ``Publisher``: one logical SDK client. It keeps a window of publishes in flight; every
  publish keeps its messageId for life. When a connection drops it reconnects (to the next
  gateway when the last one failed, as a load balancer would send it) and resends every
  unacked publish in the order first sent. An ``err`` on a publish is retried like an app
  that wants its message through: once nothing is in flight, every unacked publish is
  resent in order, on the same connection.
- ``Subscriber``: keeps a contiguous serial cursor per channel, heals gaps with ``fetch``
  (one in flight), and after a drop re-``sub``s with ``lastSerial`` on the next gateway.
  Like the SDK it drops a serial it already has (a resume replay may overlap live
  messages, PROTOCOL.md 3.5); those are counted as ``redelivered``, not recorded twice.
- ``PresenceMember`` / ``PresenceWatcher``: enter presence (re-entering after a reconnect,
  with ``resumeConnectionId``) and watch it (a reset and a fresh snapshot after a
  reconnect).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import websockets

from testing.cluster import APP_KEY
from testing.history_checker import DeliverySource, History

__all__ = [
    "ClientStats",
    "PresenceMember",
    "PresenceWatcher",
    "Publisher",
    "Subscriber",
    "now",
]

# How long a client waits for a connect + auth before it tries the next gateway.
CONNECT_TIMEOUT_S = 3.0
# How long a publish may stay unanswered before the connection is taken for dead (the
# SDKs rely on the transport's own failure; a silent partition needs a bound).
ANSWER_TIMEOUT_S = 15.0
RETRY_PAUSE_S = 0.2


def now() -> float:
    """The clock every recorded event uses."""
    return time.monotonic()


@dataclass
class ClientStats:
    """What one client went through, for the fault table."""

    connects: int = 0
    errors: dict[int, int] = field(default_factory=dict)
    redelivered: int = 0
    resumes: int = 0
    resumed_false: int = 0


class _Link:
    """One authenticated WebSocket connection (a client replaces it on every reconnect)."""

    def __init__(self, socket: websockets.ClientConnection, connected: dict[str, Any]) -> None:
        self.socket = socket
        self.connection_id = str(connected.get("connectionId", ""))

    async def send(self, frame: dict[str, Any]) -> None:
        await self.socket.send(orjson.dumps(frame).decode())

    async def frames(self) -> Any:
        async for message in self.socket:
            value = orjson.loads(message)
            if isinstance(value, dict):
                yield value

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.socket.close(), 2)


async def _open(url: str, **auth: Any) -> _Link:
    """Connect and authenticate, or raise (any error: the caller tries again)."""
    socket = await asyncio.wait_for(
        websockets.connect(url, compression=None, open_timeout=CONNECT_TIMEOUT_S),
        CONNECT_TIMEOUT_S,
    )
    try:
        await socket.send(orjson.dumps({"t": "auth", "key": APP_KEY, **auth}).decode())
        answer = orjson.loads(await asyncio.wait_for(socket.recv(), CONNECT_TIMEOUT_S))
    except BaseException:
        with contextlib.suppress(Exception):
            await socket.close()
        raise
    if answer.get("t") != "connected":
        await socket.close()
        raise ConnectionError(f"auth answered {answer}")
    return _Link(socket, answer)


class _Client:
    """What every fault client shares: the gateways it may use and the stop signal."""

    def __init__(self, name: str, urls: list[str], history: History, start: int = 0) -> None:
        self.name = name
        self.urls = urls
        self.history = history
        self.stats = ClientStats()
        self._gateway = start % len(urls)
        self._ids = itertools.count(1)  # request ids keep growing across reconnects
        self.connection_id = ""

    def _next_gateway(self) -> None:
        self._gateway = (self._gateway + 1) % len(self.urls)

    async def _connect(self, stop: asyncio.Event, **auth: Any) -> _Link | None:
        """Connect to the current gateway, moving to the next one after each failure, until
        it works or ``stop`` is set."""
        while not stop.is_set():
            try:
                if self.connection_id:
                    auth = {**auth, "resumeConnectionId": self.connection_id}
                link = await _open(self.urls[self._gateway], **auth)
            except Exception:  # refused, reset, timed out, 50001: the next gateway
                self._next_gateway()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), RETRY_PAUSE_S)
                continue
            self.stats.connects += 1
            self.connection_id = link.connection_id
            return link
        return None

    def _count_error(self, code: int) -> None:
        self.stats.errors[code] = self.stats.errors.get(code, 0) + 1


class Publisher(_Client):
    """Publishes ``rate`` messages a second round-robin over ``channels`` until ``stop``,
    then waits until every publish is acked (``drained``)."""

    def __init__(
        self,
        name: str,
        urls: list[str],
        history: History,
        channels: list[str],
        rate: float,
        window: int = 8,
        start: int = 0,
    ) -> None:
        super().__init__(name, urls, history, start)
        self.channels = channels
        self.rate = rate
        self.window = window
        self._sequence = itertools.count()
        # Unacked publishes in the order first sent: messageId -> (channel, data).
        self.unacked: dict[str, tuple[str, int]] = {}
        self.drained = asyncio.Event()

    async def run(self, stop: asyncio.Event, give_up: asyncio.Event) -> None:
        """Publish until ``stop``; keep resending until everything is acked or ``give_up``."""
        while not give_up.is_set():
            link = await self._connect(give_up, clientId=self.name)
            if link is None:
                return
            try:
                await self._session(link, stop)
            except (websockets.ConnectionClosed, OSError, TimeoutError):
                self._next_gateway()  # as if the balancer sent us elsewhere
            finally:
                await link.close()
            if stop.is_set() and not self.unacked:
                self.drained.set()
                return

    async def _session(self, link: _Link, stop: asyncio.Event) -> None:
        """One connection: resend what is unacked, then publish new messages."""
        in_flight: dict[int, str] = {}  # request id -> messageId
        retry = asyncio.Event()
        answered = asyncio.Event()
        closed: list[BaseException] = []

        async def send(message_id: str) -> None:
            channel, data = self.unacked[message_id]
            request_id = next(self._ids)
            in_flight[request_id] = message_id
            self.history.attempt(self.name, channel, message_id, now())
            await link.send(
                {
                    "t": "pub",
                    "id": request_id,
                    "channel": channel,
                    "name": "storm",
                    "data": data,
                    "messageId": message_id,
                }
            )

        async def receive() -> None:
            try:
                async for frame in link.frames():
                    message_id = in_flight.pop(frame.get("id", -1), None)
                    if message_id is None:
                        continue
                    channel, _ = self.unacked.get(message_id, ("", 0))
                    if frame["t"] == "ack":
                        self.history.ack(channel, message_id, int(frame["seq"]), now())
                        self.unacked.pop(message_id, None)
                    elif frame["t"] == "err":
                        self.history.error(channel, message_id, int(frame["code"]), now())
                        self._count_error(int(frame["code"]))
                        retry.set()
                    answered.set()
            except BaseException as error:
                closed.append(error)
                answered.set()
                raise

        reader = asyncio.create_task(receive())
        try:
            for message_id in list(self.unacked):
                await send(message_id)
            interval = 1.0 / self.rate
            next_at = now()
            last_answer = now()
            while not (stop.is_set() and not self.unacked):
                if closed or reader.done():
                    raise ConnectionError("connection closed")
                if retry.is_set() and not in_flight:
                    retry.clear()
                    await asyncio.sleep(RETRY_PAUSE_S)
                    for message_id in list(self.unacked):
                        await send(message_id)
                    continue
                can_send = not stop.is_set() and not retry.is_set()
                if can_send and len(in_flight) < self.window and now() >= next_at:
                    index = next(self._sequence)
                    message_id = f"{self.name}-{index}"
                    self.unacked[message_id] = (self.channels[index % len(self.channels)], index)
                    await send(message_id)
                    next_at = max(next_at + interval, now() - 1.0)
                    continue
                answered.clear()
                wait = max(0.001, next_at - now()) if can_send else 0.5
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(answered.wait(), wait)
                if answered.is_set() or not in_flight:
                    last_answer = now()
                elif now() - last_answer > ANSWER_TIMEOUT_S:
                    raise TimeoutError("no answer: the connection is taken for dead")
        finally:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader


class Subscriber(_Client):
    """Subscribes to ``channels`` and follows them (cursor, gap fills, resume) until
    ``stop``."""

    def __init__(
        self, name: str, urls: list[str], history: History, channels: list[str], start: int = 0
    ) -> None:
        super().__init__(name, urls, history, start)
        self.channels = channels
        self.cursor: dict[str, int] = dict.fromkeys(channels, 0)
        self.received: dict[str, set[int]] = {channel: set() for channel in channels}
        self.subscribed = asyncio.Event()
        self._link: _Link | None = None

    async def hop(self) -> None:
        """Drop the connection: the subscriber resumes on the next gateway, as an SDK does
        after a network change."""
        if self._link is not None:
            await self._link.close()

    def newest(self, channel: str) -> int:
        """The highest serial received on ``channel``."""
        return max(self.received[channel], default=0)

    async def run(self, stop: asyncio.Event) -> None:
        """Follow the channels until ``stop``, reconnecting after every drop."""
        while not stop.is_set():
            link = await self._connect(stop)
            if link is None:
                return
            self._link = link
            try:
                await self._session(link, stop)
            except (websockets.ConnectionClosed, OSError, TimeoutError, ConnectionError):
                self._next_gateway()
            finally:
                self._link = None
                await link.close()

    async def _session(self, link: _Link, stop: asyncio.Event) -> None:
        pending: dict[int, tuple[str, str, int, float]] = {}  # id -> (kind, channel, cursor, at)
        fetching: dict[str, int] = {}  # channel -> request id of its fetch in flight
        for channel in self.channels:
            request_id = next(self._ids)
            cursor = self.cursor[channel]
            pending[request_id] = ("sub", channel, cursor, now())
            frame: dict[str, Any] = {"t": "sub", "id": request_id, "channel": channel}
            if cursor:
                frame["lastSerial"] = cursor
            await link.send(frame)

        async def follow() -> None:
            async for frame in link.frames():
                kind = frame.get("t")
                if kind == "msg":
                    await self._message(link, frame, DeliverySource.LIVE, fetching, pending)
                    continue
                request = pending.pop(frame.get("id", -1), None)
                if request is None:
                    continue
                what, channel, cursor, sent_at = request
                if kind == "err":
                    self._count_error(int(frame.get("code", 0)))
                    if what == "fetch":
                        fetching.pop(channel, None)
                        continue
                    raise ConnectionError(f"sub refused: {frame}")  # reconnect and retry
                if what == "sub":
                    resumed = frame.get("resumed") if cursor else None
                    self.stats.resumes += bool(cursor)
                    self.stats.resumed_false += resumed is False
                    self.history.subscribed(self.name, channel, cursor, resumed, now(), sent_at)
                    if resumed is False:
                        self.cursor[channel] = 0  # the SDK starts again from the next serial
                    if all(c not in {p[1] for p in pending.values()} for c in self.channels):
                        self.subscribed.set()
                elif what == "fetch":
                    fetching.pop(channel, None)
                    for message in frame.get("messages") or []:
                        await self._message(link, message, DeliverySource.FETCH, fetching, pending)

        task = asyncio.create_task(follow())
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                task.result()  # raises what ended the connection
                raise ConnectionError("connection closed")
        finally:
            for pending_task in (task, stopping):
                pending_task.cancel()
                with contextlib.suppress(BaseException):
                    await pending_task

    async def _message(
        self,
        link: _Link,
        frame: dict[str, Any],
        source: DeliverySource,
        fetching: dict[str, int],
        pending: dict[int, tuple[str, str, int, float]],
    ) -> None:
        channel = frame.get("channel", "")
        serial = int(frame.get("seq") or 0)
        if channel not in self.received or not serial:
            return
        received = self.received[channel]
        if serial in received:
            self.stats.redelivered += 1  # the SDK drops it (id dedup); the app never sees it
            return
        if source is DeliverySource.LIVE and serial < max(received, default=0):
            # Below a serial already received: a resume replay healing a gap the live feed
            # left, which arrives after the later serials by design (like a fetch).
            source = DeliverySource.FETCH
        received.add(serial)
        self.history.delivered(
            self.name, channel, serial, str(frame.get("messageId", "")), now(), source
        )
        cursor = self.cursor[channel]
        if cursor == 0:
            cursor = serial  # a fresh (or reset) subscriber adopts its first serial
        while cursor + 1 in received:
            cursor += 1
        self.cursor[channel] = cursor
        if serial > cursor + 1 and channel not in fetching:
            request_id = next(self._ids)
            fetching[channel] = request_id
            pending[request_id] = ("fetch", channel, cursor, now())
            await link.send(
                {"t": "fetch", "id": request_id, "channel": channel, "fromSerial": cursor}
            )


class PresenceMember(_Client):
    """Enters presence on ``channel`` and stays (re-entering after every reconnect)."""

    def __init__(
        self, name: str, urls: list[str], history: History, channel: str, start: int = 0
    ) -> None:
        super().__init__(name, urls, history, start)
        self.channel = channel
        self.entered = asyncio.Event()
        self.link: _Link | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Stay present until ``stop``."""
        while not stop.is_set():
            self.entered.clear()
            link = await self._connect(stop, clientId=self.name)
            if link is None:
                return
            self.link = link
            try:
                request_id = next(self._ids)
                await link.send({"t": "sub", "id": next(self._ids), "channel": self.channel})
                await link.send(
                    {
                        "t": "pres",
                        "id": request_id,
                        "channel": self.channel,
                        "action": "enter",
                        "data": {"who": self.name},
                    }
                )
                async for frame in link.frames():
                    if frame.get("id") == request_id:
                        if frame.get("t") == "ack":
                            self.entered.set()
                        else:
                            self._count_error(int(frame.get("code", 0)))
                            raise ConnectionError(f"enter refused: {frame}")
                    if stop.is_set():
                        break
            except (websockets.ConnectionClosed, OSError, TimeoutError, ConnectionError):
                self._next_gateway()
            finally:
                self.link = None
                await link.close()


class PresenceWatcher(_Client):
    """Watches presence on ``channel``: a reset and a fresh snapshot after each reconnect."""

    def __init__(
        self, name: str, urls: list[str], history: History, channel: str, start: int = 0
    ) -> None:
        super().__init__(name, urls, history, start)
        self.channel = channel
        self.watching = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        """Watch until ``stop``."""
        while not stop.is_set():
            link = await self._connect(stop)
            if link is None:
                return
            try:
                self.history.presence_event(self.name, self.channel, "reset", "", "", now())
                request_id = next(self._ids)
                await link.send({"t": "presSub", "id": request_id, "channel": self.channel})
                async for frame in link.frames():
                    if frame.get("t") == "presEvt" and frame.get("channel") == self.channel:
                        self.history.presence_event(
                            self.name,
                            self.channel,
                            str(frame["action"]),
                            str(frame["clientId"]),
                            str(frame["connectionId"]),
                            now(),
                        )
                    elif frame.get("id") == request_id:
                        if frame.get("t") != "ack":
                            raise ConnectionError(f"presSub refused: {frame}")
                        self.watching.set()
            except (websockets.ConnectionClosed, OSError, TimeoutError, ConnectionError):
                self._next_gateway()
            finally:
                self.watching.clear()
                await link.close()
