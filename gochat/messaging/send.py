"""The send path: SEND → (conversation lookup) → store.append_soon → commit → fan-out → SEND_ACK.

No coroutine, Task or Future per message on the common path: a SEND whose conversation is in
the addressing caches is handed to the store with a callback, and :meth:`SendPath.committed`
fans it out and acknowledges it after the commit, in queue order. A SEND whose conversation must
be looked up first opens the connection's send backlog: it and every later SEND of the
connection wait there in arrival order, so a connection's SENDs reach the store in the order
they arrived, while one task resolves them. A room message is fanned out and acknowledged at
once (rooms store nothing). Past the node's capacity a direct or group SEND is answered
OVERLOADED (:mod:`gochat.messaging.shedding`).

Tracing (docs/observability.md, "Tracing"): a node without it keeps :meth:`SendPath.send` as
is, with no check per SEND. With ``trace_sample_rate`` > 0, ``send`` is replaced on the instance
by a wrapper that samples; a sampled SEND, and a client's TRACED SEND with a sampled
traceparent, take the traced twins below, which make the same decisions with spans around them.
"""

from __future__ import annotations

import asyncio
from collections import deque
from functools import partial
from random import random
from typing import TYPE_CHECKING, Any

from gochat._native.connection import Connection
from gochat.clock import now_ms
from gochat.config import Settings
from gochat.errors import ErrorCode, GochatError, RequestError
from gochat.ids import IdGenerator
from gochat.messaging.addressing import Addressing, Target
from gochat.messaging.delivery import Delivery
from gochat.messaging.replies import ErrorReplies
from gochat.messaging.sessions import PendingSend, SessionState
from gochat.messaging.shedding import SendAccounting
from gochat.observability.metrics import HotCounters
from gochat.protocol import FLAG_DUPLICATE, TRACEPARENT_SIZE, Kind, encode_deliver, encode_send_ack
from gochat.protocol.traceparent import parse_traceparent
from gochat.resilience.degradation import Degradation
from gochat.store import AppendRequest, AppendResult, Store, StoredMessage

if TYPE_CHECKING:
    from gochat.observability.tracing import SendTrace, Tracing

__all__ = ["MAX_SEND_BACKLOG", "SendPath"]

#: SENDs of one connection that may wait behind a conversation lookup (beyond: OVERLOADED);
#: above the default rate-limit burst (400), so only a client past its limit can reach it
MAX_SEND_BACKLOG = 1024


