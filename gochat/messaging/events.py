"""How a node applies the domain events of the event bus (gochat/cluster/bus.py).

Membership events drop a group's cached member list when they are newer than the version the
node holds (the next use reads the store); a revoked token goes to the auth service's deny-list
and closes the matching local sessions. Both are idempotent, so an event replayed after a
restart changes nothing twice. A rebuild (the node's cursor fell behind the log's retention,
or the node starts without one) forgets every cached member list and reloads the deny-list from
the store.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from gochat.cluster.bus import (
    DomainEvent,
    GroupCreated,
    GroupDissolved,
    GroupUpdated,
    MemberAdded,
    MemberRemoved,
    TokenRevoked,
)
from gochat.messaging.addressing import Addressing

__all__ = ["NodeEventHandler"]

_MEMBERSHIP = (GroupCreated, GroupUpdated, GroupDissolved, MemberAdded, MemberRemoved)


class NodeEventHandler:
    """``apply(event)`` and ``rebuild()`` for :meth:`gochat.cluster.link.ClusterLink.start_events`."""

    def __init__(
        self,
        addressing: Addressing,
        revoked: Callable[[int, int, str], None],
        reload_revocations: Callable[[], Awaitable[None]],
        close_revoked: Callable[[], int] = lambda: 0,
    ) -> None:
        self.addressing = addressing
        self.revoked = revoked
        self.reload_revocations = reload_revocations
        #: after a rebuild: close the local sessions whose tokens the reloaded deny-list names
        self.close_revoked = close_revoked

    def apply(self, event: DomainEvent) -> None:
        if isinstance(event, _MEMBERSHIP):
            self.addressing.members_changed(event.group_id, event.version)
        elif isinstance(event, TokenRevoked):
            self.revoked(event.user_id, event.expires_ms, event.revoked_id)

    async def rebuild(self) -> None:
        self.addressing.clear()
        await self.reload_revocations()
        self.close_revoked()
