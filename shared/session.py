"""The per-connection protocol state machine, independent of transport and of NATS.

A ``Session`` is fed whole client messages (one WebSocket message, or one long-poll body) and
returns commands: replies to send at once, and validated, authorised requests for the adapter
to carry out (publish, subscribe, history, ...). It owns the codec choice, the auth state, the
subscription set and every validation rule, so the WebSocket and long-poll adapters share one
behaviour and it can be tested without sockets.

States::

    AWAITING_AUTH --auth ok--> CONNECTED --close--> CLOSED
          |                                            ^
          +--------- bad first frame / bad auth -------+
"""

from __future__ import annotations

import enum
import itertools
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from realtime_protocol import binary_codec, json_codec
from realtime_protocol.binary_codec import FrameDecodeError
from realtime_protocol.errors import ErrorCode, ProtocolError
from realtime_protocol.frames import (
    AuthFrame,
    ClientFrame,
    ConnectedFrame,
    ErrorFrame,
    FetchFrame,
    FetchResponseFrame,
    HistoryFrame,
    HistoryResponseFrame,
    Message,
    MessageFrame,
    PingFrame,
    PongFrame,
    PresenceAction,
    PresenceFrame,
    PresenceSubscribeFrame,
    PresenceUnsubscribeFrame,
    PublishFrame,
    RequestFrame,
    ServerFrame,
    SubscribeFrame,
    UnsubscribeFrame,
)
from shared.auth import Identity, Keyring
from shared.capabilities import Operation
from shared.channels import validate_channel
from shared.history import HistoryOp, HistoryQuery, HistoryResult
from shared.limits import Limit, TokenBucket

__all__ = [
    "CLOSE_GOING_AWAY",
    "CLOSE_NORMAL",
    "CLOSE_POLICY_VIOLATION",
    "CLOSE_TRY_AGAIN_LATER",
    "DEFAULT_HISTORY_LIMIT",
    "MAX_FETCH",
    "MAX_HISTORY_LIMIT",
    "MAX_PUBLISH_PAUSE_S",
    "Authenticate",
    "Close",
    "Codec",
    "Command",
    "Limits",
    "Pause",
    "Publish",
    "ReadHistory",
    "Reply",
    "Session",
    "SessionState",
    "Subscribe",
    "Unsubscribe",
    "UnwatchPresence",
    "UpdatePresence",
    "WatchPresence",
    "build_message",
    "new_message_id",
]


class SessionState(enum.IntEnum):
    """Where a connection is in its life: the one state of a connection, whatever its
    transport (the adapters and the outbox read it, they keep no "closed" flags of their own).

    The order matters: every state at or after ``CLOSING`` takes no more input.
    """

    AWAITING_AUTH = 0
    CONNECTED = 1
    # Asked to close (by either side, a failed handshake, a limit): what is queued is still
    # written, then the transport closes with ``close_code``.
    CLOSING = 2
    # The transport is gone and everything the connection held is released.
    ENDED = 3


class Codec(enum.Enum):
    """Wire format of a connection, fixed by the opcode of its first message."""

    JSON = "json"
    BINARY = "binary"


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-connection limits enforced by the session."""

    keep_alive_ms: int = 15_000
    max_frame_bytes: int = 64 * 1024
    max_batch_members: int = 1000
    # Channels a connection subscribes to or watches the presence of (sub and presSub).
    max_channels: int = 1000
    max_message_id_length: int = 256
    max_presence_data_bytes: int = 8 * 1024
    # Before auth a client has proved nothing: its first message must be one small auth
    # frame (a JWT with a large capability fits), so decoding it costs next to nothing.
    max_auth_message_bytes: int = 16 * 1024
    # Records decoded from one binary message (the SDKs send one per message); a message
    # with more is answered once with 40001 and not decoded, so one message cannot hold
    # the event loop for long.
    max_records_per_message: int = 256
    # Messages per second a connection may publish (0 = no limit) and how many at once: a
    # token bucket per connection, a batch costing one token per member (shared.limits).
    publish_rate: float = 100.0
    publish_burst: int = 1000


@dataclass(frozen=True, slots=True)
class Reply:
    """Send ``frame`` to the client now. ``limit`` names the limit that refused the request
    it answers, if one did (the adapter counts it)."""

    frame: ServerFrame
    limit: str | None = None


@dataclass(frozen=True, slots=True)
class Authenticate:
    """The client sent a well-formed ``auth``: the adapter checks readiness, resolves the
    connection id and calls ``Session.accept`` (or ``Session.reject``)."""

    frame: AuthFrame


@dataclass(frozen=True, slots=True)
class Publish:
    """Store (or, if ephemeral, just fan out) ``message``, then ack ``request_id``."""

    request_id: int
    message: Message


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Start delivering ``channel``; with a cursor (``last_serial``, or a legacy
    ``last_message_id``) first replay what the client missed. ``fresh`` is true when the
    connection did not have the channel: if carrying it out fails, the adapter undoes it
    (``Session.forget_channel``)."""

    request_id: int
    channel: str
    last_serial: int = 0
    last_message_id: str = ""
    fresh: bool = False

    @property
    def resumes(self) -> bool:
        """True when the client asks for a replay from a cursor."""
        return bool(self.last_serial or self.last_message_id)


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """Stop delivering ``channel``, its presence events and the membership (PROTOCOL.md 3.3,
    section 9 item 5)."""

    request_id: int
    channel: str


