"""The messaging core: validate → sequence → persist → route → fan out.

The core takes typed requests from the gateway and answers with encoded reply bytes. It owns the
policy (membership, limits, conversation addressing) and drives the store; it never reads a
socket. Fan-out goes through the native :class:`RoutingTable` with bytes encoded once per
message (twice for a direct conversation: the two sides address it by different peer ids).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any

import orjson

from gochat._native.fanout import Connection, FanoutWriter
from gochat._native.routing import RoutingTable
from gochat.cluster.link import ClusterLink
from gochat.config import Settings
from gochat.errors import ErrorCode, RequestError
from gochat.ids import MAX_ID, IdGenerator
from gochat.messaging.presence import MemoryPresence
from gochat.observability.metrics import Metrics
from gochat.protocol import (
    FLAG_BACKWARD,
    FLAG_DUPLICATE,
    FLAG_MORE,
    FLAG_STOPPED,
    EventType,
    Kind,
    encode,
    encode_deliver,
    encode_event,
    encode_send_ack,
)
from gochat.protocol.frames import (
    CallResult,
    History,
    HistoryResult,
    Message,
    Read,
    ReadOk,
    Send,
    Subscribe,
    SubscribeOk,
    Sync,
    SyncResult,
    SyncResultEntry,
    Typing,
    Unsubscribe,
    UnsubscribeOk,
)
from gochat.store import AppendRequest, AppendResult, Store, StoredMessage

__all__ = ["MessagingCore", "SessionState"]

log = logging.getLogger("gochat.messaging")

MAX_ROOMS_PER_SESSION = 100
#: SENDs of one connection that may wait behind a conversation lookup (beyond: OVERLOADED);
#: above the default rate-limit burst (400), so only a client past its limit can reach it
MAX_SEND_BACKLOG = 1024
#: load shedding judges a SEND only with at least this many in flight, so that a moderate
#: load is never shed (docs/architecture.md, "Overload")
SHED_MIN_IN_FLIGHT = 1024
_RATE_WINDOW_S = 0.25
_GROUP_NAME_MAX = 128


class SessionState:
    """Control-plane state of one authenticated connection."""

    __slots__ = ("auth_timer", "jti", "rooms", "send_backlog", "sid", "token_exp")

    def __init__(self) -> None:
        #: rooms this session subscribed to; an empty tuple until the first SUBSCRIBE, so an idle
        #: connection carries no set (memory per idle connection is a target)
        self.rooms: set[int] | tuple[()] = ()
        self.jti = ""
        #: the refresh-token family (login session) the access token belongs to
        self.sid = ""
        self.token_exp = 0
        self.auth_timer: Any = None
        #: SENDs waiting, in arrival order, behind one whose conversation is being looked up
        #: (request, kind, arrival time); None when nothing waits
        self.send_backlog: deque[tuple[Send, int, float]] | None = None


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _unreported(conn: Connection, rid: int, exc: BaseException) -> None:
    log.error("request %d of %r failed with no gateway attached: %r", rid, conn, exc)


def _unrefused(conn: Connection, rid: int, code: int, message: str, retry_after_ms: int) -> None:
    log.error("request %d of %r refused (%d) with no gateway attached", rid, conn, code)


def _err(code: ErrorCode, message: str = "") -> RequestError:
    return RequestError(message, code=code)


class MessagingCore:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        routing: RoutingTable,
        writer: FanoutWriter,
        presence: MemoryPresence,
        ids: IdGenerator,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.store = store
        self.routing = routing
        self.writer = writer
        self.presence = presence
        self.ids = ids
        self.metrics = metrics
        self._loop_time = asyncio.get_running_loop().time
        #: SENDs handed to send_soon and not yet answered (drain waits for them)
        self._sends_in_flight = 0
        self._backlog_tasks: set[asyncio.Task[None]] = set()
        self._sends_idle: asyncio.Future[None] | None = None
        # Load shedding (docs/architecture.md, "Overload"): SENDs answered so far, the answer
        # rate measured over the last two windows of _RATE_WINDOW_S, and when the node last
        # went from no SEND in flight to some.
        self._shed_after_s = settings.overload_send_latency_ms / 1000
        self._answered = 0
        self._answer_rate = 0.0
        self._answer_rate_before = 0.0
        self._rate_since = 0.0
        self._rate_base = 0
        self._in_flight_since = 0.0
        #: reports a failed request to its connection (set by the gateway, which owns errors)
        self.request_failed: Callable[[Connection, int, BaseException], None] = _unreported
        #: answers a request with ERROR (code, message, retry_after_ms) without an exception,
        #: for answers an overloaded node gives often (set by the gateway)
        self.refuse: Callable[[Connection, int, int, str, int], None] = _unrefused
        #: set in cluster mode: remote routing and cluster presence
        self.cluster: ClusterLink | None = None
        self._direct: dict[tuple[int, int], int] = {}  # (lo, hi) -> conv
        self._members: dict[int, tuple[int, ...]] = {}  # group conv -> members (cache)
        self._members_inflight: dict[int, asyncio.Task[tuple[int, ...]]] = {}
        self._calls: dict[str, Callable[[Connection, dict[str, Any]], Any]] = {
            "group.create": self._group_create,
            "group.info": self._group_info,
            "group.members": self._call_group_members,
            "group.add": self._group_add,
            "group.remove": self._group_remove,
            "group.leave": self._group_leave,
            "conversation.list": self._conversation_list,
            "presence.query": self._presence_query,
            "user.lookup": self._user_lookup,
        }

    # ---- conversation addressing ------------------------------------------------------------
    async def _direct_conv(self, me: int, peer: int) -> int:
        key = (me, peer) if me <= peer else (peer, me)
        conv = self._direct.get(key)
        if conv is None:
            if peer > MAX_ID:
                raise _err(ErrorCode.NOT_FOUND, "no such user")
            conv = await self.store.direct_conversation(me, peer)
            self._direct[key] = conv
        return conv

    async def _group_members(self, conv: int) -> tuple[int, ...]:
        members = self._members.get(conv)
        if members is not None:
            return members
        # Single flight: concurrent first lookups share one query and resume in call order.
        task = self._members_inflight.get(conv)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load_members(conv))
            self._members_inflight[conv] = task
            task.add_done_callback(lambda _t: self._members_inflight.pop(conv, None))
        return await asyncio.shield(task)

    async def _load_members(self, conv: int) -> tuple[int, ...]:
        if conv > MAX_ID or await self.store.conversation_kind(conv) != Kind.GROUP:
            raise _err(ErrorCode.NOT_FOUND, "no such group")
        members = await self.store.members(conv)
        self._members[conv] = members
        return members

    async def _member_group(self, conv: int, user_id: int) -> tuple[int, ...]:
        members = await self._group_members(conv)
        if user_id not in members:
            raise _err(ErrorCode.NOT_MEMBER, "not a member of this group")
        return members

    async def _resolve(self, me: int, kind: int, conv_id: int) -> int:
        """Internal conv for a stored conversation the user may access."""
        if kind == Kind.DIRECT:
            if conv_id == 0:
                raise _err(ErrorCode.NOT_FOUND, "no such user")
            return await self._direct_conv(me, conv_id)
        if kind == Kind.GROUP:
            await self._member_group(conv_id, me)
            return conv_id
        raise _err(ErrorCode.BAD_REQUEST, "rooms have no history")

    def _cached_target(self, me: int, kind: int, conv_id: int) -> tuple[int, tuple[int, ...]] | None:
        """(conv, members) from the caches without I/O, or None. Raises if cached and not allowed."""
        if kind == Kind.GROUP:
            members = self._members.get(conv_id)
            if members is None:
                return None
            if me not in members:
                raise _err(ErrorCode.NOT_MEMBER, "not a member of this group")
            return conv_id, members
        key = (me, conv_id) if me <= conv_id else (conv_id, me)
        conv = self._direct.get(key)
        return None if conv is None else (conv, ())

    async def _target(self, me: int, kind: int, conv_id: int) -> tuple[int, tuple[int, ...]]:
        if kind == Kind.GROUP:
            return conv_id, await self._member_group(conv_id, me)
        if conv_id == 0:
            raise _err(ErrorCode.NOT_FOUND, "no such user")
        return await self._direct_conv(me, conv_id), ()

    # ---- SEND ---------------------------------------------------------------------------------
    def send_soon(self, conn: Connection, req: Send, started: float) -> None:
        """Handle a SEND with no coroutine, Task or Future per message.

        A room message is fanned out and acknowledged at once. A direct or group message whose
        conversation is in the caches is enqueued on the store, and :meth:`_send_committed` fans
        it out and acknowledges it after the commit. One whose conversation must be looked up
        first opens the connection's send backlog: it and every later SEND of the connection
        wait there in arrival order, so a connection's SENDs reach the store in the order they
        arrived, while one task resolves them (:meth:`_drain_backlog`). Past the node's
        capacity a direct or group SEND is answered OVERLOADED instead (:meth:`_shed_delay_ms`).
        Request errors raise :class:`~gochat.errors.GochatError`.
        """
        kind = self._check_send(req)
        if kind == Kind.ROOM:
            conn.push(self._send_room(conn, req))
            self.metrics.hot.send_latency.observe(self._loop_time() - started)
            return
        if self._sends_in_flight >= SHED_MIN_IN_FLIGHT and self._shed_after_s:
            retry_after_ms = self._shed_delay_ms(started)
            if retry_after_ms:
                self.metrics.hot.sends_shed += 1
                self.refuse(conn, req.rid, ErrorCode.OVERLOADED, "commits are lagging; retry later", retry_after_ms)
                return
        state: SessionState = conn.state
        backlog = state.send_backlog
        if backlog is not None:
            if len(backlog) >= MAX_SEND_BACKLOG:
                raise _err(ErrorCode.OVERLOADED, "too many SENDs waiting for a conversation lookup")
            backlog.append((req, kind, started))
            self._send_started(started)
            return
        target = self._cached_target(conn.user_id, kind, req.conv_id)
        if target is not None:
            self._append(conn, req, kind, target, started)
            return
        state.send_backlog = backlog = deque(((req, kind, started),))
        self._send_started(started)
        task = asyncio.get_running_loop().create_task(self._drain_backlog(conn, backlog))
        self._backlog_tasks.add(task)
        task.add_done_callback(self._backlog_tasks.discard)

    def _shed_delay_ms(self, now: float) -> int:
        """Non-zero (a retry delay in ms) when a new SEND is to be shed: it would wait longer
        than ``overload_send_latency_ms`` for its commit, estimated as the SENDs in flight ahead
        of it over the rate at which SENDs are being answered. Shedding keeps the latency of
        accepted SENDs bounded past the node's capacity, where an unbounded queue would make
        every SEND late; nothing shed was acknowledged. A node busy for less than that long is
        not judged, so a burst into an idle node is kept (docs/architecture.md, "Overload")."""
        if now - self._rate_since >= _RATE_WINDOW_S:
            self._measure_answer_rate(now)  # also while nothing is answered: a stalled store
        if now - self._in_flight_since <= self._shed_after_s:
            return 0
        # the better of the last two windows: one slow commit (a checkpoint, a GC pass) must
        # not make a node below its capacity shed; a real overload or a stall shows in both
        wait = self._sends_in_flight / max(self._answer_rate, self._answer_rate_before, 1.0)
        if wait <= self._shed_after_s:
            return 0
        return min(5000, max(100, int(wait * 1000)))

    def _measure_answer_rate(self, now: float) -> None:
        self._answer_rate_before = self._answer_rate
        self._answer_rate = (self._answered - self._rate_base) / (now - self._rate_since)
        self._rate_since = now
        self._rate_base = self._answered

    async def _drain_backlog(self, conn: Connection, backlog: deque[tuple[Send, int, float]]) -> None:
        """Enqueue a connection's waiting SENDs in arrival order, each as soon as its
        conversation is known, and every cached one in the same pass (so a backlog drains in one
        loop iteration once the lookup is done; docs/architecture.md, "The send path")."""
        try:
            while backlog:
                req, kind, started = backlog[0]
                try:
                    target = self._cached_target(conn.user_id, kind, req.conv_id)
                    if target is None:
                        target = await self._target(conn.user_id, kind, req.conv_id)
                    self._append(conn, req, kind, target, started)
                except Exception as exc:
                    self.request_failed(conn, req.rid, exc)
                backlog.popleft()
                self._send_settled()
        finally:
            conn.state.send_backlog = None
            while backlog:  # cancelled (the server is stopping): answer what still waits
                req, _, _ = backlog.popleft()
                self.request_failed(conn, req.rid, _err(ErrorCode.UNAVAILABLE, "server stopping"))
                self._send_settled()

    async def sends_settled(self) -> None:
        """Wait until every SEND handed to :meth:`send_soon` has been answered."""
        while self._sends_in_flight:
            if self._sends_idle is None:
                self._sends_idle = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._sends_idle)

    def _send_started(self, started: float) -> None:
        if not self._sends_in_flight:
            self._in_flight_since = started
        self._sends_in_flight += 1

    def _send_settled(self) -> None:
        self._sends_in_flight -= 1
        if not self._sends_in_flight and self._sends_idle is not None:
            self._sends_idle.set_result(None)
            self._sends_idle = None

    def _append(
        self, conn: Connection, req: Send, kind: int, target: tuple[int, tuple[int, ...]], started: float
    ) -> None:
        conv, members = target
        self.store.append_soon(
            AppendRequest(conv, kind, conn.user_id, req.client_msg_id, req.content_type, req.body),
            partial(self._send_committed, conn, req, conv, members, started),
        )
        self._send_started(started)

    def _check_send(self, req: Send) -> int:
        body_len = len(req.body)
        if body_len == 0:
            raise _err(ErrorCode.EMPTY_BODY)
        if body_len > self.settings.max_body:
            raise _err(ErrorCode.BODY_TOO_LARGE, f"body above {self.settings.max_body} bytes")
        return req.kind

    def _send_committed(
        self,
        conn: Connection,
        req: Send,
        conv: int,
        members: tuple[int, ...],
        started: float,
        result: AppendResult | None,
        error: BaseException | None,
    ) -> None:
        """After the commit (in queue order): fan out, then SEND_ACK."""
        self._send_settled()
        self._answered += 1
        now = self._loop_time()
        if now - self._rate_since >= _RATE_WINDOW_S:
            self._measure_answer_rate(now)
        if result is None:
            self.request_failed(conn, req.rid, error if error is not None else _err(ErrorCode.INTERNAL))
            return
        m = result.message
        hot = self.metrics.hot
        hot.messages_in[m.kind] += 1
        if not result.duplicate:
            self._fan_out(conn, m, req.conv_id, members)
            conn.push(encode_send_ack(req.rid, 0, m.kind, req.conv_id, m.seq, m.msg_id, m.ts_ms))
        elif m.conv == conv:
            conn.push(encode_send_ack(req.rid, FLAG_DUPLICATE, m.kind, req.conv_id, m.seq, m.msg_id, m.ts_ms))
        else:
            # A retry that names another conversation than the original SEND: the original
            # SEND_ACK names the original's, as the sender addresses it (for a direct one, the
            # peer, which only the store knows).
            self._background(self._ack_original(conn, req.rid, m))
        hot.send_latency.observe(now - started)

    async def _ack_original(self, conn: Connection, rid: int, m: StoredMessage) -> None:
        try:
            wire = m.conv
            if m.kind == Kind.DIRECT:
                me = m.sender_id
                wire = next((u for u in await self.store.members(m.conv) if u != me), me)
        except Exception as exc:
            self.request_failed(conn, rid, exc)
            return
        conn.push(encode_send_ack(rid, FLAG_DUPLICATE, m.kind, wire, m.seq, m.msg_id, m.ts_ms))

    def _background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._backlog_tasks.add(task)
        task.add_done_callback(self._backlog_tasks.discard)

    def _fan_out(self, conn: Connection, m: StoredMessage, wire_conv: int, members: tuple[int, ...]) -> None:
        me = m.sender_id
        if m.kind == Kind.GROUP:
            data = encode_deliver(
                m.kind, m.content_type, wire_conv, m.seq, m.msg_id, me, m.ts_ms, m.client_msg_id, m.body
            )
            n = self._deliver(members, data, conn)
        else:
            peer = wire_conv
            n = 0
            # The sender's other devices see the conversation as "with peer" (skipped, encoding
            # included, when the sender has no other device here and there is no cluster) ...
            if self.cluster is not None or self.routing.has_other_connection(me, conn):
                mine = encode_deliver(
                    m.kind, m.content_type, peer, m.seq, m.msg_id, me, m.ts_ms, m.client_msg_id, m.body
                )
                n = self._deliver((me,), mine, conn)
            if peer != me:
                # ... the peer sees it as "with sender".
                theirs = encode_deliver(
                    m.kind, m.content_type, me, m.seq, m.msg_id, me, m.ts_ms, m.client_msg_id, m.body
                )
                n += self._deliver((peer,), theirs, None)
        self.metrics.hot.deliveries += n

    def _deliver(self, user_ids: Any, data: bytes, skip: Connection | None, droppable: bool = False) -> int:
        """Queue ``data`` to every session of ``user_ids``: local ones now, remote ones through the
        cluster router (same bytes). Returns the number of local connections reached."""
        n = self.routing.fanout_users(self.writer, user_ids, data, skip, droppable)
        if self.cluster is not None:
            if len(user_ids) > self.settings.large_group_threshold:
                self.cluster.route_large(user_ids, data, droppable)
            else:
                self.cluster.route_users(user_ids, data, droppable)
        return n

    def _send_room(self, conn: Connection, req: Send) -> bytes:
        state: SessionState = conn.state
        if req.conv_id not in state.rooms:
            raise _err(ErrorCode.NOT_MEMBER, "subscribe to the room before sending")
        msg_id = self.ids.next_id()
        ts = _now_ms()
        data = encode_deliver(
            Kind.ROOM, req.content_type, req.conv_id, 0, msg_id, conn.user_id, ts, req.client_msg_id, req.body
        )
        n = self.routing.fanout_room(self.writer, req.conv_id, data, conn, True)
        if self.cluster is not None:
            self.cluster.route_room(req.conv_id, data)
        hot = self.metrics.hot
        hot.messages_in[Kind.ROOM] += 1
        hot.deliveries += n
        return encode_send_ack(req.rid, 0, Kind.ROOM, req.conv_id, 0, msg_id, ts)

    # ---- SYNC / HISTORY / READ --------------------------------------------------------------
    async def sync(self, conn: Connection, req: Sync) -> bytes:
        known = {(e.kind, e.conv_id): e.seq for e in req.entries}
        entries = []
        for c in await self.store.conversations(conn.user_id):
            wire = c.peer_id if c.kind == Kind.DIRECT else c.conv
            if c.last_seq > known.get((c.kind, wire), 0):
                entries.append(SyncResultEntry(c.kind, wire, c.last_seq, c.read_seq))
        return encode(SyncResult(entries, rid=req.rid))

    async def history(self, conn: Connection, req: History) -> bytes:
        conv = await self._resolve(conn.user_id, req.kind, req.conv_id)
        limit = min(req.limit, self.settings.history_max_limit)
        backward = bool(req.flags & FLAG_BACKWARD)
        # a from_seq past any stored seq (up to 2**64-1 on the wire) reads as "the newest"
        rows, more = await self.store.history(conv, min(req.from_seq, MAX_ID), limit, backward)
        wire = req.conv_id
        messages = [
            Message(m.kind, m.content_type, wire, m.seq, m.msg_id, m.sender_id, m.ts_ms, m.client_msg_id, m.body)
            for m in rows
        ]
        return encode(HistoryResult(req.kind, wire, messages, rid=req.rid, flags=FLAG_MORE if more else 0))

    async def read(self, conn: Connection, req: Read) -> bytes:
        me = conn.user_id
        conv = await self._resolve(me, req.kind, req.conv_id)
        seq = await self.store.set_read(conv, me, min(req.seq, MAX_ID))
        self._announce(conn, EventType.READ, req.kind, req.conv_id, seq, droppable=False)
        return encode(ReadOk(rid=req.rid))

    def _announce(self, conn: Connection, etype: int, kind: int, wire_conv: int, value: int, droppable: bool) -> None:
        """EVENT to the other members and to the actor's other devices."""
        me = conn.user_id
        if kind == Kind.GROUP:
            members = self._members.get(wire_conv, ())
            data = encode_event(etype, kind, wire_conv, me, value)
            self._deliver(members, data, conn, droppable)
        else:
            mine = encode_event(etype, kind, wire_conv, me, value)
            self._deliver((me,), mine, conn, droppable)
            if wire_conv != me:
                theirs = encode_event(etype, kind, me, me, value)
                self._deliver((wire_conv,), theirs, None, droppable)

    async def typing(self, conn: Connection, req: Typing) -> None:
        me = conn.user_id
        if req.kind == Kind.GROUP:
            await self._member_group(req.conv_id, me)
        elif req.kind == Kind.DIRECT:
            if req.conv_id == me:
                return
        else:
            raise _err(ErrorCode.BAD_REQUEST, "typing is for direct and group conversations")
        value = 0 if req.flags & FLAG_STOPPED else 1
        if req.kind == Kind.GROUP:
            data = encode_event(EventType.TYPING, req.kind, req.conv_id, me, value)
            members = self._members[req.conv_id]
            self._deliver(members, data, conn, True)
        else:
            data = encode_event(EventType.TYPING, req.kind, me, me, value)
            self._deliver((req.conv_id,), data, None, True)

    # ---- rooms -----------------------------------------------------------------------------
    def subscribe(self, conn: Connection, req: Subscribe) -> bytes:
        state: SessionState = conn.state
        if req.room_id not in state.rooms:
            if len(state.rooms) >= MAX_ROOMS_PER_SESSION:
                raise _err(ErrorCode.BAD_REQUEST, f"at most {MAX_ROOMS_PER_SESSION} rooms per session")
            if not isinstance(state.rooms, set):
                state.rooms = set()
            state.rooms.add(req.room_id)
            self.routing.subscribe(req.room_id, conn)
        return encode(SubscribeOk(req.room_id, rid=req.rid))

    def unsubscribe(self, conn: Connection, req: Unsubscribe) -> bytes:
        state: SessionState = conn.state
        if isinstance(state.rooms, set) and req.room_id in state.rooms:
            state.rooms.discard(req.room_id)
            self.routing.unsubscribe(req.room_id, conn)
        return encode(UnsubscribeOk(req.room_id, rid=req.rid))

    def connection_closed(self, conn: Connection) -> None:
        state: SessionState | None = conn.state
        if state is not None:
            for room in state.rooms:
                self.routing.unsubscribe(room, conn)
            state.rooms = ()
        self.presence.unwatch_all(conn)

    # ---- presence ----------------------------------------------------------------------------
    def presence_changed(self, user_id: int, online: bool) -> None:
        watchers = self.presence.watchers(user_id)
        if watchers:
            data = encode_event(EventType.PRESENCE, 0, 0, user_id, 1 if online else 0)
            self.writer.fanout(watchers, data, None, True)

    # ---- CALL (control plane) ----------------------------------------------------------------
    async def call(self, conn: Connection, method: str, payload: bytes, rid: int) -> bytes:
        handler = self._calls.get(method)
        if handler is None:
            raise _err(ErrorCode.UNKNOWN_METHOD, f"unknown method {method!r}")
        try:
            params = orjson.loads(payload) if payload else {}
        except orjson.JSONDecodeError as exc:
            raise _err(ErrorCode.BAD_JSON, f"payload is not JSON: {exc}") from None
        if not isinstance(params, dict):
            raise _err(ErrorCode.BAD_JSON, "payload must be a JSON object")
        result = await handler(conn, params)
        return encode(CallResult(orjson.dumps(result), rid=rid))

    @staticmethod
    def _int(params: dict[str, Any], name: str) -> int:
        v = params.get(name)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise _err(ErrorCode.BAD_REQUEST, f"{name!r} must be a positive integer")
        if v > MAX_ID:  # ids are at most 2**63-1: nothing has a larger one
            raise _err(ErrorCode.NOT_FOUND, f"no such {name.removesuffix('_id')}")
        return v

    def _group_event(self, members: tuple[int, ...], etype: int, conv: int, actor: int, value: int) -> None:
        data = encode_event(etype, Kind.GROUP, conv, actor, value)
        self._deliver(members, data, None, False)

    async def _group_create(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        name = p.get("name", "")
        members = p.get("members", [])
        if not isinstance(name, str) or not 0 < len(name) <= _GROUP_NAME_MAX:
            raise _err(ErrorCode.BAD_REQUEST, f"'name' must be 1–{_GROUP_NAME_MAX} characters")
        if not isinstance(members, list) or not all(
            isinstance(m, int) and not isinstance(m, bool) and m > 0 for m in members
        ):
            raise _err(ErrorCode.BAD_REQUEST, "'members' must be a list of user ids")
        if any(m > MAX_ID for m in members):
            raise _err(ErrorCode.NOT_FOUND, "no such user")
        if len(members) + 1 > self.settings.max_group_members:
            raise _err(ErrorCode.BAD_REQUEST, f"at most {self.settings.max_group_members} members")
        info = await self.store.create_group(conn.user_id, name, sorted(set(members)))
        self._members[info.conv] = info.members
        for uid in info.members:
            if uid != conn.user_id:
                self._group_event(info.members, EventType.MEMBER_ADDED, info.conv, conn.user_id, uid)
        return {"group_id": info.conv, "name": info.name, "members": list(info.members)}

    async def _group_info(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        conv = self._int(p, "group_id")
        await self._member_group(conv, conn.user_id)
        info = await self.store.group_info(conv)
        if info is None:
            raise _err(ErrorCode.NOT_FOUND, "no such group")
        return {
            "group_id": info.conv,
            "name": info.name,
            "owner_id": info.owner_id,
            "created_ms": info.created_ms,
            "members": list(info.members),
            "last_seq": info.last_seq,
        }

    async def _call_group_members(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        conv = self._int(p, "group_id")
        members = await self._member_group(conv, conn.user_id)
        return {"group_id": conv, "members": list(members)}

    async def _group_add(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        conv, uid = self._int(p, "group_id"), self._int(p, "user_id")
        members = await self._member_group(conv, conn.user_id)
        if len(members) >= self.settings.max_group_members:
            raise _err(ErrorCode.BAD_REQUEST, "group is full")
        if await self.store.get_user(uid) is None:
            raise _err(ErrorCode.NOT_FOUND, "no such user")
        added = await self.store.add_member(conv, uid)
        if added:
            self._members[conv] = members = await self.store.members(conv)
            self._group_event(members, EventType.MEMBER_ADDED, conv, conn.user_id, uid)
        return {"added": added}

    async def _group_remove(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        conv, uid = self._int(p, "group_id"), self._int(p, "user_id")
        members = await self._member_group(conv, conn.user_id)
        info = await self.store.group_info(conv)
        if info is not None and uid != conn.user_id and info.owner_id != conn.user_id:
            raise _err(ErrorCode.FORBIDDEN, "only the owner removes other members")
        removed = await self.store.remove_member(conv, uid)
        if removed:
            self._members[conv] = await self.store.members(conv)
            self._group_event(members, EventType.MEMBER_REMOVED, conv, conn.user_id, uid)
        return {"removed": removed}

    async def _group_leave(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        conv = self._int(p, "group_id")
        members = await self._member_group(conv, conn.user_id)
        await self.store.remove_member(conv, conn.user_id)
        self._members[conv] = await self.store.members(conv)
        self._group_event(members, EventType.MEMBER_REMOVED, conv, conn.user_id, conn.user_id)
        return {"left": True}

    async def _conversation_list(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        out = []
        for c in await self.store.conversations(conn.user_id):
            wire = c.peer_id if c.kind == Kind.DIRECT else c.conv
            out.append(
                {"kind": c.kind, "conv_id": wire, "last_seq": c.last_seq, "read_seq": c.read_seq, "name": c.name}
            )
        return {"conversations": out}

    async def _presence_query(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        ids = p.get("user_ids")
        if not isinstance(ids, list) or not all(isinstance(i, int) and i > 0 for i in ids) or len(ids) > 1000:
            raise _err(ErrorCode.BAD_REQUEST, "'user_ids' must be a list of at most 1000 user ids")
        self.presence.watch(conn, ids)
        if self.cluster is not None:
            online = await self.cluster.online(ids)
            return {"online": {str(i): online.get(i, False) for i in ids}}
        return {"online": {str(i): self.presence.is_online(i) for i in ids}}

    async def _user_lookup(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        name = p.get("username")
        if not isinstance(name, str):
            raise _err(ErrorCode.BAD_REQUEST, "'username' must be a string")
        user = await self.store.get_user_by_name(name)
        if user is None:
            raise _err(ErrorCode.NOT_FOUND, "no such user")
        return {"user_id": user.user_id, "username": user.username}
