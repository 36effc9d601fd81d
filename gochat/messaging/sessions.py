"""Sessions: the one owner of a connection's session state, from AUTH to disconnect.

A session starts when its connection authenticates (AUTH frame, or a bearer token on the
upgrade): it gets a session id, joins the routing table, and is recorded in cluster presence
(the same :class:`~gochat.cluster.link.ClusterLink` call in embedded and cluster mode; a user's
first session anywhere makes an EVENT PRESENCE "online" for its watchers). It ends when the
connection closes: rooms, presence watches, routing and cluster presence are cleared. Kicks
(logout, revocation) close the sessions that match.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from gochat._native.connection import Connection, FanoutWriter
from gochat._native.routing import RoutingTable
from gochat.auth.tokens import Claims, family_deny_key
from gochat.clock import now_ms
from gochat.errors import ErrorCode, RequestError, close_code_for
from gochat.ids import IdGenerator
from gochat.messaging.watchers import PresenceWatchers
from gochat.protocol import encode
from gochat.protocol.frames import AuthOk, GoAway, SubscribeOk, UnsubscribeOk

if TYPE_CHECKING:
    from gochat.cluster.link import ClusterLink

__all__ = ["MAX_ROOMS_PER_SESSION", "PendingSend", "SessionState", "Sessions"]

MAX_ROOMS_PER_SESSION = 100

#: a SEND waiting in a connection's backlog (the send path's): (rid, kind, content_type,
#: conv_id, client_msg_id, body, arrival time, the SendTrace of a sampled SEND or None)
PendingSend = tuple[int, int, int, int, bytes, bytes, float, Any]


class SessionState:
    """Control-plane state of one connection (``Connection.state``), created by :class:`Sessions`."""

    __slots__ = ("auth_timer", "jti", "rooms", "send_backlog", "sid", "token_exp")

    def __init__(self) -> None:
        #: rooms this session subscribed to; an empty tuple until the first SUBSCRIBE, so an idle
        #: connection carries no set (memory per idle connection is a target)
        self.rooms: set[int] | tuple[()] = ()
        self.jti = ""
        #: the refresh-token family (login session) the access token belongs to
        self.sid = ""
        self.token_exp = 0
        self.auth_timer: asyncio.TimerHandle | None = None
        #: SENDs waiting, in arrival order, behind one whose conversation is being looked up
        #: (request, kind, arrival time); None when nothing waits (the send path's)
        self.send_backlog: deque[PendingSend] | None = None


class Sessions:
    def __init__(
        self,
        routing: RoutingTable,
        writer: FanoutWriter,
        link: ClusterLink,
        watchers: PresenceWatchers,
        ids: IdGenerator,
        heartbeat_ms: int,
        max_frame: int,
    ) -> None:
        self.routing = routing
        self.writer = writer
        self.link = link
        self.watchers = watchers
        self.ids = ids
        self.heartbeat_ms = heartbeat_ms
        self.max_frame = max_frame
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[None]] = set()
        #: pushed right after AUTH_OK while set: the node's current EVENT DEGRADED
        self.greeting: bytes | None = None

    # ---- lifecycle -------------------------------------------------------------------------------
    def opened(self, conn: Connection, claims: Claims | None) -> None:
        """A new connection: its state, and its claims when the upgrade carried a valid token
        (the session starts in :meth:`connected`, when the connection can be written to)."""
        state = conn.state = SessionState()
        if claims is not None:
            self._take_claims(conn, state, claims)
            conn.authenticated = True

    def connected(
        self, conn: Connection, auth_timeout_s: float, on_timeout: Callable[[Connection], None]
    ) -> None:
        """The WebSocket is up: start the session of a connection authenticated on the
        upgrade (AUTH_OK with rid 0), or give the others ``auth_timeout_s`` to send AUTH."""
        if conn.authenticated:
            self._start(conn, rid=0)
        else:
            conn.state.auth_timer = self._loop.call_later(auth_timeout_s, on_timeout, conn)

    def authenticate(self, conn: Connection, claims: Claims, rid: int) -> None:
        """A valid AUTH frame: start the session and answer AUTH_OK."""
        state: SessionState = conn.state
        self._take_claims(conn, state, claims)
        self._start(conn, rid)

    def closed(self, conn: Connection) -> None:
        """The connection is gone: end its session, if it had one."""
        state: SessionState | None = conn.state
        if state is not None:
            if state.auth_timer is not None:
                state.auth_timer.cancel()
                state.auth_timer = None
            for room in state.rooms:
                self.routing.unsubscribe(room, conn)
            state.rooms = ()
        self.watchers.unwatch_all(conn)
        if conn.authenticated and conn.session_id:
            self.routing.remove_connection(conn)
            self._background(self.link.session_down(conn.user_id, conn.session_id))

    @staticmethod
    def _take_claims(conn: Connection, state: SessionState, claims: Claims) -> None:
        conn.user_id = claims.user_id
        state.jti = claims.jti
        state.sid = claims.sid
        state.token_exp = claims.exp

    def _start(self, conn: Connection, rid: int) -> None:
        state: SessionState = conn.state
        if state.auth_timer is not None:
            state.auth_timer.cancel()
            state.auth_timer = None
        conn.authenticated = True
        conn.session_id = self.ids.next_id()
        self.routing.add_user_connection(conn)
        self._background(self.link.session_up(conn.user_id, conn.session_id))
        conn.push(
            encode(
                AuthOk(conn.user_id, conn.session_id, now_ms(), self.heartbeat_ms, self.max_frame, rid=rid)
            )
        )
        if self.greeting is not None:
            conn.push(self.greeting)

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- rooms -----------------------------------------------------------------------------------
    def subscribe(self, conn: Connection, room_id: int, rid: int) -> bytes:
        state: SessionState = conn.state
        if room_id not in state.rooms:
            if len(state.rooms) >= MAX_ROOMS_PER_SESSION:
                raise RequestError(f"at most {MAX_ROOMS_PER_SESSION} rooms per session")
            if not isinstance(state.rooms, set):
                state.rooms = set()
            state.rooms.add(room_id)
            self.routing.subscribe(room_id, conn)
        return encode(SubscribeOk(room_id, rid=rid))

    def unsubscribe(self, conn: Connection, room_id: int, rid: int) -> bytes:
        state: SessionState = conn.state
        if isinstance(state.rooms, set) and room_id in state.rooms:
            state.rooms.discard(room_id)
            self.routing.unsubscribe(room_id, conn)
        return encode(UnsubscribeOk(room_id, rid=rid))

    # ---- control ---------------------------------------------------------------------------------
    def local(self) -> list[tuple[int, int]]:
        """(user_id, session_id) of every authenticated session on this node."""
        return [(c.user_id, c.session_id) for c in self.writer.connections() if c.authenticated]

    def broadcast(self, data: bytes, greeting: bool = False) -> int:
        """Push ``data`` to every authenticated session on this node; with ``greeting``, also to
        every session that authenticates from now on (until the next broadcast)."""
        self.greeting = data if greeting else None
        return self.push_all(data)

    def push_all(self, data: bytes) -> int:
        """Push ``data`` to every authenticated session on this node (the greeting unchanged)."""
        conns = [c for c in self.writer.connections() if c.authenticated]
        for conn in conns:
            conn.push(data)
        return len(conns)

    def kick(self, user_id: int, code: ErrorCode, reason: str, revoked_id: str = "") -> int:
        """GOAWAY and close the sessions of ``user_id`` on this node that use the revoked access
        token or login session ``revoked_id`` (every session of the user when it is empty)."""
        conns = [
            c
            for c in self.routing.user_connections(user_id)
            if not revoked_id or revoked_id in (c.state.jti, family_deny_key(c.state.sid))
        ]
        for conn in conns:
            conn.push(encode(GoAway(int(code), 0, "", reason)))
            conn.close_with(close_code_for(code), reason)
        return len(conns)

    def close_revoked(self, is_denied: Callable[[str, str], bool]) -> int:
        """GOAWAY 202 and close every local session whose access token or login session
        ``is_denied(jti, sid)`` (after the deny-list was reloaded: a rebuild)."""
        code = ErrorCode.TOKEN_REVOKED
        conns = [
            c for c in self.writer.connections() if c.authenticated and is_denied(c.state.jti, c.state.sid)
        ]
        for conn in conns:
            conn.push(encode(GoAway(int(code), 0, "", "logged out")))
            conn.close_with(close_code_for(code), "logged out")
        return len(conns)

    async def wait_background(self) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks))
