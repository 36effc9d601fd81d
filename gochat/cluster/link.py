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
import uuid
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from gochat.cluster.backends import ClusterBackends
from gochat.cluster.base import PRESENCE_GUARD_S, NodeInfo
from gochat.cluster.bus import DomainEvent, EventConsumer, EventOutbox, TokenRevoked
from gochat.cluster.envelope import (
    KickEnvelope,
    PresenceEnvelope,
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
from gochat.errors import GochatError
from gochat.observability.tracing import end_spans
from gochat.resilience import RetryPolicy
from gochat.resilience.policy import DEFAULT_RETRY

if TYPE_CHECKING:
    from gochat.observability.tracing import SendTrace, Tracing

__all__ = ["ClusterEvents", "ClusterLink", "LocalFanout"]

log = logging.getLogger("gochat.cluster")

_MAX_BATCH = 4096
#: router backlog bound (frames); beyond it pushes are shed, see route_users
_MAX_QUEUE = 100_000
FANOUT_STREAM = "fanout"


class LocalFanout(Protocol):
    """This node's connections: where frames from other nodes go, and the node's own
    (``gochat.messaging.delivery.LocalDelivery``, which keeps each conversation's DELIVERs in
    seq order on this node; the link does not depend on the data plane's types)."""

    def users(
        self, user_ids: Sequence[int], frame: bytes, droppable: bool, skip: Any = None, ordered: bool = True
    ) -> int:
        """Queue ``frame`` to the local sessions of ``user_ids`` but the connection ``skip``
        (``ordered``: through the node's seq-order gate)."""

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


class _NoEvents:
    def presence_changed(self, user_id: int, online: bool) -> None:
        pass

    def revoked(self, user_id: int, expires_ms: int, revoked_id: str) -> None:
        pass

    def kicked(self, user_id: int, code: int, reason: str) -> None:
        pass

    def local_sessions(self) -> list[tuple[int, int]]:
        return []


class ClusterLink:
    def __init__(
        self,
        node_id: str,
        backends: ClusterBackends,
        local: LocalFanout,
        shard_size: int = 1000,
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
        self.shard_size = shard_size
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
        self.events: ClusterEvents = _NoEvents()
        self._guard_task: asyncio.Task[None] | None = None
        self._nodes: list[NodeInfo] = []
        self._members_loaded = False
        #: some other node is listed: remote routing has somewhere to go (read on the send path)
        self.peers = False
        #: (user_ids, frame, droppable, trace): trace is a sampled message's, else None
        self._queue: list[tuple[Iterable[int], bytes, bool, SendTrace | None]] = []
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

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self, info: NodeInfo, load: Callable[[], NodeInfo], events: ClusterEvents) -> None:
        """Join: subscribe, register (``load()`` refreshes the entry), watch the other nodes,
        and from now on tell ``events`` what happens elsewhere."""
        self.events = events
        await self.broker.start(self.node_id, self._on_message)
        await self.registry.register(info, load)
        self.nodes = await self.registry.nodes()
        self.registry.watch(self._nodes_changed)
        loop = asyncio.get_running_loop()
        self._router_task = loop.create_task(self._router())
        await self.jobs.consume(FANOUT_STREAM, FANOUT_STREAM, self.node_id, self._fanout_job)
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
        await _cancel([*self._tasks, self._router_task, self._guard_task], timeout_s=3.0)
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
        return len(self._queue)

    # ---- outbound ----------------------------------------------------------------------------
    def route_users(
        self, user_ids: Iterable[int], frame: bytes, droppable: bool = False, trace: SendTrace | None = None
    ) -> None:
        """Deliver ``frame`` to the sessions of ``user_ids`` on the other nodes (``trace``: a
        sampled message's spans; its envelopes carry the trace context)."""
        if len(self._queue) >= _MAX_QUEUE:
            # The broker cannot keep up: shed pushes rather than memory. Stored messages are
            # recovered by clients from the store (seq gap or reconnect); ephemeral ones are lost.
            self.shed += 1
            return
        self._queue.append((user_ids, frame, droppable, trace))
        self._wake.set()

    def route_large(self, user_ids: Iterable[int], frame: bytes, droppable: bool = False) -> None:
        """Large-group tier: split the recipients into shards and enqueue one durable job per
        shard (Redis Streams); every node's consumer takes some, looks up presence for its shard
        and publishes. Spreads the work of a 10k-member group over the cluster and survives the
        death of a node mid-fan-out (pending jobs are claimed by another consumer)."""
        # numpy, imported when the first peer was listed (the nodes setter): the member list as
        # one sorted, de-duplicated u64 array, shards are views of it, each envelope's ids are
        # the view's bytes (the same envelope encode_users writes; docs/cluster.md)
        from gochat.cluster import members

        ids = members.as_sorted_ids(user_ids)
        origin = self.node_id.encode()
        head = bytes([len(origin)]) + origin
        key = uuid.uuid4().hex
        for i, shard in enumerate(members.shards(ids, self.shard_size)):
            payload = head + members.encode_users(shard, frame, droppable)
            self._spawn(self.jobs.enqueue(FANOUT_STREAM, f"{key}:{i * self.shard_size}", payload))

    async def _fanout_job(self, job_id: str, payload: bytes) -> None:
        origin = payload[1 : 1 + payload[0]].decode()
        env = decode_envelope(payload[1 + payload[0] :])
        assert isinstance(env, UsersEnvelope)
        where = await self.presence.nodes_for(env.user_ids)
        for node, uids in where.items():
            if node == origin:
                continue  # the origin delivered to its own connections already
            if node == self.node_id:
                self.local.users(uids, env.frame, env.droppable, ordered=False)
            else:
                await self.broker.send_to_node(node, encode_users(uids, env.frame, env.droppable, unordered=True))
            self.routed += 1

    def route_room(self, room_id: int, frame: bytes) -> None:
        """Deliver a room message to the room's subscribers on every other node."""
        payload = encode_room(room_id, 0, frame)
        for node in self.other_nodes():
            self._spawn(self.broker.send_to_node(node.node_id, payload))

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
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
            while self._queue:
                batch, self._queue = self._queue[:_MAX_BATCH], self._queue[_MAX_BATCH:]
                try:
                    await self._route_batch(batch)
                except GochatError as exc:
                    # Broker or presence down: pushes are lost, the store is not. Clients
                    # recover with SYNC when they notice the gap or reconnect.
                    self.route_failures += len(batch)
                    log.warning("cluster routing failed for %d frames: %s", len(batch), exc.message)
                except Exception:
                    self.route_failures += len(batch)
                    log.exception("cluster routing failed")

    async def _route_batch(self, batch: list[tuple[Iterable[int], bytes, bool, SendTrace | None]]) -> None:
        wanted: set[int] = set()
        for uids, _, _, _ in batch:
            wanted.update(uids)
        where = await self.presence.nodes_for(wanted)
        user_nodes: dict[int, list[str]] = {}
        for node, uids in where.items():
            if node == self.node_id:
                continue
            for uid in uids:
                user_nodes.setdefault(uid, []).append(node)
        if not user_nodes:
            return
        # One publish per node per turn, carrying that node's envelopes in queue order.
        outbox: dict[str, list[bytes]] = {}
        spans: list[Any] = []  # cluster.publish spans of sampled messages
        for uids, frame, droppable, trace in batch:
            per_node: dict[str, list[int]] = {}
            for uid in uids:
                for node in user_nodes.get(uid, ()):
                    per_node.setdefault(node, []).append(uid)
            for node, targets in per_node.items():
                env = encode_users(targets, frame, droppable)
                if trace is not None:
                    span, trace_id, span_id, flags = trace.publish(node, len(targets))
                    spans.append(span)
                    env = encode_traced(trace_id, span_id, flags, env)
                outbox.setdefault(node, []).append(env)
        sends = [
            self.broker.send_to_node(node, envs[0] if len(envs) == 1 else encode_batch(envs))
            for node, envs in outbox.items()
        ]
        if spans:
            try:
                await asyncio.gather(*sends)
            except BaseException as exc:
                end_spans(spans, exc)
                raise
            end_spans(spans)
        else:
            await asyncio.gather(*sends)
        self.routed += sum(len(envs) for envs in outbox.values())

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
        self._spawn(self.broker.broadcast(encode_revoke(user_id, expires_ms, revoked_id)))
        self.publish_event(
            TokenRevoked(user_id=user_id, revoked_id=revoked_id, expires_ms=expires_ms, origin=self.node_id)
        )

    def publish_kick(self, user_id: int, code: int, reason: str) -> None:
        self._spawn(self.broker.broadcast(encode_kick(user_id, code, reason)))

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
                n = self.local.users(inner.user_ids, inner.frame, inner.droppable, ordered=not inner.unordered)
                tracing.delivered(span, n)
                return
            env = inner
        if isinstance(env, UsersEnvelope):
            self.local.users(env.user_ids, env.frame, env.droppable, ordered=not env.unordered)
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
                self._spawn(self._drop_node(node))
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
                self._spawn(self.reannounce())
            self._was_listed = True
        elif self._was_listed:
            # Our entry vanished (a stall past the TTL, or Redis lost it): other nodes may have
            # dropped our sessions. The registry re-registers us; record the sessions again.
            self._was_listed = False
            self._vanished = True
            self._spawn(self.reannounce())

    async def _drop_node(self, node: str) -> None:
        """A node left or died: its sessions are gone; announce who went offline."""
        offline = await self.presence.drop_node(node)
        log.info("node %s left the cluster; %d users went offline", node, len(offline))
        for uid in offline:
            await self.broker.broadcast(encode_presence(uid, False))


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
