"""Pushes a node knows it lost, announced to the nodes that should have had them (docs/cluster.md,
"Failed pushes").

A publish to another node can fail after the message was committed (Redis unreachable, the
broker's breaker open). The store has the message; the recipients need to be told to SYNC.
:class:`LostPushes` remembers, per node, the users whose pushes were lost and sends that node a
RESYNC envelope as soon as the broker takes it; the node sends those users' sessions EVENT
RESYNC. Bounded: past :data:`LOST_MAX` users a node is told "every session".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from gochat.cluster.base import Broker, NodeInfo
from gochat.cluster.envelope import encode_resync
from gochat.errors import GochatError

__all__ = ["LOST_MAX", "RESYNC_RETRY_S", "LostPushes"]

log = logging.getLogger("gochat.cluster")

#: users remembered per node whose pushes were lost; beyond, the node's every session resyncs
LOST_MAX = 65_536
#: how often lost pushes are announced again while their node cannot be reached
RESYNC_RETRY_S = 1.0


class LostPushes:
    def __init__(
        self, broker: Broker, nodes: Callable[[], list[NodeInfo]], other_nodes: Callable[[], list[NodeInfo]]
    ) -> None:
        self.broker = broker
        self._nodes = nodes
        self._other_nodes = other_nodes
        #: node -> users whose pushes to it were lost (None: all of its sessions)
        self._lost: dict[str, set[int] | None] = {}
        self._wake = asyncio.Event()
        #: RESYNC envelopes sent (``gochat_cluster_resyncs_sent_total``)
        self.sent = 0

    def on(self, node: str, user_ids: Iterable[int]) -> None:
        """Pushes to ``user_ids`` on ``node`` were lost."""
        lost = self._lost.get(node, set())
        if lost is not None:
            lost.update(user_ids)
            if len(lost) > LOST_MAX:
                lost = None  # too many to list: every session of the node resyncs
        self._lost[node] = lost
        self._wake.set()

    def _put_back(self, node: str, users: set[int] | None) -> None:
        if users is None:
            self._lost[node] = None
        else:
            self.on(node, users)

    def everywhere(self, user_ids: Iterable[int]) -> None:
        """Pushes to ``user_ids`` on unknown nodes were lost: every other node is told."""
        ids = list(user_ids)
        for node in self._other_nodes():
            self.on(node.node_id, ids)

    async def run(self) -> None:
        """Announce lost pushes to their nodes, retried every RESYNC_RETRY_S until the broker
        takes them; a node that left is forgotten (its clients reconnect elsewhere and SYNC)."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._lost:
                listed = {n.node_id for n in self._nodes()}
                for node in list(self._lost):
                    users = self._lost.pop(node)
                    if node not in listed:
                        continue
                    try:
                        await self.broker.send_to_node(node, encode_resync(None if users is None else sorted(users)))
                    except GochatError as exc:
                        log.info("RESYNC to %s not sent yet: %s", node, exc.message)
                        self._put_back(node, users)
                        continue
                    self.sent += 1
                if self._lost:
                    await asyncio.sleep(RESYNC_RETRY_S)
