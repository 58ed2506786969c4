"""A bounded per-connection send queue that coalesces binary records.

Live deliveries beyond ``max_bytes`` are dropped (subscribers heal holes with ``fetch``);
replies are always queued, but a connection whose queue passes twice the bound is marked
overflowed: its queue is discarded at once and ``on_overflow`` tells the transport to close
it, so a client that stops reading cannot grow memory without bound. Sizes count what an
item really holds (the bytes plus the object and queue slot), not only ``len()``: a flood of
tiny replies costs several times its payload. Above half the bound the queue reports
``backed_up``; transports stop reading the client's input until it drains (TCP
back-pressure instead of buffering its replies).

Binary connections get every queued record in as few WebSocket messages as possible (each
at most ``max_message_bytes`` unless one record is larger); JSON connections get one message
per frame, as JSON-era clients require.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["ITEM_OVERHEAD_BYTES", "Outbox"]

# What one queued bytes object costs beyond its payload: the object header (33 bytes on
# 64-bit CPython), allocator rounding and the list slot.
ITEM_OVERHEAD_BYTES = 64


class Outbox:
    """Queue of encoded frames waiting for one connection's transport."""

    def __init__(self, max_bytes: int, coalesce: bool, max_message_bytes: int = 64 * 1024) -> None:
        self.max_bytes = max_bytes
        self.coalesce = coalesce
        self.max_message_bytes = max_message_bytes
        self.dropped = 0
        self.overflowed = False
        self.closed = False
        # A list, not a deque: items are only appended, iterated and cleared, and an empty
        # deque costs ~700 bytes against a list's 56, on every idle connection (issue 15).
        self._items: list[bytes] = []
        self._size = 0
        # Created only while someone waits for frames (an asyncio.Event would cost another
        # ~800 bytes per connection, idle ones included).
        self._wakeup: asyncio.Future[None] | None = None
        # Created only while a reader waits for the queue to drain.
        self._drained: asyncio.Future[None] | None = None
        # A transport that writes directly sets this; it is called when the queue goes from
        # empty to non-empty (else ``get`` waiters are woken).
        self.on_ready: Callable[[], None] | None = None
        # Called once when the queue overflows (the transport closes the connection).
        self.on_overflow: Callable[[], None] | None = None
        # Called once when the outbox closes (the connection started closing).
        self.on_close: Callable[[], None] | None = None

    @property
    def size(self) -> int:
        """Bytes queued."""
        return self._size

    @property
    def backed_up(self) -> bool:
        """True while more than half the bound waits: stop reading the client's input."""
        return self._size > self.max_bytes // 2

    def put(self, data: bytes) -> None:
        """Queue a reply (never dropped; past twice the bound the connection overflows)."""
        if self.closed or self.overflowed:
            return
        was_empty = not self._items
        self._items.append(data)
        self._size += len(data) + ITEM_OVERHEAD_BYTES
        if self._size > 2 * self.max_bytes:
            self._overflow()
        elif was_empty:
            self._signal()

    def offer(self, data: bytes) -> bool:
        """Queue a live delivery unless the queue is full; return whether it was queued."""
        if self.closed or self.overflowed:
            return False
        cost = len(data) + ITEM_OVERHEAD_BYTES
        if self._size + cost > self.max_bytes:
            self.dropped += 1
            return False
        was_empty = not self._items
        self._items.append(data)
        self._size += cost
        if was_empty:
            self._signal()
        return True

    def _overflow(self) -> None:
        self.overflowed = True
        self.discard()
        if self.on_overflow is not None:
            self.on_overflow()
        self._wake()

    def discard(self) -> None:
        """Drop everything queued (the connection is being torn down)."""
        self._items.clear()
        self._size = 0
        self._notify_drained()

    async def wait_drained(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Wait until the queue is no longer ``backed_up`` (or is closed), or ``timeout``
        seconds: a paused reader also has to notice a transport that went away."""
        if not self.backed_up or self.closed:
            return
        if self._drained is None:
            self._drained = asyncio.get_running_loop().create_future()
        # asyncio.wait never cancels the shared future, whatever happens to this waiter.
        await asyncio.wait((self._drained,), timeout=timeout)

    def _notify_drained(self) -> None:
        drained = self._drained
        if drained is not None and not self.backed_up:
            self._drained = None
            if not drained.done():
                drained.set_result(None)

    def _signal(self) -> None:
        if self.on_ready is not None:
            self.on_ready()
        else:
            self._wake()

    def wake(self) -> None:
        """Wake a ``get`` waiter (the transport's slow path)."""
        self._wake()

    @property
    def pending(self) -> bool:
        """True when frames are queued."""
        return bool(self._items)

    def close(self) -> None:
        """Stop accepting frames; ``get`` returns what is queued, then nothing."""
        if not self.closed and self.on_close is not None:
            self.on_close()
        self.closed = True
        self._wake()
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    async def get(self) -> list[bytes]:
        """Wait for frames; return them as WebSocket messages. Empty once closed and drained."""
        if not self._items:
            await self.wait_pending()
            if not self._items:
                return []
            # Woken by the first frame: let the rest of this loop iteration's callbacks (other
            # acks, the rest of a fan-out) queue theirs, so they leave in one write.
            await asyncio.sleep(0)
        return self.take()

    async def wait_pending(self) -> None:
        """Wait until frames are queued or the queue is closed, taking nothing: a caller
        that may give up (a long-poll whose client went away) takes only once it knows it
        can deliver. Cancelling it loses nothing."""
        while not self._items and not self.closed:
            if self._wakeup is None:
                self._wakeup = asyncio.get_running_loop().create_future()
            # asyncio.wait never cancels the shared future, whatever happens to this waiter.
            await asyncio.wait((self._wakeup,))

    def _wake(self) -> None:
        wakeup, self._wakeup = self._wakeup, None
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    def take(self) -> list[bytes]:
        """Return everything queued now, as messages, without waiting."""
        items = self._items
        if len(items) == 1:
            messages = [items[0]]  # the common case of a fan-out: keep the shared bytes object
        elif not self.coalesce:
            messages = list(items)
        else:
            messages = []
            group: list[bytes] = []
            group_size = 0
            for item in items:
                if group and group_size + len(item) > self.max_message_bytes:
                    messages.append(b"".join(group))
                    group, group_size = [], 0
                group.append(item)
                group_size += len(item)
            if group:
                messages.append(group[0] if len(group) == 1 else b"".join(group))
        items.clear()
        self._size = 0
        if self._drained is not None:
            self._notify_drained()
        return messages
