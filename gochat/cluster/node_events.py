"""What a node's cluster link talks to on its own node: :class:`LocalFanout`, the node's
connections, and :class:`ClusterEvents`, its reactions to what happens elsewhere (Protocols, so
that the link does not depend on the data plane's types)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from gochat.cluster.envelope import CascadeEnvelope

__all__ = ["ClusterEvents", "LocalFanout", "NoEvents"]


class LocalFanout(Protocol):
    """This node's connections: where frames from other nodes go, and the node's own
    (``gochat.messaging.delivery.LocalDelivery``, which keeps each conversation's DELIVERs in
    seq order on this node; the link does not depend on the data plane's types)."""

    def users(
        self, user_ids: Sequence[int], frame: bytes, droppable: bool, skip: Any = None, tier: int = 0
    ) -> int:
        """Queue ``frame`` to the local sessions of ``user_ids`` but the connection ``skip``
        (``tier``: the message's fan-out tier; inline and batched pass the seq-order gate)."""

    def room(self, room_id: int, frame: bytes) -> int: ...

    @property
    def held(self) -> int:
        """DELIVERs that waited for a missing seq (the order gate)."""

    @property
    def stale_dropped(self) -> int:
        """DELIVERs not delivered: at or below the last seq delivered."""


class ClusterEvents(Protocol):
    """This node's reactions to cluster-wide events, given to :meth:`ClusterLink.start`."""

    def presence_changed(self, user_id: int, online: bool) -> None:
        """A user came online or went offline somewhere."""

    def revoked(self, user_id: int, expires_ms: int, revoked_id: str) -> None:
        """A token or login session was revoked (on any node)."""

    def kicked(self, user_id: int, code: int, reason: str) -> None:
        """A user's sessions are to be closed (on any node)."""

    def local_sessions(self) -> list[tuple[int, int]]:
        """(user_id, session_id) of every authenticated session on this node."""

    def cascade(self, env: CascadeEnvelope) -> None:
        """A cascaded fan-out from another node: deliver to this node's members of the group."""

    def resync(self, user_ids: tuple[int, ...] | None) -> None:
        """Pushes to these users' sessions here (None: to every session here) were lost: tell
        them to SYNC (EVENT RESYNC)."""


class NoEvents:
    """Reacts to nothing (a link before :meth:`ClusterLink.start`)."""

    def presence_changed(self, user_id: int, online: bool) -> None:
        pass

    def revoked(self, user_id: int, expires_ms: int, revoked_id: str) -> None:
        pass

    def kicked(self, user_id: int, code: int, reason: str) -> None:
        pass

    def local_sessions(self) -> list[tuple[int, int]]:
        return []

    def cascade(self, env: CascadeEnvelope) -> None:
        pass

    def resync(self, user_ids: tuple[int, ...] | None) -> None:
        pass
