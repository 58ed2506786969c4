"""The ``Realtime`` client: one connection and its channels (``realtime.ts``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from realtime_client.channel import (
    DEFAULT_BATCH_INTERVAL_S,
    DEFAULT_BATCH_MAX_MESSAGES,
    Channel,
    OutgoingMessage,
    _name_and_data,
    is_valid_channel_name,
)
from realtime_client.connection import DEFAULT_ENDPOINT, AuthCallback, Connection
from realtime_client.crypto import Cipher
from realtime_client.messages import ConnectionState
from realtime_protocol.frames import PublishFrame

__all__ = ["BatchPublishResult", "BatchSpec", "Channels", "Realtime"]

MAX_BATCH_CHANNELS = 100
MAX_BATCH_MESSAGES = 1000

MessageInput = OutgoingMessage | Mapping[str, Any] | tuple[str, Any]


@dataclass(frozen=True, slots=True)
class BatchSpec:
    """Messages for ``Realtime.batch_publish``: all of ``messages`` to each of ``channels``."""

    channels: str | Sequence[str]
    messages: MessageInput | Sequence[MessageInput]


@dataclass(frozen=True, slots=True)
class BatchPublishResult:
    """Outcome of ``batch_publish``: per channel, ``None`` or the error that refused it."""

    success_count: int
    failure_count: int
    results: tuple[tuple[str, BaseException | None], ...]


class Channels:
    """The client's channels: ``get`` creates or returns one, ``release`` forgets it."""

    def __init__(self, realtime: Realtime) -> None:
        self._realtime = realtime
        self._channels: dict[str, Channel] = {}

    def get(
        self,
        name: str,
        cipher: Cipher | bytes | str | None = None,
        batch_interval: float | None = None,
        batch_max_messages: int | None = None,
    ) -> Channel:
        """The channel ``name`` (created on first use; options apply then).

        ``cipher`` (a ``Cipher`` or its key, raw or base64) encrypts what this client
        publishes and decrypts what it receives. ``ValueError`` for a name the server would
        refuse (1 to 255 of ``A-Z a-z 0-9 : - _``, not starting with ``:``).
        """
        if not is_valid_channel_name(name):
            raise ValueError(
                f'invalid channel name "{name}" (allowed: A-Z a-z 0-9 : - _, at most 255 '
                "characters, not starting with ':')"
            )
        channel = self._channels.get(name)
        if channel is None:
            if cipher is not None and not isinstance(cipher, Cipher):
                cipher = Cipher(cipher)
            realtime = self._realtime
            channel = Channel(
                realtime.connection,
                name,
                cipher,
                batch_interval if batch_interval is not None else realtime.batch_interval,
                batch_max_messages or realtime.batch_max_messages,
            )
            self._channels[name] = channel
        return channel

    async def release(self, name: str) -> None:
        """Detach and forget the channel ``name`` (a later ``get`` makes a new one)."""
        channel = self._channels.pop(name, None)
        if channel is None:
            return
        self._realtime.connection._unregister_channel(name)
        channel._dispose()
        # Best effort, as the SDK: the connection may already be gone.
        with contextlib.suppress(Exception):
            await channel.detach()

    def __iter__(self) -> Any:
        return iter(list(self._channels.values()))

    def __contains__(self, name: object) -> bool:
        return name in self._channels


