"""Delivery: the same encoded bytes to every session of some users, here and on other nodes.

Local sessions get the frame through the native routing table at once; sessions on other nodes
through the cluster link, which batches per node (the link is the same object in embedded mode,
on in-process backends, where it finds no other node and routes nothing). A direct
conversation is addressed by the peer's id, so it has two views: the sender's devices see it
as "with the peer", the peer as "with the sender"; :meth:`Delivery.direct` encodes each view
once and only when someone will receive it.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from gochat._native.connection import Connection, FanoutWriter
from gochat._native.routing import RoutingTable
from gochat.clock import now_ms
from gochat.cluster.fanout import Priority, Tier
from gochat.messaging.dispatch import LocalJobs
from gochat.messaging.recent import RecentMessages
from gochat.messaging.watchers import PresenceWatchers
from gochat.observability.metrics import LatencyHistogram
from gochat.protocol import EventType, Kind, encode_event

if TYPE_CHECKING:
    from gochat.cluster.link import ClusterLink
    from gochat.observability.tracing import SendTrace

__all__ = ["Delivery", "LocalDelivery", "TracedDelivery"]


#: a DELIVER's kind, conv_id, seq and ts_ms (message record at offset 12: kind @0, conv_id @2,
#: seq @10, msg_id @18, sender_id @26, ts_ms @34)
_DELIVER_KEY = struct.Struct("<BxQQ16xQ")
#: the ``tier`` labels of ``gochat_delivery_latency_seconds``, by Tier value
_TIER_LABELS = tuple(t.label for t in Tier)
_SHARDED = int(Tier.SHARDED)
#: bounds of ``gochat_delivery_latency_seconds`` (commit to queued on the recipients' connections)
DELIVERY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_OP_DELIVER = 0x40
_OP_EVENT = 0x41
#: a DELIVER's kind u8 and conv_id u64 (record at 12), and an EVENT's (payload at 12, after type)
_DELIVER_KIND_CONV = struct.Struct("<BxQ")
_EVENT_KIND_CONV = struct.Struct("<BQ")
_DIRECT = int(Priority.DIRECT)
_SMALL_GROUP = int(Priority.SMALL_GROUP)
_LARGE_GROUP = int(Priority.LARGE_GROUP)
_BATCHED = int(Tier.BATCHED)
#: how long a DELIVER that arrived ahead of a missing seq waits for it (docs/consistency.md)
ORDER_HOLD_S = 0.2
#: DELIVERs held for one conversation before the oldest gap is given up at once
ORDER_HOLD_MAX = 1024
#: conversations whose last seq this node remembers (past it the table starts over)
ORDER_KEYS_MAX = 1 << 18

Pending = tuple[Sequence[int], bytes, bool, Any]  # user_ids, frame, droppable, skip


class LocalDelivery:
    """This node's sessions, reached through the native routing table: frames from other nodes
    (the cluster link's :class:`~gochat.cluster.node_events.LocalFanout`) and this node's own.

    **Seq order on this node.** Every DELIVER of a stored message passes an order gate keyed by
    its conversation (for a direct one, by the viewer's conversation id and the recipient: the
    two views are different conversations on the wire). Messages of one conversation committed
    on different nodes reach this node on different paths and can arrive out of seq order; the
    gate delivers a DELIVER whose seq follows the last one delivered here at once, holds one that
    arrives ahead of a missing seq for up to ``hold_s`` (released in order as soon as the gap
    fills), and drops one at or below the last delivered seq (a duplicate, or one whose gap was
    given up: the client saw the gap and fetches it with HISTORY). So a connection sees DELIVER
    seqs strictly increasing; a gap it sees is one to fetch, never one that fills later."""

    __slots__ = ("_held", "_last", "_latency", "_loop", "_unseen", "held", "hold_s", "latency", "recent", "routing", "stale_dropped")

    def __init__(self, routing: RoutingTable, hold_s: float = ORDER_HOLD_S) -> None:
        self.routing = routing
        self.hold_s = hold_s
        #: the newest DELIVERs per conversation, in the order delivered (cache-only HISTORY)
        self.recent = RecentMessages()
        #: a stored message's commit (its ts_ms) to its DELIVER queued on this node's
        #: connections, once per DELIVER fanned out here (not per recipient), by fan-out tier
        #: (gochat/cluster/fanout.py: inline, batched, sharded, cascaded; a chunked job's when
        #: its last chunk is queued); across nodes it includes the clock difference between the
        #: committing node and this one
        self.latency = {label: LatencyHistogram(DELIVERY_BUCKETS) for label in _TIER_LABELS}
        self._latency = tuple(self.latency.values())  # by tier value
        self._loop = asyncio.get_running_loop()
        self._last: dict[Any, int] = {}
        #: conversations whose first DELIVER here reached no session (the sender's own view):
        #: key -> the lowest seq passed, below which a late DELIVER is still delivered
        self._unseen: dict[Any, int] = {}
        self._held: dict[Any, tuple[dict[int, Pending], asyncio.TimerHandle]] = {}
        #: DELIVERs that waited for a missing seq, and ones dropped as duplicates or too late
        self.held = 0
        self.stale_dropped = 0

    def users(
        self, user_ids: Sequence[int], frame: bytes, droppable: bool, skip: Any = None, tier: int = Tier.INLINE
    ) -> int:
        """Queue ``frame`` to the sessions of ``user_ids`` here but ``skip``. A stored message of
        the inline and batched tiers passes the order gate; one of the sharded and cascaded
        tiers does not (its shards arrive in no order)."""
        if frame[5] != _OP_DELIVER:
            return self.routing.fanout_users(user_ids, frame, skip, droppable)
        kind, conv, seq, ts_ms = _DELIVER_KEY.unpack_from(frame, 12)
        if seq == 0:  # a room message: not stored, no order
            return self.routing.fanout_users(user_ids, frame, skip, droppable)
        self._latency[tier].observe(max(0, now_ms() - ts_ms) / 1000)
        if tier >= _SHARDED:
            self._passed(conv if kind == Kind.GROUP else (conv, user_ids[0]), seq)
            return self.routing.fanout_users(user_ids, frame, skip, droppable)
        key: Any = conv if kind == Kind.GROUP else (conv, user_ids[0])
        last = self._last.get(key)
        if last is None or seq == last + 1:
            if last is None and len(self._last) >= ORDER_KEYS_MAX:
                self._last.clear()
                self._unseen.clear()
            self._last[key] = seq
            self.recent.add(key, frame)
            n = self.routing.fanout_users(user_ids, frame, skip, droppable)
            if n:
                self._unseen.pop(key, None)
            elif last is None and skip is not None:
                # The sender's own view, first seen here, reached no session (the sender has
                # no other one here): nothing was delivered, so a lower seq still on its way
                # (the peer's message, committed just before on another node) is not stale.
                self._unseen[key] = seq
            if key in self._held:
                n += self._release(key)
            return n
        if seq <= last:
            below = self._unseen.get(key)
            if below is not None and seq < below:
                self._unseen[key] = seq  # delivered now; only lower seqs may still follow
                self.recent.add(key, frame)
                return self.routing.fanout_users(user_ids, frame, skip, droppable)
            self.stale_dropped += 1
            return 0
        held = self._held.get(key)
        if held is None:
            held = self._held[key] = ({}, self._loop.call_later(self.hold_s, self._give_up, key))
        held[0][seq] = (user_ids, frame, droppable, skip)
        self.held += 1
        if len(held[0]) > ORDER_HOLD_MAX:
            self._give_up(key)
        return 0

    def unordered(self, user_ids: Sequence[int], frame: bytes, droppable: bool, skip: Any = None) -> int:
        """One chunk of a fan-out job (gochat/messaging/dispatch.py): no order gate, no latency
        sample (the job observes one when its last chunk is queued)."""
        return self.routing.fanout_users(user_ids, frame, skip, droppable)

    def observe(self, tier: int, frame: bytes) -> None:
        """A latency sample of a stored message's fan-out finished here (``frame``: its
        DELIVER), and its seq noted by the order gate."""
        if frame[5] == _OP_DELIVER:
            kind, conv, seq, ts_ms = _DELIVER_KEY.unpack_from(frame, 12)
            if seq:
                self._latency[tier].observe(max(0, now_ms() - ts_ms) / 1000)
                if kind == Kind.GROUP:
                    self._passed(conv, seq)

    def _passed(self, key: Any, seq: int) -> None:
        """A DELIVER that bypassed the gate (a large tier): later gated ones of the
        conversation follow it, so they do not wait for seqs that never pass the gate (a group
        that crossed a tier boundary)."""
        last = self._last.get(key)
        if last is not None and seq > last and key not in self._held:
            self._last[key] = seq

    def _release(self, key: Any) -> int:
        """Deliver the held DELIVERs that now follow the last one, in seq order."""
        pending, timer = self._held[key]
        last = self._last[key]
        n = 0
        while (nxt := pending.pop(last + 1, None)) is not None:
            user_ids, frame, droppable, skip = nxt
            self.recent.add(key, frame)
            n += self.routing.fanout_users(user_ids, frame, skip, droppable)
            last += 1
        self._last[key] = last
        if not pending:
            timer.cancel()
            del self._held[key]
        return n

    def _give_up(self, key: Any) -> None:
        """The missing seq did not come within ``hold_s``: deliver what waits, in order, and
        leave the gap to the clients (they fetch it with HISTORY)."""
        held = self._held.pop(key, None)
        if held is None:
            return
        pending, timer = held
        timer.cancel()
        for seq in sorted(pending):
            user_ids, frame, droppable, skip = pending[seq]
            self.recent.add(key, frame)
            self.routing.fanout_users(user_ids, frame, skip, droppable)
            self._last[key] = seq

    def room(self, room_id: int, frame: bytes) -> int:
        return self.routing.fanout_room(room_id, frame, None, True)


class Delivery:
    """Fan-out by tier (gochat/cluster/fanout.py): ``users`` picks the tier of each message from
    its recipient count; :meth:`direct` is the inline tier at the direct-message priority."""

    def __init__(
        self,
        routing: RoutingTable,
        writer: FanoutWriter,
        link: ClusterLink,
        watchers: PresenceWatchers,
        large_group_threshold: int,
        *,
        inline_max: int = 100,
        cascade_min: int = 5000,
        jobs: LocalJobs | None = None,
        members_version: Callable[[int], int] = lambda conv: 0,
    ) -> None:
        self.routing = routing
        self.writer = writer
        self.link = link
        self.watchers = watchers
        #: the tier boundaries (reloadable; large_group_threshold moves with the dynamic threshold)
        self.inline_max = inline_max
        self.large_group_threshold = large_group_threshold
        self.cascade_min = cascade_min
        #: this node's chunked local fan-out of the sharded and cascaded tiers
        self.jobs = jobs if jobs is not None else LocalJobs(link.local, link.backends.progress, link.node_id)  # type: ignore[arg-type]
        #: a group's membership version known here (a cascaded job's receivers read at least it)
        self.members_version = members_version
        #: fan-outs by tier (gochat_fanout_messages_total{tier}), by Tier value
        self.by_tier = [0, 0, 0, 0]

    def users(
        self, user_ids: Sequence[int], data: bytes, skip: Connection | None, droppable: bool = False
    ) -> int:
        """Queue ``data`` to every session of ``user_ids`` but ``skip``: local ones now (or in
        chunks, for the sharded and cascaded tiers), remote ones through the cluster link (same
        bytes). Returns the local connections reached now."""
        n = len(user_ids)
        if n <= self.inline_max:
            self.by_tier[0] += 1
            link = self.link
            c = link.local.users(user_ids, data, droppable, skip)
            if link.peers:
                link.route_users(user_ids, data, droppable, None, _SMALL_GROUP)
            return c
        return self._large(user_ids, data, skip, droppable, n)

    def _large(self, user_ids: Sequence[int], data: bytes, skip: Connection | None, droppable: bool, n: int) -> int:
        link = self.link
        if n <= self.large_group_threshold:
            self.by_tier[Tier.BATCHED] += 1
            c = link.local.users(user_ids, data, droppable, skip, _BATCHED)
            if link.peers:
                link.route_users(user_ids, data, droppable, None, _LARGE_GROUP, _BATCHED)
            return c
        conv = _group_of(data)
        tier = Tier.SHARDED if n <= self.cascade_min or not conv else Tier.CASCADED
        self.by_tier[tier] += 1
        job_id = link.fanout.start(tier, user_ids, data, droppable, conv, self.members_version(conv))
        # the shards reach the nodes in no order: no node's order gate can keep this group's
        # seq order across nodes (docs/consistency.md, "Delivery order")
        self.jobs.add(user_ids, data, droppable, skip, tier, job_id)
        return 0

    def direct(
        self, conn: Connection, me: int, peer: int, encode: Callable[[int], bytes], droppable: bool = False
    ) -> int:
        """Deliver to both sides of the direct conversation of ``me`` (on ``conn``) and ``peer``:
        ``encode(conv_id)`` builds the frame for a viewer who addresses the conversation as
        ``conv_id``. ``me``'s other sessions get the "with peer" view (not encoded when ``me``
        has no other session anywhere), ``peer``'s sessions the "with me" view."""
        n = 0
        if self.link.peers or self.routing.has_other_connection(me, conn):
            n = self._direct_to((me,), encode(peer), conn, droppable)
        if peer != me:
            n += self._direct_to((peer,), encode(me), None, droppable)
        return n

    def _direct_to(self, user: tuple[int], data: bytes, skip: Connection | None, droppable: bool) -> int:
        """The inline tier at the direct-message priority."""
        link = self.link
        n = link.local.users(user, data, droppable, skip)
        if link.peers:
            link.route_users(user, data, droppable, None, _DIRECT)
        return n

    def room(self, room_id: int, data: bytes, skip: Connection | None) -> int:
        n = self.routing.fanout_room(room_id, data, skip, True)
        if self.link.peers:
            self.link.route_room(room_id, data)
        return n

    def traced(self, trace: SendTrace) -> TracedDelivery:
        """This delivery for one sampled message (docs/observability.md, "Tracing")."""
        return TracedDelivery(self, trace)

    def presence_changed(self, user_id: int, online: bool) -> None:
        """EVENT PRESENCE to the local sessions watching ``user_id``."""
        watchers = self.watchers.watchers(user_id)
        if watchers:
            data = encode_event(EventType.PRESENCE, 0, 0, user_id, 1 if online else 0)
            self.writer.fanout(watchers, data, None, True)


