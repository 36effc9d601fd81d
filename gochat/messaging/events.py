"""How a node applies the domain events of the event bus (gochat/cluster/bus.py).

Membership events drop a group's cached member list when they are newer than the version the
node holds (the next use reads the store); a revoked token goes to the auth service's deny-list
and closes the matching local sessions. Both are idempotent, so an event replayed after a
restart changes nothing twice. A rebuild (the node's cursor fell behind the log's retention,
or the node starts without one) forgets every cached member list and reloads the deny-list from
the store.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from gochat.cluster.bus import (
    BreakerChanged,
    ConfigChanged,
    DegradationChanged,
    DomainEvent,
    GroupCreated,
    GroupDissolved,
    GroupUpdated,
    MemberAdded,
    MemberRemoved,
    TokenRevoked,
)
from gochat.messaging.addressing import Addressing
from gochat.resilience.degradation import SWITCH_NAMES, Degradation

__all__ = ["NodeEventHandler"]

_MEMBERSHIP = (GroupCreated, GroupUpdated, GroupDissolved, MemberAdded, MemberRemoved)
_SWITCHES = {name: switch for switch, name in SWITCH_NAMES.items()}
log = logging.getLogger("gochat.messaging.events")


class NodeEventHandler:
    """``apply(event)`` and ``rebuild()`` for :meth:`gochat.cluster.link.ClusterLink.start_events`."""

    def __init__(
        self,
        addressing: Addressing,
        revoked: Callable[[int, int, str], None],
        reload_revocations: Callable[[], Awaitable[None]],
        close_revoked: Callable[[], int] = lambda: 0,
        degradation: Degradation | None = None,
        node_id: str = "",
        config_changed: Callable[[ConfigChanged], object] | None = None,
    ) -> None:
        #: an operator's configuration change, made on any node, applies on every node
        self.config_changed = config_changed
        #: an operator's degradation switch, set on any node, applies on every node
        self.degradation = degradation
        self.node_id = node_id
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
        elif isinstance(event, DegradationChanged) and self.degradation is not None:
            switch = _SWITCHES.get(event.switch)
            if switch is not None:
                value = None if event.value < 0 else bool(event.value)
                if self.degradation.manual(switch) != value:
                    self.degradation.set_manual(switch, value, f"operator, through {event.origin}")
        elif isinstance(event, ConfigChanged) and self.config_changed is not None:
            self.config_changed(event)
        elif isinstance(event, BreakerChanged) and event.origin != self.node_id:
            log.info("node %s: %s breaker %s (%s)", event.origin, event.breaker, event.state, event.reason)

    async def rebuild(self) -> None:
        self.addressing.clear()
        await self.reload_revocations()
        self.close_revoked()