@dataclass(frozen=True, slots=True)
class ReadHistory:
    """Answer ``hist`` (``query.op`` HISTORY) or ``fetch`` (FETCH) with ``query``, whose
    limits the session already applied."""

    request_id: int
    query: HistoryQuery


@dataclass(frozen=True, slots=True)
class UpdatePresence:
    """Enter, update or leave ``channel``'s presence."""

    request_id: int
    channel: str
    action: PresenceAction
    data: bytes | None
    encoding: str


@dataclass(frozen=True, slots=True)
class WatchPresence:
    """Start ``channel``'s presence events, snapshot first (``fresh`` as for Subscribe)."""

    request_id: int
    channel: str
    fresh: bool = False


@dataclass(frozen=True, slots=True)
class UnwatchPresence:
    """Stop ``channel``'s presence events (membership is untouched)."""

    request_id: int
    channel: str


@dataclass(frozen=True, slots=True)
class Pause:
    """Read nothing more from the client for ``seconds``: it published faster than its
    rate, and each refused publish costs it the time of a token, so a flood costs the
    gateway about as many refusals as acks (``Session._paced``)."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Close:
    """Close the transport after what is queued (the session is already ``CLOSING`` with
    this code and reason)."""

    code: int
    reason: str


Command = (
    Reply
    | Authenticate
    | Publish
    | Subscribe
    | Unsubscribe
    | ReadHistory
    | UpdatePresence
    | WatchPresence
    | UnwatchPresence
    | Pause
    | Close
)

# History requests: the protocol's defaults and caps (PROTOCOL.md 3.6, 3.7).
DEFAULT_HISTORY_LIMIT = 100
MAX_HISTORY_LIMIT = 1000
MAX_FETCH = 1000
# The longest a connection's input is paused after publishes refused for its rate.
MAX_PUBLISH_PAUSE_S = 1.0

# WebSocket close codes (RFC 6455) the service uses.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY_VIOLATION = 1008
CLOSE_TRY_AGAIN_LATER = 1013


def new_message_id(now_ns: int | None = None) -> str:
    """A server-assigned message id, ``<unixNanos>-<8 lowercase hex>`` (PROTOCOL.md 3.9)."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    return f"{now_ns}-{uuid.uuid4().hex[:8]}"


def build_message(frame: PublishFrame, client_id: str, timestamp: int, limits: Limits) -> Message:
    """The message a ``pub`` frame (or a REST publish, turned into one) stores: stamped with
    the publisher's ``client_id`` and the server's ``timestamp``, a server id when the
    client sent none. Raises ``ProtocolError`` 40001 (request id ``frame.id``) for a batch
    above ``limits.max_batch_members`` or an overlong message id."""
    if len(frame.members) > limits.max_batch_members:
        raise ProtocolError(
            ErrorCode.BAD_FRAME,
            f"batch of {len(frame.members)} messages exceeds {limits.max_batch_members}",
            frame.id,
            Limit.BATCH_MEMBERS,
        )
    if len(frame.message_id) > limits.max_message_id_length:
        raise ProtocolError(ErrorCode.BAD_FRAME, "messageId is too long", frame.id)
    return Message(
        channel=frame.channel,
        name="" if frame.members else frame.name,
        data=None if frame.members else frame.data,
        # Early JSON clients sent no id: assign one (such publishes cannot be deduplicated).
        message_id=frame.message_id or new_message_id(),
        client_id=client_id,
        timestamp=timestamp,
        encoding="" if frame.members else frame.encoding,
        ephemeral=frame.ephemeral,
        members=frame.members,
    )


