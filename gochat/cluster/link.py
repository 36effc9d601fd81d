"""A node's link to the rest of the cluster: remote routing, presence, revocations, registry.

Local fan-out never waits for the cluster: the messaging core queues bytes to local connections
first, then hands the same bytes to :meth:`ClusterLink.route_users`. One router task drains
everything queued since its last turn, asks Presence where all the recipients are in one
pipelined lookup, and publishes one envelope per (frame, node) in queue order, so a node
receives the DELIVERs of a conversation in seq order. Pub/sub is at most once: a recipient that
misses a push sees a seq gap (or reconnects) and recovers with SYNC/HISTORY, which read the
durable store.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any

from gochat.cluster.backends import ClusterBackends
from gochat.cluster.base import PRESENCE_GUARD_S, NodeInfo
from gochat.cluster.bus import DomainEvent, EventConsumer, EventOutbox, TokenRevoked
from gochat.cluster.envelope import (
    CascadeEnvelope,
    KickEnvelope,
    PresenceEnvelope,
    ResyncEnvelope,
    RevokeEnvelope,
    RoomEnvelope,
    TracedEnvelope,
    UsersEnvelope,
    decode_envelope,
    encode_batch,
    encode_kick,
    encode_presence,
    encode_revoke,
    encode_room,
    encode_traced,
    encode_users,
    split_batch,
)
from gochat.cluster.fanout import Priority
from gochat.cluster.fanout_jobs import FANOUT_STREAM, FanoutJobs
from gochat.cluster.lost import LostPushes
from gochat.cluster.node_events import ClusterEvents, LocalFanout, NoEvents
from gochat.errors import GochatError
from gochat.observability.tracing import end_spans
from gochat.resilience import RetryPolicy
from gochat.resilience.policy import DEFAULT_RETRY

if TYPE_CHECKING:
    from gochat.observability.tracing import SendTrace, Tracing

__all__ = ["ClusterEvents", "ClusterLink", "LocalFanout"]

log = logging.getLogger("gochat.cluster")

_MAX_BATCH = 4096
#: frames of each waiting priority class a router turn takes before higher classes fill the
#: rest of the batch: a backlog of direct messages never starves the classes below for long
_MIN_SHARE = _MAX_BATCH // 16
#: router backlog bound (frames); beyond it pushes are shed, see route_users
_MAX_QUEUE = 100_000
#: the router's priority classes (gochat.cluster.fanout.Priority), in order
_CLASSES = (Priority.DIRECT, Priority.SMALL_GROUP, Priority.LARGE_GROUP, Priority.ROOM)
_ROOM_CLASS = _CLASSES.index(Priority.ROOM)
#: users remembered per node whose pushes were lost; beyond, the node's every session resyncs
_LOST_MAX = 65_536
#: how often lost pushes are announced again (RESYNC) while their node cannot be reached
RESYNC_RETRY_S = 1.0
#: a router item: (user_ids or room_id, frame, droppable, trace, tier; -1 for a room)
_Item = tuple[Any, bytes, bool, "SendTrace | None", int]


class ClusterLink:
    def __init__(
        self,
        node_id: str,
        backends: ClusterBackends,
        local: LocalFanout,
        shard_size: int = 500,
        presence_guard_s: float = PRESENCE_GUARD_S,
        retry: RetryPolicy = DEFAULT_RETRY,
        tracing: Tracing | None = None,
    ) -> None:
        self.node_id = node_id
        #: the node's tracing (None: off): spans for traced envelopes (docs/observability.md)
        self.tracing = tracing
        #: the node's retry policy (event handlers, the outbox)
        self.retry = retry
        self.backends = backends
        self.jobs = backends.jobs
        #: fan-out job records (gochat/cluster/fanout.py)
        self.progress = backends.progress
        #: members per stream job of the sharded tier (reloadable: fanout_shard_size)
        self.shard_size = shard_size
        #: stream jobs of the sharded tier one node handles at once
        self.job_concurrency = 4
        self.broker = backends.broker
        self.presence = backends.presence
        self.registry = backends.registry
        self.bus = backends.bus
        #: this node's events on their way to the bus (ordered, retried while it is down)
        self.outbox = EventOutbox(self.bus, retry=retry)
        #: this node's reader of the event bus (:meth:`start_events`)
        self.consumer: EventConsumer | None = None
        self.local = local
        self.presence_guard_s = presence_guard_s
        self.events: ClusterEvents = NoEvents()
        self._guard_task: asyncio.Task[None] | None = None
        self._nodes: list[NodeInfo] = []
        self._members_loaded = False
        #: some other node is listed: remote routing has somewhere to go (read on the send path)
        self.peers = False
        #: per priority class (_CLASSES): (user_ids, frame, droppable, trace, tier); trace is a
        #: sampled message's, else None; a room's item is (room_id, frame, True, None, -1)
        self._queues: list[list[_Item]] = [[] for _ in _CLASSES]
        self._queued = 0
        self._wake = asyncio.Event()
        #: background work from _spawn (publishes, node drops, re-announces)
        self._tasks: list[asyncio.Task[Any]] = []
        self._router_task: asyncio.Task[None] | None = None
        #: deregistered (draining): our own entry leaving the registry is expected, and this
        #: node's sessions are never recorded again
        self._leaving = False
        #: close() began: nothing new is spawned
        self._closing = False
        self._dead_handled: set[str] = set()
        self._epochs: dict[int, int] = {}  # session_id -> presence epoch
        self._was_listed = False
        #: our registry entry vanished and has not been listed again yet
        self._vanished = False
        self.routed = 0
        self.route_failures = 0
        self.shed = 0
        #: pushes this node lost, announced to their nodes with RESYNC (docs/cluster.md, "Failed pushes")
        self.lost = LostPushes(self.broker, lambda: self.nodes, self.other_nodes)
        self._resync_task: asyncio.Task[None] | None = None
        #: the sharded and cascaded tiers (start a job, run this node's stream shards)
        self.fanout = FanoutJobs(self)

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self, info: NodeInfo, load: Callable[[], NodeInfo], events: ClusterEvents) -> None:
        """Join: subscribe, register (``load()`` refreshes the entry), watch the other nodes,
        and from now on tell ``events`` what happens elsewhere."""
        self.events = events
        await self.broker.start(self.node_id, self._on_message, self._resubscribed)
        await self.registry.register(info, load)
        self.nodes = await self.registry.nodes()
        self.registry.watch(self._nodes_changed)
        loop = asyncio.get_running_loop()
        self._router_task = loop.create_task(self._router())
        self._resync_task = loop.create_task(self.lost.run())
        await self.jobs.consume(
            FANOUT_STREAM, FANOUT_STREAM, self.node_id, self.fanout.run_shard, concurrency=self.job_concurrency
        )
        await self.presence.mark(self.node_id)
        self._guard_task = loop.create_task(self._presence_guard())

    async def start_events(
        self,
        name: str,
        apply: Callable[[DomainEvent], Any],
        rebuild: Callable[[], Any],
    ) -> EventConsumer:
        """Read the event bus as consumer ``name`` (stable across restarts of the node, so it
        replays from its cursor): ``apply(event)`` for every domain event, ``rebuild()`` when
        the node cannot replay (docs/consistency.md). Stopped by :meth:`close`."""
        self.consumer = EventConsumer(self.bus, name, apply, rebuild, retry=self.retry)
        await self.consumer.start()
        return self.consumer

    def publish_event(self, event: DomainEvent) -> None:
        """Publish a domain event in the background, in order, retried until the bus takes it
        (:class:`~gochat.cluster.bus.EventOutbox`; what changed is in the store already)."""
        if not event.origin:
            event = dataclasses.replace(event, origin=self.node_id)
        self.outbox.add(event)

    async def _presence_guard(self) -> None:
        """A presence backend that lost its data (Redis restarted without persistence) lost
        this node's sessions too: record every local session again."""
        while True:
            await asyncio.sleep(self.presence_guard_s)
            try:
                if await self.presence.lost(self.node_id):
                    sessions = self.events.local_sessions()
                    await self.reannounce(sessions)
                    # marked only once every session is recorded again: a failure on the way
                    # leaves the mark missing, and the next check tries again
                    await self.presence.mark(self.node_id)
                    log.warning("presence data was lost (backend restarted?): re-recorded %d sessions", len(sessions))
                    # while they were missing, other nodes routed nothing to them
                    self.events.resync(None)
            except GochatError as exc:  # the backend is still down: try again next time
                log.info("presence guard: %s", exc.message)

    async def ping(self) -> None:
        """Raise :class:`~gochat.errors.UnavailableError` when the cluster backends are unreachable."""
        await self.presence.ping()

    async def deregister(self) -> None:
        """Leave the registry first on drain, so clients stop being sent here."""
        self._leaving = True
        try:
            await self.registry.deregister()
        except GochatError as exc:
            log.warning("deregister failed: %s", exc.message)

    async def close(self) -> None:
        """Leave: stop every task of the link, forget this node's presence mark, close the
        backends (each within a bound: a hung connection must not stall shutdown)."""
        self._leaving = self._closing = True
        if self._tasks:
            # publishes spawned just before (a kick, a revocation) get a moment to go out
            await asyncio.wait(list(self._tasks), timeout=1.0)
        await self.outbox.flush(1.0)
        await self.outbox.close()
        await _cancel([*self._tasks, self._router_task, self._guard_task, self._resync_task], timeout_s=3.0)
        if self.consumer is not None:
            await self.consumer.close()
        try:
            async with asyncio.timeout(3.0):
                await self.presence.unmark(self.node_id)
        except (TimeoutError, GochatError) as exc:
            log.info("presence unmark on close: %r", exc)
        await self.backends.close()

    @property
    def nodes(self) -> list[NodeInfo]:
        """The nodes the registry lists (this one included), as last read or watched."""
        return self._nodes

    @nodes.setter
    def nodes(self, nodes: list[NodeInfo]) -> None:
        self._nodes = nodes
        self.peers = any(n.node_id != self.node_id for n in nodes)
        if self.peers and not self._members_loaded:
            # the large-group tier's numpy arithmetic (~55 ms to import): loaded when the node
            # first sees a peer, not on the first large group's send, and never on an embedded
            # node (docs/dependencies.md, "numpy")
            from gochat.cluster import members  # noqa: F401

            self._members_loaded = True

    def other_nodes(self) -> list[NodeInfo]:
        return [n for n in self.nodes if n.node_id != self.node_id and not n.draining]

    @property
    def queue_depth(self) -> int:
        """Frames waiting to be routed to other nodes (a load signal of the dynamic threshold)."""
        return self._queued

    def queue_depths(self) -> dict[str, int]:
        """Frames waiting, by priority class (``gochat_cluster_route_queue{priority}``)."""
        return {c.name.lower(): len(q) for c, q in zip(_CLASSES, self._queues, strict=True)}

    # ---- outbound ----------------------------------------------------------------------------
    def route_users(
        self,
        user_ids: Iterable[int],
        frame: bytes,
        droppable: bool = False,
        trace: SendTrace | None = None,
        priority: int = Priority.SMALL_GROUP,
        tier: int = 0,
    ) -> None:
        """Deliver ``frame`` to the sessions of ``user_ids`` on the other nodes, in the router's
        next turns by ``priority`` (``trace``: a sampled message's spans; its envelopes carry the
        trace context; ``tier``: the message's fan-out tier, inline or batched)."""
        if self._queued >= _MAX_QUEUE:
            # The broker cannot keep up: shed pushes rather than memory. Stored messages are
            # recovered by clients from the store (seq gap or reconnect); ephemeral ones are lost.
            self.shed += 1
            return
        self._queues[priority - 1].append((user_ids, frame, droppable, trace, tier))
        self._queued += 1
        self._wake.set()

    def route_room(self, room_id: int, frame: bytes) -> None:
        """Deliver a room message to the room's subscribers on every other node (the router's
        lowest priority)."""
        if self._queued >= _MAX_QUEUE:
            self.shed += 1
            return
        self._queues[_ROOM_CLASS].append((room_id, frame, True, None, -1))
        self._queued += 1
        self._wake.set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` in the background, a failure logged and counted (route failures)."""
        if self._closing:
            coro.close()  # shutting down: dropped, and not left un-awaited
            return
        # The task runs the coroutine itself (no wrapper coroutine awaiting it): a task that
        # close() cancels before its first step then closes the coroutine instead of leaving
        # it never awaited.
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.append(task)
        task.add_done_callback(self._spawned_done)

    def _spawned_done(self, task: asyncio.Task[Any]) -> None:
        with contextlib.suppress(ValueError):
            self._tasks.remove(task)
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, GochatError):
            self.route_failures += 1
            log.warning("cluster publish failed: %s", exc.message)
        elif exc is not None:
            log.error("cluster task failed", exc_info=exc)

    async def _router(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queued:
                batch = self._take()
                try:
                    await self._route_batch(batch)
                except GochatError as exc:
                    # Presence down: these pushes are lost (the store is not); every other
                    # node is told to have their recipients SYNC once it can be reached.
                    self.route_failures += len(batch)
                    log.warning("cluster routing failed for %d frames: %s", len(batch), exc.message)
                    self.lost.everywhere(_users_of(batch))
                except Exception:
                    self.route_failures += len(batch)
                    log.exception("cluster routing failed")
                    self.lost.everywhere(_users_of(batch))

    def _take(self) -> list[_Item]:
        """The next router turn's frames, at most _MAX_BATCH: first up to _MIN_SHARE of each
        waiting class, then the rest of the batch by priority; queue order kept within a class."""
        budget = _MAX_BATCH
        takes = [0] * len(self._queues)
        for i, q in enumerate(self._queues):
            takes[i] = min(len(q), _MIN_SHARE, budget)
            budget -= takes[i]
        for i, q in enumerate(self._queues):
            more = min(len(q) - takes[i], budget)
            takes[i] += more
            budget -= more
        batch: list[_Item] = []
        for i, n in enumerate(takes):
            if n:
                q = self._queues[i]
                batch += q[:n]
                del q[:n]
        self._queued -= len(batch)
        return batch

    async def _route_batch(self, batch: list[_Item]) -> None:
        wanted: set[int] = set()
        rooms = False
        for uids, _, _, _, tier in batch:
            if tier < 0:
                rooms = True
            else:
                wanted.update(uids)  # type: ignore[arg-type]
        # every listed node may hold sessions, a draining one included
        listed = [n.node_id for n in self.nodes if n.node_id != self.node_id]
        where = await self.presence.nodes_for(wanted, listed) if wanted else {}
        user_nodes: dict[int, list[str]] = {}
        for node, uids in where.items():
            if node == self.node_id:
                continue
            for uid in uids:
                user_nodes.setdefault(uid, []).append(node)
        if not user_nodes and not rooms:
            return
        # One publish per node per turn, carrying that node's envelopes in queue order.
        outbox: dict[str, list[bytes]] = {}
        spans: list[Any] = []  # cluster.publish spans of sampled messages
        room_nodes = [n.node_id for n in self.other_nodes()] if rooms else []
        for uids, frame, droppable, trace, tier in batch:
            if tier < 0:  # a room message: every other node
                env = encode_room(uids, 0, frame)  # type: ignore[arg-type]
                for node in room_nodes:
                    outbox.setdefault(node, []).append(env)
                continue
            per_node: dict[str, list[int]] = {}
            for uid in uids:  # type: ignore[union-attr]
                for node in user_nodes.get(uid, ()):
                    per_node.setdefault(node, []).append(uid)
            for node, targets in per_node.items():
                env = encode_users(targets, frame, droppable, tier=tier)
                if trace is not None:
                    span, trace_id, span_id, flags = trace.publish(node, len(targets))
                    spans.append(span)
                    env = encode_traced(trace_id, span_id, flags, env)
                outbox.setdefault(node, []).append(env)
        nodes = list(outbox)
        results = await asyncio.gather(
            *(self.broker.send_to_node(node, _one_or_batch(outbox[node])) for node in nodes), return_exceptions=True
        )
        failed: BaseException | None = None
        for node, result in zip(nodes, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, Exception):
                    raise result  # a cancellation
                failed = result
                self.route_failures += len(outbox[node])
                log.warning("cluster publish to %s failed: %r", node, result)
                self.lost.on(node, [uid for uid, where in user_nodes.items() if node in where])
            else:
                self.routed += len(outbox[node])
        if spans:
            end_spans(spans, failed)

    # ---- failed pushes: RESYNC ------------------------------------------------------------------
    def _resubscribed(self) -> None:
        """Our pub/sub subscription was lost and is back: pushes sent to this node meanwhile
        are gone, so every session here is told to SYNC."""
        log.warning("broker subscription restored: every local session is told to SYNC")
        self.events.resync(None)

    # ---- presence and revocation ---------------------------------------------------------------
    async def session_up(self, user_id: int, session_id: int) -> None:
        try:
            lease = await self.presence.session_up(user_id, self.node_id, session_id)
            self._epochs[session_id] = lease.epoch
            if lease.came_online:
                await self.broker.broadcast(encode_presence(user_id, True))
        except GochatError as exc:
            log.warning("presence up failed for user %d: %s", user_id, exc.message)

    async def session_down(self, user_id: int, session_id: int) -> None:
        # The epoch fences stale removals: a late "down" of an old session can never remove
        # a newer recording of it (after a re-announce, say).
        epoch = self._epochs.pop(session_id, None)
        try:
            if await self.presence.session_down(user_id, self.node_id, session_id, epoch):
                await self.broker.broadcast(encode_presence(user_id, False))
        except GochatError as exc:
            log.warning("presence down failed for user %d: %s", user_id, exc.message)

    async def online(self, user_ids: list[int]) -> dict[int, bool]:
        return await self.presence.online(user_ids)

    def publish_revocation(self, user_id: int, expires_ms: int, revoked_id: str) -> None:
        """At once on pub/sub (at most once), and durably on the event bus (every node,
        replayed after a disconnect)."""
        self.spawn(self.broker.broadcast(encode_revoke(user_id, expires_ms, revoked_id)))
        self.publish_event(
            TokenRevoked(user_id=user_id, revoked_id=revoked_id, expires_ms=expires_ms, origin=self.node_id)
        )

    def publish_kick(self, user_id: int, code: int, reason: str) -> None:
        self.spawn(self.broker.broadcast(encode_kick(user_id, code, reason)))

    async def _reannounce_and_resync(self) -> None:
        """Record every local session again, then tell them to SYNC: pushes routed to them while
        other nodes had dropped them were lost (docs/cluster.md, "Failed pushes")."""
        await self.reannounce()
        if not self._leaving:
            self.events.resync(None)

    async def reannounce(self, sessions: list[tuple[int, int]] | None = None) -> None:
        """Re-record every local session (after the presence backend lost its data, or after
        another node wrongly declared this one dead and dropped its sessions). Nothing once
        the node deregistered: its sessions are being drained."""
        if self._leaving:
            return
        for user_id, session_id in sessions if sessions is not None else self.events.local_sessions():
            if self._leaving:
                return
            lease = await self.presence.session_up(user_id, self.node_id, session_id)
            self._epochs[session_id] = lease.epoch

    # ---- inbound ---------------------------------------------------------------------------------
    def _on_message(self, payload: bytes) -> None:
        try:
            envelopes = split_batch(payload)
        except GochatError as exc:
            log.error("dropping cluster message: %s", exc.message)
            return
        for one in envelopes:
            self._on_envelope(one)

    def _on_envelope(self, payload: bytes) -> None:
        try:
            env = decode_envelope(payload)
        except GochatError as exc:
            log.error("dropping cluster message: %s", exc.message)
            return
        if isinstance(env, TracedEnvelope):
            inner, tracing = env.inner, self.tracing
            if tracing is not None and isinstance(inner, UsersEnvelope):
                span = tracing.deliver(env.trace_id, env.span_id, env.trace_flags, len(inner.user_ids), inner.frame)
                n = self.local.users(inner.user_ids, inner.frame, inner.droppable, tier=inner.tier)
                tracing.delivered(span, n)
                return
            env = inner
        if isinstance(env, UsersEnvelope):
            self.local.users(env.user_ids, env.frame, env.droppable, tier=env.tier)
        elif isinstance(env, ResyncEnvelope):
            self.events.resync(env.user_ids)
        elif isinstance(env, CascadeEnvelope):
            if env.origin != self.node_id:  # the origin queued its own part already
                self.events.cascade(env)
        elif isinstance(env, RoomEnvelope):
            self.local.room(env.room_id, env.frame)
        elif isinstance(env, PresenceEnvelope):
            self.events.presence_changed(env.user_id, env.online)
        elif isinstance(env, RevokeEnvelope):
            self.events.revoked(env.user_id, env.expires_ms, env.revoked_id)
        elif isinstance(env, KickEnvelope):
            self.events.kicked(env.user_id, env.code, env.reason)

    def _nodes_changed(self, nodes: list[NodeInfo]) -> None:
        if self._closing:
            return
        alive = {n.node_id for n in nodes}
        gone = [n.node_id for n in self.nodes if n.node_id not in alive and n.node_id != self.node_id]
        self.nodes = nodes
        for node in gone:
            if node not in self._dead_handled:
                self._dead_handled.add(node)
                self.spawn(self._drop_node(node))
        self._dead_handled -= alive  # a node that came back may die again later
        if self._leaving:
            # We deregistered: our entry is gone on purpose. Re-announcing now would record
            # the sessions being drained again (and, spawned just before close(), be cancelled
            # before it ran).
            return
        if self.node_id in alive:
            if self._vanished:
                # Listed again. A node that saw us gone drops our sessions, and that can land
                # after the re-announce made when we vanished (seen after a Redis restart):
                # record them once more now that every node sees us alive.
                self._vanished = False
                self.spawn(self._reannounce_and_resync())
            self._was_listed = True
        elif self._was_listed:
            # Our entry vanished (a stall past the TTL, or Redis lost it): other nodes may have
            # dropped our sessions. The registry re-registers us; record the sessions again.
            self._was_listed = False
            self._vanished = True
            self.spawn(self.reannounce())

    async def _drop_node(self, node: str) -> None:
        """A node left or died: its sessions are gone; announce who went offline."""
        offline = await self.presence.drop_node(node)
        log.info("node %s left the cluster; %d users went offline", node, len(offline))
        for uid in offline:
            await self.broker.broadcast(encode_presence(uid, False))


def _one_or_batch(envelopes: list[bytes]) -> bytes:
    return envelopes[0] if len(envelopes) == 1 else encode_batch(envelopes)


def _users_of(batch: list[_Item]) -> set[int]:
    users: set[int] = set()
    for uids, _, _, _, tier in batch:
        if tier >= 0:
            users.update(uids)
    return users


async def _cancel(tasks: Iterable[asyncio.Task[Any] | None], timeout_s: float) -> None:
    """Cancel ``tasks`` and wait for them, cancelling again while one runs on (a client library
    can swallow a cancellation that lands just as its call completes)."""
    pending = {t for t in tasks if t is not None and not t.done()}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while pending and loop.time() < deadline:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=min(0.1, max(0.0, deadline - loop.time())))
