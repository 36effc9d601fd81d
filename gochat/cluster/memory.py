"""In-process cluster seams: embedded mode, tests, and the reference the Redis ones follow.

Every class takes a :class:`MemoryHub`. Several instances built on one hub behave like several
nodes of one cluster (one registry per node, one broker per node, ...); instances built without
a hub get a private one. Setting :attr:`MemoryHub.available` to False makes every operation
raise :class:`~gochat.errors.UnavailableError`, which lets callers test their degraded paths
without a Redis server.

Semantics match :mod:`gochat.cluster.redis` (TTL expiry, renewal, watch notifications, at-most-
once broker delivery, epoch fencing, consumer groups with idle claiming, idempotent jobs and
dead letters) except for what only an outside server can do (restarts, per-node presence TTL).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gochat.clock import now_ms
from gochat.cluster.base import (
    REGISTRY_RENEW_S,
    REGISTRY_TTL_S,
    JobHandler,
    NodeInfo,
    SessionLease,
)
from gochat.errors import UnavailableError

__all__ = [
    "MemoryBroker",
    "MemoryClusterPresence",
    "MemoryHub",
    "MemoryJobQueue",
    "MemoryRegistry",
]

log = logging.getLogger("gochat.cluster.memory")


def _snapshot_key(nodes: Iterable[NodeInfo]) -> tuple[NodeInfo, ...]:
    """What watchers compare: the nodes without the registry's own renewal timestamp."""
    return tuple(dataclasses.replace(n, updated_ms=0) for n in nodes)


@dataclass
class _Pending:
    consumer: str
    delivered_at: float
    deliveries: int = 1


@dataclass
class _Group:
    next_index: int = 0
    pending: dict[int, _Pending] = field(default_factory=dict)


@dataclass
class _Stream:
    entries: dict[int, tuple[str, bytes]] = field(default_factory=dict)
    seq: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    last_id: int = 0
    groups: dict[str, _Group] = field(default_factory=dict)
    dead: list[tuple[str, bytes, str]] = field(default_factory=list)


class MemoryHub:
    """Shared state of one in-process "cluster"."""

    def __init__(self) -> None:
        #: False simulates a backend outage: every operation raises UnavailableError
        self.available = True
        # registry: node_id -> (info, monotonic deadline)
        self.registry: dict[str, tuple[NodeInfo, float]] = {}
        self.registry_events: set[asyncio.Event] = set()
        # broker: node_id -> {subscriber id: callback}
        self.subscribers: dict[str, dict[int, Callable[[bytes], None]]] = {}
        self._sub_ids = itertools.count(1)
        # presence: user -> {(node_id, session_id): epoch}; node -> users; user -> epoch counter
        self.sessions: dict[int, dict[tuple[str, int], int]] = {}
        self.node_users: dict[str, set[int]] = {}
        self.epochs: dict[int, int] = {}
        #: nodes that recorded their sessions (Presence.mark); cleared by :meth:`lose_data`
        self.marks: set[str] = set()
        self.node_numbers = itertools.count()
        # jobs
        self.streams: dict[str, _Stream] = {}
        # (stream, job_id) -> (groups that finished it, dedupe deadline)
        self.job_state: dict[tuple[str, str], tuple[set[str], float]] = {}
        self.job_events: dict[str, asyncio.Event] = {}
        # shared (L2) cache (gochat/cluster/memory_cache.py): "space:key" -> entry, oldest
        # first, and the bytes the entries hold
        self.shared_cache: OrderedDict[str, Any] = OrderedDict()
        self.shared_cache_bytes = 0
        # fan-out job records (gochat/cluster/fanout.py, MemoryFanoutProgress): job_id -> record
        self.fanout_jobs: OrderedDict[str, Any] = OrderedDict()

    def lose_data(self) -> None:
        """Simulate a backend restart without persistence: presence, marks and the shared
        cache are gone."""
        self.sessions.clear()
        self.node_users.clear()
        self.marks.clear()
        self.shared_cache.clear()
        self.shared_cache_bytes = 0

    def check(self) -> None:
        if not self.available:
            raise UnavailableError("cluster backend unavailable (memory hub switched off)")

    # registry helpers
    def live_nodes(self) -> list[NodeInfo]:
        now = time.monotonic()
        expired = [nid for nid, (_, deadline) in self.registry.items() if deadline <= now]
        for nid in expired:
            del self.registry[nid]
        if expired:
            self.announce()
        return [self.registry[nid][0] for nid in sorted(self.registry)]

    def announce(self) -> None:
        for ev in self.registry_events:
            ev.set()

    def stream(self, name: str) -> _Stream:
        s = self.streams.get(name)
        if s is None:
            s = self.streams[name] = _Stream()
        return s

    def job_event(self, name: str) -> asyncio.Event:
        ev = self.job_events.get(name)
        if ev is None:
            ev = self.job_events[name] = asyncio.Event()
        return ev


