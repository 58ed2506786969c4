"""The key registry's NATS side: a JetStream KV bucket (``RT_KEYS_BUCKET``, replicated like
the message stream), one entry per key (``<appSlug>.<keyId>``, the value from
``shared.keys.encode_record``), a deleted entry being a revoked key."""

from __future__ import annotations

from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BadRequestError, KeyNotFoundError, NoKeysError
from nats.js.kv import KeyValue

from shared.settings import Settings

__all__ = ["key_bucket", "next_update", "stop_watching", "stored_names", "stored_value"]

_STREAM_NAME_IN_USE = 10058


async def key_bucket(js: JetStreamContext, settings: Settings) -> KeyValue:
    """The registry's bucket, created on first use (idempotent, safe when racing)."""
    config = KeyValueConfig(
        bucket=settings.keys_bucket,
        # One value per key: a rotation or revocation replaces what was there.
        history=1,
        replicas=settings.stream_replicas,
        storage=StorageType.FILE,
    )
    try:
        return await js.create_key_value(config)
    except BadRequestError as error:
        if error.err_code != _STREAM_NAME_IN_USE:
            raise
    return await js.key_value(settings.keys_bucket)


async def stored_names(bucket: KeyValue) -> list[str]:
    """Every key name in the bucket (revoked ones excluded)."""
    try:
        return sorted(await bucket.keys())
    except NoKeysError:
        return []


async def stored_value(bucket: KeyValue, name: str) -> bytes | None:
    """The stored record of ``name``, None if there is none (or it was revoked)."""
    try:
        entry = await bucket.get(name)
    except KeyNotFoundError:
        return None
    return entry.value


async def next_update(watcher: KeyValue.KeyWatcher, timeout: float) -> KeyValue.Entry | None:  # noqa: ASYNC109 - nats-py's own wait
    """The watcher's next entry; None marks the end of the initial snapshot (then live
    changes follow); ``TimeoutError`` when nothing came within ``timeout`` seconds."""
    try:
        entry: KeyValue.Entry | None = await watcher.updates(timeout=timeout)  # type: ignore[no-untyped-call]
    except NatsTimeoutError:
        raise TimeoutError from None
    return entry


async def stop_watching(watcher: KeyValue.KeyWatcher) -> None:
    """Stop a watcher (its consumer goes away)."""
    await watcher.stop()  # type: ignore[no-untyped-call]
