"""Backend-independent behaviour tests for the cluster seams (:mod:`gochat.cluster.base`).

A backend binds the suites by subclassing :class:`RegistryBehaviour`, :class:`BrokerBehaviour`,
:class:`PresenceBehaviour` and :class:`JobQueueBehaviour` in a ``test_*.py`` module and providing
a ``backend_factory`` fixture: a zero-argument callable, called inside the test's event loop,
that returns a fresh :class:`Backend`. Each ``registry()``/``broker()``/... call on a backend
returns a new instance that behaves like another node of the same cluster; ``aclose()`` closes
them all and removes whatever the backend stored. :class:`MemoryBackend` is the reference.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from gochat.cluster.base import Broker, JobQueue, NodeInfo, Presence, Registry
from gochat.cluster.memory import (
    MemoryBroker,
    MemoryClusterPresence,
    MemoryHub,
    MemoryJobQueue,
    MemoryRegistry,
)

T = TypeVar("T")


class Backend:
    """Factory of cluster seam instances sharing one cluster; closes what it made."""

    name = "abstract"

    def __init__(self) -> None:
        self.closables: list[Any] = []

    def _track(self, obj: T) -> T:
        self.closables.append(obj)
        return obj

    def registry(self, *, ttl_s: float = 10.0, renew_s: float = 5.0) -> Registry:
        raise NotImplementedError

    def broker(self) -> Broker:
        raise NotImplementedError

    def presence(self) -> Presence:
        raise NotImplementedError

    def jobs(self, *, claim_idle_ms: int = 30_000, max_deliveries: int = 16) -> JobQueue:
        raise NotImplementedError

    async def lose_data(self) -> None:
        """What a backend restart without persistence does: every key is gone."""
        raise NotImplementedError

    async def aclose(self) -> None:
        for obj in reversed(self.closables):
            try:
                await obj.close()
            except Exception:
                pass
        self.closables.clear()


class MemoryBackend(Backend):
    name = "memory"

    def __init__(self) -> None:
        super().__init__()
        self.hub = MemoryHub()

    def registry(self, *, ttl_s: float = 10.0, renew_s: float = 5.0) -> Registry:
        return self._track(MemoryRegistry(self.hub, ttl_s=ttl_s, renew_s=renew_s))

    def broker(self) -> Broker:
        return self._track(MemoryBroker(self.hub))

    def presence(self) -> Presence:
        return self._track(MemoryClusterPresence(self.hub))

    def jobs(self, *, claim_idle_ms: int = 30_000, max_deliveries: int = 16) -> JobQueue:
        return self._track(MemoryJobQueue(self.hub, claim_idle_ms=claim_idle_ms, max_deliveries=max_deliveries))

    async def lose_data(self) -> None:
        self.hub.lose_data()


BackendFactory = Callable[[], Backend]


def run_with(factory: BackendFactory, body: Callable[[Backend], Awaitable[T]], timeout: float = 30.0) -> T:
    """Run ``body(backend)`` in a fresh event loop and close the backend afterwards."""

    async def main() -> T:
        backend = factory()
        try:
            async with asyncio.timeout(timeout):
                return await body(backend)
        finally:
            await backend.aclose()

    return asyncio.run(main())


async def eventually(
    predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.02, what: str = "condition"
) -> None:
    """Poll ``predicate`` (sync or async) until it is truthy, else fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def node(node_id: str, **kw: Any) -> NodeInfo:
    return NodeInfo(
        node_id=node_id,
        ws_url=f"ws://{node_id}.test:7000/ws",
        http_url=f"http://{node_id}.test:7001",
        version="0.1.0",
        started_ms=1_700_000_000_000,
        **kw,
    )


def bare(nodes: list[NodeInfo]) -> list[NodeInfo]:
    return [dataclasses.replace(n, updated_ms=0) for n in nodes]


async def ids(registry: Registry) -> list[str]:
    return [n.node_id for n in await registry.nodes()]


# --------------------------------------------------------------------------- registry


