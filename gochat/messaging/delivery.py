"""Delivery: the same encoded bytes to every session of some users, here and on other nodes.

Local sessions get the frame through the native routing table at once; sessions on other nodes
through the cluster link, which batches per node (the link is the same object in embedded mode,
on in-process backends, where it finds no other node and routes nothing). A direct
conversation is addressed by the peer's id, so it has two views: the sender's devices see it
as "with the peer", the peer as "with the sender"; :meth:`Delivery.direct` encodes each view
once and only when someone will receive it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from gochat._native.fanout import Connection, FanoutWriter
from gochat._native.routing import RoutingTable
from gochat.messaging.watchers import PresenceWatchers
from gochat.protocol import EventType, encode_event

if TYPE_CHECKING:
    from gochat.cluster.link import ClusterLink

__all__ = ["Delivery", "LocalDelivery"]


class LocalDelivery:
    """Frames that came from other nodes, to this node's sessions (the cluster link's
    :class:`~gochat.cluster.link.LocalFanout`)."""

    __slots__ = ("routing", "writer")

    def __init__(self, routing: RoutingTable, writer: FanoutWriter) -> None:
        self.routing = routing
        self.writer = writer

    def users(self, user_ids: Sequence[int], frame: bytes, droppable: bool) -> int:
        return self.routing.fanout_users(self.writer, user_ids, frame, None, droppable)

    def room(self, room_id: int, frame: bytes) -> int:
        return self.routing.fanout_room(self.writer, room_id, frame, None, True)


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
        n = self.routing.fanout_users(self.writer, user_ids, data, skip, droppable)
        link = self.link
        if link.peers:
            if len(user_ids) > self.large_group_threshold:
                link.route_large(user_ids, data, droppable)
            else:
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
        n = self.routing.fanout_room(self.writer, room_id, data, skip, True)
        if self.link.peers:
            self.link.route_room(room_id, data)
        return n

    def presence_changed(self, user_id: int, online: bool) -> None:
        """EVENT PRESENCE to the local sessions watching ``user_id``."""
        watchers = self.watchers.watchers(user_id)
        if watchers:
            data = encode_event(EventType.PRESENCE, 0, 0, user_id, 1 if online else 0)
            self.writer.fanout(watchers, data, None, True)
