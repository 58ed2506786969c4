"""Listener registries and bounded async streams shared by connections, channels, presence."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from realtime_client.errors import QueueOverflowError

__all__ = ["EventEmitter", "Stream", "report_listener_error"]

EventT = TypeVar("EventT", bound=Hashable)
ValueT = TypeVar("ValueT")
Listener = Callable[[ValueT], object]


def report_listener_error(error: BaseException, what: str) -> None:
    """Hand an exception raised by an application callback to the loop's exception handler:
    one bad listener must neither break delivery to the others nor kill the reader task."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    loop.call_exception_handler({"message": f"realtime_client: {what} raised", "exception": error})


class EventEmitter(Generic[EventT, ValueT]):
    """Listeners for every event or for chosen events, called synchronously in order.

    ``on`` returns a function that removes the listener again.
    """

    def __init__(self) -> None:
        self._listeners: list[tuple[frozenset[EventT] | None, Listener[ValueT], bool]] = []

    def on(
        self, listener: Listener[ValueT], *events: EventT, once: bool = False
    ) -> Callable[[], None]:
        """Call ``listener(value)`` on every event, or only on ``events`` when given."""
        entry = (frozenset(events) if events else None, listener, once)
        self._listeners.append(entry)

        def off() -> None:
            if entry in self._listeners:
                self._listeners.remove(entry)
                self._listener_removed()

        return off

    def once(self, listener: Listener[ValueT], *events: EventT) -> Callable[[], None]:
        """Like ``on``, but the listener is removed after its first call."""
        return self.on(listener, *events, once=True)

    def off(self, listener: Listener[ValueT] | None = None) -> None:
        """Remove ``listener`` (every registration of it), or all listeners when omitted."""
        before = len(self._listeners)
        if listener is None:
            self._listeners.clear()
        else:
            self._listeners = [entry for entry in self._listeners if entry[1] is not listener]
        if len(self._listeners) != before:
            self._listener_removed()

    async def wait_for(self, *events: EventT, timeout: float | None = None) -> ValueT:
        """The value of the next of ``events`` (any event when none are given)."""
        future: asyncio.Future[ValueT] = asyncio.get_running_loop().create_future()

        def resolve(value: ValueT) -> None:
            if not future.done():
                future.set_result(value)

        off = self.on(resolve, *events)
        try:
            async with asyncio.timeout(timeout):
                return await future
        finally:
            off()

    @property
    def has_listeners(self) -> bool:
        """True while any listener is registered."""
        return bool(self._listeners)

    def _emit(self, event: EventT, value: ValueT) -> None:
        listeners = self._listeners
        if not listeners:
            return
        fired_once = False
        for entry in list(listeners):
            events, listener, once = entry
            if events is not None and event not in events:
                continue
            if once:
                fired_once = True
                if entry in self._listeners:
                    self._listeners.remove(entry)
            try:
                listener(value)
            except Exception as error:
                report_listener_error(error, f"listener for {event!r}")
        if fired_once:
            self._listener_removed()

    def _listener_removed(self) -> None:
        """Hook: a listener went away (presence stops watching when none remain)."""


class Stream(Generic[ValueT]):
    """An ``async for`` view of a listener, with a bounded queue.

    Use it as ``async with channel.stream() as messages: async for message in messages``, or
    iterate it directly and ``close()`` it when done. When the reader falls ``max_queued``
    items behind, later items are dropped and the iteration raises ``QueueOverflowError``
    after the items queued before the overflow: a gap is reported, never hidden.
    """

    def __init__(self, max_queued: int = 1024) -> None:
        if max_queued < 1:
            raise ValueError("max_queued must be at least 1")
        self._items: deque[ValueT] = deque()
        self._max_queued = max_queued
        self._waiter: asyncio.Future[None] | None = None
        self._overflowed = False
        self._closed = False
        self._detach: Callable[[], None] | None = None
        self.dropped = 0
        """Items dropped because the queue was full."""

    def _attach(self, detach: Callable[[], None]) -> None:
        self._detach = detach

    def push(self, item: ValueT) -> None:
        """Queue ``item`` for the reader (called by the listener registration)."""
        if self._closed:
            return
        if self._overflowed or len(self._items) >= self._max_queued:
            self._overflowed = True
            self.dropped += 1
        else:
            self._items.append(item)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def close(self) -> None:
        """Stop receiving; a pending ``async for`` ends after the queued items."""
        if self._closed:
            return
        self._closed = True
        if self._detach is not None:
            self._detach()
            self._detach = None
        self._wake()

    def __aiter__(self) -> Stream[ValueT]:
        return self

    async def __anext__(self) -> ValueT:
        while True:
            if self._items:
                return self._items.popleft()
            if self._overflowed:
                self.close()
                raise QueueOverflowError(
                    f"subscription queue overflowed ({self.dropped} dropped); read faster or "
                    "raise max_queued",
                    code=50000,
                )
            if self._closed:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def get(self, timeout: float | None = None) -> ValueT:
        """The next item, waiting at most ``timeout`` seconds (``TimeoutError``)."""
        async with asyncio.timeout(timeout):
            return await self.__anext__()

    async def __aenter__(self) -> Stream[ValueT]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