class RegistryBehaviour:
    def test_node_numbers_start_at_0_and_never_repeat(self, backend_factory: BackendFactory) -> None:
        async def body(b: Backend) -> None:
            ra, rb = b.registry(), b.registry()
            numbers = [await ra.node_number(), await rb.node_number(), await ra.node_number()]
            assert numbers == [0, 1, 2]

        run_with(backend_factory, body)

    def test_register_lists_live_nodes_sorted_with_metadata(self, backend_factory: BackendFactory) -> None:
        async def body(b: Backend) -> None:
            infos = [node("n2", weight=50, extra={"zone": "b"}), node("n1", connections=7), node("n3")]
            for info in infos:
                await b.registry().register(info)
            listed = await b.registry().nodes()
            assert [n.node_id for n in listed] == ["n1", "n2", "n3"]
            assert bare(listed) == sorted(infos, key=lambda n: n.node_id)
            now_ms = time.time() * 1000
            assert all(now_ms - 10_000 < n.updated_ms <= now_ms + 1000 for n in listed)

        run_with(backend_factory, body)

    def test_entry_expires_when_renewals_stop(self, backend_factory: BackendFactory) -> None:
        async def body(b: Backend) -> None:
            crashed = b.registry(ttl_s=0.5, renew_s=0.15)
            await crashed.register(node("n1"))
            observer = b.registry()
            assert await ids(observer) == ["n1"]
            await crashed.close()  # stops renewing, like a crash: no deregistration
            t0 = time.monotonic()
            await eventually(lambda: _empty(observer), 3.0, what="expiry")
            assert time.monotonic() - t0 < 2.0

        run_with(backend_factory, body)

    def test_renewal_keeps_entry_and_takes_fresh_metadata(self, backend_factory: BackendFactory) -> None:
        async def body(b: Backend) -> None:
            load_calls = 0

            def load() -> NodeInfo:
                nonlocal load_calls
                load_calls += 1
                return node("n1", connections=load_calls)

            r = b.registry(ttl_s=0.4, renew_s=0.1)
            await r.register(node("n1"), load)
            observer = b.registry()
            await asyncio.sleep(1.0)  # 2.5 TTLs
            listed = await observer.nodes()
            assert [n.node_id for n in listed] == ["n1"]
            assert load_calls >= 4
            assert listed[0].connections >= load_calls - 1

        run_with(backend_factory, body)

    def test_deregister_removes_at_once_and_stops_renewing(self, backend_factory: BackendFactory) -> None:
        async def body(b: Backend) -> None:
            r = b.registry(ttl_s=5, renew_s=0.05)
            await r.register(node("n1"))
            await b.registry().register(node("n2"))
            await r.deregister()
            observer = b.registry()
            assert await ids(observer) == ["n2"]
            await asyncio.sleep(0.3)
            assert await ids(observer) == ["n2"]

        run_with(backend_factory, body)

    def test_watch_reports_join_update_leave_at_once(self, backend_factory: BackendFactory) -> None:
        async def body(b: Backend) -> None:
            seen: list[list[NodeInfo]] = []
            watcher = b.registry(ttl_s=60, renew_s=30)  # refresh far away: only announcements count
            watcher.watch(seen.append)
            await eventually(lambda: seen, 3.0, what="initial callback")
            assert seen[-1] == []
            r = b.registry(ttl_s=60, renew_s=30)
            await r.register(node("n1", connections=1))
            await eventually(lambda: seen and [n.node_id for n in seen[-1]] == ["n1"], 3.0, what="join")
            await r.register(node("n1", connections=2))
            await eventually(lambda: seen[-1] and seen[-1][0].connections == 2, 3.0, what="update")
            await r.deregister()
            await eventually(lambda: seen[-1] == [], 3.0, what="leave")

        run_with(backend_factory, body)

    def test_watch_notices_expiry_within_a_renew_interval(self, backend_factory: BackendFactory) -> None:
        async def body(b: Backend) -> None:
            seen: list[list[str]] = []
            watcher = b.registry(ttl_s=2, renew_s=0.2)
            r = b.registry(ttl_s=0.4, renew_s=0.1)
            await r.register(node("n1"))
            watcher.watch(lambda nodes: seen.append([n.node_id for n in nodes]))
            await eventually(lambda: seen == [["n1"]], 3.0, what="initial callback")
            await r.close()
            await eventually(lambda: seen[-1] == [], 3.0, what="expiry noticed")

        run_with(backend_factory, body)

    def test_watch_is_quiet_when_only_renewals_happen(self, backend_factory: BackendFactory) -> None:
        async def body(b: Backend) -> None:
            r = b.registry(ttl_s=1, renew_s=0.05)
            await r.register(node("n1"))
            seen: list[list[NodeInfo]] = []
            watcher = b.registry(ttl_s=1, renew_s=0.05)
            watcher.watch(seen.append)
            await asyncio.sleep(0.6)
            assert len(seen) == 1, seen
            assert [n.node_id for n in seen[0]] == ["n1"]

        run_with(backend_factory, body)


