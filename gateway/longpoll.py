"""The HTTP long-polling transport (docs/PROTOCOL.md section 5): a second thin adapter
around the same ``Connection`` as the WebSocket.

Four POST routes on the gateway's port: ``/lp/connect`` (body: the auth record; answer: the
handshake records and, on success, the session token in ``foony-lp-session``), ``/lp/send``
(client records, in arrival order), ``/lp/poll`` (held until there is something to send, at
most ``RT_LONGPOLL_HOLD_S``) and ``/lp/disconnect``. Everything the protocol decides happens
in the session and the connection, exactly as for a WebSocket; this module only moves bodies.

Sessions are capped per app (``RT_MAX_LONGPOLL_SESSIONS_PER_APP``, on top of the gateway's
``RT_MAX_CONNECTIONS_PER_APP``, which counts them with the WebSockets): a refusal is a refused
handshake, ``200`` with an ``err`` 42900 record and no session header, because the SDK reads a
body only on a 2xx and must see the code to back off and retry (PROTOCOL.md 5).

A session lives on the gateway that created it. Another gateway answers its token with 410,
the SDK reconnects with ``resumeConnectionId`` and resumes by serial, so a load balancer
needs no sticky sessions (docs/DESIGN.md, "Long-polling").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets

from aiohttp import web

from gateway.connection import Connection
from gateway.http import error_response, expect_continue, read_body, refusal_response
from gateway.metrics import METRICS
from gateway.services import GatewayServices, RegisteredConnection
from realtime_protocol.errors import ErrorCode, ProtocolError
from shared.auth import Identity
from shared.limits import Limit
from shared.session import CLOSE_GOING_AWAY, CLOSE_NORMAL, CLOSE_TRY_AGAIN_LATER

__all__ = ["SESSION_HEADER", "LongPollSession", "LongPollSessions"]

log = logging.getLogger(__name__)

SESSION_HEADER = "foony-lp-session"
_BINARY = "application/octet-stream"
# 192 random bits: the token is the session's only credential (PROTOCOL.md 5 asks >= 128).
_TOKEN_BYTES = 24
# A send body carries what the SDK queued while its previous send was in flight (a burst of
# publishes, say). Bounded so one request cannot hold much memory; the SDK's own resend of
# unacked publishes after a reconnect is well below it.
MAX_SEND_BODY_BYTES = 4 * 1024 * 1024
# A send waits at most this long for the client's queue to drain (the client's requests
# time out after 40 s); then it is read anyway and the outbox's overflow rule applies.
_SEND_BACKPRESSURE_S = 20.0


class LongPollSession:
    """One long-poll client: its connection, its send lane and its held poll."""

    def __init__(self, token: str, connection: Connection, address: str, app: str = "") -> None:
        self.token = token
        self.connection = connection
        self.address = address
        # The app it is counted under while capping sessions per app ("" when not counted).
        self.app = app
        # Bodies are processed in arrival order, one at a time (the SDK sends one at a time
        # too; a retried request must not overtake the one before it).
        self.send_lock = asyncio.Lock()
        # Resolved to tell the poll held now to answer empty: a newer poll replaced it.
        self.superseded: asyncio.Future[None] | None = None
        self.idle_timer: asyncio.TimerHandle | None = None
        self.ended = False


class LongPollSessions:
    """Every long-poll session of this gateway, by token, and the four route handlers."""

    def __init__(self, services: GatewayServices) -> None:
        self.services = services
        settings = services.settings
        self.hold_s = settings.longpoll_hold_s
        self.idle_s = settings.longpoll_idle_s
        self.max_per_address = settings.max_connections_per_address
        self.max_per_app = settings.max_longpoll_sessions_per_app
        self.sessions: dict[str, LongPollSession] = {}
        self._per_address: dict[str, int] = {}
        # Sessions per app (kept only while capping), admitted ones included; an entry goes
        # at zero.
        self.per_app: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self.sessions)

    def add_routes(self, app: web.Application) -> None:
        """Register ``/lp/connect``, ``/lp/send``, ``/lp/poll`` and ``/lp/disconnect``."""
        app.router.add_post("/lp/connect", self.connect, expect_handler=expect_continue)
        app.router.add_post("/lp/send", self.send, expect_handler=expect_continue)
        app.router.add_post("/lp/poll", self.poll, expect_handler=expect_continue)
        app.router.add_post("/lp/disconnect", self.disconnect, expect_handler=expect_continue)

    # ---- routes ----

    async def connect(self, request: web.Request) -> web.Response:
        """Run the handshake on the auth record in the body.

        A refused handshake still answers 200, without the session header, with the ``err``
        record as body: the SDK reads the body only on a 2xx (PROTOCOL.md 5). A draining
        gateway answers 503 (50001) instead: the SDK retries, through the load balancer, on
        another gateway."""
        if self.services.draining:
            return error_response(
                ErrorCode.BOOTSTRAP, "gateway draining, connect to another one", status=503
            )
        address = request.remote or ""
        if self.max_per_address and self._per_address.get(address, 0) >= self.max_per_address:
            METRICS.rate_limited[Limit.CONNECTIONS_PER_ADDRESS].inc()
            return error_response(ErrorCode.RATE_LIMITED, "too many long-poll sessions")
        try:
            body = await read_body(request, self.services.limits.max_auth_message_bytes)
        except ProtocolError as error:
            return refusal_response(error)
        # The app the handshake admitted a session of (and counted), if it did.
        admitted: list[str] = []

        def admit(
            identity: Identity, predecessor: RegisteredConnection | None
        ) -> ProtocolError | None:
            refusal = self._admit(identity.app, takes_over=predecessor is not None)
            if refusal is None:
                admitted.append(identity.app)
            return refusal

        connection = Connection(
            self.services, "long-polling", admit if self.max_per_app > 0 else None
        )
        await connection.receive_body(body)
        frames = b"".join(connection.outbox.take())
        if not connection.is_connected:
            for app in admitted:  # admitted, then closed before it became a session
                self._release(app)
            await connection.finish()
            return web.Response(body=frames, content_type=_BINARY)
        token = secrets.token_urlsafe(_TOKEN_BYTES)
        session = LongPollSession(token, connection, address, admitted[0] if admitted else "")
        connection.outbox.on_overflow = lambda: _overflowed(connection)
        self.sessions[token] = session
        self._per_address[address] = self._per_address.get(address, 0) + 1
        self._arm_idle(session)
        return web.Response(body=frames, content_type=_BINARY, headers={SESSION_HEADER: token})

    async def send(self, request: web.Request) -> web.Response:
        """Feed the body's records to the connection, in arrival order."""
        session = self._find(request)
        if session is None:
            return _gone()
        try:
            body = await read_body(request, MAX_SEND_BODY_BYTES)
        except ProtocolError as error:
            return refusal_response(error)
        connection = session.connection
        async with session.send_lock:
            # Back-pressure, as the WebSocket reader does: a client that does not poll its
            # replies is not read until it does (its one send lane waits here).
            waited = 0.0
            while connection.outbox.backed_up and not connection.is_closing:
                if waited >= _SEND_BACKPRESSURE_S:
                    break
                await connection.outbox.wait_drained(1.0)
                waited += 1.0
            # A closing connection ignores input; its last frames (an ``err``, say) still go
            # out through the poll, which then answers 410.
            await connection.receive_body(body)
        return web.Response(status=200)

    async def poll(self, request: web.Request) -> web.Response:
        """Answer with the frames queued for the session, waiting up to ``hold_s`` for some.

        A newer poll answers the older one empty; a poll whose client went away takes
        nothing (the frames wait for the next poll); a closed connection with nothing left
        to send ends the session (410)."""
        session = self._find(request)
        if session is None:
            return _gone()
        await request.read()  # the body is empty; read it so the connection can be reused
        if session.superseded is not None and not session.superseded.done():
            session.superseded.set_result(None)
        superseded = asyncio.get_running_loop().create_future()
        session.superseded = superseded
        if session.idle_timer is not None:
            session.idle_timer.cancel()
            session.idle_timer = None
        connection = session.connection
        outbox = connection.outbox
        try:
            if not outbox.pending and not outbox.closed:
                pending = asyncio.ensure_future(outbox.wait_pending())
                try:
                    await asyncio.wait(
                        (pending, superseded),
                        timeout=self.hold_s,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    pending.cancel()
                if outbox.pending:
                    # Let this loop iteration's other callbacks (the rest of a fan-out,
                    # other acks) queue theirs, so they leave in this response.
                    await asyncio.sleep(0)
            transport = request.transport
            if superseded.done() or transport is None or transport.is_closing():
                return web.Response(status=200)
            frames = outbox.take() if outbox.pending else []
        finally:
            if session.superseded is superseded:
                session.superseded = None
                if not session.ended:
                    self._arm_idle(session)
        if frames:
            return web.Response(body=b"".join(frames), content_type=_BINARY)
        if connection.is_closing:
            await self._end(session, graceful=False)
            return _gone()
        return web.Response(status=200)

    async def disconnect(self, request: web.Request) -> web.Response:
        """The client closed on purpose: its presence ends now, not after the grace."""
        session = self._find(request)
        if session is not None:
            session.connection.close(CLOSE_NORMAL, "client disconnected")
            await self._end(session, graceful=True)
        return web.Response(status=200)

    # ---- lifetime ----

    def _admit(self, app: str, takes_over: bool = False) -> ProtocolError | None:
        """Count a new session of ``app``, or refuse it (42900) at the cap. Called inside the
        handshake, once the credential names the app: counting here rather than when the
        session is registered (after awaits) keeps concurrent connects from overshooting.
        A session that ``takes_over`` a connection (a resume) is admitted as the gateway's
        cap admits it: the one it replaces is closing, and its slot comes free when it ends."""
        count = self.per_app.get(app, 0)
        if count >= self.max_per_app and not takes_over:
            return ProtocolError(
                ErrorCode.RATE_LIMITED,
                f"app has {self.max_per_app} long-poll sessions on this gateway already, "
                "retry later",
                limit=Limit.LONGPOLL_SESSIONS_PER_APP,
            )
        self.per_app[app] = count + 1
        return None

    def _release(self, app: str) -> None:
        count = self.per_app.get(app, 0) - 1
        if count > 0:
            self.per_app[app] = count
        else:
            self.per_app.pop(app, None)

    async def close_all(self) -> None:
        """End every session (shutdown): held polls answer, later ones get 410."""
        for session in list(self.sessions.values()):
            session.connection.close(CLOSE_GOING_AWAY, "server shutting down")
            await self._end(session, graceful=False)

    def _find(self, request: web.Request) -> LongPollSession | None:
        token = request.headers.get(SESSION_HEADER)
        if not token:
            return None
        return self.sessions.get(token)

    def _arm_idle(self, session: LongPollSession) -> None:
        if session.idle_timer is not None:
            session.idle_timer.cancel()
        session.idle_timer = asyncio.get_running_loop().call_later(self.idle_s, self._idle, session)

    def _idle(self, session: LongPollSession) -> None:
        """No poll for ``idle_s``: the client is gone (it keeps one outstanding always)."""
        session.idle_timer = None
        session.connection.close(CLOSE_GOING_AWAY, "long-poll session idle")
        task = asyncio.create_task(self._end(session, graceful=False))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _end(self, session: LongPollSession, graceful: bool) -> None:
        """Forget the session and release its connection; its token answers 410 from now."""
        if session.ended:
            return
        session.ended = True
        self.sessions.pop(session.token, None)
        count = self._per_address.get(session.address, 0) - 1
        if count > 0:
            self._per_address[session.address] = count
        else:
            self._per_address.pop(session.address, None)
        if session.app:
            self._release(session.app)
        if session.idle_timer is not None:
            session.idle_timer.cancel()
            session.idle_timer = None
        if session.superseded is not None and not session.superseded.done():
            session.superseded.set_result(None)
        with contextlib.suppress(Exception):
            await session.connection.finish(graceful)


def _overflowed(connection: Connection) -> None:
    """The client stopped polling and its queue passed twice the bound: close it (1013)."""
    METRICS.slow_consumer_disconnects.inc()
    connection.close(CLOSE_TRY_AGAIN_LATER, "slow consumer")


def _gone() -> web.Response:
    """410: the session ended or lives on another gateway; the SDK reconnects and resumes."""
    return error_response(ErrorCode.NOT_FOUND, "long-poll session ended or unknown", status=410)
