"""Live fan-out: one NATS subscription per channel with local subscribers.

Each live message is decoded once and encoded at most once per wire format, however many
connections receive it (``Delivery``); connections get the pre-encoded bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from gateway.broker import Broker
from gateway.metrics import METRICS
from nats_adapter.connect import flush
from realtime_protocol import binary_codec, json_codec
from realtime_protocol.binary_codec import FrameDecodeError
from realtime_protocol.frames import Message
from shared import subjects
from shared.subjects import SERIAL_HEADER

__all__ = ["ChannelRouter", "Delivery", "Subscriber"]

log = logging.getLogger(__name__)


class Delivery:
    """One live message and its lazily built, cached encodings."""

    __slots__ = ("_binary", "_json", "message")

    def __init__(self, message: Message) -> None:
        self.message = message
        self._binary: bytes | None = None
        self._json: bytes | None = None

    @property
    def binary(self) -> bytes:
        """The length-prefixed binary record."""
        if self._binary is None:
            self._binary = binary_codec.frame_record(
                binary_codec.encode_message_record(self.message)
            )
        return self._binary

    @property
    def json(self) -> bytes:
        """The JSON text message."""
        if self._json is None:
            self._json = json_codec.encode_message_text(self.message)
        return self._json

    def queued_bytes(self, count: int, json_count: int) -> int:
        """Bytes queued by a fan-out to ``count`` subscribers, ``json_count`` of them JSON,
        counting only the encodings that were built (a subscriber whose delivery was held
        for a replay may have needed none yet)."""
        binary = len(self._binary) if self._binary is not None else 0
        text = len(self._json) if self._json is not None else 0
        return json_count * text + (count - json_count) * binary


class Subscriber(Protocol):
    """What the router needs of a connection."""

    @property
    def wants_json(self) -> bool:
        """True when it receives JSON text (fixed once the connection is authenticated)."""

    def deliver(self, delivery: Delivery) -> None:
        """Queue ``delivery`` without blocking."""


class _Channel:
    __slots__ = ("json_subscribers", "newest", "ready", "subscribers", "subscription")

    def __init__(self) -> None:
        self.subscribers: set[Subscriber] = set()
        # How many of them take JSON: a fan-out counts its bytes by codec without looking
        # at each subscriber.
        self.json_subscribers = 0
        self.subscription: Subscription | None = None
        # The newest stored serial fanned out here (a floor for history reads).
        self.newest = 0
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def add(self, subscriber: Subscriber) -> None:
        """Add ``subscriber`` (once) and count its codec."""
        if subscriber not in self.subscribers:
            self.subscribers.add(subscriber)
            self.json_subscribers += subscriber.wants_json

    def discard(self, subscriber: Subscriber) -> None:
        """Remove ``subscriber`` if present, and its codec from the count."""
        if subscriber in self.subscribers:
            self.subscribers.discard(subscriber)
            self.json_subscribers -= subscriber.wants_json


def decode_live(msg: Msg) -> Message:
    """Turn a live NATS message (republished from the stream, or ephemeral) into a Message."""
    message = binary_codec.decode_member(msg.data)
    headers = msg.headers
    if headers and SERIAL_HEADER in headers:
        return message.with_serial(int(headers[SERIAL_HEADER]))
    return message


class ChannelRouter:
    """Tracks which local connections subscribe to which (app, channel)."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._channels: dict[str, _Channel] = {}

    def __len__(self) -> int:
        return len(self._channels)

    def subscription_count(self) -> int:
        """Subscriptions of local connections, all channels together (read when scraped)."""
        return sum(len(entry.subscribers) for entry in self._channels.values())

    def newest_serial(self, app: str, channel: str) -> int:
        """The newest stored serial this gateway delivered live on the channel (0: none or
        not subscribed here)."""
        entry = self._channels.get(subjects.live_subject(app, channel))
        return entry.newest if entry is not None else 0

    async def add(self, app: str, channel: str, subscriber: Subscriber) -> None:
        """Subscribe ``subscriber``; returns once NATS will route the channel's messages here."""
        subject = subjects.live_subject(app, channel)
        entry = self._channels.get(subject)
        if entry is None:
            entry = self._channels[subject] = _Channel()
            entry.add(subscriber)
            try:
                nc = self._broker.client()
                entry.subscription = await nc.subscribe(subject, cb=self._handler(entry))
                # The SUB must reach the server before we ack, or a message published right
                # after the ack could miss us.
                await flush(nc, self._broker.settings.request_timeout_s)
            except BaseException as error:
                if self._channels.get(subject) is entry:
                    del self._channels[subject]
                # A SUB whose flush timed out may still reach the server later: without
                # this, the failed subscribers (told so with an err) would go on receiving
                # the channel through a subscription nobody owns, and get every message
                # twice once they subscribe again (a duplicate the fault suite found).
                entry.subscribers.clear()
                entry.json_subscribers = 0
                if entry.subscription is not None:
                    with contextlib.suppress(Exception):
                        await entry.subscription.unsubscribe()
                entry.ready.set_exception(error)
                entry.ready.exception()  # mark retrieved: other waiters get it too
                raise
            entry.ready.set_result(None)
            return
        entry.add(subscriber)
        await asyncio.shield(entry.ready)

    async def remove(self, app: str, channel: str, subscriber: Subscriber) -> None:
        """Unsubscribe ``subscriber``; drop the NATS subscription when nobody is left."""
        subject = subjects.live_subject(app, channel)
        entry = self._channels.get(subject)
        if entry is None:
            return
        entry.discard(subscriber)
        if entry.subscribers:
            return
        del self._channels[subject]
        if entry.subscription is not None:
            with contextlib.suppress(Exception):
                await entry.subscription.unsubscribe()

    def _handler(self, entry: _Channel) -> Callable[[Msg], Awaitable[None]]:
        metrics = METRICS
        delivered = metrics.deliveries
        sent_bytes = metrics.sent_bytes
        lag = metrics.delivery_lag

        async def on_message(msg: Msg) -> None:
            try:
                delivery = Delivery(decode_live(msg))
            except (FrameDecodeError, ValueError):
                log.error("undecodable live message on %s dropped", msg.subject)
                return
            subscribers = entry.subscribers
            for subscriber in subscribers:
                subscriber.deliver(delivery)
            # Counted once per fan-out, never per delivery (gateway.metrics).
            count = len(subscribers)
            delivered.value += count
            sent_bytes.value += delivery.queued_bytes(count, entry.json_subscribers)
            message = delivery.message
            if message.serial:  # stored: its timestamp was set when it was published
                if message.serial > entry.newest:
                    entry.newest = message.serial
                lag.observe(max(0.0, time.time() - message.timestamp / 1000))

        return on_message