async def _empty(registry: Registry) -> bool:
    return await registry.nodes() == []


# --------------------------------------------------------------------------- broker


class _Inbox:
    def __init__(self) -> None:
        self.items: list[bytes] = []

    def __call__(self, payload: bytes) -> None:
        self.items.append(payload)


async def _three_nodes(b: Backend) -> tuple[list[Broker], list[_Inbox]]:
    brokers = [b.broker() for _ in range(3)]
    inboxes = [_Inbox() for _ in range(3)]
    for i, (br, inbox) in enumerate(zip(brokers, inboxes, strict=True)):
        await br.start(f"n{i + 1}", inbox)
    return brokers, inboxes


class BrokerBehaviour:
    def test_send_to_node_reaches_only_that_node(self, backend_factory: BackendFactory) -> None:
        async def body(b: Backend) -> None:
            brokers, inboxes = await _three_nodes(b)
            await brokers[0].send_to_node("n2", b"to-n2")
            await brokers[2].send_to_node("n1", b"to-n1")
            await eventually(lambda: inboxes[1].items and inboxes[0].items, what="delivery")
            await asyncio.sleep(0.1)
            assert inboxes[0].items == [b"to-n1"]
            assert inboxes[1].items == [b"to-n2"]
            assert inboxes[2].items == []

        run_with(backend_factory, body)

    def test_broadcast_reaches_every_node_once_sender_included(self, backend_factory: BackendFactory) -> None:
        async def body(b: Backend) -> None:
            brokers, inboxes = await _three_nodes(b)
            await brokers[1].broadcast(b"hello all")
            await eventually(lambda: all(i.items for i in inboxes), what="broadcast")
            await asyncio.sleep(0.1)
            assert [i.items for i in inboxes] == [[b"hello all"]] * 3

        run_with(backend_factory, body)

    def test_binary_payloads_arrive_intact_and_in_order(self, backend_factory: BackendFactory) -> None:
        async def body(b: Backend) -> None:
            brokers, inboxes = await _three_nodes(b)
            payloads = [b"\x00\xff\x80" + os.urandom(i % 64) + i.to_bytes(4, "little") for i in range(300)]
            for p in payloads:
                await brokers[0].send_to_node("n3", p)
            await eventually(lambda: len(inboxes[2].items) == len(payloads), what="all payloads")
            assert inboxes[2].items == payloads

        run_with(backend_factory, body)

    def test_unknown_node_and_closed_node_drop_silently(self, backend_factory: BackendFactory) -> None:
        async def body(b: Backend) -> None:
            brokers, inboxes = await _three_nodes(b)
            await brokers[0].send_to_node("nobody", b"x")
            await brokers[1].close()
            await brokers[0].broadcast(b"after close")
            await brokers[0].send_to_node("n2", b"to closed")
            await eventually(lambda: inboxes[0].items and inboxes[2].items, what="broadcast")
            await asyncio.sleep(0.1)
            assert inboxes[0].items == inboxes[2].items == [b"after close"]
            assert inboxes[1].items == []

        run_with(backend_factory, body)


# --------------------------------------------------------------------------- presence