class Session:
    """Protocol state of one client connection. Not thread-safe; one per connection.

    ``clock_ms`` stamps messages (wall time); ``clock`` (monotonic seconds) drives the
    publish rate limit."""

    def __init__(
        self,
        keyring: Keyring,
        limits: Limits,
        clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.keyring = keyring
        self.limits = limits
        self.clock_ms = clock_ms
        # None when publishing is not rate-limited (RT_PUBLISH_RATE=0).
        self.publish_bucket: TokenBucket | None = None
        if limits.publish_rate > 0:
            self.publish_bucket = TokenBucket(
                limits.publish_rate, max(1, limits.publish_burst), clock
            )
        self.state = SessionState.AWAITING_AUTH
        self.close_code = CLOSE_NORMAL
        self.close_reason = ""
        self.codec: Codec | None = None
        self.identity: Identity | None = None
        self.connection_id = ""
        self.subscriptions: set[str] = set()
        # Channels whose presence the client watches with presSub (they count against
        # max_channels too: each costs the gateway a presence watch).
        self.presence_subscriptions: set[str] = set()
        # Publishes refused for the rate since the last input was handled (``_paced``).
        self._rate_refusals = 0
        self._deferred: list[bytes] | None = None
        self._deferred_error: FrameDecodeError | None = None

    @property
    def is_closed(self) -> bool:
        """True once the session is closing or ended: later input is ignored."""
        return self.state >= SessionState.CLOSING

    # ---- input ----

    def receive_message(self, data: bytes, is_text: bool) -> list[Command]:
        """Handle one client message; return what to do, in order."""
        return self._paced(self._receive_message(data, is_text))

    def _receive_message(self, data: bytes, is_text: bool) -> list[Command]:
        if self.state >= SessionState.CLOSING:
            return []
        if self.codec is None:
            self.codec = Codec.JSON if is_text else Codec.BINARY
        elif (self.codec is Codec.JSON) != is_text:
            expected = "text" if self.codec is Codec.JSON else "binary"
            return [
                self._error(
                    ProtocolError(
                        ErrorCode.BAD_FRAME, f"this connection speaks {expected} messages only"
                    )
                )
            ]
        limits = self.limits
        if self.state is SessionState.AWAITING_AUTH and len(data) > limits.max_auth_message_bytes:
            return self._close_with(
                ProtocolError(
                    ErrorCode.BAD_FRAME,
                    f"the first message must be one auth frame of at most "
                    f"{limits.max_auth_message_bytes} bytes",
                    limit=Limit.MESSAGE_SIZE,
                )
            )
        if len(data) > limits.max_frame_bytes:
            return self._oversized(data)
        if self.codec is Codec.JSON:
            try:
                return self._receive_frame(json_codec.decode_client_text(data))
            except ProtocolError as error:
                return self._failed(error)
        records: list[bytes] = []
        malformed: FrameDecodeError | None = None
        try:
            # Split at most one record more than allowed: enough to know it is too many.
            allowed = limits.max_records_per_message
            records.extend(itertools.islice(binary_codec.iter_records(data), allowed + 1))
        except FrameDecodeError as error:
            malformed = error
        if len(records) > limits.max_records_per_message:
            return self._failed(
                ProtocolError(
                    ErrorCode.BAD_FRAME,
                    f"a message may carry at most {limits.max_records_per_message} records; "
                    "none of this one was processed",
                )
            )
        return self._receive_split(records, malformed)

    def receive_body(self, data: bytes) -> list[Command]:
        """Handle one long-poll body (PROTOCOL.md 5): binary records the client queued
        while its previous request was in flight, concatenated. Unlike a WebSocket message,
        a body is not one frame: each record is held to the frame limit on its own, and the
        number of records is bounded by the body size the adapter accepts."""
        return self._paced(self._receive_body(data))

    def _receive_body(self, data: bytes) -> list[Command]:
        if self.state >= SessionState.CLOSING:
            return []
        if self.codec is None:
            self.codec = Codec.BINARY
        limits = self.limits
        if self.state is SessionState.AWAITING_AUTH and len(data) > limits.max_auth_message_bytes:
            return self._close_with(
                ProtocolError(
                    ErrorCode.BAD_FRAME,
                    f"the connect body must be one auth record of at most "
                    f"{limits.max_auth_message_bytes} bytes",
                    limit=Limit.MESSAGE_SIZE,
                )
            )
        records: list[bytes] = []
        malformed: FrameDecodeError | None = None
        try:
            records.extend(binary_codec.iter_records(data))
        except FrameDecodeError as error:
            malformed = error
        return self._receive_split(records, malformed)

    def _receive_split(
        self, records: list[bytes], malformed: FrameDecodeError | None
    ) -> list[Command]:
        commands = self._receive_records(records)
        if malformed is not None:
            if self._deferred is not None:
                self._deferred_error = malformed
            else:
                commands += self._failed(malformed)
        return commands

    def _receive_records(self, records: list[bytes]) -> list[Command]:
        commands: list[Command] = []
        max_frame_bytes = self.limits.max_frame_bytes
        for index, record in enumerate(records):
            if len(record) > max_frame_bytes:
                # Only a long-poll body gets here (a WebSocket message was checked whole).
                commands += self._oversized(binary_codec.frame_record(record))
                if self.is_closed:
                    break
                continue
            try:
                frame = binary_codec.decode_client_record(record)
            except FrameDecodeError as error:
                commands += self._failed(error)
            else:
                commands += self._receive_frame(frame)
                if commands and isinstance(commands[-1], Authenticate):
                    # Records after auth wait until the adapter has finished the handshake.
                    self._deferred = records[index + 1 :]
                    return commands
            if self.is_closed:
                break
        return commands

    def after_handshake(self) -> list[Command]:
        """Commands for the records that arrived in the auth frame's message after it (call
        once ``accept`` or ``reject`` is done)."""
        records, self._deferred = self._deferred or [], None
        error, self._deferred_error = self._deferred_error, None
        if self.is_closed:
            return []
        commands = self._receive_records(records)
        if error is not None:
            commands += self._failed(error)
        return self._paced(commands)

    def _paced(self, commands: list[Command]) -> list[Command]:
        """``commands``, followed by a ``Pause`` when publishes were refused for the rate.

        Reading, decoding and answering a refused publish costs the gateway about as much
        as reading one it stores, so a connection that floods would take a core with
        refusals alone, at its neighbours' expense (measured: ~35,000 refusals/s from one
        connection, 0.86 of a core, a quiet subscriber's p99 8x). So its input waits until
        the bucket has earned what it lacked: at least one token, one per refused publish,
        at most ``MAX_PUBLISH_PAUSE_S``. TCP pushes back on the client meanwhile, and a
        flood costs about one refusal per accepted publish."""
        refused, self._rate_refusals = self._rate_refusals, 0
        bucket = self.publish_bucket
        if refused and bucket is not None and not self.is_closed:
            wait = max(bucket.retry_after(), refused / bucket.rate)
            commands.append(Pause(min(wait, MAX_PUBLISH_PAUSE_S)))
        return commands

    def _oversized(self, data: bytes) -> list[Command]:
        message = f"frame of {len(data)} bytes exceeds the {self.limits.max_frame_bytes}-byte limit"
        request_ids: list[int] = []
        try:
            if self.codec is Codec.JSON:
                request_ids.append(_request_id(json_codec.decode_client_text(data)))
            else:
                # Name the requests that can be read cheaply, so they fail instead of hanging.
                records = binary_codec.iter_records(data)
                for record in itertools.islice(records, self.limits.max_records_per_message):
                    request_ids.append(_request_id(binary_codec.decode_client_record(record)))
        except ProtocolError:
            pass
        scoped = [request_id for request_id in request_ids if request_id]
        size = Limit.MESSAGE_SIZE
        errors = [
            ProtocolError(ErrorCode.BAD_FRAME, message, request_id, size) for request_id in scoped
        ]
        if not errors:
            errors = [ProtocolError(ErrorCode.BAD_FRAME, message, limit=size)]
        commands: list[Command] = []
        for error in errors:
            commands += self._failed(error)
        return commands

    def _failed(self, error: ProtocolError) -> list[Command]:
        if self.state is SessionState.AWAITING_AUTH:
            return self._close_with(error)
        return [self._error(error)]

    def _receive_frame(self, frame: ClientFrame) -> list[Command]:
        if self.state is SessionState.AWAITING_AUTH:
            if not isinstance(frame, AuthFrame):
                return self._close_with(
                    ProtocolError(ErrorCode.BAD_FRAME, "the first frame must be auth")
                )
            if frame.version != 0:
                return self._close_with(
                    ProtocolError(
                        ErrorCode.BAD_FRAME, f"unsupported auth protocol version {frame.version}"
                    )
                )
            return [Authenticate(frame)]
        if isinstance(frame, PingFrame):
            return [Reply(PongFrame())]
        if isinstance(frame, AuthFrame):
            return [self._error(ProtocolError(ErrorCode.BAD_FRAME, "already authenticated"))]
        try:
            return [self._request(frame)]
        except ProtocolError as error:
            return [self._error(error)]

    def _request(self, frame: RequestFrame) -> Command:
        identity = self.identity
        assert identity is not None
        request_id = frame.id
        channel = validate_channel(frame.channel, request_id)
        capability = identity.capability
        if isinstance(frame, PublishFrame):
            capability.check(Operation.PUBLISH, channel, request_id)
            message = self._message(frame)
            # Last, so only a publish that would otherwise be stored spends tokens.
            if self.publish_bucket is not None:
                self._check_publish_rate(self.publish_bucket, len(frame.members) or 1, request_id)
            return Publish(request_id, message)
        if isinstance(frame, SubscribeFrame):
            capability.check(Operation.SUBSCRIBE, channel, request_id)
            fresh = channel not in self.subscriptions
            if fresh:
                self._check_channel_limit(channel, request_id)
                self.subscriptions.add(channel)
            return Subscribe(request_id, channel, frame.last_serial, frame.last_message_id, fresh)
        if isinstance(frame, UnsubscribeFrame):
            self.subscriptions.discard(channel)
            self.presence_subscriptions.discard(channel)
            return Unsubscribe(request_id, channel)
        if isinstance(frame, PresenceFrame):
            capability.check(Operation.PRESENCE, channel, request_id)
            size = len(frame.data or b"") + len(frame.encoding)
            if size > self.limits.max_presence_data_bytes:
                raise ProtocolError(
                    ErrorCode.BAD_FRAME,
                    f"presence data of {size} bytes exceeds {self.limits.max_presence_data_bytes}",
                    request_id,
                    Limit.PRESENCE_DATA,
                )
            return UpdatePresence(request_id, channel, frame.action, frame.data, frame.encoding)
        if isinstance(frame, PresenceSubscribeFrame):
            capability.allows_any((Operation.PRESENCE, Operation.SUBSCRIBE), channel, request_id)
            fresh = channel not in self.presence_subscriptions
            if fresh:
                self._check_channel_limit(channel, request_id)
                self.presence_subscriptions.add(channel)
            return WatchPresence(request_id, channel, fresh)
        if isinstance(frame, PresenceUnsubscribeFrame):
            self.presence_subscriptions.discard(channel)
            return UnwatchPresence(request_id, channel)
        app = identity.app
        if isinstance(frame, HistoryFrame):
            capability.check(Operation.HISTORY, channel, request_id)
            limit = min(frame.limit or DEFAULT_HISTORY_LIMIT, MAX_HISTORY_LIMIT)
            query = HistoryQuery(
                HistoryOp.HISTORY,
                app,
                channel,
                limit,
                frame.before,
                message_id="" if frame.before else frame.start,
            )
            return ReadHistory(request_id, query)
        assert isinstance(frame, FetchFrame)
        capability.allows_any((Operation.SUBSCRIBE, Operation.HISTORY), channel, request_id)
        query = HistoryQuery(
            HistoryOp.FETCH, app, channel, MAX_FETCH, from_serial=frame.from_serial
        )
        return ReadHistory(request_id, query)

    def _check_channel_limit(self, channel: str, request_id: int) -> None:
        """Refuse (42900) a new channel once sub and presSub channels reach ``max_channels``."""
        watched = self.subscriptions | self.presence_subscriptions
        if channel not in watched and len(watched) >= self.limits.max_channels:
            raise ProtocolError(
                ErrorCode.RATE_LIMITED,
                f"at most {self.limits.max_channels} channels (sub and presSub) per connection",
                request_id,
                Limit.CHANNELS_PER_CONNECTION,
            )

    def _check_publish_rate(self, bucket: TokenBucket, cost: int, request_id: int) -> None:
        """Refuse (42900, scoped to the request) a publish of ``cost`` messages beyond the
        connection's token bucket. Nothing is stored, the connection stays open, and a
        refused publish spends no tokens."""
        if not bucket.take(cost):
            self._rate_refusals += 1
            limits = self.limits
            raise ProtocolError(
                ErrorCode.RATE_LIMITED,
                f"publish rate limit: {limits.publish_rate:g} messages/s, burst "
                f"{limits.publish_burst}; retry in {bucket.retry_after(cost):.2f} s",
                request_id,
                Limit.PUBLISH_RATE,
            )

    def forget_channel(self, channel: str) -> None:
        """A subscribe that failed (the adapter could not carry it out) holds no slot."""
        self.subscriptions.discard(channel)

    def forget_presence_channel(self, channel: str) -> None:
        """A presSub that failed holds no slot."""
        self.presence_subscriptions.discard(channel)

    def _message(self, frame: PublishFrame) -> Message:
        identity = self.identity
        assert identity is not None
        return build_message(frame, identity.client_id, self.clock_ms(), self.limits)

    # ---- handshake ----

    def authenticate(
        self, frame: AuthFrame, assign_client_id: str, backend_ready: bool = True
    ) -> Identity:
        """Check ``frame``'s credential; raise ``ProtocolError`` on failure: 50001 while the
        message backend is not ready (the client retries), 40101/40102 for a credential."""
        if not backend_ready:
            raise ProtocolError(ErrorCode.BOOTSTRAP, "message backend not ready, retry later")
        identity = self.keyring.identify(frame.token, frame.key, frame.client_id, assign_client_id)
        self.identity = identity
        return identity

    def accept(self, connection_id: str) -> ConnectedFrame:
        """Finish the handshake with ``connection_id``; return the ``connected`` frame."""
        assert self.identity is not None
        self.state = SessionState.CONNECTED
        self.connection_id = connection_id
        return ConnectedFrame(connection_id, self.limits.keep_alive_ms, self.identity.client_id)

    def reject(self, error: ProtocolError) -> list[Command]:
        """Fail the handshake: send ``err`` (unscoped) and close."""
        self.identity = None
        return self._close_with(error)

    def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> bool:
        """Start closing with ``code``; later input is ignored. Return False if the session
        was already closing or ended (the first close decides the code)."""
        if self.state >= SessionState.CLOSING:
            return False
        self.state = SessionState.CLOSING
        self.close_code, self.close_reason = code, reason
        return True

    def end(self) -> bool:
        """The transport is gone: mark the session ended. Return False if it already was
        (teardown runs once, whichever way the connection ended)."""
        if self.state is SessionState.ENDED:
            return False
        self.close(self.close_code, self.close_reason)
        self.state = SessionState.ENDED
        return True

    # ---- output ----

    def encode(self, frame: ServerFrame) -> bytes:
        """Encode ``frame`` for this connection: a length-prefixed record in binary mode,
        one JSON text in JSON mode."""
        if self.codec is Codec.JSON:
            return json_codec.encode_server_text(frame)
        return binary_codec.frame_record(binary_codec.encode_server_frame(frame))

    def encode_history_response(self, command: ReadHistory, result: HistoryResult) -> bytes:
        """The ``histRes``/``fetchRes`` for ``command``: spliced from the worker's encoded
        members for a binary client (never decoded here), a JSON text otherwise."""
        query = command.query
        is_history = query.op is HistoryOp.HISTORY
        if self.codec is Codec.BINARY:
            record = binary_codec.encode_response_members(
                is_history, result.flag, command.request_id, query.channel, result.members
            )
            return binary_codec.frame_record(record)
        kind = HistoryResponseFrame if is_history else FetchResponseFrame
        frame = kind(command.request_id, query.channel, result.messages, result.flag)
        return json_codec.encode_server_text(frame)

    def encode_replay(self, result: HistoryResult) -> list[bytes]:
        """One page of a resume replay as this connection's records or texts."""
        if self.codec is Codec.BINARY:
            return [
                binary_codec.frame_record(binary_codec.message_record_from_member(member))
                for member in result.members
            ]
        return [json_codec.encode_server_text(MessageFrame(message)) for message in result.messages]

    # ---- helpers ----

    def _error(self, error: ProtocolError) -> Reply:
        return Reply(ErrorFrame(int(error.code), error.message, error.request_id), error.limit)

    def _close_with(self, error: ProtocolError) -> list[Command]:
        reason = f"error {int(error.code)}"
        self.close(CLOSE_POLICY_VIOLATION, reason)
        return [
            Reply(ErrorFrame(int(error.code), error.message, 0), error.limit),
            Close(CLOSE_POLICY_VIOLATION, reason),
        ]


def _request_id(frame: ClientFrame) -> int:
    return getattr(frame, "id", 0) or 0
