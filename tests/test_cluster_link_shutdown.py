"""ClusterLink on a graceful exit (in-memory cluster backends, no outside service).

A node that deregisters is about to stop: seeing its own entry gone from the registry must not
re-record its sessions in presence (they are being drained), and closing the link must leave
no coroutine un-awaited and no task running, even with work spawned a moment before.
"""

from __future__ import annotations

import asyncio
import gc
import warnings

from gochat._native.routing import RoutingTable
from gochat.cluster.backends import ClusterBackends
from gochat.cluster.base import NodeInfo
from gochat.cluster.link import ClusterLink
from gochat.cluster.memory import (
    MemoryBroker,
    MemoryClusterPresence,
    MemoryHub,
    MemoryJobQueue,
    MemoryRegistry,
)
from gochat.cluster.node_events import NoEvents
from gochat.messaging.delivery import LocalDelivery


class _Events(NoEvents):
    """The node's side of the link, reduced to its local sessions."""

    def __init__(self, sessions: list[tuple[int, int]]) -> None:
        self.sessions = sessions

    def local_sessions(self) -> list[tuple[int, int]]:
        return list(self.sessions)


def _link(hub: MemoryHub, node: str, sessions: list[tuple[int, int]]) -> tuple[ClusterLink, _Events]:
    backends = ClusterBackends(
        MemoryBroker(hub), MemoryClusterPresence(hub), MemoryRegistry(hub, ttl_s=3, renew_s=1), MemoryJobQueue(hub)
    )
    link = ClusterLink(node, backends, LocalDelivery(RoutingTable()))
    return link, _Events(sessions)


def _info(node: str) -> NodeInfo:
    return NodeInfo(node, f"ws://{node}/ws", f"http://{node}", "test")


async def _until(pred: object, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():  # type: ignore[operator]
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def _run_checked(coro: object) -> None:
    """Run on a fresh loop; fail on any 'never awaited' / 'destroyed but pending' warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asyncio.run(coro)  # type: ignore[arg-type]
        gc.collect()
    bad = [str(w.message) for w in caught if "never awaited" in str(w.message) or "pending" in str(w.message)]
    assert not bad, bad


def test_deregistered_node_does_not_reannounce_its_sessions() -> None:
    async def body() -> None:
        hub = MemoryHub()
        (a, a_events), (b, b_events) = _link(hub, "a", [(1, 11), (2, 12)]), _link(hub, "b", [])
        await a.start(_info("a"), lambda: _info("a"), a_events)
        await b.start(_info("b"), lambda: _info("b"), b_events)
        await a.session_up(1, 11)
        await a.session_up(2, 12)
        await _until(lambda: {n.node_id for n in a.nodes} == {"a", "b"})
        recorded: list[tuple[int, int]] = []
        session_up = a.presence.session_up

        async def spy(user_id: int, node_id: str, session_id: int) -> object:
            recorded.append((user_id, session_id))
            return await session_up(user_id, node_id, session_id)

        a.presence.session_up = spy  # type: ignore[method-assign]
        await a.deregister()
        await _until(lambda: {n.node_id for n in a.nodes} == {"b"})
        for _ in range(20):
            await asyncio.sleep(0.01)
        # the drain is about to end every session: nothing records them again
        assert recorded == []
        await a.close()
        await b.close()

    _run_checked(body())


def test_close_right_after_deregister_leaves_nothing_unawaited() -> None:
    async def body() -> None:
        hub = MemoryHub()
        pairs = [_link(hub, n, [(i + 1, i + 10)]) for i, n in enumerate("abc")]
        links = [link for link, _ in pairs]
        for link, events in pairs:
            await link.start(_info(link.node_id), lambda n=link.node_id: _info(n), events)  # type: ignore[misc]
        await _until(lambda: all(len(link.nodes) == 3 for link in links))
        # every node leaves at once: each sees itself and the others vanish while it closes
        await asyncio.gather(*(link.deregister() for link in links))
        nodes = await links[0].registry.nodes()
        for link in links:
            # the registry watch reports the departures (its own included) just before close()
            link._nodes_changed(nodes)
            link.publish_kick(7, 202, "bye")  # work spawned a moment before close()
            await link.close()
        for link in links:
            assert all(t.done() for t in link._tasks), link._tasks
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert not pending, pending

    _run_checked(body())