class PresenceBehaviour:
    def test_lost_tells_a_node_its_sessions_must_be_recorded_again(self, backend_factory: BackendFactory) -> None:
        async def body(b: Backend) -> None:
            pa, pb = b.presence(), b.presence()
            await pa.ping()
            await pa.mark("A")
            assert await pb.lost("A") is False  # another client sees the same mark
            await pa.session_up(5, "A", 1)
            await b.lose_data()
            assert await pa.online([5]) == {5: False}
            assert await pa.lost("A") is True
            assert await pa.lost("A") is True, "lost until marked again"
            await pa.mark("A")
            assert await pa.lost("A") is False
            await pa.unmark("A")
            assert await pb.lost("A") is True

        run_with(backend_factory, body)

    def test_multi_device_user_stays_online_until_last_session(self, backend_factory: BackendFactory) -> None:
        async def body(b: Backend) -> None:
            pa, pb = b.presence(), b.presence()  # the presence clients of nodes A and B
            u = 4242
            phone = await pa.session_up(u, "A", 1)
            assert phone and phone.came_online
            laptop = await pb.session_up(u, "B", 2)
            assert not laptop and not laptop.came_online
            assert laptop.epoch > phone.epoch
            assert await pa.nodes_for([u]) == {"A": [u], "B": [u]}
            assert await pa.session_down(u, "A", 1, phone.epoch) is False
            assert await pb.online([u]) == {u: True}
            assert await pb.nodes_for([u]) == {"B": [u]}
            assert await pb.session_down(u, "B", 2, laptop.epoch) is True
            assert await pa.online([u]) == {u: False}
            assert await pa.nodes_for([u]) == {}
            assert await pa.session_up(u, "A", 3)  # online again

        run_with(backend_factory, body)

    def test_stale_session_never_removes_newer_one(self, backend_factory: BackendFactory) -> None:
        async def body(b: Backend) -> None:
            p = b.presence()
            u = 77
            old = await p.session_up(u, "A", 9)
            new = await p.session_up(u, "A", 9)  # reconnect under the same node and session id
            assert new.epoch > old.epoch
            assert not new.came_online
            assert await p.session_down(u, "A", 9, old.epoch) is False  # the stale close
            assert await p.online([u]) == {u: True}
            assert await p.nodes_for([u]) == {"A": [u]}
            assert await p.session_down(u, "A", 9, new.epoch) is True
            assert await p.online([u]) == {u: False}

        run_with(backend_factory, body)

    def test_session_down_without_epoch_and_unknown_sessions(self, backend_factory: BackendFactory) -> None:
        async def body(b: Backend) -> None:
            p = b.presence()
            assert await p.session_down(5, "A", 1) is True  # never up: no session left
            await p.session_up(5, "A", 1)
            await p.session_up(5, "B", 2)
            assert await p.session_down(5, "A", 99) is False  # unknown session: nothing removed
            assert await p.session_down(5, "A", 1) is False  # no epoch: removes what is stored
            assert await p.nodes_for([5]) == {"B": [5]}

        run_with(backend_factory, body)

    def test_nodes_for_ten_thousand_users(self, backend_factory: BackendFactory) -> None:
        async def body(b: Backend) -> None:
            presences = {n: b.presence() for n in ("A", "B", "C")}
            names = list(presences)
            users = list(range(1_000_000, 1_010_000))
            expected: dict[str, list[int]] = {n: [] for n in names}
            placements: list[tuple[int, str, int]] = []
            for i, u in enumerate(users):
                first = names[i % 3]
                placements.append((u, first, i))
                if i % 10 == 0:
                    placements.append((u, names[(i + 1) % 3], i + 100_000))
            for u, n, _ in placements:
                expected[n].append(u)
            for start in range(0, len(placements), 200):
                await asyncio.gather(
                    *(presences[n].session_up(u, n, sid) for u, n, sid in placements[start : start + 200])
                )
            unknown = list(range(5, 105))
            got = await presences["A"].nodes_for(users + unknown + users[:50])
            assert sorted(got) == names
            for n in names:
                assert sorted(got[n]) == sorted(expected[n]), n
            # asked per candidate node (a backend may): the same answer
            per_node = await presences["A"].nodes_for(users + unknown + users[:50], candidates=[*names, "gone"])
            assert {n: sorted(v) for n, v in per_node.items()} == {n: sorted(v) for n, v in got.items()}
            status = await presences["B"].online(users[:3] + unknown[:2])
            assert status == {users[0]: True, users[1]: True, users[2]: True, 5: False, 6: False}

        run_with(backend_factory, body, timeout=45)

    def test_drop_node_forgets_its_sessions(self, backend_factory: BackendFactory) -> None:
        async def body(b: Backend) -> None:
            pa, pb, janitor = b.presence(), b.presence(), b.presence()
            only_a, both, only_b = 1, 2, 3
            await pa.session_up(only_a, "A", 10)
            await pa.session_up(only_a, "A", 11)
            await pa.session_up(both, "A", 12)
            await pb.session_up(both, "B", 13)
            await pb.session_up(only_b, "B", 14)
            await pa.mark("A")
            await pb.mark("B")
            assert sorted(await janitor.drop_node("A")) == [only_a]
            # A may still be alive (only its registry entry lapsed): it finds its mark gone
            assert await pa.lost("A") and not await pb.lost("B")
            assert await janitor.nodes_for([only_a, both, only_b]) == {"B": [both, only_b]}
            many = [only_a, both, only_b, *range(100, 140)]
            assert await janitor.nodes_for(many, candidates=["A", "B"]) == {"B": [both, only_b]}
            assert await janitor.online([only_a, both]) == {only_a: False, both: True}
            assert await janitor.drop_node("A") == []  # idempotent
            assert await pa.session_down(both, "A", 12) is False  # late close from the dead node
            assert await pb.session_up(only_a, "B", 15)  # comes back online elsewhere

        run_with(backend_factory, body)


