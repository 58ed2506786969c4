"""Channels and their presence: attach/detach, subscribe, publish, resume, history.

Follows ``channel.ts`` of @foony/realtime 0.16.0: the same channel states and events, the
same serial cursor (adopt the first serial, advance on ``+1``, ``fetch`` on a gap), the same
8 192-entry ``(clientId, messageId)`` de-duplication that makes replays and fetch overlaps
harmless, the same auto-batching of single publishes (10 ms, 200 members) and the same
presence re-entry after a reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import orjson

from realtime_client.crypto import Cipher, CipherError, is_cipher_encoding
from realtime_client.errors import ConnectionClosedError, RealtimeError, is_capability_error
from realtime_client.events import EventEmitter, Stream, report_listener_error
from realtime_client.messages import (
    ChannelState,
    ChannelStateChange,
    ConnectionState,
    ConnectionStateChange,
    HistoryPage,
    Message,
    PresenceMessage,
)
from realtime_protocol.frames import (
    BatchMember,
    BundleFrame,
    FetchFrame,
    HistoryFrame,
    MessageFrame,
    PresenceAction,
    PresenceEventFrame,
    PresenceFrame,
    PresenceSubscribeFrame,
    PresenceUnsubscribeFrame,
    PublishFrame,
    SubscribeFrame,
    UnsubscribeFrame,
)
from realtime_protocol.frames import Message as WireMessage

if TYPE_CHECKING:
    from realtime_client.connection import Connection

__all__ = [
    "DEDUP_CACHE_SIZE",
    "Channel",
    "OutgoingMessage",
    "Presence",
    "expand_message",
    "is_valid_channel_name",
]

DEFAULT_BATCH_INTERVAL_S = 0.010
DEFAULT_BATCH_MAX_MESSAGES = 200
DEDUP_CACHE_SIZE = 8192
MAX_CHANNEL_NAME_LENGTH = 255
_NAME_CHARACTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789:_-")
_ACTION_NAMES = {
    PresenceAction.ENTER: "enter",
    PresenceAction.LEAVE: "leave",
    PresenceAction.UPDATE: "update",
}

MessageListener = Callable[[Message], object]
PresenceListener = Callable[[PresenceMessage], object]
ChannelListener = Callable[[ChannelStateChange], object]


def is_valid_channel_name(name: str) -> bool:
    """The server's channel grammar (PROTOCOL.md 7.1), checked before anything is sent."""
    return (
        0 < len(name) <= MAX_CHANNEL_NAME_LENGTH
        and not name.startswith(":")
        and all(character in _NAME_CHARACTERS for character in name)
    )


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """One message of an array publish (``Channel.publish([...])``)."""

    name: str
    data: Any = None


def _load(data: bytes | None) -> Any:
    return None if data is None else orjson.loads(data)


def _member_message(message: WireMessage, index: int, member: BatchMember) -> Message:
    return Message(
        message.channel,
        member.name,
        _load(member.data),
        f"{message.message_id}:{index}",
        message.client_id,
        message.timestamp,
        member.encoding,
        0,
        message.ephemeral,
    )


def _single_message(message: WireMessage) -> Message:
    return Message(
        message.channel,
        message.name,
        _load(message.data),
        message.message_id,
        message.client_id,
        message.timestamp,
        message.encoding,
        message.serial,
        message.ephemeral,
    )


def expand_message(message: WireMessage) -> list[Message]:
    """A stored or live message as the application sees it, before decryption: a batch
    becomes one message per member with ids ``<id>:<index>`` and no serial of its own."""
    if message.members:
        return [
            _member_message(message, index, member) for index, member in enumerate(message.members)
        ]
    return [_single_message(message)]


def _decrypt(cipher: Cipher | None, message: Message) -> Message:
    """``message`` with its payload decrypted (raises ``CipherError`` when it cannot be)."""
    if cipher is None or not is_cipher_encoding(message.encoding):
        return message
    return Message(
        message.channel,
        message.name,
        cipher.decrypt(message.encoding, message.data),
        message.message_id,
        message.client_id,
        message.timestamp,
        "",
        message.serial,
        message.ephemeral,
    )