class TracedDelivery(Delivery):
    """:class:`Delivery` for one sampled message: the same decisions (it shares the node's
    delivery's settings and job queue), with a ``fanout.local`` span around the local fan-out
    and the trace handed to the cluster link (its envelopes carry the context). Built per
    sampled message only; :meth:`users` mirrors ``Delivery.users``."""

    def __init__(self, base: Delivery, trace: SendTrace) -> None:
        super().__init__(
            base.routing,
            base.writer,
            base.link,
            base.watchers,
            base.large_group_threshold,
            inline_max=base.inline_max,
            cascade_min=base.cascade_min,
            jobs=base.jobs,
            members_version=base.members_version,
        )
        self.by_tier = base.by_tier
        self.trace = trace

    def users(
        self, user_ids: Sequence[int], data: bytes, skip: Connection | None, droppable: bool = False
    ) -> int:
        trace = self.trace
        span = trace.fanout_local(len(user_ids))
        n = len(user_ids)
        if n > self.inline_max:
            c = self._large(user_ids, data, skip, droppable, n)  # batched and job tiers: not traced further
            trace.fanned_out(span, c)
            return c
        self.by_tier[0] += 1
        return self._traced_inline(user_ids, data, skip, droppable, span, _SMALL_GROUP)

    def _direct_to(self, user: tuple[int], data: bytes, skip: Connection | None, droppable: bool) -> int:
        return self._traced_inline(user, data, skip, droppable, self.trace.fanout_local(1), _DIRECT)

    def _traced_inline(
        self, user_ids: Sequence[int], data: bytes, skip: Connection | None, droppable: bool, span: Any, priority: int
    ) -> int:
        link, trace = self.link, self.trace
        c = link.local.users(user_ids, data, droppable, skip)
        trace.fanned_out(span, c)
        if link.peers:
            link.route_users(user_ids, data, droppable, trace, priority)
        return c


def _group_of(frame: bytes) -> int:
    """The group a DELIVER or EVENT frame is about (0: none, or not a group)."""
    op = frame[5]
    if op == _OP_DELIVER:
        kind, conv = _DELIVER_KIND_CONV.unpack_from(frame, 12)
    elif op == _OP_EVENT:
        kind, conv = _EVENT_KIND_CONV.unpack_from(frame, 13)
    else:
        return 0
    return conv if kind == Kind.GROUP else 0
