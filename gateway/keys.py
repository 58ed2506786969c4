"""Following the key registry: keys created, rotated, revoked or expired in the NATS bucket
take effect on this gateway within about a second, with no restart.

A watcher on the bucket (nats-py's ordered consumer) delivers the current records, then every
change. Each record is opened (``shared.keys``) and put into the gateway's ``Keyring``; a
deleted record (``realtime keys revoke``) or an expired key is removed from it, and every live
connection authenticated with that key (directly or with a token it signed) gets an unscoped
``err`` 40101 and is closed. The watcher is replaced after every NATS reconnect and once a
minute, each time from a full snapshot that replaces the registry keys wholesale, so a change
missed while disconnected is never missed for long. Until the first snapshot is in, the
gateway is not ready (handshakes get 50001, ``/readyz`` 503): a valid registry key must never
be refused at start-up.

Without ``RT_KEYS_SECRET`` the registry is off and only static keys work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from gateway.broker import Broker
from nats_adapter.keys import key_bucket, next_update, stop_watching
from realtime_protocol.errors import ErrorCode
from realtime_protocol.frames import ErrorFrame, ServerFrame
from shared.auth import ApiKey, Keyring
from shared.keys import SecretBox, decode_record
from shared.logs import RateLimitFilter
from shared.session import CLOSE_POLICY_VIOLATION, Session
from shared.settings import Settings

__all__ = ["KeyHolder", "KeyRegistry"]

log = logging.getLogger(__name__)
log.addFilter(RateLimitFilter())

# A fresh snapshot this often even without a reconnect: the backstop for anything missed.
_RESYNC_S = 60.0
_EXPIRY_CHECK_S = 0.5
_RETRY_MIN_S = 0.2
_RETRY_MAX_S = 5.0


class KeyHolder(Protocol):
    """A live connection, as far as revocation is concerned."""

    @property
    def session(self) -> Session:
        """Its protocol state (the identity names the key)."""

    def send(self, frame: ServerFrame) -> None:
        """Queue a frame."""

    def close(self, code: int, reason: str) -> None:
        """Close after what is queued."""


class KeyRegistry:
    """Applies the registry bucket to ``keyring``; closes what a revoked key opened."""

    def __init__(
        self,
        settings: Settings,
        keyring: Keyring,
        broker: Broker,
        connections: Callable[[], Iterable[KeyHolder]],
    ) -> None:
        self.settings = settings
        self.keyring = keyring
        self.broker = broker
        self.connections = connections
        self.box = SecretBox(settings.keys_secret) if settings.keys_secret else None
        self.ready = asyncio.Event()
        if self.box is None:
            self.ready.set()  # nothing to wait for: static keys only
        # The registry keys applied now, by name.
        self.applied: dict[str, ApiKey] = {}

    @property
    def is_ready(self) -> bool:
        """True once the first snapshot is applied (always, with the registry off)."""
        return self.ready.is_set()

    async def start(self) -> None:
        """Follow the bucket until cancelled."""
        if self.box is None:
            log.info("key registry off (RT_KEYS_SECRET unset): static keys only")
            return
        expiry = asyncio.create_task(self._expire_keys(), name="key-expiry")
        try:
            await self._follow()
        finally:
            expiry.cancel()

    async def _follow(self) -> None:
        loop = asyncio.get_running_loop()
        seen: object = None
        watcher: KeyValue.KeyWatcher | None = None
        next_resync = 0.0
        delay = _RETRY_MIN_S
        while True:
            epoch = self.broker.connection_epoch()
            if epoch is None:
                await asyncio.sleep(0.1)
                continue
            try:
                if watcher is None or epoch != seen or loop.time() >= next_resync:
                    if watcher is not None:
                        with contextlib.suppress(Exception):
                            await stop_watching(watcher)
                        watcher = None
                    watcher = await self._snapshot()
                    seen, next_resync, delay = epoch, loop.time() + _RESYNC_S, _RETRY_MIN_S
                try:
                    entry = await next_update(watcher, 1.0)
                except TimeoutError:
                    continue
                if entry is not None:
                    self._apply(entry.key, entry.value, entry.operation in (KV_DEL, KV_PURGE))
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning(
                    "key registry: %s: %s; retrying in %.1fs", type(error).__name__, error, delay
                )
                watcher = None
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_S)

    async def _snapshot(self) -> KeyValue.KeyWatcher:
        """Start a watcher and apply the bucket's current records as the whole registry."""
        bucket = await key_bucket(self.broker.jetstream(), self.settings)
        watcher = await bucket.watchall()
        current: dict[str, bytes] = {}
        while True:
            entry = await next_update(watcher, self.settings.request_timeout_s * 5)
            if entry is None:  # the end of what was there: live changes follow
                break
            if entry.operation in (KV_DEL, KV_PURGE):
                current.pop(entry.key, None)
            elif entry.value is not None:
                current[entry.key] = entry.value
        for name in [name for name in self.applied if name not in current]:
            self.revoke(name, "key revoked")
        for name, value in current.items():
            self._apply(name, value, deleted=False)
        if not self.ready.is_set():
            log.info("key registry: %d keys", len(self.applied))
        self.ready.set()
        return watcher

    def _apply(self, name: str, value: bytes | None, deleted: bool) -> None:
        if deleted or not value:
            self.revoke(name, "key revoked")
            return
        assert self.box is not None
        try:
            record = decode_record(value, self.box)
        except ValueError as error:
            # A record we cannot open must not keep working with a stale secret.
            log.error("key registry: %s: %s", name, error)
            self.revoke(name, "key unusable")
            return
        if record.name != name:
            log.error("key registry: record under %s names %s; ignored", name, record.name)
            return
        key = record.api_key()
        if not self.keyring.put(key):
            log.warning("key registry: %s is a static key; the registry's copy is ignored", name)
            return
        self.applied[name] = key
        if key.expires_at is not None and key.expires_at <= time.time():
            self.revoke(name, "key expired")

    def revoke(self, name: str, reason: str) -> int:
        """Remove ``name`` from the keyring and close every connection it authenticated
        (key or token): unscoped ``err`` 40101, then close. Returns how many were closed."""
        if self.applied.pop(name, None) is None:
            return 0
        self.keyring.remove(name)
        closed = 0
        for connection in list(self.connections()):
            identity = connection.session.identity
            if identity is not None and identity.key_name == name:
                connection.send(ErrorFrame(int(ErrorCode.BAD_AUTH), reason))
                connection.close(CLOSE_POLICY_VIOLATION, reason)
                closed += 1
        log.info("key registry: %s removed (%s), %d connections closed", name, reason, closed)
        return closed

    async def _expire_keys(self) -> None:
        """Expired keys go as revoked ones do (their connections too)."""
        while True:
            await asyncio.sleep(_EXPIRY_CHECK_S)
            now = time.time()
            for name, key in list(self.applied.items()):
                if key.expires_at is not None and key.expires_at <= now:
                    self.revoke(name, "key expired")