class Channel(EventEmitter[str, ChannelStateChange]):
    """One channel of a ``Realtime`` client; get it with ``client.channels.get(name)``.

    Channel events (``on(listener, *events)``) are the state names plus ``"update"`` (an
    event that changes no state, such as a re-attach that could not resume), each a
    ``ChannelStateChange``.
    """

    def __init__(
        self,
        connection: Connection,
        name: str,
        cipher: Cipher | None = None,
        batch_interval: float = DEFAULT_BATCH_INTERVAL_S,
        batch_max_messages: int = DEFAULT_BATCH_MAX_MESSAGES,
    ) -> None:
        super().__init__()
        self.name = name
        self.cipher = cipher
        self._connection = connection
        self._batch_interval = batch_interval
        self._batch_max_messages = batch_max_messages
        self._state = ChannelState.INITIALIZED
        self._message_listeners: list[tuple[frozenset[str] | None, MessageListener]] = []
        self._seen: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._serial = 0
        self._backfilling = False
        self._wanted = False
        self._attach_task: asyncio.Task[None] | None = None
        self._batch: list[tuple[BatchMember, asyncio.Future[int]]] = []
        self._batch_timer: asyncio.TimerHandle | None = None
        self._last_flush = 0.0
        self._tasks: set[asyncio.Task[Any]] = set()
        self.presence = Presence(self)
        connection._register_channel(name, self)
        self._connection_off = connection.on(self._on_connection_state)

    # ---- state ----

    @property
    def state(self) -> ChannelState:
        """The channel's state."""
        return self._state

    @property
    def serial(self) -> int:
        """The channel's contiguous serial cursor: every durable message up to it has been
        delivered (0 = none yet). Persist it and pass it to ``resume_from`` to resume after a
        restart."""
        return self._serial

    def resume_from(self, serial: int) -> None:
        """Resume from ``serial`` on the next attach (messages after it are replayed, and
        ``attached`` reports ``resumed``). Ignored once attaching or attached."""
        if serial <= 0 or self._state in (ChannelState.ATTACHING, ChannelState.ATTACHED):
            return
        self._serial = max(self._serial, serial)

    def _transition(
        self,
        state: ChannelState,
        resumed: bool = False,
        reason: BaseException | None = None,
        notify: bool = False,
    ) -> None:
        previous = self._state
        if previous is state:
            if notify:
                self._emit("update", ChannelStateChange(state, state, resumed, reason))
            return
        self._state = state
        self._emit(state.value, ChannelStateChange(state, previous, resumed, reason))

    def _on_connection_state(self, change: ConnectionStateChange) -> None:
        state = change.current
        if change.previous is state:
            return
        if state in (ConnectionState.DISCONNECTED, ConnectionState.SUSPENDED):
            if self._state is ChannelState.ATTACHED:
                reason = change.reason or ConnectionClosedError(f"connection {state}")
                self._transition(ChannelState.SUSPENDED, reason=reason)
            self.presence._on_disconnected()
        elif state is ConnectionState.CONNECTED:
            if self._state is ChannelState.SUSPENDED:
                self._transition(ChannelState.ATTACHING)
        elif state is ConnectionState.FAILED and self._is_live():
            self._transition(ChannelState.FAILED, reason=change.reason)
        elif state is ConnectionState.CLOSED and self._is_live():
            self._transition(ChannelState.DETACHED)

    def _is_live(self) -> bool:
        return self._state not in (
            ChannelState.INITIALIZED,
            ChannelState.DETACHED,
            ChannelState.FAILED,
        )

    def _spawn(self, coroutine: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---- attach / detach ----

    async def attach(self) -> None:
        """Subscribe on the server (resuming from ``serial`` when there is one).

        A connection that drops meanwhile does not fail it: the channel is re-attached after
        the reconnect and ``attach`` returns then. Raises ``RealtimeError``: a 403xx refusal
        leaves the channel ``failed`` and forgotten; other refusals leave it ``suspended``,
        re-attached after the next reconnect; ``ConnectionClosedError`` when the connection
        is closed, suspended or failed.
        """
        while self._state is not ChannelState.ATTACHED:
            if self._attach_task is None or self._attach_task.done():
                self._transition(ChannelState.ATTACHING)
                self._wanted = True
                self._attach_task = self._spawn(self._subscribe(explicit=True))
            try:
                await asyncio.shield(self._attach_task)
            except ConnectionClosedError:
                if not self._connection._will_reconnect() or not self._wanted:
                    raise
                if self.state is ChannelState.ATTACHED:  # attached meanwhile
                    return
                # Dropped mid-attach: the reconnect re-attaches the channel; wait for it.
                change = await self.wait_for(
                    ChannelState.ATTACHED, ChannelState.FAILED, ChannelState.DETACHED
                )
                if change.current is not ChannelState.ATTACHED:
                    raise change.reason or ConnectionClosedError(
                        f"channel {change.current}"
                    ) from None

    async def _subscribe(self, explicit: bool) -> None:
        last_serial = self._serial
        try:
            ack = await self._connection.request(
                lambda request_id: SubscribeFrame(request_id, self.name, last_serial)
            )
        except RealtimeError as error:
            if not explicit and not is_capability_error(error):
                # A failed restore leaves the channel attaching until the next reconnect.
                return
            if is_capability_error(error):
                self._wanted = False
                self._transition(ChannelState.FAILED, reason=error)
            elif self._state is ChannelState.ATTACHING:
                self._transition(ChannelState.SUSPENDED, reason=error)
            if explicit:
                raise
            return
        if last_serial > 0:
            self._on_resumed(bool(ack.resumed))
        elif self._state is not ChannelState.ATTACHED:
            self._transition(ChannelState.ATTACHED)

    def _on_resumed(self, resumed: bool) -> None:
        if not resumed:
            # Part of the range aged out: adopt the next serial seen, report the gap.
            self._serial = 0
        if self._state in (ChannelState.ATTACHING, ChannelState.SUSPENDED, ChannelState.ATTACHED):
            self._transition(ChannelState.ATTACHED, resumed=resumed, notify=True)

    def _on_reconnected(self) -> None:
        """Called by the connection after a reconnect: re-subscribe (resuming from the
        cursor), re-open the presence watcher, re-enter presence."""
        if self._wanted:
            self._attach_task = self._spawn(self._subscribe(explicit=False))
        self.presence._on_reconnected()

    async def detach(self) -> None:
        """Unsubscribe; also ends this connection's presence membership and watcher here."""
        await self.flush()
        if self._state in (
            ChannelState.INITIALIZED,
            ChannelState.DETACHED,
            ChannelState.DETACHING,
        ):
            return
        self._transition(ChannelState.DETACHING)
        self._wanted = False
        self.presence._on_detached()
        try:
            await self._connection.request(
                lambda request_id: UnsubscribeFrame(request_id, self.name)
            )
        finally:
            # A re-attach may have started meanwhile; only a channel still detaching ends.
            if self.state is ChannelState.DETACHING:
                self._transition(ChannelState.DETACHED)

    # ---- subscribe ----

    def add_listener(
        self, listener: MessageListener, name: str | Iterable[str] | None = None
    ) -> Callable[[], None]:
        """Register ``listener`` for messages (all, or those named ``name``) without
        attaching; returns the function that removes it."""
        names = None if name is None else frozenset([name] if isinstance(name, str) else name)
        entry = (names, listener)
        self._message_listeners.append(entry)

        def remove() -> None:
            if entry in self._message_listeners:
                self._message_listeners.remove(entry)

        return remove

    async def subscribe(
        self, listener: MessageListener, name: str | Iterable[str] | None = None
    ) -> Callable[[], None]:
        """Call ``listener(message)`` for every message (or only those named ``name``, one
        name or several) and attach; returns the function that removes the listener.

        If attaching fails the listener is removed again and the error raised.
        """
        remove = self.add_listener(listener, name)
        try:
            await self.attach()
        except BaseException:
            remove()
            raise
        return remove

    def unsubscribe(self, listener: MessageListener | None = None) -> None:
        """Remove ``listener`` (or every message listener); the channel stays attached."""
        if listener is None:
            self._message_listeners.clear()
        else:
            self._message_listeners = [
                entry for entry in self._message_listeners if entry[1] is not listener
            ]

    async def stream(
        self, name: str | Iterable[str] | None = None, max_queued: int = 1024
    ) -> Stream[Message]:
        """Attach and return an ``async for`` stream of messages (all or named ``name``).

        ``async with await channel.stream() as messages: async for message in messages``.
        The queue holds ``max_queued`` messages; a reader further behind gets
        ``QueueOverflowError``.
        """
        stream: Stream[Message] = Stream(max_queued)
        stream._attach(await self.subscribe(stream.push, name))
        return stream

    # ---- incoming ----

    def _on_message(self, frame: MessageFrame | BundleFrame) -> None:
        if isinstance(frame, BundleFrame):
            for message in frame.messages:
                self._deliver(message)
        else:
            self._deliver(frame.message)

    def _on_presence(self, frame: PresenceEventFrame) -> None:
        self.presence._on_event(frame)

    def _deliver(self, message: WireMessage) -> None:
        if message.members:
            for index, member in enumerate(message.members):
                self._deliver_one(
                    message.client_id,
                    f"{message.message_id}:{index}",
                    functools.partial(_member_message, message, index, member),
                    member.name,
                )
        else:
            self._deliver_one(
                message.client_id,
                message.message_id,
                functools.partial(_single_message, message),
                message.name,
            )
        if not message.ephemeral:
            self._record_serial(message.serial)

    def _deliver_one(
        self, client_id: str, message_id: str, build: Callable[[], Message], name: str
    ) -> None:
        key = (client_id, message_id)
        seen = self._seen
        if key in seen:
            return
        seen[key] = None
        if len(seen) > DEDUP_CACHE_SIZE:
            seen.popitem(last=False)
        listeners = [
            entry[1] for entry in self._message_listeners if entry[0] is None or name in entry[0]
        ]
        if not listeners:
            # Nobody listens: skip decoding (and decrypting) the payload.
            return
        try:
            message = _decrypt(self.cipher, build())
        except (CipherError, orjson.JSONDecodeError) as error:
            report_listener_error(error, f"decoding a message on {self.name}")
            return
        for listener in listeners:
            try:
                listener(message)
            except Exception as error:
                report_listener_error(error, f"message listener on {self.name}")

    def _record_serial(self, serial: int) -> None:
        if serial == 0:
            return
        if self._serial == 0 or serial == self._serial + 1:
            self._serial = serial
        elif serial > self._serial:
            self._backfill()

    def _backfill(self) -> None:
        """A gap: fetch what is missing above the cursor (one fetch at a time)."""
        if self._backfilling or self._state is not ChannelState.ATTACHED or self._serial <= 0:
            return
        self._backfilling = True
        self._spawn(self._fetch(self._serial))

    async def _fetch(self, from_serial: int) -> None:
        try:
            response = await self._connection.request_fetch(
                lambda request_id: FetchFrame(request_id, self.name, from_serial)
            )
        except RealtimeError:
            return  # retried on the next gapped message
        finally:
            self._backfilling = False
        if not response.resumed:
            self._on_resumed(False)
            return
        for message in response.messages:
            self._deliver(message)

    # ---- publish ----

    def _member(self, name: str, data: Any) -> BatchMember:
        if self.cipher is None:
            return BatchMember(name, orjson.dumps(data))
        encoding, ciphertext = self.cipher.encrypt(data)
        return BatchMember(name, orjson.dumps(ciphertext), encoding)

    async def publish(
        self,
        name_or_messages: str | Sequence[OutgoingMessage | Mapping[str, Any] | tuple[str, Any]],
        data: Any = None,
        *,
        ephemeral: bool = False,
    ) -> int:
        """Publish one message (``publish(name, data)``) or several as one atomic batch
        (``publish([OutgoingMessage(name, data), ...])``; dicts and ``(name, data)`` tuples
        work too), and wait for the ack.

        Single durable publishes are auto-batched (all published within ``batch_interval``,
        at most ``batch_max_messages``, go out as one batch). Returns the serial stored (the
        batch's, when batched; 0 for ``ephemeral`` ones, which are delivered live only).
        """
        if isinstance(name_or_messages, str):
            member = self._member(name_or_messages, data)
            if not ephemeral:
                return await self._enqueue(member)
            frame = PublishFrame(
                0,
                self.name,
                member.name,
                member.data,
                member.encoding,
                ephemeral=True,
            )
            return await self._connection.publish(frame)
        members = tuple(self._member(*_name_and_data(item)) for item in name_or_messages)
        frame = PublishFrame(0, self.name, "", b"null", ephemeral=ephemeral, members=members)
        return await self._connection.publish(frame)

    async def _enqueue(self, member: BatchMember) -> int:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._batch.append((member, future))
        if len(self._batch) >= self._batch_max_messages:
            self._flush_now()
        elif self._batch_timer is None:
            loop = asyncio.get_running_loop()
            wait = max(0.0, self._batch_interval - (loop.time() - self._last_flush))
            self._batch_timer = loop.call_later(wait, self._flush_now)
        return await future

    def _flush_now(self) -> None:
        if self._batch_timer is not None:
            self._batch_timer.cancel()
            self._batch_timer = None
        if not self._batch:
            return
        pending, self._batch = self._batch, []
        self._last_flush = asyncio.get_running_loop().time()
        frame = PublishFrame(
            0, self.name, "", b"null", members=tuple(member for member, _ in pending)
        )
        self._spawn(self._publish_batch(frame, [future for _, future in pending]))

    async def _publish_batch(self, frame: PublishFrame, futures: list[asyncio.Future[int]]) -> None:
        try:
            serial = await self._connection.publish(frame)
        except BaseException as error:
            for future in futures:
                if not future.done():
                    future.set_exception(error)
            if not isinstance(error, Exception):
                raise
            return
        for future in futures:
            if not future.done():
                future.set_result(serial)

    async def flush(self) -> None:
        """Send the auto-batch buffer now (``detach`` does this first)."""
        self._flush_now()

    # ---- history ----

    async def history(self, limit: int | None = None, before: int | None = None) -> HistoryPage:
        """A page of stored messages, oldest first: the newest ``limit`` (server default
        100, at most 1 000) with serial below ``before``. ``page.more`` says older ones
        exist; ``channel.history(before=page.before)`` reads them."""
        while True:
            try:
                response = await self._connection.request_history(
                    lambda request_id: HistoryFrame(request_id, self.name, limit or 0, before or 0)
                )
                break
            except ConnectionClosedError:
                # A read is safe to repeat: ask again once the connection is back.
                if not self._connection._will_reconnect():
                    raise
        messages: list[Message] = []
        for stored in response.messages:
            for message in expand_message(stored):
                try:
                    messages.append(_decrypt(self.cipher, message))
                except CipherError:
                    messages.append(message)  # as the SDK: undecryptable stays encrypted
        oldest = min((stored.serial for stored in response.messages if stored.serial), default=0)
        return HistoryPage(tuple(messages), response.more, oldest if response.more else 0)

    def history_pages(
        self, limit: int | None = None, before: int | None = None
    ) -> AsyncIterator[HistoryPage]:
        """Every page from newest to oldest, as an async iterator of ``HistoryPage``."""
        return _HistoryPages(self, limit, before)

    def _dispose(self) -> None:
        self._connection_off()
        if self._batch_timer is not None:
            self._batch_timer.cancel()
            self._batch_timer = None


class _HistoryPages:
    """Async iterator over history pages, newest page first."""

    def __init__(self, channel: Channel, limit: int | None, before: int | None) -> None:
        self._channel = channel
        self._limit = limit
        self._before = before
        self._done = False

    def __aiter__(self) -> _HistoryPages:
        return self

    async def __anext__(self) -> HistoryPage:
        if self._done:
            raise StopAsyncIteration
        page = await self._channel.history(self._limit, self._before)
        self._before = page.before
        self._done = not page.more or page.before == 0
        return page


def _name_and_data(item: OutgoingMessage | Mapping[str, Any] | tuple[str, Any]) -> tuple[str, Any]:
    if isinstance(item, OutgoingMessage):
        return item.name, item.data
    if isinstance(item, tuple):
        return item[0], item[1]
    return str(item.get("name", "")), item.get("data")


class Presence(EventEmitter[str, PresenceMessage]):
    """Presence on one channel: ``enter``/``update``/``leave`` this client, ``get`` the
    members, and watch ``enter``/``update``/``leave`` events (listeners or ``stream``).

    Watching starts with the first listener of ``subscribe``/``stream`` (``presSub``: a
    snapshot of the members, then live events; the inherited ``on`` registers a listener
    without starting to watch) and stops with the last one, unless ``get()`` was used,
    which keeps the member set tracked until the channel is detached. After a reconnect the
    watcher is re-opened, members who left meanwhile get a ``leave`` event, and a membership
    this client had is re-entered with its last data.
    """

    def __init__(self, channel: Channel) -> None:
        super().__init__()
        self._channel = channel
        self._connection = channel._connection
        self._watching = False
        self._tracking = False
        self._watch_task: asyncio.Task[None] | None = None
        self._synced = asyncio.Event()
        self._members: dict[str, PresenceMessage] = {}
        self._previous_members: dict[str, PresenceMessage] | None = None
        self._entered: tuple[Any] | None = None

    async def enter(self, data: Any = None) -> None:
        """Enter this client into the channel's presence with ``data`` (attaches first)."""
        self._entered = (data,)
        await self._send(PresenceAction.ENTER, data)

    async def update(self, data: Any = None) -> None:
        """Replace this client's presence data (enters when not yet present)."""
        self._entered = (data,)
        await self._send(PresenceAction.UPDATE, data)

    async def leave(self) -> None:
        """Leave the channel's presence."""
        self._entered = None
        await self._send(PresenceAction.LEAVE, None)

    async def _send(self, action: PresenceAction, data: Any) -> None:
        await self._channel.attach()
        payload: bytes | None = None
        encoding = ""
        if data is not None and action is not PresenceAction.LEAVE:
            if self._channel.cipher is not None:
                encoding, ciphertext = self._channel.cipher.encrypt(data)
                payload = orjson.dumps(ciphertext)
            else:
                payload = orjson.dumps(data)
        channel = self._channel.name
        await self._connection.request(
            lambda request_id: PresenceFrame(request_id, channel, action, payload, encoding)
        )

    async def get(self, timeout: float | None = None) -> list[PresenceMessage]:
        """The channel's current members (action ``present``), ordered by client id then
        connection id. Waits until the member set is in sync with the server (after a
        reconnect: until the new snapshot arrived)."""
        self._tracking = True
        async with asyncio.timeout(timeout):
            while True:
                try:
                    await self._ensure_watching()
                except ConnectionClosedError:
                    if not self._connection._will_reconnect():
                        raise
                if self._synced.is_set():
                    break
                await self._synced.wait()
        members = sorted(
            self._members.values(), key=lambda member: (member.client_id, member.connection_id)
        )
        return [replace(member, action="present") for member in members]

    async def subscribe(
        self, listener: PresenceListener, action: str | None = None
    ) -> Callable[[], None]:
        """Call ``listener(event)`` for presence events (all, or one ``action``: ``enter``,
        ``update``, ``leave``); starts watching (the snapshot of current members arrives
        first, as ``enter`` events). Returns the function that removes the listener."""
        remove = self.on(listener, action) if action else self.on(listener)
        try:
            await self._ensure_watching()
        except ConnectionClosedError:
            if not self._connection._will_reconnect():
                remove()
                raise
            # The watcher opens after the reconnect (snapshot first); the listener stays.
        except BaseException:
            remove()
            raise
        return remove

    async def stream(
        self, action: str | None = None, max_queued: int = 1024
    ) -> Stream[PresenceMessage]:
        """Start watching and return an ``async for`` stream of presence events."""
        stream: Stream[PresenceMessage] = Stream(max_queued)
        stream._attach(await self.subscribe(stream.push, action))
        return stream

    def unsubscribe(self, listener: PresenceListener | None = None) -> None:
        """Remove ``listener`` (or all); watching stops when none remain (unless tracked)."""
        self.off(listener)

    async def _ensure_watching(self) -> None:
        if self._watch_task is not None and not self._watch_task.done():
            await asyncio.shield(self._watch_task)
            return
        if self._watching and self._synced.is_set():
            return
        self._watching = True
        self._watch_task = self._channel._spawn(self._watch(explicit=True))
        await asyncio.shield(self._watch_task)

    async def _watch(self, explicit: bool) -> None:
        # A fresh snapshot arrives before the ack; members missing from it left meanwhile.
        self._previous_members = self._members
        self._members = {}
        self._synced.clear()
        channel = self._channel.name
        try:
            await self._connection.request(
                lambda request_id: PresenceSubscribeFrame(request_id, channel)
            )
        except RealtimeError as error:
            if self._previous_members is not None:
                self._members, self._previous_members = self._previous_members, None
            if is_capability_error(error):
                self._watching = False
                self._tracking = False
            if explicit:
                raise
            return
        previous, self._previous_members = self._previous_members or {}, None
        self._synced.set()
        for connection_id, member in previous.items():
            if connection_id not in self._members:
                self._emit_event(replace(member, action="leave"))

    def _listener_removed(self) -> None:
        if self._watching and not self.has_listeners and not self._tracking:
            self._watching = False
            self._synced.clear()
            self._members = {}
            channel = self._channel.name
            if self._connection.state is ConnectionState.CONNECTED:
                self._channel._spawn(self._quiet_request(channel))

    async def _quiet_request(self, channel: str) -> None:
        with contextlib.suppress(RealtimeError):
            await self._connection.request(
                lambda request_id: PresenceUnsubscribeFrame(request_id, channel)
            )

    def _on_disconnected(self) -> None:
        self._synced.clear()

    def _on_reconnected(self) -> None:
        if self._watching:
            self._watch_task = self._channel._spawn(self._watch(explicit=False))
        if self._entered is not None:
            self._channel._spawn(self._reenter(self._entered[0]))

    async def _reenter(self, data: Any) -> None:
        # A failed re-entry is tried again after the next reconnect.
        with contextlib.suppress(RealtimeError):
            await self._send(PresenceAction.ENTER, data)

    def _on_detached(self) -> None:
        self._watching = False
        self._tracking = False
        self._entered = None
        self._members = {}
        self._synced.clear()

    def _on_event(self, frame: PresenceEventFrame) -> None:
        data = _load(frame.data)
        encoding = frame.encoding
        cipher = self._channel.cipher
        if cipher is not None and is_cipher_encoding(encoding):
            try:
                data = cipher.decrypt(encoding, data)
                encoding = ""
            except CipherError as error:
                report_listener_error(error, f"decrypting presence on {frame.channel}")
                return
        event = PresenceMessage(
            _ACTION_NAMES[frame.action],
            frame.channel,
            frame.client_id,
            frame.connection_id,
            data,
            frame.timestamp,
            encoding,
        )
        if frame.action is PresenceAction.LEAVE:
            self._members.pop(frame.connection_id, None)
        else:
            self._members[frame.connection_id] = event
        self._emit_event(event)

    def _emit_event(self, event: PresenceMessage) -> None:
        self._emit(event.action, event)
