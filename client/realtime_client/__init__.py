"""A typed asyncio Python client for Realtime, wire-compatible with @foony/realtime 0.16.0.

``Realtime`` holds one WebSocket connection (binary protocol) and its channels: subscribe
with callbacks or ``async for``, publish with auto-batching and exactly-once resends, resume
after drops by serial, read history, and use presence. ``Rest`` publishes and reads over
HTTP. ``Cipher`` encrypts payloads end to end, interoperable with the JS SDK.

Render this reference with ``python -m pydoc realtime_client`` (or
``python -m pydoc -b`` for a browsable one); see client/README.md for a quick start.
"""

from realtime_client.auth import create_jwt
from realtime_client.backoff import Backoff
from realtime_client.channel import Channel, OutgoingMessage, Presence
from realtime_client.connection import Connection
from realtime_client.crypto import Cipher, CipherError, generate_random_key, is_cipher_encoding
from realtime_client.errors import (
    ConnectionClosedError,
    QueueOverflowError,
    RealtimeError,
    RestError,
)
from realtime_client.events import Stream
from realtime_client.messages import (
    ChannelState,
    ChannelStateChange,
    ConnectionState,
    ConnectionStateChange,
    HistoryPage,
    Message,
    PresenceMessage,
)
from realtime_client.realtime import BatchPublishResult, BatchSpec, Realtime
from realtime_client.rest import (
    PaginatedResult,
    PublishResult,
    Rest,
    RestChannel,
    RestMessage,
    TokenDetails,
)

__all__ = [
    "Backoff",
    "BatchPublishResult",
    "BatchSpec",
    "Channel",
    "ChannelState",
    "ChannelStateChange",
    "Cipher",
    "CipherError",
    "Connection",
    "ConnectionClosedError",
    "ConnectionState",
    "ConnectionStateChange",
    "HistoryPage",
    "Message",
    "OutgoingMessage",
    "PaginatedResult",
    "Presence",
    "PresenceMessage",
    "PublishResult",
    "QueueOverflowError",
    "Realtime",
    "RealtimeError",
    "Rest",
    "RestChannel",
    "RestError",
    "RestMessage",
    "Stream",
    "TokenDetails",
    "create_jwt",
    "generate_random_key",
    "is_cipher_encoding",
]
