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
#: bounds of ``gochat_delivery_latency_seconds`` (commit to queued on the recipients' connections)
DELIVERY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_OP_DELIVER = 0x40
#: how long a DELIVER that arrived ahead of a missing seq waits for it (docs/consistency.md)
ORDER_HOLD_S = 0.2
#: DELIVERs held for one conversation before the oldest gap is given up at once
ORDER_HOLD_MAX = 1024
#: conversations whose last seq this node remembers (past it the table starts over)
ORDER_KEYS_MAX = 1 << 18

Pending = tuple[Sequence[int], bytes, bool, Any]  # user_ids, frame, droppable, skip


class LocalDelivery:
    """This node's sessions, reached through the native routing table: frames from other nodes
    (the cluster link's :class:`~gochat.cluster.link.LocalFanout`) and this node's own.

    **Seq order on this node.** Every DELIVER of a stored message passes an order gate keyed by
    its conversation (for a direct one, by the viewer's conversation id and the recipient: the
    two views are different conversations on the wire). Messages of one conversation committed
    on different nodes reach this node on different paths and can arrive out of seq order; the
    gate delivers a DELIVER whose seq follows the last one delivered here at once, holds one that
    arrives ahead of a missing seq for up to ``hold_s`` (released in order as soon as the gap
    fills), and drops one at or below the last delivered seq (a duplicate, or one whose gap was
    given up: the client saw the gap and fetches it with HISTORY). So a connection sees DELIVER
    seqs strictly increasing; a gap it sees is one to fetch, never one that fills later."""

    __slots__ = ("_held", "_last", "_loop", "held", "hold_s", "latency", "recent", "routing", "stale_dropped")

    def __init__(self, routing: RoutingTable, hold_s: float = ORDER_HOLD_S) -> None:
        self.routing = routing
        self.hold_s = hold_s
        #: the newest DELIVERs per conversation, in the order delivered (cache-only HISTORY)
        self.recent = RecentMessages()
        #: a stored message's commit (its ts_ms) to its DELIVER queued on this node's
        #: connections, once per DELIVER fanned out here (not per recipient), by fan-out tier:
        #: "inline" (routed by the sender's node, through the order gate) and "large" (groups
        #: above large_group_threshold, through stream jobs); across nodes it includes the
        #: clock difference between the committing node and this one
        self.latency = {"inline": LatencyHistogram(DELIVERY_BUCKETS), "large": LatencyHistogram(DELIVERY_BUCKETS)}
        self._loop = asyncio.get_running_loop()
        self._last: dict[Any, int] = {}
        self._held: dict[Any, tuple[dict[int, Pending], asyncio.TimerHandle]] = {}
        #: DELIVERs that waited for a missing seq, and ones dropped as duplicates or too late
        self.held = 0
        self.stale_dropped = 0

    def users(
        self, user_ids: Sequence[int], frame: bytes, droppable: bool, skip: Any = None, ordered: bool = True
    ) -> int:
        if frame[5] != _OP_DELIVER:
            return self.routing.fanout_users(user_ids, frame, skip, droppable)
        kind, conv, seq, ts_ms = _DELIVER_KEY.unpack_from(frame, 12)
        if seq == 0:  # a room message: not stored, no order
            return self.routing.fanout_users(user_ids, frame, skip, droppable)
        if not ordered:
            self.latency["large"].observe(max(0, now_ms() - ts_ms) / 1000)
            return self.routing.fanout_users(user_ids, frame, skip, droppable)
        self.latency["inline"].observe(max(0, now_ms() - ts_ms) / 1000)
        key: Any = conv if kind == Kind.GROUP else (conv, user_ids[0])
        last = self._last.get(key)
        if last is None or seq == last + 1:
            if last is None and len(self._last) >= ORDER_KEYS_MAX:
                self._last.clear()
            self._last[key] = seq
            self.recent.add(key, frame)
            n = self.routing.fanout_users(user_ids, frame, skip, droppable)
            if key in self._held:
                n += self._release(key)
            return n
        if seq <= last:
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
    def __init__(
        self,
        routing: RoutingTable,
        writer: FanoutWriter,
        link: ClusterLink,
        watchers: PresenceWatchers,
        large_group_threshold: int,
    ) -> None:
        self.routing = routing
        self.writer = writer
        self.link = link
        self.watchers = watchers
        self.large_group_threshold = large_group_threshold

    def users(
        self, user_ids: Sequence[int], data: bytes, skip: Connection | None, droppable: bool = False
    ) -> int:
        """Queue ``data`` to every session of ``user_ids`` but ``skip``: local ones now, remote
        ones through the cluster link (same bytes). Returns the local connections reached."""
        link = self.link
        if link.peers and len(user_ids) > self.large_group_threshold:
            # the large-group tier: shards reach the nodes in no order, so no node's order gate
            # can keep this group's seq order (docs/consistency.md, "Delivery order")
            n = link.local.users(user_ids, data, droppable, skip, ordered=False)
            link.route_large(user_ids, data, droppable)
            return n
        n = link.local.users(user_ids, data, droppable, skip)
        if link.peers:
            link.route_users(user_ids, data, droppable)
        return n

    def direct(
        self, conn: Connection, me: int, peer: int, encode: Callable[[int], bytes], droppable: bool = False
    ) -> int:
        """Deliver to both sides of the direct conversation of ``me`` (on ``conn``) and ``peer``:
        ``encode(conv_id)`` builds the frame for a viewer who addresses the conversation as
        ``conv_id``. ``me``'s other sessions get the "with peer" view (not encoded when ``me``
        has no other session anywhere), ``peer``'s sessions the "with me" view."""
        n = 0
        if self.link.peers or self.routing.has_other_connection(me, conn):
            n = self.users((me,), encode(peer), conn, droppable)
        if peer != me:
            n += self.users((peer,), encode(me), None, droppable)
        return n

    def room(self, room_id: int, data: bytes, skip: Connection | None) -> int:
        n = self.routing.fanout_room(room_id, data, skip, True)
        if self.link.peers:
            self.link.route_room(room_id, data)
        return n

    def traced(self, trace: SendTrace) -> TracedDelivery:
        """This delivery for one sampled message (docs/observability.md, "Tracing")."""
        return TracedDelivery(self.routing, self.writer, self.link, self.watchers, self.large_group_threshold, trace)

    def presence_changed(self, user_id: int, online: bool) -> None:
        """EVENT PRESENCE to the local sessions watching ``user_id``."""
        watchers = self.watchers.watchers(user_id)
        if watchers:
            data = encode_event(EventType.PRESENCE, 0, 0, user_id, 1 if online else 0)
            self.writer.fanout(watchers, data, None, True)