class SendPath:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        addressing: Addressing,
        delivery: Delivery,
        replies: ErrorReplies,
        ids: IdGenerator,
        hot: HotCounters,
        degradation: Degradation,
        tracing: Tracing | None = None,
    ) -> None:
        self.max_body = settings.max_body
        #: the node's tracing, None when off (docs/observability.md, "Tracing")
        self.tracing = tracing
        if tracing is not None and tracing.rate > 0:
            # sampling: every SEND passes a random draw first; without it, no check at all
            self.send = self._send_sampling  # type: ignore[method-assign]
        #: read_only refuses stored SENDs (docs/resilience.md); one attribute read per SEND
        self.degradation = degradation
        self.store = store
        self.addressing = addressing
        self.delivery = delivery
        self.replies = replies
        self.ids = ids
        self.hot = hot
        self.accounting = SendAccounting(settings.overload_send_latency_ms)
        self._loop_time = asyncio.get_running_loop().time
        self._tasks: set[asyncio.Task[None]] = set()

    def send(
        self,
        conn: Connection,
        rid: int,
        kind: int,
        content_type: int,
        conv_id: int,
        client_msg_id: bytes,
        body: bytes,
        started: float,
    ) -> None:
        """Handle one SEND, given as plain values (the native session calls this for every
        SEND; the reference gateway unpacks its frame object into it). Every answer, refusals
        included, is written to ``conn``: SEND_ACK after the commit, or ERROR."""
        # one function on the hot path (a try block costs nothing until it catches)
        try:
            body_len = len(body)
            if body_len == 0:
                raise RequestError(code=ErrorCode.EMPTY_BODY)
            if body_len > self.max_body:
                raise RequestError(f"body above {self.max_body} bytes", code=ErrorCode.BODY_TOO_LARGE)
            if kind == Kind.ROOM:
                conn.push(self._send_room(conn, rid, content_type, conv_id, client_msg_id, body))
                self.hot.send_latency.observe(self._loop_time() - started)
                return
            if self.degradation.read_only:
                self.replies.error(
                    conn, rid, ErrorCode.READ_ONLY, "read-only for now", self.degradation.retry_after_ms
                )
                return
            accounting = self.accounting
            retry_after_ms = accounting.shed_delay_ms(started)
            if retry_after_ms:
                self.hot.sends_shed += 1
                self.replies.error(
                    conn, rid, ErrorCode.OVERLOADED, "commits are lagging; retry later", retry_after_ms
                )
                return
            state: SessionState = conn.state
            backlog = state.send_backlog
            if backlog is not None:
                if len(backlog) >= MAX_SEND_BACKLOG:
                    raise RequestError(
                        "too many SENDs waiting for a conversation lookup", code=ErrorCode.OVERLOADED
                    )
                backlog.append((rid, kind, content_type, conv_id, client_msg_id, body, started, None))
                accounting.started(started)
                return
            target = self.addressing.cached_target(conn.user_id, kind, conv_id)
            if target is not None:
                self._append(conn, rid, kind, content_type, conv_id, client_msg_id, body, started, target)
                return
            state.send_backlog = backlog = deque(
                ((rid, kind, content_type, conv_id, client_msg_id, body, started, None),)
            )
            accounting.started(started)
            self._spawn(self._drain_backlog(conn, backlog))
        except GochatError as exc:
            self.replies.error(conn, rid, exc.code, exc.message, exc.retry_after_ms)

    async def _drain_backlog(self, conn: Connection, backlog: deque[PendingSend]) -> None:
        """Enqueue a connection's waiting SENDs in arrival order, each as soon as its
        conversation is known, and every cached one in the same pass (so a backlog drains in one
        loop iteration once the lookup is done; docs/architecture.md, "The send path")."""
        addressing = self.addressing
        try:
            while backlog:
                entry = backlog[0]
                rid, kind, content_type, conv_id, client_msg_id, body, started, trace = entry
                try:
                    target = addressing.cached_target(conn.user_id, kind, conv_id)
                    if target is None:
                        target = await addressing.target(conn.user_id, kind, conv_id)
                    if trace is None:
                        self._append(conn, rid, kind, content_type, conv_id, client_msg_id, body, started, target)
                    else:
                        self._append_traced(
                            conn, rid, kind, content_type, conv_id, client_msg_id, body, started, target, trace
                        )
                except Exception as exc:
                    self.replies.failed(conn, rid, exc)
                    if trace is not None:
                        trace.error(exc)
                backlog.popleft()
                self.accounting.settled()
        finally:
            conn.state.send_backlog = None
            while backlog:  # cancelled (the server is stopping): answer what still waits
                entry = backlog.popleft()
                self.replies.error(conn, entry[0], ErrorCode.UNAVAILABLE, "server stopping")
                if entry[7] is not None:
                    entry[7].failed(ErrorCode.UNAVAILABLE, "server stopping")
                self.accounting.settled()

    def _append(
        self,
        conn: Connection,
        rid: int,
        kind: int,
        content_type: int,
        conv_id: int,
        client_msg_id: bytes,
        body: bytes,
        started: float,
        target: Target,
    ) -> None:
        # plain arguments: the common path (conversation cached) builds no tuple per SEND
        conv, members = target
        self.store.append_soon(
            AppendRequest(conv, kind, conn.user_id, client_msg_id, content_type, body),
            partial(self.committed, conn, rid, conv_id, conv, members, started),
        )
        self.accounting.started(started)

    def committed(
        self,
        conn: Connection,
        rid: int,
        wire_conv: int,
        conv: int,
        members: tuple[int, ...],
        started: float,
        result: AppendResult | None,
        error: BaseException | None,
    ) -> None:
        """After the commit (in queue order): fan out, then SEND_ACK."""
        now = self._loop_time()
        self.accounting.answered(now)
        if result is None:
            self.replies.failed(conn, rid, error if error is not None else RequestError(code=ErrorCode.INTERNAL))
            return
        m = result.message
        hot = self.hot
        hot.messages_in[m.kind] += 1
        if not result.duplicate:
            self._fan_out(conn, m, wire_conv, members, self.delivery)
            conn.push(encode_send_ack(rid, 0, m.kind, wire_conv, m.seq, m.msg_id, m.ts_ms))
        elif m.conv == conv:
            conn.push(encode_send_ack(rid, FLAG_DUPLICATE, m.kind, wire_conv, m.seq, m.msg_id, m.ts_ms))
        else:
            # A retry that names another conversation than the original SEND: the original
            # SEND_ACK names the original's, as the sender addresses it (for a direct one, the
            # peer, which only the store knows).
            self._spawn(self._ack_original(conn, rid, m))
        hot.send_latency.observe(now - started)

    async def _ack_original(self, conn: Connection, rid: int, m: StoredMessage) -> None:
        try:
            wire = m.conv
            if m.kind == Kind.DIRECT:
                me = m.sender_id
                wire = next((u for u in await self.store.members(m.conv) if u != me), me)
        except Exception as exc:
            self.replies.failed(conn, rid, exc)
            return
        conn.push(encode_send_ack(rid, FLAG_DUPLICATE, m.kind, wire, m.seq, m.msg_id, m.ts_ms))

    def _fan_out(
        self, conn: Connection, m: StoredMessage, wire_conv: int, members: tuple[int, ...], delivery: Delivery
    ) -> None:
        me = m.sender_id
        if m.kind == Kind.GROUP:
            data = encode_deliver(
                m.kind, m.content_type, wire_conv, m.seq, m.msg_id, me, m.ts_ms, m.client_msg_id, m.body
            )
            n = delivery.users(members, data, conn)
        else:
            n = delivery.direct(
                conn,
                me,
                wire_conv,
                lambda conv_id: encode_deliver(
                    m.kind, m.content_type, conv_id, m.seq, m.msg_id, me, m.ts_ms, m.client_msg_id, m.body
                ),
            )
        self.hot.deliveries += n

    def _send_room(
        self, conn: Connection, rid: int, content_type: int, room_id: int, client_msg_id: bytes, body: bytes
    ) -> bytes:
        state: SessionState = conn.state
        if room_id not in state.rooms:
            raise RequestError("subscribe to the room before sending", code=ErrorCode.NOT_MEMBER)
        msg_id = self.ids.next_id()
        ts = now_ms()
        data = encode_deliver(Kind.ROOM, content_type, room_id, 0, msg_id, conn.user_id, ts, client_msg_id, body)
        hot = self.hot
        hot.deliveries += self.delivery.room(room_id, data, conn)
        hot.messages_in[Kind.ROOM] += 1
        return encode_send_ack(rid, 0, Kind.ROOM, room_id, 0, msg_id, ts)

    # ---- traced (docs/observability.md, "Tracing"): the same decisions, with spans ---------------
    def send_traced(
        self,
        conn: Connection,
        rid: int,
        kind: int,
        content_type: int,
        conv_id: int,
        client_msg_id: bytes,
        body: bytes,
        started: float,
    ) -> None:
        """A SEND with the TRACED flag: ``body`` starts with the client's W3C traceparent, which
        is checked (not one: 105 BAD_BODY, fatal) and stripped. A sampled traceparent is traced
        (when this node has tracing), with the client's span as the parent; an unsampled one is
        not (and not sampled here either)."""
        parent = parse_traceparent(body[:TRACEPARENT_SIZE])
        if parent is None:
            self.replies.error(
                conn, rid, ErrorCode.BAD_BODY, "a TRACED SEND's body must start with a W3C traceparent (version 00)"
            )
            return
        body = body[TRACEPARENT_SIZE:]
        if self.tracing is not None and parent.sampled:
            self._send_traced(conn, rid, kind, content_type, conv_id, client_msg_id, body, started, parent)
        else:
            SendPath.send(self, conn, rid, kind, content_type, conv_id, client_msg_id, body, started)

    def _send_sampling(
        self,
        conn: Connection,
        rid: int,
        kind: int,
        content_type: int,
        conv_id: int,
        client_msg_id: bytes,
        body: bytes,
        started: float,
    ) -> None:
        """``send`` on a node with ``trace_sample_rate`` > 0: head sampling, then either path."""
        assert self.tracing is not None
        if random() < self.tracing.rate:
            self._send_traced(conn, rid, kind, content_type, conv_id, client_msg_id, body, started, None)
        else:
            SendPath.send(self, conn, rid, kind, content_type, conv_id, client_msg_id, body, started)

    def _send_traced(
        self,
        conn: Connection,
        rid: int,
        kind: int,
        content_type: int,
        conv_id: int,
        client_msg_id: bytes,
        body: bytes,
        started: float,
        parent: tuple[int, int, int] | None,
    ) -> None:
        """:meth:`send` for a sampled SEND (keep the two in step)."""
        assert self.tracing is not None
        trace = self.tracing.send(parent, started, kind, conv_id, len(body))
        try:
            body_len = len(body)
            if body_len == 0:
                raise RequestError(code=ErrorCode.EMPTY_BODY)
            if body_len > self.max_body:
                raise RequestError(f"body above {self.max_body} bytes", code=ErrorCode.BODY_TOO_LARGE)
            if kind == Kind.ROOM:
                trace.routing()  # rooms store nothing: the route span is the fan-out
                conn.push(self._send_room(conn, rid, content_type, conv_id, client_msg_id, body))
                self.hot.send_latency.observe(self._loop_time() - started)
                trace.end()
                return
            if self.degradation.read_only:
                self.replies.error(
                    conn, rid, ErrorCode.READ_ONLY, "read-only for now", self.degradation.retry_after_ms
                )
                trace.failed(ErrorCode.READ_ONLY, "read-only for now")
                return
            accounting = self.accounting
            retry_after_ms = accounting.shed_delay_ms(started)
            if retry_after_ms:
                self.hot.sends_shed += 1
                self.replies.error(
                    conn, rid, ErrorCode.OVERLOADED, "commits are lagging; retry later", retry_after_ms
                )
                trace.failed(ErrorCode.OVERLOADED, "commits are lagging; retry later")
                return
            state: SessionState = conn.state
            backlog = state.send_backlog
            if backlog is not None:
                if len(backlog) >= MAX_SEND_BACKLOG:
                    raise RequestError(
                        "too many SENDs waiting for a conversation lookup", code=ErrorCode.OVERLOADED
                    )
                backlog.append((rid, kind, content_type, conv_id, client_msg_id, body, started, trace))
                accounting.started(started)
                return
            target = self.addressing.cached_target(conn.user_id, kind, conv_id)
            if target is not None:
                self._append_traced(
                    conn, rid, kind, content_type, conv_id, client_msg_id, body, started, target, trace
                )
                return
            state.send_backlog = backlog = deque(
                ((rid, kind, content_type, conv_id, client_msg_id, body, started, trace),)
            )
            accounting.started(started)
            self._spawn(self._drain_backlog(conn, backlog))
        except GochatError as exc:
            self.replies.error(conn, rid, exc.code, exc.message, exc.retry_after_ms)
            trace.failed(exc.code, exc.message)

    def _append_traced(
        self,
        conn: Connection,
        rid: int,
        kind: int,
        content_type: int,
        conv_id: int,
        client_msg_id: bytes,
        body: bytes,
        started: float,
        target: Target,
        trace: SendTrace,
    ) -> None:
        conv, members = target
        trace.committing(len(members))
        self.store.append_soon(
            AppendRequest(conv, kind, conn.user_id, client_msg_id, content_type, body),
            partial(self._committed_traced, trace, conn, rid, conv_id, conv, members, started),
        )
        self.accounting.started(started)

    def _committed_traced(
        self,
        trace: SendTrace,
        conn: Connection,
        rid: int,
        wire_conv: int,
        conv: int,
        members: tuple[int, ...],
        started: float,
        result: AppendResult | None,
        error: BaseException | None,
    ) -> None:
        """:meth:`committed` for a sampled SEND (keep the two in step)."""
        if result is None or result.duplicate:
            # an ERROR or the original's SEND_ACK, no fan-out: the untraced answer
            if result is None:
                trace.error(error if error is not None else RequestError(code=ErrorCode.INTERNAL))
            else:
                trace.committed(result.message.seq, result.message.msg_id, True)
            self.committed(conn, rid, wire_conv, conv, members, started, result, error)
            trace.end()
            return
        now = self._loop_time()
        self.accounting.answered(now)
        m = result.message
        hot = self.hot
        hot.messages_in[m.kind] += 1
        trace.committed(m.seq, m.msg_id, False)
        self._fan_out(conn, m, wire_conv, members, self.delivery.traced(trace))
        conn.push(encode_send_ack(rid, 0, m.kind, wire_conv, m.seq, m.msg_id, m.ts_ms))
        hot.send_latency.observe(now - started)
        trace.end()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def settled(self) -> None:
        """Wait until every SEND handed to :meth:`send_soon` has been answered."""
        await self.accounting.all_settled()
