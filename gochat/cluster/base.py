"""Cluster seams: node registry, node-to-node broker, cluster presence, durable job streams.

Each seam has an in-process implementation (embedded mode, tests) in
:mod:`gochat.cluster.memory` and a Redis one in :mod:`gochat.cluster.redis`. The same behaviour
tests run against both. Nothing here parses client frames: payloads are opaque bytes built by
the messaging core (:mod:`gochat.cluster.envelope`).

Figures from the architecture review: a node registers with a 90 s TTL renewed every 30 s,
with metadata (addresses, version, weight, load), and deregisters on graceful shutdown.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

__all__ = [
    "PRESENCE_GUARD_S",
    "REGISTRY_RENEW_S",
    "REGISTRY_TTL_S",
    "Broker",
    "JobHandler",
    "JobQueue",
    "NodeInfo",
    "Presence",
    "Registry",
    "SessionLease",
]

REGISTRY_TTL_S = 90
REGISTRY_RENEW_S = 30
#: how often a node checks that presence still holds its sessions (:meth:`Presence.lost`)
PRESENCE_GUARD_S = 5


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What a node publishes about itself in the registry."""

    node_id: str
    ws_url: str
    http_url: str
    version: str
    weight: int = 100
    connections: int = 0
    draining: bool = False
    started_ms: int = 0
    #: the node's configuration version (gochat/config_reload.py; absent from older nodes' entries: 0)
    config_version: int = 0
    #: set by the registry when read
    updated_ms: int = 0
    extra: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class Registry(Protocol):
    """Service registry: every live node, with a TTL so crashed nodes disappear by themselves."""

    async def register(self, info: NodeInfo, load: Callable[[], NodeInfo] | None = None) -> None:
        """Publish ``info`` with the TTL and keep renewing it every REGISTRY_RENEW_S (or the
        configured interval), taking fresh metadata from ``load()`` when given. Re-registers by
        itself after the backend comes back."""

    async def deregister(self) -> None:
        """Remove this node now (graceful shutdown) and stop renewing."""

    async def nodes(self) -> list[NodeInfo]:
        """The live nodes (their entries have not expired), sorted by node_id."""

    def watch(self, callback: Callable[[list[NodeInfo]], None]) -> None:
        """Call ``callback(nodes)`` whenever the set of nodes or their metadata change (at most
        once per renew interval when nothing is announced, immediately on join/leave)."""

    async def node_number(self) -> int:
        """A number from a cluster-wide counter, different for every call (0 first for a new
        cluster): a node without a configured node id derives its snowflake node id from it."""

    async def close(self) -> None: ...


@runtime_checkable
class Broker(Protocol):
    """Node-to-node messaging (at most once; durable work goes through :class:`JobQueue`)."""

    async def start(
        self, node_id: str, on_message: Callable[[bytes], None], on_resubscribe: Callable[[], None] | None = None
    ) -> None:
        """Subscribe to this node's channel and the cluster-wide channel; ``on_message`` gets
        every payload sent to this node or broadcast. Re-subscribes by itself after the
        backend restarts, then calls ``on_resubscribe()`` (payloads published meanwhile were
        lost)."""

    async def send_to_node(self, node_id: str, payload: bytes) -> None: ...

    async def broadcast(self, payload: bytes) -> None:
        """Send to every node, this one included."""

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class SessionLease:
    """What :meth:`Presence.session_up` returns: truthy when the user came online; ``epoch`` is
    the session's fencing token, to pass back to :meth:`Presence.session_down`."""

    came_online: bool
    epoch: int

    def __bool__(self) -> bool:
        return self.came_online


@runtime_checkable
class Presence(Protocol):
    """Which nodes hold sessions of which users, multi-device safe."""

    async def session_up(self, user_id: int, node_id: str, session_id: int) -> SessionLease:
        """Record a session; the lease is truthy when the user had no session anywhere before
        (came online). Its ``epoch`` increases with every session_up of the user."""

    async def session_down(
        self, user_id: int, node_id: str, session_id: int, epoch: int | None = None
    ) -> bool:
        """Remove exactly that session: with ``epoch`` (from its lease) only if the stored
        session still has that epoch, so a stale session never removes a newer one registered
        under the same node and session id (``None``: remove whatever is stored). True when the
        user has no session left anywhere (went offline)."""

    async def nodes_for(
        self, user_ids: Iterable[int], candidates: Sequence[str] | None = None
    ) -> dict[str, list[int]]:
        """node_id -> those of ``user_ids`` with at least one session on that node.
        ``candidates``: every node that may hold sessions (the registry's list), which lets a
        backend ask per node rather than per user when there are many users (same answer)."""

    async def online(self, user_ids: Iterable[int]) -> dict[int, bool]: ...

    async def drop_node(self, node_id: str) -> list[int]:
        """Forget every session of a dead node, and its mark (so a node only thought dead,
        still running, finds itself :meth:`lost` and records its sessions again); returns the
        users that went offline."""

    async def mark(self, node_id: str) -> None:
        """Note that ``node_id`` has recorded its sessions (see :meth:`lost`)."""

    async def lost(self, node_id: str) -> bool:
        """True when the backend lost what it held since :meth:`mark` (a Redis restart without
        persistence): the node must record its sessions again, then :meth:`mark` again."""

    async def unmark(self, node_id: str) -> None:
        """Forget the mark (graceful exit)."""

    async def ping(self) -> None:
        """Raise :class:`~gochat.errors.UnavailableError` when the backend is unreachable."""

    async def close(self) -> None: ...


JobHandler = Callable[[str, bytes], Awaitable[None]]


@runtime_checkable
class JobQueue(Protocol):
    """Durable background work (Redis Streams with consumer groups): at least once, with
    idempotent consumers (a job id is processed once even if delivered twice)."""

    async def enqueue(self, stream: str, job_id: str, payload: bytes) -> None: ...

    async def consume(
        self, stream: str, group: str, consumer: str, handler: JobHandler, concurrency: int = 1
    ) -> None:
        """Start consuming in the background: new jobs and jobs left pending by dead consumers
        (claimed after an idle timeout) go to ``handler(job_id, payload)``, at most
        ``concurrency`` at once; a job is acknowledged after the handler returns, retried if it
        raises."""

    async def close(self) -> None: ...
