"""One client connection, independent of its transport.

The transport (WebSocket now, long-polling later) feeds whole client messages to
``Connection.receive`` and writes what ``Connection.outbox`` yields; this class runs the
session's commands against NATS: publishing, fan-out subscriptions, history and resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Coroutine
from typing import Any

from nats.errors import Error as NatsError

from gateway.fanout import Delivery
from gateway.metrics import METRICS
from gateway.outbox import Outbox
from gateway.presence import WatchReason
from gateway.services import GatewayServices
from shared.binary_codec import (
    encode_response_members,
    frame_record,
    message_record_from_member,
)
from shared.errors import ErrorCode, ProtocolError
from shared.frames import (
    AckFrame,
    AuthFrame,
    ErrorFrame,
    FetchFrame,
    FetchResponseFrame,
    HistoryFrame,
    HistoryResponseFrame,
    MessageFrame,
    PresenceFrame,
    PresenceSubscribeFrame,
    PresenceUnsubscribeFrame,
    ServerFrame,
    SubscribeFrame,
    UnsubscribeFrame,
)
from shared.history import HistoryOp, HistoryQuery, HistoryResult
from shared.session import (
    CLOSE_NORMAL,
    Authenticate,
    Close,
    Codec,
    Command,
    Publish,
    Reply,
    Request,
    Session,
    SessionState,
)

__all__ = ["Connection"]

log = logging.getLogger(__name__)

_MAX_IN_FLIGHT = 256
_MAX_REPLAY_BUFFER = 10_000
_DEFAULT_HISTORY_LIMIT = 100
_MAX_HISTORY_LIMIT = 1000
_MAX_FETCH = 1000
# How often a replay waiting for a slow reader checks that the connection is still open.
_REPLAY_DRAIN_CHECK_S = 0.5


class _ReplayGate:
    """Holds a channel's live deliveries while its resume replay is read."""

    __slots__ = ("buffer",)

    def __init__(self) -> None:
        self.buffer: list[Delivery] = []