# --------------------------------------------------------------------------- job queue


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, bytes]] = []  # (consumer, job_id, payload)

    def handler(self, consumer: str) -> Callable[[str, bytes], Awaitable[None]]:
        async def handle(job_id: str, payload: bytes) -> None:
            self.calls.append((consumer, job_id, payload))

        return handle

    def job_counts(self) -> Counter[str]:
        return Counter(job_id for _, job_id, _ in self.calls)


class JobQueueBehaviour:
    def test_each_job_runs_once_across_consumers(self, backend_factory: BackendFactory) -> None:
        async def body(b: Backend) -> None:
            rec = _Recorder()
            q1, q2 = b.jobs(), b.jobs()
            await q1.consume("audit", "workers", "c1", rec.handler("c1"))
            await q2.consume("audit", "workers", "c2", rec.handler("c2"))
            for i in range(60):
                await q1.enqueue("audit", f"job-{i}", b"payload-%d" % i)
            await eventually(lambda: len(rec.calls) >= 60, what="60 jobs")
            await asyncio.sleep(0.2)
            assert rec.job_counts() == Counter({f"job-{i}": 1 for i in range(60)})
            assert {(j, p) for _, j, p in rec.calls} == {(f"job-{i}", b"payload-%d" % i) for i in range(60)}

        run_with(backend_factory, body)

    def test_jobs_enqueued_before_consumers_start_are_not_lost(self, backend_factory: BackendFactory) -> None:
        async def body(b: Backend) -> None:
            rec = _Recorder()
            q = b.jobs()
            for i in range(5):
                await q.enqueue("early", f"e{i}", b"x")
            await q.consume("early", "g", "c1", rec.handler("c1"))
            await eventually(lambda: len(rec.calls) == 5, what="early jobs")

        run_with(backend_factory, body)

    def test_every_group_gets_every_job(self, backend_factory: BackendFactory) -> None:
        async def body(b: Backend) -> None:
            audit, push = _Recorder(), _Recorder()
            q = b.jobs()
            await q.consume("events", "audit", "a1", audit.handler("a1"))
            await q.consume("events", "push", "p1", push.handler("p1"))
            for i in range(10):
                await q.enqueue("events", f"ev{i}", b"e")
            await eventually(lambda: len(audit.calls) == len(push.calls) == 10, what="both groups")

        run_with(backend_factory, body)

    def test_duplicate_enqueue_runs_once(self, backend_factory: BackendFactory) -> None:
        async def body(b: Backend) -> None:
            rec = _Recorder()
            q = b.jobs()
            await q.enqueue("mail", "welcome-42", b"first")
            await q.enqueue("mail", "welcome-42", b"second")
            await q.consume("mail", "g", "c1", rec.handler("c1"))
            await eventually(lambda: rec.calls, what="the job")
            await q.enqueue("mail", "welcome-42", b"third")  # after it ran
            await q.enqueue("mail", "other", b"o")
            await eventually(lambda: len(rec.calls) == 2, what="the other job")
            await asyncio.sleep(0.2)
            assert [(j, p) for _, j, p in rec.calls] == [("welcome-42", b"first"), ("other", b"o")]

        run_with(backend_factory, body)

    def test_failed_job_is_retried_until_it_succeeds(self, backend_factory: BackendFactory) -> None:
        async def body(b: Backend) -> None:
            attempts: list[str] = []
            done: list[str] = []

            async def flaky(job_id: str, payload: bytes) -> None:
                attempts.append(job_id)
                if len(attempts) < 3:
                    raise RuntimeError("transient")
                done.append(job_id)

            q = b.jobs(claim_idle_ms=150)
            await q.consume("retry", "g", "c1", flaky)
            await q.enqueue("retry", "j1", b"x")
            await eventually(lambda: done, 5.0, what="success after retries")
            await asyncio.sleep(0.4)
            assert attempts == ["j1", "j1", "j1"]
            assert done == ["j1"]

        run_with(backend_factory, body)

    def test_job_of_a_dead_consumer_is_claimed_by_another(self, backend_factory: BackendFactory) -> None:
        async def body(b: Backend) -> None:
            started = asyncio.Event()
            finished: list[tuple[str, str]] = []

            async def stuck(job_id: str, payload: bytes) -> None:
                started.set()
                await asyncio.sleep(3600)
                finished.append(("c1", job_id))

            async def healthy(job_id: str, payload: bytes) -> None:
                finished.append(("c2", job_id))

            q1 = b.jobs(claim_idle_ms=250)
            await q1.consume("work", "g", "c1", stuck)
            await q1.enqueue("work", "j1", b"x")
            async with asyncio.timeout(5):
                await started.wait()
            await q1.close()  # the consumer dies mid-job: no ack
            q2 = b.jobs(claim_idle_ms=250)
            await q2.consume("work", "g", "c2", healthy)
            await eventually(lambda: finished, 5.0, what="job claimed by c2")
            await asyncio.sleep(0.6)
            assert finished == [("c2", "j1")]

        run_with(backend_factory, body)

    def test_running_job_is_not_claimed_while_its_consumer_lives(self, backend_factory: BackendFactory) -> None:
        async def body(b: Backend) -> None:
            runs: list[str] = []

            def slow(consumer: str) -> Callable[[str, bytes], Awaitable[None]]:
                async def handle(job_id: str, payload: bytes) -> None:
                    runs.append(consumer)
                    await asyncio.sleep(0.9)  # several claim_idle_ms

                return handle

            q1, q2 = b.jobs(claim_idle_ms=200), b.jobs(claim_idle_ms=200)
            await q1.consume("slow", "g", "c1", slow("c1"))
            await q1.enqueue("slow", "j1", b"x")
            await eventually(lambda: runs, what="job started")
            await q2.consume("slow", "g", "c2", slow("c2"))
            await asyncio.sleep(1.3)
            assert runs == ["c1"]

        run_with(backend_factory, body)

    def test_poison_job_stops_after_max_deliveries(self, backend_factory: BackendFactory) -> None:
        async def body(b: Backend) -> None:
            attempts: list[str] = []
            rec = _Recorder()

            async def poison(job_id: str, payload: bytes) -> None:
                if job_id == "bad":
                    attempts.append(job_id)
                    raise ValueError("cannot process")
                await rec.handler("c1")(job_id, payload)

            q = b.jobs(claim_idle_ms=100, max_deliveries=3)
            await q.consume("p", "g", "c1", poison)
            await q.enqueue("p", "bad", b"x")
            await q.enqueue("p", "good", b"y")
            await eventually(lambda: len(attempts) == 3 and rec.calls, 5.0, what="3 attempts")
            await asyncio.sleep(0.5)
            assert len(attempts) == 3
            assert rec.job_counts() == Counter({"good": 1})

        run_with(backend_factory, body)