async def _wait_event(event: asyncio.Event, timeout_s: float) -> None:
    """``event.wait()`` for at most ``timeout_s`` (asyncio.timeout: Python 3.11's wait_for can
    swallow a cancellation that races with the inner wait finishing)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await event.wait()


async def _cancel(tasks: Iterable[asyncio.Task[None]], timeout_s: float = 5.0) -> None:
    """Cancel background tasks and wait (bounded) until they are done; their errors are
    dropped, a cancellation of the caller is not."""
    live = [t for t in tasks if t is not None and not t.done()]
    for t in live:
        t.cancel()
    if live:
        await asyncio.wait(live, timeout=timeout_s)


class MemoryRegistry:
    """:class:`~gochat.cluster.base.Registry` over a :class:`MemoryHub` (one instance per node)."""

    def __init__(
        self,
        hub: MemoryHub | None = None,
        *,
        ttl_s: float = REGISTRY_TTL_S,
        renew_s: float = REGISTRY_RENEW_S,
    ) -> None:
        if not 0 < renew_s < ttl_s:
            raise ValueError("need 0 < renew_s < ttl_s")
        self.hub = hub if hub is not None else MemoryHub()
        self.ttl_s = ttl_s
        self.renew_s = renew_s
        self._info: NodeInfo | None = None
        self._load: Callable[[], NodeInfo] | None = None
        self._renew_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._watchers: list[tuple[Callable[[list[NodeInfo]], None], list[tuple[NodeInfo, ...] | None]]] = []
        self._event = asyncio.Event()
        #: close() began: the watch calls no callback any more
        self._closed = False

    def _put(self, info: NodeInfo) -> None:
        self.hub.check()
        info = dataclasses.replace(info, updated_ms=now_ms())
        old = self.hub.registry.get(info.node_id)
        self.hub.registry[info.node_id] = (info, time.monotonic() + self.ttl_s)
        if old is None or _snapshot_key([old[0]]) != _snapshot_key([info]):
            self.hub.announce()

    async def register(self, info: NodeInfo, load: Callable[[], NodeInfo] | None = None) -> None:
        self._info, self._load = info, load
        self._put(info)
        if self._renew_task is None or self._renew_task.done():
            self._renew_task = asyncio.create_task(self._renew_loop(), name=f"registry-renew-{info.node_id}")

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self.renew_s)
            assert self._info is not None
            try:
                info = self._load() if self._load is not None else self._info
                if info.node_id != self._info.node_id:
                    raise ValueError("load() changed the node_id")
                self._info = info
                self._put(info)
            except Exception as exc:
                log.warning("registry renew of %s failed: %s", self._info.node_id, exc)

    async def deregister(self) -> None:
        if self._renew_task is not None:
            await _cancel([self._renew_task])
            self._renew_task = None
        if self._info is not None:
            self.hub.check()
            if self.hub.registry.pop(self._info.node_id, None) is not None:
                self.hub.announce()

    async def nodes(self) -> list[NodeInfo]:
        self.hub.check()
        return self.hub.live_nodes()

    async def node_number(self) -> int:
        self.hub.check()
        return next(self.hub.node_numbers)

    def watch(self, callback: Callable[[list[NodeInfo]], None]) -> None:
        self._watchers.append((callback, [None]))
        self._event.set()
        if self._watch_task is None or self._watch_task.done():
            self.hub.registry_events.add(self._event)
            self._watch_task = asyncio.create_task(self._watch_loop(), name="registry-watch")

    async def _watch_loop(self) -> None:
        while True:
            await _wait_event(self._event, self.renew_s)
            self._event.clear()
            if self._closed:
                return
            if not self.hub.available:
                continue
            nodes = self.hub.live_nodes()
            key = _snapshot_key(nodes)
            for callback, last in list(self._watchers):
                if last[0] != key:
                    last[0] = key
                    try:
                        callback(list(nodes))
                    except Exception:
                        log.exception("registry watch callback failed")

    async def close(self) -> None:
        """Stop renewing and watching; the entry (if any) expires after its TTL, like a crash."""
        self._closed = True
        self.hub.registry_events.discard(self._event)
        await _cancel([t for t in (self._renew_task, self._watch_task) if t is not None])
        self._renew_task = self._watch_task = None


class MemoryBroker:
    """:class:`~gochat.cluster.base.Broker` over a :class:`MemoryHub`; delivery is asynchronous
    (the next loop iteration) and at most once, like pub/sub."""

    def __init__(self, hub: MemoryHub | None = None) -> None:
        self.hub = hub if hub is not None else MemoryHub()
        self.node_id = ""
        self._sub_id = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(
        self, node_id: str, on_message: Callable[[bytes], None], on_resubscribe: Callable[[], None] | None = None
    ) -> None:
        # an in-process subscription is never lost: ``on_resubscribe`` is never called
        self.hub.check()
        if self._sub_id:
            raise RuntimeError("broker already started")
        self.node_id = node_id
        self._loop = asyncio.get_running_loop()
        self._sub_id = next(self.hub._sub_ids)
        self.hub.subscribers.setdefault(node_id, {})[self._sub_id] = on_message

    def _deliver(self, callbacks: Iterable[Callable[[bytes], None]], payload: bytes) -> None:
        loop = asyncio.get_running_loop()
        for cb in callbacks:
            loop.call_soon(_safe_call, cb, bytes(payload))

    async def send_to_node(self, node_id: str, payload: bytes) -> None:
        self.hub.check()
        self._deliver(list(self.hub.subscribers.get(node_id, {}).values()), payload)

    async def broadcast(self, payload: bytes) -> None:
        self.hub.check()
        self._deliver([cb for subs in self.hub.subscribers.values() for cb in subs.values()], payload)

    async def close(self) -> None:
        if self._sub_id:
            subs = self.hub.subscribers.get(self.node_id, {})
            subs.pop(self._sub_id, None)
            if not subs:
                self.hub.subscribers.pop(self.node_id, None)
            self._sub_id = 0


def _safe_call(cb: Callable[[bytes], None], payload: bytes) -> None:
    try:
        cb(payload)
    except Exception:
        log.exception("broker on_message callback failed")


class MemoryClusterPresence:
    """:class:`~gochat.cluster.base.Presence` over a :class:`MemoryHub` (same epoch fencing as
    the Redis one; no per-node TTL: dead nodes are removed with :meth:`drop_node`)."""

    def __init__(self, hub: MemoryHub | None = None) -> None:
        self.hub = hub if hub is not None else MemoryHub()

    async def session_up(self, user_id: int, node_id: str, session_id: int) -> SessionLease:
        self.hub.check()
        sessions = self.hub.sessions.setdefault(user_id, {})
        came_online = not sessions
        epoch = self.hub.epochs.get(user_id, 0) + 1
        self.hub.epochs[user_id] = epoch
        sessions[(node_id, session_id)] = epoch
        self.hub.node_users.setdefault(node_id, set()).add(user_id)
        return SessionLease(came_online, epoch)

    async def session_down(
        self, user_id: int, node_id: str, session_id: int, epoch: int | None = None
    ) -> bool:
        self.hub.check()
        sessions = self.hub.sessions.get(user_id)
        if sessions is None:
            return True
        stored = sessions.get((node_id, session_id))
        if stored is not None and (epoch is None or stored == epoch):
            del sessions[(node_id, session_id)]
            if not any(n == node_id for n, _ in sessions):
                users = self.hub.node_users.get(node_id)
                if users is not None:
                    users.discard(user_id)
                    if not users:
                        del self.hub.node_users[node_id]
        if not sessions:
            del self.hub.sessions[user_id]
            return True
        return False

    async def nodes_for(
        self, user_ids: Iterable[int], candidates: Sequence[str] | None = None
    ) -> dict[str, list[int]]:
        self.hub.check()
        out: dict[str, list[int]] = {}
        for uid in dict.fromkeys(user_ids):
            for node in dict.fromkeys(n for n, _ in self.hub.sessions.get(uid, {})):
                out.setdefault(node, []).append(uid)
        return out

    async def online(self, user_ids: Iterable[int]) -> dict[int, bool]:
        self.hub.check()
        return {uid: bool(self.hub.sessions.get(uid)) for uid in user_ids}

    async def drop_node(self, node_id: str) -> list[int]:
        self.hub.check()
        self.hub.marks.discard(node_id)  # the node, if alive, records its sessions again
        offline: list[int] = []
        for uid in sorted(self.hub.node_users.pop(node_id, set())):
            sessions = self.hub.sessions.get(uid)
            if sessions is None:
                continue
            for key in [k for k in sessions if k[0] == node_id]:
                del sessions[key]
            if not sessions:
                del self.hub.sessions[uid]
                offline.append(uid)
        return offline

    async def mark(self, node_id: str) -> None:
        self.hub.check()
        self.hub.marks.add(node_id)

    async def lost(self, node_id: str) -> bool:
        self.hub.check()
        return node_id not in self.hub.marks

    async def unmark(self, node_id: str) -> None:
        self.hub.check()
        self.hub.marks.discard(node_id)

    async def ping(self) -> None:
        self.hub.check()

    async def close(self) -> None:
        return None


class MemoryJobQueue:
    """:class:`~gochat.cluster.base.JobQueue` over a :class:`MemoryHub`, modelled on Redis
    Streams consumer groups: each job goes to one consumer of a group, stays pending until the
    handler returns, is claimed by any consumer of the group once it has been idle for
    ``claim_idle_ms`` (a running handler keeps its job fresh), and moves to a dead-letter list
    after ``max_deliveries`` failed deliveries. Job ids are deduplicated per stream at enqueue,
    and a group skips deliveries of a job it already finished."""

    def __init__(
        self,
        hub: MemoryHub | None = None,
        *,
        claim_idle_ms: int = 30_000,
        max_deliveries: int = 16,
        dedupe_ttl_s: float = 86_400,
    ) -> None:
        self.hub = hub if hub is not None else MemoryHub()
        self.claim_idle_ms = claim_idle_ms
        self.max_deliveries = max_deliveries
        self.dedupe_ttl_s = dedupe_ttl_s
        self._tasks: list[asyncio.Task[None]] = []

    def _state(self, stream: str, job_id: str) -> set[str] | None:
        st = self.hub.job_state.get((stream, job_id))
        if st is None or st[1] <= time.monotonic():
            return None
        return st[0]

    async def enqueue(self, stream: str, job_id: str, payload: bytes) -> None:
        self.hub.check()
        if self._state(stream, job_id) is not None:
            return  # duplicate enqueue: the job is already queued or done
        self.hub.job_state[(stream, job_id)] = (set(), time.monotonic() + self.dedupe_ttl_s)
        s = self.hub.stream(stream)
        s.last_id = next(s.seq)
        s.entries[s.last_id] = (job_id, bytes(payload))
        self.hub.job_event(stream).set()

    def dead_letters(self, stream: str) -> list[tuple[str, bytes, str]]:
        """(job_id, payload, last error) of the jobs given up on."""
        return list(self.hub.stream(stream).dead)

    async def consume(
        self, stream: str, group: str, consumer: str, handler: JobHandler, concurrency: int = 1
    ) -> None:
        # in-process handlers run one at a time (``concurrency`` is for backends with I/O)
        self.hub.check()
        s = self.hub.stream(stream)
        s.groups.setdefault(group, _Group())
        self._tasks.append(
            asyncio.create_task(
                self._consume_loop(stream, group, consumer, handler), name=f"jobs-{stream}-{consumer}"
            )
        )

    def _next(self, s: _Stream, g: _Group, consumer: str) -> tuple[int, bool] | None:
        """(entry id, claimed) of the next job for ``consumer``."""
        now = time.monotonic()
        idle_s = self.claim_idle_ms / 1000
        for eid, p in g.pending.items():
            if now - p.delivered_at >= idle_s:
                p.consumer, p.delivered_at = consumer, now
                p.deliveries += 1
                return eid, True
        while g.next_index < s.last_id:
            g.next_index += 1
            if g.next_index in s.entries:
                g.pending[g.next_index] = _Pending(consumer, now)
                return g.next_index, False
        return None

    async def _consume_loop(self, stream: str, group: str, consumer: str, handler: JobHandler) -> None:
        s = self.hub.stream(stream)
        g = s.groups[group]
        ev = self.hub.job_event(stream)
        while True:
            nxt = self._next(s, g, consumer) if self.hub.available else None
            if nxt is None:
                ev.clear()
                await _wait_event(ev, max(0.01, self.claim_idle_ms / 2000))
                continue
            eid, _claimed = nxt
            pending = g.pending[eid]
            job_id, payload = s.entries[eid]
            if group in (self._state(stream, job_id) or ()):
                g.pending.pop(eid, None)
                continue
            if pending.deliveries > self.max_deliveries:
                s.dead.append((job_id, payload, "too many deliveries"))
                g.pending.pop(eid, None)
                log.warning("job %s/%s moved to dead letters after %d deliveries", stream, job_id, pending.deliveries - 1)
                continue
            heartbeat = asyncio.create_task(self._heartbeat(pending))
            try:
                await handler(job_id, payload)
            except Exception as exc:
                log.warning("job %s/%s failed (delivery %d): %r", stream, job_id, pending.deliveries, exc)
                if pending.deliveries >= self.max_deliveries:
                    s.dead.append((job_id, payload, repr(exc)))
                    g.pending.pop(eid, None)
                continue
            finally:
                await _cancel([heartbeat])
            done = self._state(stream, job_id) or set()
            done.add(group)
            self.hub.job_state[(stream, job_id)] = (done, time.monotonic() + self.dedupe_ttl_s)
            g.pending.pop(eid, None)

    async def _heartbeat(self, pending: _Pending) -> None:
        while True:
            pending.delivered_at = time.monotonic()
            await asyncio.sleep(max(0.005, self.claim_idle_ms / 3000))

    async def close(self) -> None:
        """Stop this instance's consumers at once (a running job stays pending, as if the
        consumer died, and is claimed by another consumer after ``claim_idle_ms``)."""
        await _cancel(self._tasks)
        self._tasks.clear()
