"""The messaging core: validate → sequence → persist → route → fan out.

:class:`MessagingCore` takes typed requests from the gateway and answers with encoded reply
bytes (or raises :class:`~gochat.errors.GochatError`); answers that come later, after a commit
or a lookup, it writes to the connection itself (SEND_ACK, or ERROR through
:class:`~gochat.messaging.replies.ErrorReplies`). It never reads a socket and never calls back
into the gateway. Its parts, one job each:

- :mod:`~gochat.messaging.send` the send path (with :mod:`~gochat.messaging.shedding`),
- :mod:`~gochat.messaging.addressing` which stored conversation a request names, cached,
- :mod:`~gochat.messaging.delivery` the same bytes to local and remote sessions,
- :mod:`~gochat.messaging.sessions` session state, from AUTH to disconnect,
- :mod:`~gochat.messaging.calls` the CALL methods,
- this module: SYNC, HISTORY, READ, TYPING and rooms.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import TYPE_CHECKING

import orjson

from gochat._native.connection import Connection, FanoutWriter
from gochat._native.routing import RoutingTable
from gochat.cluster.envelope import CascadeEnvelope
from gochat.cluster.fanout import Tier
from gochat.config import Settings
from gochat.errors import ErrorCode, GochatError, RequestError, UnavailableError
from gochat.ids import MAX_ID, IdGenerator
from gochat.messaging.addressing import Addressing
from gochat.messaging.calls import ControlCalls
from gochat.messaging.delivery import Delivery
from gochat.messaging.dispatch import LocalJobs
from gochat.messaging.recent import RecentMessages
from gochat.messaging.replies import ErrorReplies
from gochat.messaging.send import SendPath
from gochat.messaging.sessions import Sessions
from gochat.messaging.watchers import PresenceWatchers
from gochat.observability.metrics import Metrics
from gochat.protocol import (
    FLAG_BACKWARD,
    FLAG_MORE,
    FLAG_PARTIAL,
    FLAG_STOPPED,
    FLAG_TRACED,
    EventType,
    Kind,
    encode,
    encode_event,
)
from gochat.protocol.frames import (
    History,
    HistoryResult,
    Message,
    Read,
    ReadOk,
    Send,
    Subscribe,
    Sync,
    SyncResult,
    SyncResultEntry,
    Typing,
    Unsubscribe,
)
from gochat.resilience.degradation import Degradation, Switch
from gochat.store import ConversationState, Store

if TYPE_CHECKING:
    from gochat.cluster.link import ClusterLink
    from gochat.observability.tracing import Tracing

__all__ = ["SYNC_CACHE_USERS", "MessagingCore"]

log = logging.getLogger("gochat.messaging")

#: users whose last SYNC answer a node keeps for cache-only SYNCs
SYNC_CACHE_USERS = 65_536


class MessagingCore:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        routing: RoutingTable,
        writer: FanoutWriter,
        link: ClusterLink,
        ids: IdGenerator,
        metrics: Metrics,
        replies: ErrorReplies,
        degradation: Degradation | None = None,
        recent: RecentMessages | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.settings = settings
        #: the node's degradation switches (docs/resilience.md): read_only refuses SENDs,
        #: non_core_off drops typing, read-receipt and presence events
        self.degradation = degradation if degradation is not None else Degradation()
        #: what cache-only answers come from: the newest DELIVERs this node passed on (the
        #: order gate's), and each user's last SYNC answer (bounded)
        self.recent = recent if recent is not None else RecentMessages()
        self._synced: OrderedDict[int, list[ConversationState]] = OrderedDict()
        self.store = store
        self.link = link
        self.watchers = PresenceWatchers()
        self.addressing = Addressing(store, link.backends.cache)
        self.delivery = Delivery(
            routing,
            writer,
            link,
            self.watchers,
            settings.large_group_threshold,
            inline_max=settings.fanout_inline_max,
            cascade_min=settings.fanout_cascade_min,
            jobs=LocalJobs(
                link.local,  # type: ignore[arg-type]
                link.backends.progress,
                link.node_id,
                chunk=settings.fanout_chunk,
                max_jobs=settings.fanout_max_jobs,
            ),
            members_version=self.addressing.version,
        )
        self.delivery.jobs.on_shed = lambda user_ids: self.resync(tuple(user_ids), "fan-out shed")
        #: cascaded fan-outs waiting for their group's members to load, by group (in order)
        self._cascades: dict[int, list[CascadeEnvelope]] = {}
        self._cascade_tasks: set[asyncio.Task[None]] = set()
        self.sessions = Sessions(
            routing, writer, link, self.watchers, ids, settings.heartbeat_ms, settings.max_frame
        )
        self.sends = SendPath(
            settings, store, self.addressing, self.delivery, replies, ids, metrics.hot, self.degradation, tracing
        )
        self.calls = ControlCalls(
            settings, store, self.addressing, self.delivery, self.watchers, link, self.degradation
        )
        self.degradation.on_change(self._announce_degradation)
        self._announce_degradation(self.degradation.active, Switch(0), "configuration")

    def _announce_degradation(self, active: Switch, previous: Switch, reason: str) -> None:
        """EVENT DEGRADED to every session, and after AUTH_OK to every later one while any
        switch is on (docs/protocol.md §3, EVENT types)."""
        if active or previous:
            extra = orjson.dumps({"switches": Degradation.names(active), "reason": reason})
            event = encode_event(EventType.DEGRADED, 0, 0, 0, int(active), extra)
            self.sessions.broadcast(event, greeting=bool(active))

    # ---- SEND and CALL ---------------------------------------------------------------------------
    def send_soon(self, conn: Connection, req: Send, started: float) -> None:
        """A SEND given as a frame object (the reference gateway, and a TRACED SEND from either
        gateway); see :meth:`SendPath.send` and :meth:`SendPath.send_traced`."""
        if req.flags & FLAG_TRACED:
            self.sends.send_traced(
                conn, req.rid, req.kind, req.content_type, req.conv_id, req.client_msg_id, req.body, started
            )
            return
        self.sends.send(conn, req.rid, req.kind, req.content_type, req.conv_id, req.client_msg_id, req.body, started)

    async def call(self, conn: Connection, method: str, payload: bytes, rid: int) -> bytes:
        return await self.calls.call(conn, method, payload, rid)

    async def sends_settled(self) -> None:
        """Wait until every SEND handed to :meth:`send_soon` has been answered."""
        await self.sends.settled()

    # ---- SYNC / HISTORY / READ -------------------------------------------------------------------
    async def sync(self, conn: Connection, req: Sync) -> bytes:
        me = conn.user_id
        known = {(e.kind, e.conv_id): e.seq for e in req.entries}
        flags = 0
        try:
            convs = await self.store.conversations(me)
        except UnavailableError:
            if not self.degradation.cache_only:
                raise
            # cache-only (docs/resilience.md): this user's last SYNC answer on this node, with
            # the newer seqs this node delivered since; marked partial
            convs, flags = self._synced.get(me, []), FLAG_PARTIAL
        else:
            self._remember_sync(me, convs)
        entries = []
        for c in convs:
            wire = c.peer_id if c.kind == Kind.DIRECT else c.conv
            last_seq = c.last_seq
            if flags:
                last_seq = max(last_seq, self.recent.last_seq(c.conv if c.kind == Kind.GROUP else (wire, me)))
            if last_seq > known.get((c.kind, wire), 0):
                entries.append(SyncResultEntry(c.kind, wire, last_seq, c.read_seq))
        return encode(SyncResult(entries, rid=req.rid, flags=flags))

    def _remember_sync(self, user_id: int, convs: list[ConversationState]) -> None:
        synced = self._synced
        synced[user_id] = convs
        synced.move_to_end(user_id)
        if len(synced) > SYNC_CACHE_USERS:
            synced.popitem(last=False)

    async def history(self, conn: Connection, req: History) -> bytes:
        limit = min(req.limit, self.settings.history_max_limit)
        backward = bool(req.flags & FLAG_BACKWARD)
        try:
            conv = await self.addressing.resolve(conn.user_id, req.kind, req.conv_id)
            # a from_seq past any stored seq (up to 2**64-1 on the wire) reads as "the newest"
            rows, more = await self.store.history(conv, min(req.from_seq, MAX_ID), limit, backward)
        except UnavailableError:
            if not self.degradation.cache_only or req.kind not in (Kind.DIRECT, Kind.GROUP):
                raise
            return await self._cached_history(conn, req, limit, backward)
        wire = req.conv_id
        messages = [
            Message(
                m.kind, m.content_type, wire, m.seq, m.msg_id, m.sender_id, m.ts_ms, m.client_msg_id, m.body
            )
            for m in rows
        ]
        return encode(HistoryResult(req.kind, wire, messages, rid=req.rid, flags=FLAG_MORE if more else 0))

    async def _cached_history(self, conn: Connection, req: History, limit: int, backward: bool) -> bytes:
        """HISTORY while the database is out of reach (cache-only): the newest messages this
        node delivered in the conversation, marked partial (docs/resilience.md). A group's
        membership is still checked (from the member cache; UNAVAILABLE when not cached)."""
        me = conn.user_id
        if req.kind == Kind.GROUP:
            await self.addressing.member_group(req.conv_id, me)
            key: object = req.conv_id
        else:
            key = (req.conv_id, me)
        from_seq = MAX_ID if backward and req.from_seq == 0 else min(req.from_seq, MAX_ID)
        cached, more = self.recent.history(key, from_seq, limit, backward)
        wire = req.conv_id
        messages = [
            Message(m.kind, m.content_type, wire, m.seq, m.msg_id, m.sender_id, m.ts_ms, m.client_msg_id, m.body)
            for m in cached
        ]
        flags = FLAG_PARTIAL | (FLAG_MORE if more else 0)
        return encode(HistoryResult(req.kind, wire, messages, rid=req.rid, flags=flags))

    async def read(self, conn: Connection, req: Read) -> bytes:
        me = conn.user_id
        conv = await self.addressing.resolve(me, req.kind, req.conv_id)
        seq = await self.store.set_read(conv, me, min(req.seq, MAX_ID))
        if not self.degradation.non_core_off:  # read receipts are not core: stored, not announced
            self._announce(conn, EventType.READ, req.kind, req.conv_id, seq)
        return encode(ReadOk(rid=req.rid))

    def _announce(self, conn: Connection, etype: int, kind: int, wire_conv: int, value: int) -> None:
        """EVENT to the other members and to the actor's other devices."""
        me = conn.user_id
        if kind == Kind.GROUP:
            data = encode_event(etype, kind, wire_conv, me, value)
            self.delivery.users(self.addressing.cached_members(wire_conv), data, conn)
        else:
            self.delivery.direct(
                conn, me, wire_conv, lambda conv_id: encode_event(etype, kind, conv_id, me, value)
            )

    async def typing(self, conn: Connection, req: Typing) -> None:
        """EVENT TYPING to the other members (never to the typist's own devices; droppable)."""
        me = conn.user_id
        if self.degradation.non_core_off:
            return  # typing is droppable anyway: dropped silently while non-core features are off
        value = 0 if req.flags & FLAG_STOPPED else 1
        if req.kind == Kind.GROUP:
            members = await self.addressing.member_group(req.conv_id, me)
            self.delivery.users(
                members, encode_event(EventType.TYPING, req.kind, req.conv_id, me, value), conn, True
            )
        elif req.kind == Kind.DIRECT:
            if req.conv_id != me:
                self.delivery.users(
                    (req.conv_id,), encode_event(EventType.TYPING, req.kind, me, me, value), None, True
                )
        else:
            raise RequestError("typing is for direct and group conversations", code=ErrorCode.BAD_REQUEST)

    # ---- rooms and presence ----------------------------------------------------------------------
    def subscribe(self, conn: Connection, req: Subscribe) -> bytes:
        return self.sessions.subscribe(conn, req.room_id, req.rid)

    def unsubscribe(self, conn: Connection, req: Unsubscribe) -> bytes:
        return self.sessions.unsubscribe(conn, req.room_id, req.rid)

    # ---- the cascaded tier ------------------------------------------------------------------------
    def cascade(self, env: CascadeEnvelope) -> None:
        """A cascaded fan-out from another node: queue the message to this node's sessions of
        the group's members, read at the sender's membership version or newer (loaded when the
        cache holds an older list; the group's later cascades wait behind the load, in order)."""
        conv = env.conv_id
        waiting = self._cascades.get(conv)
        if waiting is not None:
            waiting.append(env)
            return
        if self.addressing.version(conv) >= env.members_version:
            members = self.addressing.cached_members(conv)
            if members:
                self.delivery.jobs.add(members, env.frame, env.droppable, None, Tier.CASCADED, env.job_id)
                return
        self._cascades[conv] = [env]
        task = asyncio.get_running_loop().create_task(self._load_cascade(conv))
        self._cascade_tasks.add(task)
        task.add_done_callback(self._cascade_tasks.discard)

    async def _load_cascade(self, conv: int) -> None:
        members: tuple[int, ...] = ()
        try:
            members = await self.addressing.reload_members(conv)
        except GochatError as exc:
            # who the members here are is unknown: every session here is told to SYNC
            log.warning("cascaded fan-out of group %d dropped here: %s", conv, exc.message)
            self.resync(None, "a group's members could not be read")
        finally:
            for env in self._cascades.pop(conv, ()):
                if members:
                    self.delivery.jobs.add(members, env.frame, env.droppable, None, Tier.CASCADED, env.job_id)

    def resync(self, user_ids: tuple[int, ...] | None, reason: str) -> None:
        """EVENT RESYNC to the sessions here of ``user_ids`` (None: every session): pushes to
        them were lost on the way (docs/cluster.md, "Failed pushes"); their clients SYNC."""
        event = encode_event(EventType.RESYNC, 0, 0, 0, 0, orjson.dumps({"reason": reason}))
        if user_ids is None:
            self.sessions.push_all(event)
        else:
            self.link.local.users(user_ids, event, False)

    async def close(self) -> None:
        """Stop the fan-out work still queued here (its recipients recover with SYNC)."""
        for task in list(self._cascade_tasks):
            task.cancel()
        await self.delivery.jobs.close()

    def presence_changed(self, user_id: int, online: bool) -> None:
        """A user came online or went offline (anywhere in the cluster): tell the watchers here
        (not while non-core features are off)."""
        if self.degradation.non_core_off:
            return
        self.delivery.presence_changed(user_id, online)