class Connection:
    """A client connection: session state, outbox and the work it started."""

    def __init__(self, services: GatewayServices, transport: str) -> None:
        self.services = services
        self.transport = transport
        self.session = Session(services.keyring, services.limits)
        self.outbox = Outbox(services.settings.outbox_max_bytes, coalesce=True)
        self.close_code = CLOSE_NORMAL
        self.close_reason = ""
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_flight = asyncio.Semaphore(_MAX_IN_FLIGHT)
        self._replay_gates: dict[str, _ReplayGate] = {}
        self._expiry: asyncio.TimerHandle | None = None
        self._finished = False
        METRICS.connections.labels(transport).inc()

    # ---- input ----

    @property
    def is_closing(self) -> bool:
        """True once the connection was asked to close."""
        return self.outbox.closed

    @property
    def is_connected(self) -> bool:
        """True after a successful handshake, until close."""
        return self.session.state is SessionState.CONNECTED

    async def receive(self, data: bytes, is_text: bool) -> None:
        """Handle one client message (a WebSocket message or a long-poll body)."""
        commands = self.session.receive_message(data, is_text)
        self.outbox.coalesce = self.session.codec is Codec.BINARY
        for command in commands:
            await self._execute(command)

    async def _execute(self, command: Command) -> None:
        if isinstance(command, Reply):
            self.send(command.frame)
        elif isinstance(command, Publish):
            # Waiting here (not in the task) pushes back on a client that floods publishes,
            # and keeps per-channel order: tasks reach the broker's channel queue in order.
            await self._in_flight.acquire()
            self._spawn(self._publish(command))
        elif isinstance(command, Request):
            await self._request(command)
        elif isinstance(command, Authenticate):
            await self._authenticate(command.frame)
            for deferred in self.session.after_handshake():
                await self._execute(deferred)
        elif isinstance(command, Close):
            self.close(command.code, command.reason)

    # ---- output ----

    def send(self, frame: ServerFrame) -> None:
        """Queue a reply frame."""
        if isinstance(frame, ErrorFrame):
            METRICS.errors.labels(str(frame.code)).inc()
        self.outbox.put(self.session.encode(frame))

    def send_encoded(self, binary: bytes, text: bytes) -> None:
        """Queue a frame already encoded for both codecs (presence events: one encoding per
        event, whatever the number of watchers)."""
        self.outbox.put(text if self.session.codec is Codec.JSON else binary)

    def deliver(self, delivery: Delivery) -> None:
        """Queue a live message (called by the router for every subscriber)."""
        gates = self._replay_gates
        if gates:
            gate = gates.get(delivery.message.channel)
            if gate is not None:
                if len(gate.buffer) < _MAX_REPLAY_BUFFER:
                    gate.buffer.append(delivery)
                else:  # dropped like any overflow: the client sees the gap and fetches
                    METRICS.dropped.inc()
                return
        data = delivery.json if self.session.codec is Codec.JSON else delivery.binary
        if not self.outbox.offer(data):
            METRICS.dropped.inc()

    def close(self, code: int, reason: str) -> None:
        """Close after what is queued has been written."""
        if not self.outbox.closed:
            self.close_code, self.close_reason = code, reason
            self.session.close()
            self.outbox.close()

    # ---- handshake ----

    async def _authenticate(self, frame: AuthFrame) -> None:
        services = self.services
        session = self.session
        try:
            if not services.broker.is_ready:
                raise ProtocolError(ErrorCode.BOOTSTRAP, "message backend not ready, retry later")
            identity = session.authenticate(frame, assign_client_id=secrets.token_urlsafe(9))
        except ProtocolError as error:
            # Once per template per interval (the handlers' rate limit): a credential-stuffing
            # client cannot flood the log.
            log.info("auth refused (%d): %s", int(error.code), error.message)
            for command in session.reject(error):
                await self._execute(command)
            return
        connection_id, predecessor = services.registry.claim(frame.resume_connection_id, identity)
        if predecessor is not None:
            predecessor.close(CLOSE_NORMAL, "resumed by a new connection")
        services.registry.add(connection_id, self)
        self.send(session.accept(connection_id))
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "connection %s opened (%s, app %s, client %s)",
                connection_id,
                self.transport,
                identity.app,
                identity.client_id,
            )
        if connection_id == frame.resume_connection_id:
            services.presence.resumed(self)
        if identity.expires_at is not None:
            delay = max(0.0, identity.expires_at - time.time())
            self._expiry = asyncio.get_running_loop().call_later(delay, self._token_expired)

    def _token_expired(self) -> None:
        self.send(ErrorFrame(int(ErrorCode.AUTH_EXPIRED), "token expired"))
        self.close(CLOSE_NORMAL, "token expired")

    # ---- requests ----

    async def _publish(self, command: Publish) -> None:
        identity = self.session.identity
        assert identity is not None
        try:
            serial = await self.services.broker.publish(identity.app, command.message)
        except ProtocolError as error:
            self.send(ErrorFrame(int(error.code), error.message, command.request_id))
        except (TimeoutError, NatsError) as error:
            log.warning("publish failed: %s", error)
            self.send(
                ErrorFrame(int(ErrorCode.SERVER), "publish failed, retry", command.request_id)
            )
        else:
            METRICS.publishes.labels("ephemeral" if command.message.ephemeral else "stored").inc()
            self.send(AckFrame(command.request_id, serial))
        finally:
            self._in_flight.release()

    async def _request(self, command: Request) -> None:
        frame = command.frame
        try:
            if isinstance(frame, SubscribeFrame):
                await self._subscribe(frame)
            elif isinstance(frame, UnsubscribeFrame):
                await self._unsubscribe(frame)
            elif isinstance(frame, HistoryFrame | FetchFrame):
                await self._in_flight.acquire()
                self._spawn(self._history(frame))
            elif isinstance(frame, PresenceFrame):
                await self.services.presence.apply(
                    self, frame.action, frame.channel, frame.data, frame.encoding
                )
                self.send(AckFrame(frame.id))
            elif isinstance(frame, PresenceSubscribeFrame):
                await self.services.presence.subscribe(
                    self, self._app(), frame.channel, WatchReason.EXPLICIT
                )
                self.send(AckFrame(frame.id))
            elif isinstance(frame, PresenceUnsubscribeFrame):
                self.services.presence.unsubscribe(
                    self, self._app(), frame.channel, (WatchReason.EXPLICIT,)
                )
                self.send(AckFrame(frame.id))
        except ProtocolError as error:
            await self._undo(command)
            self.send(ErrorFrame(int(error.code), error.message, frame.id))
        except (TimeoutError, NatsError) as error:
            await self._undo(command)
            log.warning("%s failed: %s", type(frame).__name__, error)
            self.send(ErrorFrame(int(ErrorCode.SERVER), "backend error, retry", frame.id))

    async def _undo(self, command: Request) -> None:
        """A new ``sub`` or ``presSub`` that failed leaves nothing behind: no slot in the
        session, no live subscription, no presence watch (the client will retry it)."""
        if not command.fresh:
            return
        frame = command.frame
        app = self._app()
        if isinstance(frame, SubscribeFrame):
            self.session.forget_channel(frame.channel)
            self._replay_gates.pop(frame.channel, None)
            with contextlib.suppress(Exception):
                await self.services.router.remove(app, frame.channel, self)
            if self.session.codec is Codec.JSON:
                self.services.presence.unsubscribe(
                    self, app, frame.channel, (WatchReason.IMPLICIT,)
                )
        elif isinstance(frame, PresenceSubscribeFrame):
            self.session.forget_presence_channel(frame.channel)
            self.services.presence.unsubscribe(self, app, frame.channel, (WatchReason.EXPLICIT,))

    async def _subscribe(self, frame: SubscribeFrame) -> None:
        identity = self.session.identity
        assert identity is not None
        channel = frame.channel
        if self.session.codec is Codec.JSON:
            try:
                await self.services.presence.subscribe(
                    self, identity.app, channel, WatchReason.IMPLICIT
                )
            except (ProtocolError, TimeoutError, NatsError) as error:
                # Messages matter more than the presence events JSON clients get with them:
                # the subscription goes ahead without them.
                log.warning("presence events for a JSON sub unavailable: %s", error)
        if not (frame.last_serial or frame.last_message_id):
            await self.services.router.add(identity.app, channel, self)
            self.send(AckFrame(frame.id))
            return
        # Resume: hold live deliveries while the replay is read, so the client sees the
        # replay, then live messages after it, in serial order with no gap.
        gate = self._replay_gates[channel] = _ReplayGate()
        try:
            await self.services.router.add(identity.app, channel, self)
            resumed, last_sent = await self._replay(identity.app, frame)
        except BaseException:
            self._replay_gates.pop(channel, None)
            raise
        del self._replay_gates[channel]
        for delivery in gate.buffer:
            serial = delivery.message.serial
            if serial == 0 or serial > last_sent:
                self.deliver(delivery)
        self.send(AckFrame(frame.id, resumed=resumed))

    async def _replay(self, app: str, frame: SubscribeFrame) -> tuple[bool, int]:
        """Send every retained message after the resume cursor, in pages, waiting for the
        client to read each before the next (memory stays bounded however many it missed).
        Returns ``resumed`` and the last serial sent.

        The replay goes on until the channel's newest serial at the last page, so nothing
        after the cursor is left for a later live message to reveal (on a quiet channel,
        never). A cursor more than ``resume_max_records`` behind is answered
        ``resumed:false`` with no replay (PROTOCOL.md 3.5): the client starts afresh rather
        than being sent an unbounded backlog."""
        channel = frame.channel
        history = self.services.history
        result = await history.query(
            HistoryQuery(
                HistoryOp.RESUME,
                app,
                channel,
                limit=_MAX_FETCH,
                from_serial=frame.last_serial,
                message_id="" if frame.last_serial else frame.last_message_id,
            )
        )
        if not result.flag:
            # Not resumed (aged out, or a cursor we never issued): nothing is replayed and
            # every held live message goes out.
            return False, 0
        if frame.last_serial:
            cursor = frame.last_serial
        elif result.members:  # a legacy message-id cursor: the replay starts right after it
            cursor = result.messages[0].serial - 1
        else:
            cursor = result.newest
        if result.newest - cursor > self._resume_max_records():
            return False, 0
        last_sent = self._send_replay(result, cursor)
        while result.members and last_sent < result.newest:
            while self.outbox.backed_up and not self.is_closing:
                await self.outbox.wait_drained(_REPLAY_DRAIN_CHECK_S)
            if self.is_closing:
                break
            result = await history.query(
                HistoryQuery(HistoryOp.FETCH, app, channel, _MAX_FETCH, from_serial=last_sent)
            )
            if not result.flag:
                break  # aged out while replaying: the client sees the gap and fetches
            last_sent = self._send_replay(result, last_sent)
        return True, last_sent

    def _send_replay(self, result: HistoryResult, last_sent: int) -> int:
        """Queue one page of a replay; return the last serial it carried."""
        if self.session.codec is Codec.BINARY:
            for member in result.members:
                self.outbox.put(frame_record(message_record_from_member(member)))
            return last_sent + len(result.members)  # pages are contiguous from the cursor
        for message in result.messages:
            self.send(MessageFrame(message))
            last_sent = message.serial
        return last_sent

    def _resume_max_records(self) -> int:
        settings = self.services.settings
        return settings.resume_max_records or settings.retention_max_messages_per_channel

    async def _unsubscribe(self, frame: UnsubscribeFrame) -> None:
        identity = self.session.identity
        assert identity is not None
        await self.services.router.remove(identity.app, frame.channel, self)
        # unsub also ends the presence watcher and the membership (PROTOCOL.md 3.3, 9.5).
        presence = self.services.presence
        presence.unsubscribe(
            self, identity.app, frame.channel, (WatchReason.EXPLICIT, WatchReason.IMPLICIT)
        )
        await presence.leave_channel(self, frame.channel)
        self.send(AckFrame(frame.id))

    async def _history(self, frame: HistoryFrame | FetchFrame) -> None:
        identity = self.session.identity
        assert identity is not None
        try:
            if isinstance(frame, HistoryFrame):
                limit = min(frame.limit or _DEFAULT_HISTORY_LIMIT, _MAX_HISTORY_LIMIT)
                query = HistoryQuery(
                    HistoryOp.HISTORY,
                    identity.app,
                    frame.channel,
                    limit,
                    frame.before,
                    message_id="" if frame.before else frame.start,
                )
                result = await self.services.history.query(query)
                if self.session.codec is Codec.BINARY:
                    self._send_members(True, frame, result)
                else:
                    self.send(
                        HistoryResponseFrame(frame.id, frame.channel, result.messages, result.flag)
                    )
            else:
                query = HistoryQuery(
                    HistoryOp.FETCH,
                    identity.app,
                    frame.channel,
                    _MAX_FETCH,
                    from_serial=frame.from_serial,
                )
                result = await self.services.history.query(query)
                if self.session.codec is Codec.BINARY:
                    self._send_members(False, frame, result)
                else:
                    self.send(
                        FetchResponseFrame(frame.id, frame.channel, result.messages, result.flag)
                    )
        except ProtocolError as error:
            self.send(ErrorFrame(int(error.code), error.message, frame.id))
        except (TimeoutError, NatsError):
            self.send(ErrorFrame(int(ErrorCode.SERVER), "history unavailable, retry", frame.id))
        finally:
            self._in_flight.release()

    def _send_members(
        self, history: bool, frame: HistoryFrame | FetchFrame, result: HistoryResult
    ) -> None:
        """A binary response spliced from the worker's encoded members, never decoded here."""
        record = encode_response_members(
            history, result.flag, frame.id, frame.channel, result.members
        )
        self.outbox.put(frame_record(record))

    # ---- teardown ----

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _app(self) -> str:
        identity = self.session.identity
        assert identity is not None
        return identity.app

    async def finish(self, graceful: bool = False) -> None:
        """Release everything the connection holds; call once its transport is gone.

        ``graceful`` (the client closed cleanly) ends its presence at once; otherwise its
        memberships wait out the grace period for a resume.
        """
        if self._finished:
            return
        self._finished = True
        self.close(self.close_code, self.close_reason)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "connection %s closed (%d %s%s)",
                self.session.connection_id or "(not authenticated)",
                self.close_code,
                self.close_reason or "-",
                ", by the client" if graceful else "",
            )
        METRICS.connections.labels(self.transport).dec()
        if self._expiry is not None:
            self._expiry.cancel()
        for task in list(self._tasks):
            task.cancel()
        identity = self.session.identity
        if identity is not None and self.session.connection_id:
            self.services.presence.connection_closed(self, graceful)
            self.services.registry.remove(self.session.connection_id, self)
            for channel in list(self.session.subscriptions):
                with contextlib.suppress(Exception):
                    await self.services.router.remove(identity.app, channel, self)