class TracedDelivery(Delivery):
    """:class:`Delivery` for one sampled message: the same decisions, with a ``fanout.local``
    span around the local fan-out and the trace handed to the cluster link (its envelopes carry
    the context). Built per sampled message only; :meth:`users` mirrors ``Delivery.users``."""

    def __init__(
        self,
        routing: RoutingTable,
        writer: FanoutWriter,
        link: ClusterLink,
        watchers: PresenceWatchers,
        large_group_threshold: int,
        trace: SendTrace,
    ) -> None:
        super().__init__(routing, writer, link, watchers, large_group_threshold)
        self.trace = trace

    def users(
        self, user_ids: Sequence[int], data: bytes, skip: Connection | None, droppable: bool = False
    ) -> int:
        link, trace = self.link, self.trace
        span = trace.fanout_local(len(user_ids))
        if link.peers and len(user_ids) > self.large_group_threshold:
            n = link.local.users(user_ids, data, droppable, skip, ordered=False)
            trace.fanned_out(span, n)
            link.route_large(user_ids, data, droppable)  # durable jobs: not traced further
            return n
        n = link.local.users(user_ids, data, droppable, skip)
        trace.fanned_out(span, n)
        if link.peers:
            link.route_users(user_ids, data, droppable, trace)
        return n