class Realtime:
    """A realtime client (WebSocket, binary protocol).

    Exactly one of ``key`` (``appSlug.keyId:secret``; ``client_id`` names the client),
    ``token`` (a JWT; it is never renewed, so the connection ends ``failed`` after it
    expires) or ``auth_callback`` (returns a token, or ``TokenDetails``, sync or async;
    called before every connect, so tokens are renewed on each reconnect and at once when
    the server says ``40102``). ``endpoint`` is a host (``wss://`` is used) or a
    ``ws://``/``wss://`` URL.

    Use ``async with Realtime(...) as client`` or ``await client.connect()`` and
    ``await client.close()``.
    """

    def __init__(
        self,
        *,
        key: str | None = None,
        token: str | None = None,
        auth_callback: AuthCallback | None = None,
        client_id: str | None = None,
        endpoint: str = DEFAULT_ENDPOINT,
        auto_reconnect: bool = True,
        initial_reconnect_delay: float = 1.0,
        max_reconnect_delay: float = 30.0,
        reconnect_jitter: float = 0.5,
        queue_messages: bool = True,
        connect_timeout: float = 15.0,
        max_outstanding_publishes: int = 10_000,
        batch_interval: float = DEFAULT_BATCH_INTERVAL_S,
        batch_max_messages: int = DEFAULT_BATCH_MAX_MESSAGES,
    ) -> None:
        self.connection = Connection(
            endpoint=endpoint,
            key=key,
            token=token,
            auth_callback=auth_callback,
            client_id=client_id,
            auto_reconnect=auto_reconnect,
            initial_reconnect_delay=initial_reconnect_delay,
            max_reconnect_delay=max_reconnect_delay,
            reconnect_jitter=reconnect_jitter,
            queue_messages=queue_messages,
            connect_timeout=connect_timeout,
            max_outstanding_publishes=max_outstanding_publishes,
        )
        self.key = key
        self.batch_interval = batch_interval
        self.batch_max_messages = batch_max_messages
        self.channels = Channels(self)

    @property
    def state(self) -> ConnectionState:
        """The connection's state."""
        return self.connection.state

    @property
    def connection_id(self) -> str | None:
        """The connection's id (``None`` before the first connect)."""
        return self.connection.connection_id

    @property
    def client_id(self) -> str | None:
        """The client id the server resolved (``None`` before the first connect)."""
        return self.connection.client_id

    async def connect(self, timeout: float | None = None) -> None:
        """Connect; see ``Connection.connect``."""
        await self.connection.connect(timeout)

    async def suspend(self) -> None:
        """Disconnect until ``connect()``; see ``Connection.suspend``."""
        await self.connection.suspend()

    async def close(self) -> None:
        """Close the connection for good and release every channel.

        No ``unsub`` is sent (and none awaited): the server ends a closed connection's
        subscriptions and presence itself, and ``close`` must not hang on a server that
        stopped answering.
        """
        await self.connection.close()
        for channel in list(self.channels):
            self.channels._channels.pop(channel.name, None)
            self.connection._unregister_channel(channel.name)
            channel._dispose()

    async def __aenter__(self) -> Realtime:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def batch_publish(self, specs: BatchSpec | Sequence[BatchSpec]) -> BatchPublishResult:
        """Publish messages to several channels at once: per channel one atomic batch of
        every message the specs name for it. At most 100 channels and 1 000 messages per
        channel (``ValueError``). A channel's failure does not fail the others."""
        spec_list = [specs] if isinstance(specs, BatchSpec) else list(specs)
        per_channel: dict[str, list[MessageInput]] = {}
        for spec in spec_list:
            channels = [spec.channels] if isinstance(spec.channels, str) else spec.channels
            messages: Sequence[MessageInput]
            if isinstance(spec.messages, OutgoingMessage | Mapping) or (
                isinstance(spec.messages, tuple)
                and len(spec.messages) == 2
                and isinstance(spec.messages[0], str)
            ):
                messages = [spec.messages]
            else:
                messages = spec.messages
            for channel in channels:
                per_channel.setdefault(channel, []).extend(messages)
        if len(per_channel) > MAX_BATCH_CHANNELS:
            raise ValueError(f"batch_publish: at most {MAX_BATCH_CHANNELS} channels per request")
        for channel, messages in per_channel.items():
            if len(messages) > MAX_BATCH_MESSAGES:
                raise ValueError(
                    f"batch_publish: at most {MAX_BATCH_MESSAGES} messages per channel per "
                    f'request (channel "{channel}" has {len(messages)})'
                )

        async def one(channel_name: str, messages: list[MessageInput]) -> BaseException | None:
            channel = self.channels.get(channel_name)
            members = tuple(channel._member(*_name_and_data(message)) for message in messages)
            try:
                await self.connection.publish(
                    PublishFrame(0, channel_name, "", b"null", members=members)
                )
            except Exception as error:
                return error
            return None

        outcomes = await asyncio.gather(*(one(name, m) for name, m in per_channel.items()))
        results = tuple(zip(per_channel, outcomes, strict=True))
        failures = sum(1 for outcome in outcomes if outcome is not None)
        return BatchPublishResult(len(results) - failures, failures, results)
