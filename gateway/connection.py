"""One client connection, independent of its transport: the executor of the session's
commands.

The transport (WebSocket now, long-polling next) feeds whole client messages to
``Connection.receive`` and writes what ``Connection.outbox`` yields. ``shared.session``
decides (validation, limits, capabilities, history limits, which codec answers); this class
carries the typed commands out against the engines (``gateway.engines``: message bus, live
channels, history, presence), with resume gating from ``shared.resume``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from typing import Any

from nats.errors import Error as NatsError
from prometheus_client import Gauge

from gateway.fanout import Delivery
from gateway.metrics import METRICS
from gateway.outbox import Outbox
from gateway.presence import WatchReason
from gateway.services import GatewayServices, RegisteredConnection
from realtime_protocol.errors import ErrorCode, ProtocolError
from realtime_protocol.frames import AckFrame, AuthFrame, ErrorFrame, ServerFrame
from shared.auth import Identity
from shared.history import HistoryOp, HistoryQuery, HistoryResult
from shared.resume import ReplayGate, replay_start
from shared.session import (
    CLOSE_NORMAL,
    MAX_FETCH,
    Authenticate,
    Close,
    Codec,
    Command,
    Pause,
    Publish,
    ReadHistory,
    Reply,
    Session,
    SessionState,
    Subscribe,
    Unsubscribe,
    UnwatchPresence,
    UpdatePresence,
    WatchPresence,
)

__all__ = ["Connection"]

log = logging.getLogger(__name__)

_MAX_IN_FLIGHT = 256
# How often a replay waiting for a slow reader checks that the connection is still open.
_REPLAY_DRAIN_CHECK_S = 0.5

# A transport's own admission rule, asked once the credential checked out and the gateway's
# rules admitted the connection, with the connection it takes over (a resume), if any: the
# refusal, or None. A rule that admits may count the connection from then on (long-polling
# counts its sessions per app).
Admission = Callable[[Identity, RegisteredConnection | None], ProtocolError | None]


class Connection:
    """A client connection: session state, outbox and the work it started."""

    def __init__(
        self, services: GatewayServices, transport: str, admit: Admission | None = None
    ) -> None:
        self.services = services
        self.transport = transport
        self.admit = admit
        self.session = Session(services.keyring, services.limits)
        self.outbox = Outbox(services.settings.outbox_max_bytes, coalesce=True)
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_flight = asyncio.Semaphore(_MAX_IN_FLIGHT)
        self._replay_gates: dict[str, ReplayGate[Delivery]] = {}
        self._expiry: asyncio.TimerHandle | None = None
        # Publishes sent to the broker whose ack is not queued yet: a drain waits for them,
        # so a client closed by a draining gateway gets the acks of what it already sent.
        self._publishing: set[asyncio.Task[None]] = set()
        # The ``realtime_connections`` child counted once the handshake succeeded.
        self._counted: Gauge | None = None
        METRICS.opened[transport].inc()

    # ---- input ----

    @property
    def is_closing(self) -> bool:
        """True once the connection was asked to close (``session.state``, the connection's
        one state, is ``CLOSING`` or ``ENDED``)."""
        return self.session.state >= SessionState.CLOSING

    @property
    def close_code(self) -> int:
        """The WebSocket close code the transport ends with (the first close decided it)."""
        return self.session.close_code

    @property
    def close_reason(self) -> str:
        """The close reason that goes with ``close_code``."""
        return self.session.close_reason

    @property
    def is_connected(self) -> bool:
        """True after a successful handshake, until close."""
        return self.session.state is SessionState.CONNECTED

    @property
    def wants_json(self) -> bool:
        """True when live messages go out as JSON text (the router counts bytes by codec)."""
        return self.session.codec is Codec.JSON

    async def receive(self, data: bytes, is_text: bool) -> None:
        """Handle one client message (a WebSocket message or a long-poll body)."""
        METRICS.received_bytes.value += len(data)
        commands = self.session.receive_message(data, is_text)
        self.outbox.coalesce = self.session.codec is Codec.BINARY
        for command in commands:
            await self._execute(command)

    async def receive_body(self, data: bytes) -> None:
        """Handle one long-poll body (binary records, concatenated)."""
        METRICS.received_bytes.value += len(data)
        for command in self.session.receive_body(data):
            await self._execute(command)

    async def _execute(self, command: Command) -> None:
        if isinstance(command, Reply):
            if command.limit is not None:
                METRICS.rate_limited[command.limit].inc()
            self.send(command.frame)
        elif isinstance(command, Publish):
            # Waiting here (not in the task) pushes back on a client that floods publishes,
            # and keeps per-channel order: tasks reach the broker's channel queue in order.
            await self._in_flight.acquire()
            task = self._spawn(self._publish(command, time.perf_counter()))
            self._publishing.add(task)
            task.add_done_callback(self._publishing.discard)
        elif isinstance(command, ReadHistory):
            await self._in_flight.acquire()
            self._spawn(self._read_history(command))
        elif isinstance(command, Authenticate):
            await self._authenticate(command.frame)
            for deferred in self.session.after_handshake():
                await self._execute(deferred)
        elif isinstance(command, Close):
            self.outbox.close()  # the session already moved to CLOSING with this code
        elif isinstance(command, Pause):
            # The transports read the next message (or body) only once this returns: the
            # client's input waits, its replies (the refusals) go out meanwhile.
            await asyncio.sleep(command.seconds)
        else:
            await self._carry_out(command)

    # ---- output ----

    def send(self, frame: ServerFrame) -> None:
        """Queue a reply frame."""
        if isinstance(frame, ErrorFrame):
            METRICS.error_frame(frame.code)
        data = self.session.encode(frame)
        METRICS.sent_bytes.value += len(data)
        self.outbox.put(data)

    def refuse(self, error: ProtocolError, request_id: int) -> None:
        """Answer request ``request_id`` with ``error`` (counted when a limit refused it)."""
        if error.limit is not None:
            METRICS.rate_limited[error.limit].inc()
        self.send(ErrorFrame(int(error.code), error.message, request_id))

    def send_encoded(self, binary: bytes, text: bytes) -> None:
        """Queue a frame already encoded for both codecs (presence events: one encoding per
        event, whatever the number of watchers)."""
        data = text if self.session.codec is Codec.JSON else binary
        METRICS.sent_bytes.value += len(data)
        self.outbox.put(data)

    def deliver(self, delivery: Delivery) -> None:
        """Queue a live message (called by the router for every subscriber).

        The router counts the fan-out's deliveries and bytes once, after calling this for
        every subscriber; what was not queued here (held for a replay, dropped) is taken
        off its byte count first, in the same callback, so the counter never goes down
        between two scrapes."""
        gates = self._replay_gates
        if gates:
            gate = gates.get(delivery.message.channel)
            if gate is not None:
                gate.hold(delivery.message.serial, delivery)
                held = delivery.json if self.session.codec is Codec.JSON else delivery.binary
                METRICS.sent_bytes.value -= len(held)  # counted when released
                return
        data = delivery.json if self.session.codec is Codec.JSON else delivery.binary
        if not self.outbox.offer(data):
            metrics = METRICS
            metrics.dropped.value += 1
            metrics.sent_bytes.value -= len(data)

    def _deliver_held(self, delivery: Delivery) -> None:
        """Queue a live message held during a replay (the router did not count it)."""
        data = delivery.json if self.session.codec is Codec.JSON else delivery.binary
        if self.outbox.offer(data):
            METRICS.sent_bytes.value += len(data)
        else:
            METRICS.dropped.value += 1

    def close(self, code: int, reason: str) -> None:
        """Close after what is queued has been written."""
        if self.session.close(code, reason):
            self.outbox.close()

    async def close_settled(self, code: int, reason: str, settle_s: float) -> None:
        """Close once the publishes already handed to the broker have their acks queued
        (at most ``settle_s`` seconds): a draining gateway closes its clients this way, so
        they do not resend what was stored (the resend would be deduplicated, but costs a
        round trip on the gateway they move to)."""
        publishing = [task for task in self._publishing if not task.done()]
        if publishing and not self.is_closing:
            await asyncio.wait(publishing, timeout=settle_s)
        self.close(code, reason)

    # ---- handshake ----

    async def _authenticate(self, frame: AuthFrame) -> None:
        services = self.services
        session = self.session
        try:
            identity = session.authenticate(
                frame, secrets.token_urlsafe(9), backend_ready=services.is_ready
            )
        except ProtocolError as error:
            # Once per template per interval (the handlers' rate limit): a credential-stuffing
            # client cannot flood the log.
            METRICS.auth_failure(int(error.code))
            log.info("auth refused (%d): %s", int(error.code), error.message)
            for command in session.reject(error):
                await self._execute(command)
            return
        connection_id, predecessor = services.registry.claim(frame.resume_connection_id, identity)
        # The gateway's cap first, then the transport's (which counts what it admits).
        refusal = services.registry.admission_error(identity, predecessor)
        if refusal is None and self.admit is not None:
            refusal = self.admit(identity, predecessor)
        if refusal is not None:
            METRICS.auth_failure(int(refusal.code))
            log.info("connection refused (%d): %s", int(refusal.code), refusal.message)
            for command in session.reject(refusal):
                await self._execute(command)
            return
        if predecessor is not None:
            predecessor.close(CLOSE_NORMAL, "resumed by a new connection")
        services.registry.add(connection_id, self)
        self._counted = METRICS.connections[self.transport, session.codec is Codec.JSON]
        self._counted.inc()
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

    async def _publish(self, command: Publish, received: float) -> None:
        """Store one publish and queue its ack; ``received`` is when it was read
        (``time.perf_counter``), for the publish-to-ack latency."""
        identity = self.session.identity
        assert identity is not None
        message = command.message
        try:
            serial = await self.services.broker.publish(identity.app, message)
        except ProtocolError as error:
            METRICS.publish_errors.inc()
            self.refuse(error, command.request_id)
        except (TimeoutError, NatsError) as error:
            METRICS.publish_errors.inc()
            log.warning("publish failed: %s", error)
            self.send(
                ErrorFrame(int(ErrorCode.SERVER), "publish failed, retry", command.request_id)
            )
        else:
            METRICS.published[message.ephemeral].inc(len(message.members) or 1)
            self.send(AckFrame(command.request_id, serial))
            METRICS.publish_ack.observe(time.perf_counter() - received)
        finally:
            self._in_flight.release()

    async def _carry_out(
        self,
        command: Subscribe | Unsubscribe | UpdatePresence | WatchPresence | UnwatchPresence,
    ) -> None:
        """Run one request against the engines; answer its ack or err."""
        presence = self.services.presence
        app = self._app()
        try:
            if isinstance(command, Subscribe):
                await self._subscribe(command)
                return  # the subscription acks itself (after a replay)
            if isinstance(command, Unsubscribe):
                await self.services.router.remove(app, command.channel, self)
                reasons = (WatchReason.EXPLICIT, WatchReason.IMPLICIT)
                presence.unsubscribe(self, app, command.channel, reasons)
                await presence.leave_channel(self, command.channel)
            elif isinstance(command, UpdatePresence):
                await presence.apply(
                    self, command.action, command.channel, command.data, command.encoding
                )
            elif isinstance(command, WatchPresence):
                await presence.subscribe(self, app, command.channel, WatchReason.EXPLICIT)
            else:
                presence.unsubscribe(self, app, command.channel, (WatchReason.EXPLICIT,))
            self.send(AckFrame(command.request_id))
        except ProtocolError as error:
            await self._undo(command)
            self.refuse(error, command.request_id)
        except (TimeoutError, NatsError) as error:
            await self._undo(command)
            log.warning("%s failed: %s", type(command).__name__, error)
            self.send(ErrorFrame(int(ErrorCode.SERVER), "backend error, retry", command.request_id))

    async def _undo(
        self,
        command: Subscribe | Unsubscribe | UpdatePresence | WatchPresence | UnwatchPresence,
    ) -> None:
        """A new ``sub`` or ``presSub`` that failed leaves nothing behind: no slot in the
        session, no live subscription, no presence watch (the client will retry it)."""
        app = self._app()
        if isinstance(command, Subscribe) and command.fresh:
            self.session.forget_channel(command.channel)
            self._replay_gates.pop(command.channel, None)
            with contextlib.suppress(Exception):
                await self.services.router.remove(app, command.channel, self)
            if self.session.codec is Codec.JSON:
                self.services.presence.unsubscribe(
                    self, app, command.channel, (WatchReason.IMPLICIT,)
                )
        elif isinstance(command, WatchPresence) and command.fresh:
            self.session.forget_presence_channel(command.channel)
            self.services.presence.unsubscribe(self, app, command.channel, (WatchReason.EXPLICIT,))

    async def _subscribe(self, command: Subscribe) -> None:
        app = self._app()
        channel = command.channel
        if self.session.codec is Codec.JSON:
            try:
                await self.services.presence.subscribe(self, app, channel, WatchReason.IMPLICIT)
            except (ProtocolError, TimeoutError, NatsError) as error:
                # Messages matter more than the presence events JSON clients get with them:
                # the subscription goes ahead without them.
                log.warning("presence events for a JSON sub unavailable: %s", error)
        if not command.resumes:
            await self.services.router.add(app, channel, self)
            self.send(AckFrame(command.request_id))
            return
        # Resume (shared.resume): hold live deliveries while the replay is read, so the
        # client sees the replay, then live messages after it, in serial order, no gap.
        gate = self._replay_gates[channel] = ReplayGate[Delivery]()
        try:
            await self.services.router.add(app, channel, self)
            resumed, last_sent = await self._replay(app, command)
        except BaseException:
            self._replay_gates.pop(channel, None)
            raise
        del self._replay_gates[channel]
        if gate.dropped:
            METRICS.dropped.value += gate.dropped  # the client sees the gap and fetches
        for delivery in gate.release(last_sent):
            self._deliver_held(delivery)
        self.send(AckFrame(command.request_id, resumed=resumed))

    async def _replay(self, app: str, command: Subscribe) -> tuple[bool, int]:
        """Send every retained message after the resume cursor, in pages, waiting for the
        client to read each before the next (memory stays bounded however many it missed).
        Returns ``resumed`` and the last serial sent.

        The replay goes on until the channel's newest serial at the last page, so nothing
        after the cursor is left for a later live message to reveal (on a quiet channel,
        never). Where it starts, and whether it happens at all, is ``replay_start``'s call."""
        channel = command.channel
        history = self.services.history
        result = await history.query(
            HistoryQuery(
                HistoryOp.RESUME,
                app,
                channel,
                limit=MAX_FETCH,
                from_serial=command.last_serial,
                message_id="" if command.last_serial else command.last_message_id,
            )
        )
        first = result.messages[0].serial if result.members and not command.last_serial else 0
        cursor = replay_start(
            command.last_serial, first, result.newest, result.flag, self._resume_max_records()
        )
        if cursor is None:
            return False, 0  # every held live message goes out
        last_sent = self._send_replay(result, cursor)
        while result.members and last_sent < result.newest:
            while self.outbox.backed_up and not self.is_closing:
                await self.outbox.wait_drained(_REPLAY_DRAIN_CHECK_S)
            if self.is_closing:
                break
            result = await history.query(
                HistoryQuery(HistoryOp.FETCH, app, channel, MAX_FETCH, from_serial=last_sent)
            )
            if not result.flag:
                break  # aged out while replaying: the client sees the gap and fetches
            last_sent = self._send_replay(result, last_sent)
        return True, last_sent

    def _send_replay(self, result: HistoryResult, last_sent: int) -> int:
        """Queue one page of a replay; return the last serial it carried (pages are
        contiguous from the cursor)."""
        for record in self.session.encode_replay(result):
            METRICS.sent_bytes.value += len(record)
            self.outbox.put(record)
        return last_sent + len(result.members)

    def _resume_max_records(self) -> int:
        settings = self.services.settings
        return settings.resume_max_records or settings.retention_max_messages_per_channel

    async def _read_history(self, command: ReadHistory) -> None:
        try:
            result = await self.services.history.query(command.query)
            response = self.session.encode_history_response(command, result)
            METRICS.sent_bytes.value += len(response)
            self.outbox.put(response)
        except ProtocolError as error:
            self.send(ErrorFrame(int(error.code), error.message, command.request_id))
        except (TimeoutError, NatsError):
            self.send(
                ErrorFrame(int(ErrorCode.SERVER), "history unavailable, retry", command.request_id)
            )
        finally:
            self._in_flight.release()

    # ---- teardown ----

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _app(self) -> str:
        identity = self.session.identity
        assert identity is not None
        return identity.app

    async def finish(self, graceful: bool = False) -> None:
        """Release everything the connection holds; call once its transport is gone.

        ``graceful`` (the client closed cleanly) ends its presence at once; otherwise its
        memberships wait out the grace period for a resume.
        """
        if not self.session.end():
            return
        self.services.finished_connections += 1
        self.outbox.close()
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "connection %s closed (%d %s%s)",
                self.session.connection_id or "(not authenticated)",
                self.close_code,
                self.close_reason or "-",
                ", by the client" if graceful else "",
            )
        if self._counted is not None:
            self._counted.dec()
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
