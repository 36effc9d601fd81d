"""Distributed locks (:mod:`gochat.cluster.locks`): one behaviour suite run on the memory hub and
on a real Redis (its own key prefix per test, deleted afterwards), plus a holder killed -9.

Every ``locks()`` instance of one backend behaves like another node of one cluster (for Redis,
another client, as another process would have)."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
import redis
import redis.asyncio as aioredis

from gochat.cluster.backends import ClusterBackends, memory_backends
from gochat.cluster.locks import Lease, LockNotHeldError, Locks, LockService, LockTimeoutError
from gochat.cluster.memory import MemoryHub
from gochat.cluster.memory_locks import MemoryLocks
from gochat.errors import ErrorCode, UnavailableError

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("GOCHAT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


class LockBackend:
    name = "abstract"

    def __init__(self) -> None:
        self.made: list[LockService] = []

    def _new(self) -> LockService:
        raise NotImplementedError

    def locks(self) -> LockService:
        lk = self._new()
        self.made.append(lk)
        return lk

    def down(self) -> LockService:
        """Locks over a backend that is unreachable."""
        raise NotImplementedError

    async def aclose(self) -> None:
        for lk in reversed(self.made):
            try:
                await lk.close()
            except Exception:
                pass


class MemoryLockBackend(LockBackend):
    name = "memory"

    def __init__(self) -> None:
        super().__init__()
        self.hub = MemoryHub()

    def _new(self) -> LockService:
        return MemoryLocks(self.hub)

    def down(self) -> LockService:
        hub = MemoryHub()
        hub.available = False
        lk = MemoryLocks(hub)
        self.made.append(lk)
        return lk


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisLockBackend(LockBackend):
    name = "redis"

    def __init__(self, url: str = REDIS_URL) -> None:
        super().__init__()
        from gochat.cluster.redis.locks import RedisLocks

        self._cls = RedisLocks
        self.url = url
        self.prefix = f"gtest:{uuid.uuid4().hex[:12]}:"

    def _new(self) -> LockService:
        return self._cls(self.url, self.prefix, timeout_s=1.0, waiter_ttl_s=1.0)

    def down(self) -> LockService:
        lk = self._cls(f"redis://127.0.0.1:{_free_port()}/0", self.prefix, timeout_s=0.3)
        self.made.append(lk)
        return lk

    async def aclose(self) -> None:
        await super().aclose()
        admin = aioredis.Redis.from_url(self.url)
        try:
            keys = [k async for k in admin.scan_iter(match=f"{self.prefix}*", count=1000)]
            if keys:
                await admin.delete(*keys)
        finally:
            await admin.aclose()


@pytest.fixture(scope="module")
def redis_url() -> str:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is required for the lock tests and is unreachable at {REDIS_URL}: {exc}")
    finally:
        client.close()
    return REDIS_URL


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> Callable[[], LockBackend]:
    if request.param == "memory":
        return MemoryLockBackend
    url = request.getfixturevalue("redis_url")
    return lambda: RedisLockBackend(url)


def run_with(factory: Callable[[], LockBackend], body: Callable[[LockBackend], Awaitable[T]], timeout: float = 30) -> T:
    async def main() -> T:
        b = factory()
        try:
            async with asyncio.timeout(timeout):
                return await body(b)
        finally:
            await b.aclose()

    return asyncio.run(main())


# --------------------------------------------------------------------------- behaviour


def test_the_backends_are_locks(backend: Callable[[], LockBackend]) -> None:
    async def body(b: LockBackend) -> None:
        assert isinstance(b.locks(), Locks)

    run_with(backend, body)


def test_mutual_exclusion_under_concurrency(backend: Callable[[], LockBackend]) -> None:
    """N tasks over three nodes read, await, write a shared counter: the serial result."""

    async def body(b: LockBackend) -> None:
        nodes = [b.locks() for _ in range(3)]
        state = {"counter": 0, "inside": 0, "max_inside": 0}

        async def work(i: int) -> None:
            for _ in range(3):
                async with nodes[i % 3].lock("counter", ttl_s=5) as lease:
                    assert lease.name == "counter"
                    state["inside"] += 1
                    state["max_inside"] = max(state["max_inside"], state["inside"])
                    v = state["counter"]
                    await asyncio.sleep(0.001)
                    state["counter"] = v + 1
                    state["inside"] -= 1

        await asyncio.gather(*(work(i) for i in range(12)))
        assert state["counter"] == 36
        assert state["max_inside"] == 1
        assert await nodes[0].holder("counter") is None

    run_with(backend, body)


def test_waiters_get_the_lock_in_arrival_order(backend: Callable[[], LockBackend]) -> None:
    async def body(b: LockBackend) -> None:
        holder, *nodes = [b.locks() for _ in range(4)]
        first = await holder.acquire("fair", ttl_s=5)
        order: list[int] = []

        async def wait(i: int) -> None:
            async with nodes[i % 3].lock("fair", ttl_s=5, timeout_s=20):
                order.append(i)
                await asyncio.sleep(0.01)

        tasks = []
        for i in range(6):
            tasks.append(asyncio.create_task(wait(i)))
            deadline = time.monotonic() + 5
            while await holder.waiters("fair") < i + 1:
                assert time.monotonic() < deadline, "the waiter did not line up"
                await asyncio.sleep(0.01)
        await holder.release(first)
        await asyncio.gather(*tasks)
        assert order == list(range(6))
        assert await holder.waiters("fair") == 0

    run_with(backend, body)


def test_reentrant_for_the_same_owner(backend: Callable[[], LockBackend]) -> None:
    async def body(b: LockBackend) -> None:
        a, other = b.locks(), b.locks()
        async with a.lock("re", ttl_s=5) as outer:
            async with a.lock("re", ttl_s=5) as inner:
                assert inner == outer
                with pytest.raises(LockTimeoutError) as exc:
                    await other.acquire("re", timeout_s=0.2)
                assert exc.value.code == ErrorCode.UNAVAILABLE and "'re'" in exc.value.message
            assert await other.holder("re") == outer  # one exit of two: still held
            with pytest.raises(LockTimeoutError):
                await other.acquire("re", timeout_s=0.2)
            # an explicit owner re-enters across tasks too
            again = await asyncio.create_task(a.acquire("re", owner=outer.owner, timeout_s=1))
            assert again == outer
            await a.release(again)
        assert await other.holder("re") is None
        lease = await other.acquire("re", timeout_s=1)
        assert lease.fence > outer.fence
        await other.release(lease)

    run_with(backend, body)


def test_renewal_keeps_a_long_holder_past_its_ttl(backend: Callable[[], LockBackend]) -> None:
    async def body(b: LockBackend) -> None:
        a, other = b.locks(), b.locks()
        async with a.lock("long", ttl_s=0.3) as lease:
            with pytest.raises(LockTimeoutError):
                await other.acquire("long", timeout_s=1.2)
            assert await other.holder("long") == lease
            await a.renew(lease)
        got = await other.acquire("long", timeout_s=1)
        assert got.fence == lease.fence + 1
        await other.release(got)

    run_with(backend, body)


def test_a_holder_that_stops_renewing_is_released_after_its_ttl(backend: Callable[[], LockBackend]) -> None:
    async def body(b: LockBackend) -> None:
        dead, other = b.locks(), b.locks()
        lease = await dead.acquire("crash", ttl_s=0.4)
        dead.abandon()  # what a crash does: no renewal, no release
        t0 = time.monotonic()
        got = await other.acquire("crash", ttl_s=5, timeout_s=5)
        assert time.monotonic() - t0 < 4
        assert got.fence > lease.fence
        assert await other.holder("crash") == got
        # the dead holder's lease is refused now
        with pytest.raises(LockNotHeldError):
            await dead.renew(lease)
        with pytest.raises(LockNotHeldError) as exc:
            await dead.release(lease)
        assert exc.value.code == ErrorCode.CONFLICT
        assert await other.holder("crash") == got
        await other.release(got)

    run_with(backend, body)


def test_fences_strictly_increase_across_holders(backend: Callable[[], LockBackend]) -> None:
    async def body(b: LockBackend) -> None:
        nodes = [b.locks() for _ in range(3)]
        assert await nodes[0].fence("f") == 0
        fences = []
        for i in range(7):
            async with nodes[i % 3].lock("f", ttl_s=5) as lease:
                fences.append(lease.fence)
        assert all(x < y for x, y in itertools.pairwise(fences))
        assert await nodes[1].fence("f") == fences[-1]
        # another name has its own counter
        async with nodes[0].lock("g") as g:
            assert g.fence == await nodes[2].fence("g") >= 1
        assert await nodes[1].fence("f") == fences[-1]

    run_with(backend, body)


def test_release_by_a_non_owner_is_refused(backend: Callable[[], LockBackend]) -> None:
    async def body(b: LockBackend) -> None:
        a, other = b.locks(), b.locks()
        lease = await a.acquire("mine", ttl_s=5)
        for forged in (Lease("mine", "mallory", lease.fence), Lease("mine", lease.owner, lease.fence + 1)):
            with pytest.raises(LockNotHeldError):
                await other.release(forged)
            with pytest.raises(LockNotHeldError):
                await other.renew(forged)
        with pytest.raises(LockNotHeldError):
            await other.release(Lease("nobody-holds-this", "x", 1))
        assert await other.holder("mine") == lease
        await a.release(lease)
        with pytest.raises(LockNotHeldError):
            await a.release(lease)

    run_with(backend, body)


def test_a_cancelled_waiter_leaves_the_line(backend: Callable[[], LockBackend]) -> None:
    async def body(b: LockBackend) -> None:
        a, w1, w2 = b.locks(), b.locks(), b.locks()
        lease = await a.acquire("line", ttl_s=5)
        t1 = asyncio.create_task(w1.acquire("line", timeout_s=20))
        deadline = time.monotonic() + 5
        while await a.waiters("line") < 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        t2 = asyncio.create_task(w2.acquire("line", ttl_s=5, timeout_s=20))
        while await a.waiters("line") < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        t1.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t1
        assert await a.waiters("line") == 1
        await a.release(lease)
        got = await asyncio.wait_for(t2, 3)  # not held up by the cancelled one
        assert got.fence == lease.fence + 1
        await w2.release(got)

    run_with(backend, body)


def test_a_timed_out_waiter_leaves_the_line(backend: Callable[[], LockBackend]) -> None:
    async def body(b: LockBackend) -> None:
        a, w = b.locks(), b.locks()
        lease = await a.acquire("t", ttl_s=5)
        with pytest.raises(LockTimeoutError):
            await w.acquire("t", timeout_s=0.2)
        assert await a.waiters("t") == 0
        await a.release(lease)
        got = await w.acquire("t", timeout_s=0.5)
        await w.release(got)

    run_with(backend, body)


def test_the_body_is_cancelled_and_the_lock_released(backend: Callable[[], LockBackend]) -> None:
    async def body(b: LockBackend) -> None:
        a, other = b.locks(), b.locks()
        entered = asyncio.Event()

        async def hold() -> None:
            async with a.lock("c", ttl_s=5):
                entered.set()
                await asyncio.sleep(60)

        t = asyncio.create_task(hold())
        await entered.wait()
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        got = await other.acquire("c", timeout_s=1)
        await other.release(got)

    run_with(backend, body)


def test_backend_down_is_unavailable(backend: Callable[[], LockBackend]) -> None:
    async def body(b: LockBackend) -> None:
        lk = b.down()
        t0 = time.monotonic()
        with pytest.raises(UnavailableError) as exc:
            await lk.acquire("x", timeout_s=1)
        assert exc.value.code == ErrorCode.UNAVAILABLE
        assert not isinstance(exc.value, LockTimeoutError)
        assert time.monotonic() - t0 < 5
        with pytest.raises(UnavailableError):
            await lk.holder("x")

    run_with(backend, body)


def test_close_releases_what_an_instance_holds(backend: Callable[[], LockBackend]) -> None:
    async def body(b: LockBackend) -> None:
        a, other = b.locks(), b.locks()
        await a.acquire("k", ttl_s=30)
        await a.acquire("k", ttl_s=30)
        await a.close()
        got = await other.acquire("k", timeout_s=1)
        await other.release(got)
        with pytest.raises(UnavailableError):
            await a.acquire("k")

    run_with(backend, body)


def test_close_ends_the_instances_waiting_acquires(backend: Callable[[], LockBackend]) -> None:
    async def body(b: LockBackend) -> None:
        a, w = b.locks(), b.locks()
        lease = await a.acquire("w", ttl_s=5)
        t = asyncio.create_task(w.acquire("w", timeout_s=20))
        deadline = time.monotonic() + 5
        while await a.waiters("w") < 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        await w.close()
        with pytest.raises(UnavailableError):
            await asyncio.wait_for(t, 3)
        assert await a.waiters("w") == 0
        await a.release(lease)

    run_with(backend, body)


# --------------------------------------------------------------------------- composition


def test_memory_backends_share_locks_through_the_hub() -> None:
    async def main() -> None:
        hub = MemoryHub()
        one, two = memory_backends(hub), memory_backends(hub)
        lease = await one.locks.acquire("g:1")
        with pytest.raises(LockTimeoutError):
            await two.locks.acquire("g:1", timeout_s=0.05)
        await one.close()  # releases
        got = await two.locks.acquire("g:1", timeout_s=0.5)
        assert got.fence == lease.fence + 1
        await two.close()

    asyncio.run(main())


def test_redis_backends_have_redis_locks(redis_url: str) -> None:
    from gochat.cluster.backends import redis_backends
    from gochat.cluster.redis.locks import RedisLocks

    async def main() -> None:
        prefix = f"gtest:{uuid.uuid4().hex[:12]}:"
        backends: ClusterBackends = redis_backends(redis_url, prefix, registry_ttl_s=10, registry_renew_s=5)
        assert isinstance(backends.locks, RedisLocks)
        lease = await backends.locks.acquire("x")
        await backends.locks.release(lease)
        await backends.close()
        admin = aioredis.Redis.from_url(redis_url)
        keys = [k async for k in admin.scan_iter(match=f"{prefix}*")]
        if keys:
            await admin.delete(*keys)
        await admin.aclose()

    asyncio.run(main())


def test_a_dead_waiter_loses_its_place_after_the_waiter_ttl(redis_url: str) -> None:
    """A waiter whose process died (its ticket stays first in line) holds nobody up for long."""

    async def body(b: LockBackend) -> None:
        assert isinstance(b, RedisLockBackend)
        a, w = b.locks(), b.locks()
        lease = await a.acquire("q", ttl_s=5)
        admin = aioredis.Redis.from_url(redis_url)
        try:
            sec, usec = await admin.time()
            now_ms = sec * 1000 + usec // 1000
            await admin.zadd(f"{b.prefix}lockq:q", {"ghost|1": 0})
            await admin.zadd(f"{b.prefix}lockw:q", {"ghost|1": now_ms + 800})
        finally:
            await admin.aclose()
        assert await a.waiters("q") == 1
        await a.release(lease)
        with pytest.raises(LockTimeoutError):  # the ghost is first in line
            await w.acquire("q", timeout_s=0.3)
        got = await w.acquire("q", timeout_s=5)  # ... until its deadline passes
        assert await w.waiters("q") == 0
        await w.release(got)

    run_with(lambda: RedisLockBackend(redis_url), body)


def test_fences_keep_increasing_after_redis_loses_its_data(redis_url: str) -> None:
    """A restart without persistence loses the fence counter; the next one starts above it."""

    async def body(b: LockBackend) -> None:
        assert isinstance(b, RedisLockBackend)
        a = b.locks()
        async with a.lock("r") as first:
            admin = aioredis.Redis.from_url(redis_url)
            try:
                assert int(await admin.hget(f"{b.prefix}lock:r", "fence")) == first.fence
                assert int(await admin.get(f"{b.prefix}fence:r")) == first.fence
                await asyncio.sleep(0.01)
                await admin.delete(*[k async for k in admin.scan_iter(match=f"{b.prefix}*")])
            finally:
                await admin.aclose()
        async with a.lock("r") as second:
            assert second.fence > first.fence

    run_with(lambda: RedisLockBackend(redis_url), body)


# --------------------------------------------------------------------------- kill -9


_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from gochat.cluster.redis.locks import RedisLocks

    async def main():
        locks = RedisLocks(sys.argv[1], sys.argv[2])
        lease = await locks.acquire("victim", ttl_s=float(sys.argv[3]), timeout_s=10)
        print(lease.owner, lease.fence, flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


def test_a_holder_killed_with_sigkill_is_released_within_the_ttl(redis_url: str) -> None:
    ttl_s = 1.5

    async def body(b: LockBackend) -> None:
        assert isinstance(b, RedisLockBackend)
        proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, redis_url, b.prefix, str(ttl_s)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 20)
            assert line, proc.stderr.read() if proc.stderr else ""
            owner, fence = line.split()
            other = b.locks()
            # the child's watchdog keeps it held past its TTL
            await asyncio.sleep(ttl_s * 1.5)
            assert await other.holder("victim") == Lease("victim", owner, int(fence))
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            got = await other.acquire("victim", timeout_s=ttl_s + 10)
            assert got.fence > int(fence)
            await other.release(got)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)

    run_with(lambda: RedisLockBackend(redis_url), body)
