"""The WebSocket gateway: connection lifecycle, authentication, decoding and dispatch.

picows calls the native connection for every WebSocket message. By default that is a
:class:`~gochat._native.session.Session`, which walks the frames in C (validation, rate limit,
auth gate, op switch, PING) and calls the coarse methods here: :meth:`Gateway.on_send` (plain
values, straight into the send path), :meth:`Gateway.on_auth`, :meth:`Gateway.on_request` (one
control-plane frame), :meth:`Gateway.on_violation`, :meth:`Gateway.on_rate_limited`. With
``native_session = false`` a plain :class:`Connection` hands each message to
:meth:`Gateway.on_message`, the reference implementation in Python that decodes every frame
and dispatches it; the tests check that both answer alike. Replies and pushes are queued on the
connection and leave in one coalesced write at the end of the loop tick (``FanoutWriter``).

Errors: a request-level failure is answered with ERROR (the connection stays); a protocol
violation is answered with ERROR and the connection is closed with ``4000 + code``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

from picows import WSUpgradeRequest, WSUpgradeResponse, WSUpgradeResponseWithListener

from gochat._native.connection import Connection, FanoutWriter
from gochat._native.session import Session
from gochat.auth.service import AuthService
from gochat.auth.tokens import Claims
from gochat.config import Settings
from gochat.errors import ErrorCode, GochatError, close_code_for
from gochat.messaging.core import MessagingCore
from gochat.messaging.replies import ErrorReplies
from gochat.protocol import CLIENT_OPS, Op, decode, encode
from gochat.protocol.frames import GoAway, Pong

__all__ = ["Gateway"]

log = logging.getLogger("gochat.gateway")

_RETRY_RATE_LIMITED_MS = 1000


class Gateway:
    def __init__(
        self,
        settings: Settings,
        auth: AuthService,
        core: MessagingCore,
        writer: FanoutWriter,
        replies: ErrorReplies,
    ) -> None:
        self.settings = settings
        self.auth = auth
        self.core = core
        self.sessions = core.sessions
        self.writer = writer
        self.replies = replies
        self.loop = asyncio.get_running_loop()
        self.inflight: set[asyncio.Task[None]] = set()
        self.draining = False
        self._picows_max_message = settings.max_frame * 4
        self._auth_timeout_s = settings.auth_timeout_ms / 1000
        self._connection_class = Session if settings.native_session else Connection
        #: the native session's SEND entry: the send path itself, no gateway frame in between
        self.on_send = core.sends.send

    # ---- listener factory ------------------------------------------------------------------
    def listener_factory(self, request: WSUpgradeRequest) -> Any:
        path = request.path.split(b"?", 1)[0]
        if path != b"/ws":
            return None  # picows answers 404
        if self.draining:
            return WSUpgradeResponseWithListener(
                WSUpgradeResponse.create_error_response(503, b"draining"), None
            )
        conn = self._connection_class(
            self,
            self.writer,
            self.settings.outbound_soft_limit,
            self.settings.outbound_hard_limit,
            self.settings.rate_limit_per_s,
            float(self.settings.rate_limit_burst),
            self._picows_max_message,
        )
        claims: Claims | None = None
        header = request.headers.get("Authorization")
        if header:
            scheme, _, token = header.partition(" ")
            try:
                if scheme.lower() != "bearer" or not token:
                    raise GochatError("expected 'Authorization: Bearer <token>'", code=ErrorCode.UNAUTHORIZED)
                claims = self.auth.verify_access(token.strip())
            except GochatError as exc:
                body = exc.message.encode()
                status = 503 if exc.code == ErrorCode.UNAVAILABLE else 401  # 503: retry later
                return WSUpgradeResponseWithListener(
                    WSUpgradeResponse.create_error_response(status, body), None
                )
        self.sessions.opened(conn, claims)  # a header-authenticated session starts in on_connected
        return conn

    # ---- connection lifecycle (called by Connection) -----------------------------------------
    def on_connected(self, conn: Connection) -> None:
        self.sessions.connected(conn, self._auth_timeout_s, self._auth_timeout)

    def on_disconnected(self, conn: Connection) -> None:
        self.sessions.closed(conn)

    def on_text(self, conn: Connection) -> None:
        self._fatal(conn, 0, ErrorCode.TEXT_FRAME, "only binary WebSocket messages are allowed")

    def on_oversize(self, conn: Connection) -> None:
        self._fatal(conn, 0, ErrorCode.FRAME_TOO_LARGE, "message above the maximum size")

    def _auth_timeout(self, conn: Connection) -> None:
        if not conn.authenticated and not conn.closing:
            self._fatal(conn, 0, ErrorCode.NOT_AUTHENTICATED, "no AUTH within the time allowed")

    # ---- inbound: the native session's coarse calls ----------------------------------------------
    def on_auth(self, conn: Connection, rid: int, token: str) -> None:
        if conn.authenticated:
            self.replies.error(conn, rid, ErrorCode.ALREADY_AUTHENTICATED)
            return
        try:
            claims = self.auth.verify_access(token)
        except GochatError as exc:
            # UNAVAILABLE (the node is catching up with revocations) is not fatal: the client
            # sends AUTH again after retry_after_ms; every other refusal closes (error table)
            self.replies.error(conn, rid, exc.code, exc.message, exc.retry_after_ms)
            return
        self.sessions.authenticate(conn, claims, rid)

    def on_request(self, conn: Connection, frame: bytes) -> None:
        """One valid control-plane frame of an authenticated connection."""
        self._dispatch(conn, decode(frame, self.settings.max_frame)[0])

    def on_violation(self, conn: Connection, rid: int, code: int, message: str) -> None:
        self._fatal(conn, rid, code, message)

    def on_rate_limited(self, conn: Connection, rid: int) -> None:
        self.replies.error(conn, rid, ErrorCode.RATE_LIMITED, "", _RETRY_RATE_LIMITED_MS)

    # ---- inbound: the reference implementation ---------------------------------------------------
    def on_message(self, conn: Connection, data: bytes) -> None:
        if conn.closing:
            return
        try:
            frames = decode(data, self.settings.max_frame)
        except GochatError as exc:
            self._fatal(conn, 0, exc.code, exc.message)
            return
        if conn.authenticated and not conn.take_tokens(self.loop.time(), float(len(frames))):
            self._dispatch_limited(conn, frames)
            return
        for frame in frames:
            if conn.closing:
                return
            self._dispatch(conn, frame)

    def _dispatch_limited(self, conn: Connection, frames: list[Any]) -> None:
        """A message with more frames than the rate limit has tokens: frames are limited one by
        one, as in separate messages. Each frame within the budget is dispatched; each one past
        it is answered RATE_LIMITED (a TYPING is dropped silently)."""
        now = self.loop.time()
        for frame in frames:
            if conn.closing:
                return
            if conn.take_tokens(now, 1.0):
                self._dispatch(conn, frame)
            elif frame.op != Op.TYPING:
                self.replies.error(conn, frame.rid, ErrorCode.RATE_LIMITED, "", _RETRY_RATE_LIMITED_MS)

    def _dispatch(self, conn: Connection, f: Any) -> None:
        op = f.op
        if op not in CLIENT_OPS:
            self._fatal(conn, f.rid, ErrorCode.UNEXPECTED_OP, f"op 0x{op:02x} is server-to-client")
            return
        if op == Op.PING:
            conn.push(encode(Pong(f.payload, rid=f.rid)))
            return
        if not conn.authenticated:
            if op == Op.AUTH:
                self.on_auth(conn, f.rid, f.token)
            else:
                self._fatal(conn, f.rid, ErrorCode.NOT_AUTHENTICATED, "AUTH first")
            return
        core = self.core
        if op == Op.SEND:
            core.send_soon(conn, f, self.loop.time())
        elif op == Op.AUTH:
            self.on_auth(conn, f.rid, f.token)
        elif op == Op.SYNC:
            self._spawn(conn, f.rid, core.sync(conn, f))
        elif op == Op.HISTORY:
            self._spawn(conn, f.rid, core.history(conn, f))
        elif op == Op.READ:
            self._spawn(conn, f.rid, core.read(conn, f))
        elif op == Op.CALL:
            self._spawn(conn, f.rid, core.call(conn, f.method, f.payload, f.rid))
        elif op == Op.TYPING:
            self._spawn(conn, f.rid, core.typing(conn, f))
        else:
            try:
                conn.push(core.subscribe(conn, f) if op == Op.SUBSCRIBE else core.unsubscribe(conn, f))
            except GochatError as exc:
                self.replies.error(conn, f.rid, exc.code, exc.message, exc.retry_after_ms)

    @property
    def connection_count(self) -> int:
        """Open WebSocket connections (the writer tracks them; no per-connection dict here)."""
        return int(self.writer.tracked)

    def _spawn(self, conn: Connection, rid: int, coro: Awaitable[bytes | None]) -> None:
        task = self.loop.create_task(self._run(conn, rid, coro))
        self.inflight.add(task)
        task.add_done_callback(self.inflight.discard)

    async def _run(self, conn: Connection, rid: int, coro: Awaitable[bytes | None]) -> None:
        try:
            reply = await coro
        except Exception as exc:
            self.replies.failed(conn, rid, exc)
            return
        if reply is not None:
            conn.push(reply)

    def _fatal(self, conn: Connection, rid: int, code: int, message: str) -> None:
        """A protocol violation (or a refused AUTH): ERROR, then close ``4000 + code``."""
        self.replies.error(conn, rid, code, message)

    # ---- control ---------------------------------------------------------------------------------
    def kick_user(self, user_id: int, code: ErrorCode, reason: str, revoked_id: str = "") -> int:
        """See :meth:`~gochat.messaging.sessions.Sessions.kick`."""
        return self.sessions.kick(user_id, code, reason, revoked_id)

    async def drain(self, url_hint: str = "", timeout: float = 10.0) -> None:
        """Stop taking work: GOAWAY everyone, let in-flight requests commit, close."""
        self.draining = True
        goaway = encode(GoAway(int(ErrorCode.SHUTTING_DOWN), 500, url_hint, "server is shutting down"))
        for conn in self.writer.connections():
            conn.push(goaway)
        self.writer.flush_now()
        if self.inflight:
            await asyncio.wait(list(self.inflight), timeout=timeout)
        try:
            # fast-path SENDs are not tasks: their commits and ACKs are awaited here
            await asyncio.wait_for(self.core.sends_settled(), timeout)
        except TimeoutError:
            log.warning("drain: SENDs still uncommitted after %.1f s", timeout)
        shutting_down = close_code_for(ErrorCode.SHUTTING_DOWN)  # 4502, as the GOAWAY's code says
        for conn in self.writer.connections():
            conn.close_with(shutting_down, "server is shutting down")
        self.writer.flush_now()

    def stats(self) -> dict[str, Any]:
        w = self.writer
        return {
            "connections": self.connection_count,
            "authenticated": self.sessions.routing.connections,
            "frames_out": w.frames_out,
            "bytes_out": w.bytes_out,
            "writes": w.writes,
            "drops": w.drops,
            "slow_disconnects": w.slow_disconnects,
            "order_held": self.core.link.local.held,
            "order_stale": self.core.link.local.stale_dropped,
        }
