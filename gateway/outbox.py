"""A bounded per-connection send queue that coalesces binary records.

Live deliveries beyond ``max_bytes`` are dropped (subscribers heal holes with ``fetch``);
replies are always queued, but a connection whose queue passes twice the bound is marked
overflowed and closed by its transport, so a client that stops reading cannot grow memory
without bound. Binary connections get every queued record in as few WebSocket messages as
possible (each at most ``max_message_bytes`` unless one record is larger); JSON connections
get one message per frame, as JSON-era clients require.
"""

from __future__ import annotations

import asyncio
from collections import deque

__all__ = ["Outbox"]


class Outbox:
    """Queue of encoded frames waiting for one connection's transport."""

    def __init__(self, max_bytes: int, coalesce: bool, max_message_bytes: int = 64 * 1024) -> None:
        self.max_bytes = max_bytes
        self.coalesce = coalesce
        self.max_message_bytes = max_message_bytes
        self.dropped = 0
        self.overflowed = False
        self.closed = False
        self._items: deque[bytes] = deque()
        self._size = 0
        self._wakeup = asyncio.Event()

    @property
    def size(self) -> int:
        """Bytes queued."""
        return self._size

    def put(self, data: bytes) -> None:
        """Queue a reply (never dropped)."""
        if self.closed:
            return
        self._items.append(data)
        self._size += len(data)
        if self._size > 2 * self.max_bytes:
            self.overflowed = True
        self._wakeup.set()

    def offer(self, data: bytes) -> bool:
        """Queue a live delivery unless the queue is full; return whether it was queued."""
        if self.closed:
            return False
        if self._size + len(data) > self.max_bytes:
            self.dropped += 1
            return False
        self._items.append(data)
        self._size += len(data)
        self._wakeup.set()
        return True

    def close(self) -> None:
        """Stop accepting frames; ``get`` returns what is queued, then nothing."""
        self.closed = True
        self._wakeup.set()

    async def get(self) -> list[bytes]:
        """Wait for frames; return them as WebSocket messages. Empty once closed and drained."""
        if not self._items:
            while not self._items:
                if self.closed:
                    return []
                self._wakeup.clear()
                await self._wakeup.wait()
            # Woken by the first frame: let the rest of this loop iteration's callbacks (other
            # acks, the rest of a fan-out) queue theirs, so they leave in one write.
            await asyncio.sleep(0)
        return self.take()

    def take(self) -> list[bytes]:
        """Return everything queued now, as messages, without waiting."""
        items = self._items
        if not self.coalesce:
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
        return messages
