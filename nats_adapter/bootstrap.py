"""Creating (or updating) the message stream, the tails stream and the presence bucket.

Idempotent, and safe when several gateways start at once: a create that loses the race (or
finds an older config) falls back to an update.
"""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    RePublish,
    StorageType,
    StreamConfig,
    StreamSource,
    SubjectTransform,
)
from nats.js.errors import BadRequestError, NotFoundError

from shared import subjects
from shared.settings import Settings

__all__ = ["bootstrap"]

_STREAM_NAME_IN_USE = 10058


async def bootstrap(js: JetStreamContext, settings: Settings) -> None:
    """Create or update the message stream and the presence bucket.

    Idempotent, and safe when several gateways start at once: a create that loses the race
    (or finds an older config) falls back to an update.
    """
    source, live = subjects.stream_subjects()
    stream = StreamConfig(
        name=settings.stream_name,
        subjects=[source],
        republish=RePublish(src=source, dest=live),
        allow_direct=True,
        allow_atomic=True,
        storage=StorageType.FILE,
        num_replicas=settings.stream_replicas,
        discard=DiscardPolicy.OLD,
        # JetStream refuses a dedup window longer than the retention (and it could not
        # remember ids of messages it no longer has anyway).
        duplicate_window=min(settings.duplicate_window_s, settings.retention_max_age_s)
        if settings.retention_max_age_s > 0
        else settings.duplicate_window_s,
        max_age=settings.retention_max_age_s,
        max_msgs_per_subject=settings.retention_max_messages_per_channel,
        max_bytes=settings.retention_max_bytes,
        max_msg_size=-1,
    )
    await _create_or_update(js, stream)
    # One message per channel, never aged: the last serial outlives retention (see the
    # module docstring). Filled by the server, so publishing costs the gateway nothing more.
    tails = StreamConfig(
        name=subjects.tails_stream(settings.stream_name),
        subjects=[],
        sources=[
            StreamSource(
                name=settings.stream_name,
                subject_transforms=[SubjectTransform(src=source, dest=f"{subjects.TAIL_PREFIX}>")],
            )
        ],
        allow_direct=True,
        storage=StorageType.FILE,
        num_replicas=settings.stream_replicas,
        discard=DiscardPolicy.OLD,
        max_msgs_per_subject=1,
        max_msg_size=-1,
    )
    if settings.channels_can_empty:
        await _create_or_update(js, tails)
    # Per-key TTLs need allow_msg_ttl (nats-py sets it for buckets); limit markers make
    # expiries visible to watchers, which is how a dead gateway's members leave.
    presence = KeyValueConfig(
        bucket=settings.presence_bucket,
        history=1,
        direct=True,
        replicas=settings.stream_replicas,
        storage=StorageType.FILE,
        limit_marker_ttl=max(1.0, settings.presence_ttl_s),
    )
    for _ in range(5):
        try:
            await js.create_key_value(presence)
            return
        except BadRequestError as error:
            if error.err_code != _STREAM_NAME_IN_USE:
                raise
        # It exists with another config (an older release, or a racing gateway that won):
        # bring the settings that matter up to date.
        try:
            info = await js.stream_info(f"KV_{settings.presence_bucket}")
        except NotFoundError:
            continue
        config = info.config
        config.allow_msg_ttl = True
        config.subject_delete_marker_ttl = presence.limit_marker_ttl
        config.allow_direct = True
        await js.update_stream(config)
        return


async def _create_or_update(js: JetStreamContext, config: StreamConfig) -> None:
    for _ in range(5):
        try:
            await js.add_stream(config)
            return
        except BadRequestError as error:
            if error.err_code != _STREAM_NAME_IN_USE:
                raise
        try:
            await js.update_stream(config)
            return
        except NotFoundError:
            continue  # deleted in between: create again
    raise RuntimeError(f"could not create or update stream {config.name}")
