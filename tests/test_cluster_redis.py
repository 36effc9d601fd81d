"""Cluster seams on a real Redis (no mocks), plus the same behaviour suites on the memory hub.

The shared server comes from ``GOCHAT_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``);
every test uses its own key prefix and deletes its keys afterwards (never FLUSHALL). When the
server is unreachable the Redis tests fail; they are never skipped. Restart tests run a private
``redis-server`` on a free port, kill it and start it again on the same port.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
import redis
import redis.asyncio as aioredis

from gochat.cluster.base import Broker, JobQueue, Presence, Registry
from gochat.cluster.redis import RedisBroker, RedisJobQueue, RedisPresence, RedisRegistry, connect
from gochat.errors import UnavailableError
from tests.conftest import restartable_port

try:
    from tests.cluster_behaviour import (
        Backend,
        BackendFactory,
        BrokerBehaviour,
        JobQueueBehaviour,
        MemoryBackend,
        PresenceBehaviour,
        RegistryBehaviour,
        eventually,
        node,
        run_with,
    )
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from cluster_behaviour import (  # type: ignore[no-redef,import-not-found]
        Backend,
        BackendFactory,
        BrokerBehaviour,
        JobQueueBehaviour,
        MemoryBackend,
        PresenceBehaviour,
        RegistryBehaviour,
        eventually,
        node,
        run_with,
    )

T = TypeVar("T")
REDIS_URL = os.environ.get("GOCHAT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


async def delete_prefix(client: aioredis.Redis, prefix: str) -> int:
    """Delete every key under ``prefix`` (SCAN, never FLUSH*)."""
    n = 0
    batch: list[bytes] = []
    async for key in client.scan_iter(match=f"{prefix}*", count=1000):
        batch.append(key)
        if len(batch) >= 500:
            n += await client.delete(*batch)
            batch.clear()
    if batch:
        n += await client.delete(*batch)
    return n


class RedisBackend(Backend):
    """Every instance gets its own client (like separate node processes) under one prefix."""

    name = "redis"

    def __init__(self, url: str = REDIS_URL, prefix: str | None = None) -> None:
        super().__init__()
        self.url = url
        self.prefix = prefix or f"gtest:{uuid.uuid4().hex[:12]}:"
        self.admin = connect(url)

    def registry(self, *, ttl_s: float = 10.0, renew_s: float = 5.0) -> Registry:
        return self._track(RedisRegistry(self.url, self.prefix, ttl_s=ttl_s, renew_s=renew_s))

    def broker(self) -> Broker:
        return self._track(RedisBroker(self.url, self.prefix))

    def presence(self, *, node_ttl_s: float = 90.0) -> Presence:
        return self._track(RedisPresence(self.url, self.prefix, node_ttl_s=node_ttl_s))

    def jobs(self, *, claim_idle_ms: int = 30_000, max_deliveries: int = 16, **kw: Any) -> JobQueue:
        return self._track(
            RedisJobQueue(self.url, self.prefix, claim_idle_ms=claim_idle_ms, max_deliveries=max_deliveries, **kw)
        )

    async def lose_data(self) -> None:
        await delete_prefix(self.admin, self.prefix)

    async def keys(self) -> list[str]:
        return sorted([k.decode() async for k in self.admin.scan_iter(match=f"{self.prefix}*")])

    async def aclose(self) -> None:
        await super().aclose()
        try:
            await delete_prefix(self.admin, self.prefix)
        finally:
            await self.admin.aclose()


@pytest.fixture(scope="session")
def redis_url() -> str:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is required for the cluster tests and is unreachable at {REDIS_URL}: {exc}")
    finally:
        client.close()
    return REDIS_URL


@pytest.fixture(params=["memory", "redis"])
def backend_factory(request: pytest.FixtureRequest) -> BackendFactory:
    if request.param == "memory":
        return MemoryBackend
    url = request.getfixturevalue("redis_url")
    return lambda: RedisBackend(url)


class TestRegistry(RegistryBehaviour):
    pass


class TestBroker(BrokerBehaviour):
    pass


class TestPresence(PresenceBehaviour):
    pass


class TestJobQueue(JobQueueBehaviour):
    pass


# --------------------------------------------------------------------------- private server


class RedisServer:
    """A private ``redis-server`` without persistence (a restart loses every key)."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is required for the restart tests and is not on PATH")
        self.binary = binary
        self.port = restartable_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                c = redis.Redis(port=self.port, socket_connect_timeout=0.2)
                try:
                    if c.ping():
                        return
                finally:
                    c.close()
            except redis.RedisError:
                time.sleep(0.02)
        pytest.fail(f"private redis-server did not start on port {self.port}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    async def restart_after(self, down_s: float) -> None:
        self.kill()
        await asyncio.sleep(down_s)
        self.start()


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.kill()


def run_redis(body: Callable[[RedisBackend], Awaitable[T]], url: str = REDIS_URL, timeout: float = 30.0) -> T:
    return run_with(lambda: RedisBackend(url), body, timeout)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- registry


def test_registry_keys_ttl_and_index(redis_url: str) -> None:
    async def body(b: RedisBackend) -> None:
        r = b.registry(ttl_s=3, renew_s=1)
        await r.register(node("n1"))
        assert await b.keys() == [f"{b.prefix}node:n1", f"{b.prefix}nodes"]
        pttl = await b.admin.pttl(f"{b.prefix}node:n1")
        assert 2000 < pttl <= 3000
        assert await b.admin.zrange(f"{b.prefix}nodes", 0, -1) == [b"n1"]
        await r.deregister()
        assert await b.keys() == []

    run_redis(body)


def test_registry_stale_index_entries_are_cleaned(redis_url: str) -> None:
    async def body(b: RedisBackend) -> None:
        await b.admin.zadd(f"{b.prefix}nodes", {"ghost": 1})
        await b.registry().register(node("n1"))
        assert [n.node_id for n in await b.registry().nodes()] == ["n1"]
        assert await b.admin.zrange(f"{b.prefix}nodes", 0, -1) == [b"n1"]

    run_redis(body)


def test_registry_registers_again_after_its_keys_vanish(redis_url: str) -> None:
    async def body(b: RedisBackend) -> None:
        r = b.registry(ttl_s=5, renew_s=0.5)
        await r.register(node("n1"))
        observer = b.registry()
        assert await delete_prefix(b.admin, b.prefix) == 2  # what a FLUSHDB would do to us
        assert await observer.nodes() == []
        t0 = time.monotonic()
        await eventually(lambda: b.admin.exists(f"{b.prefix}node:n1"), 2.0, what="re-registered")
        assert time.monotonic() - t0 < 1.0  # within one renew interval
        assert [n.node_id for n in await observer.nodes()] == ["n1"]
        assert await b.admin.zrange(f"{b.prefix}nodes", 0, -1) == [b"n1"]

    run_redis(body)


def test_registry_survives_a_redis_restart(private_redis: RedisServer) -> None:
    async def body(b: RedisBackend) -> None:
        r = b.registry(ttl_s=5, renew_s=0.2)
        await r.register(node("n1"))
        seen: list[list[str]] = []
        watcher = b.registry(ttl_s=5, renew_s=0.2)
        watcher.watch(lambda nodes: seen.append([n.node_id for n in nodes]))
        await eventually(lambda: seen == [["n1"]], what="initial")
        await private_redis.restart_after(0.5)
        await eventually(lambda: b.admin.exists(f"{b.prefix}node:n1"), 5.0, what="re-registered")
        assert [n.node_id for n in await watcher.nodes()] == ["n1"]
        private_redis.kill()
        with pytest.raises(UnavailableError):
            await watcher.nodes()
        private_redis.start()

    run_redis(body, private_redis.url)


# --------------------------------------------------------------------------- broker


def test_broker_resubscribes_after_redis_restart(private_redis: RedisServer) -> None:
    async def body(b: RedisBackend) -> None:
        inbox: dict[str, list[bytes]] = {"n1": [], "n2": []}
        b1, b2 = RedisBroker(private_redis.url, b.prefix, ping_s=1), RedisBroker(private_redis.url, b.prefix)
        b._track(b1)
        b._track(b2)
        await b1.start("n1", inbox["n1"].append)
        await b2.start("n2", inbox["n2"].append)
        await b1.send_to_node("n2", b"before")
        await eventually(lambda: inbox["n2"] == [b"before"], what="first delivery")

        private_redis.kill()
        t0 = time.monotonic()
        with pytest.raises(UnavailableError):
            await b1.send_to_node("n2", b"while down")
        with pytest.raises(UnavailableError):
            await b2.broadcast(b"while down")
        assert time.monotonic() - t0 < 6.0  # bounded, never hangs
        await asyncio.sleep(0.3)
        private_redis.start()

        await eventually(lambda: b1.resubscribes >= 1 and b2.resubscribes >= 1, 10.0, what="re-subscribe")
        await b2.send_to_node("n1", b"after")
        await b1.broadcast(b"all after")
        await eventually(lambda: len(inbox["n1"]) == 2 and len(inbox["n2"]) == 2, what="deliveries after restart")
        assert inbox["n1"] == [b"after", b"all after"]
        assert inbox["n2"] == [b"before", b"all after"]

    run_redis(body, private_redis.url)


def test_broker_start_fails_fast_without_redis() -> None:
    async def main() -> None:
        broker = RedisBroker(f"redis://127.0.0.1:{restartable_port()}/0", "x:", timeout_s=0.5)
        t0 = time.monotonic()
        with pytest.raises(UnavailableError):
            await broker.start("n1", lambda _p: None)
        with pytest.raises(UnavailableError):
            await broker.send_to_node("n1", b"x")
        assert time.monotonic() - t0 < 5
        await broker.close()

    asyncio.run(main())


# --------------------------------------------------------------------------- presence


def test_presence_key_layout_and_cleanup(redis_url: str) -> None:
    async def body(b: RedisBackend) -> None:
        p = b.presence()
        lease = await p.session_up(9, "A", 1)
        assert await b.admin.hgetall(f"{b.prefix}p:9") == {b"A:1": str(lease.epoch).encode()}
        assert await b.admin.smembers(f"{b.prefix}n:A") == {b"9"}
        assert await b.admin.get(f"{b.prefix}epoch:9") == str(lease.epoch).encode()
        assert 0 < await b.admin.ttl(f"{b.prefix}epoch:9")
        assert 0 < await b.admin.pttl(f"{b.prefix}pn:A")
        assert await p.session_down(9, "A", 1, lease.epoch)
        assert await b.admin.exists(f"{b.prefix}p:9", f"{b.prefix}n:A") == 0
        await p.session_up(9, "A", 2)
        assert await p.drop_node("A") == [9]
        assert await b.keys() == [f"{b.prefix}epoch:9"]

    run_redis(body)


def test_presence_ignores_nodes_whose_liveness_expired(redis_url: str) -> None:
    async def body(b: RedisBackend) -> None:
        pa = b.presence(node_ttl_s=0.4)
        pb = b.presence(node_ttl_s=30)
        await pa.session_up(1, "A", 1)
        await pa.session_up(2, "A", 2)
        await pb.session_up(2, "B", 3)
        await asyncio.sleep(0.6)  # the heartbeat keeps A alive past its TTL
        assert await pb.nodes_for([1, 2]) == {"A": [1, 2], "B": [2]}
        await pa.close()  # node A crashes: no drop_node yet
        await eventually(lambda: _eq(pb.nodes_for([1, 2]), {"B": [2]}), 2.0, what="A ignored")
        assert await pb.online([1, 2]) == {1: False, 2: True}
        assert await pb.session_up(1, "B", 4)  # A's leftover does not count: came online
        assert await pb.session_down(2, "B", 3) is True  # only A's dead session is left
        assert sorted(await pb.drop_node("A")) == [2]  # cleans up for good
        assert await b.admin.exists(f"{b.prefix}n:A", f"{b.prefix}p:2") == 0

    run_redis(body)


def test_presence_drop_node_works_through_many_chunks(redis_url: str) -> None:
    async def body(b: RedisBackend) -> None:
        janitor = b._track(RedisPresence(b.url, b.prefix, chunk=7))
        pa, pb = b.presence(), b.presence()
        for u in range(100):
            await pa.session_up(u, "A", 1000 + u)
        for u in range(0, 100, 4):
            await pb.session_up(u, "B", 2000 + u)
        offline = await janitor.drop_node("A")
        assert offline == [u for u in range(100) if u % 4]
        assert await janitor.nodes_for(range(100)) == {"B": list(range(0, 100, 4))}
        assert await b.admin.exists(f"{b.prefix}n:A", f"{b.prefix}pn:A") == 0

    run_redis(body)


def test_clients_with_decoded_responses_are_refused(redis_url: str) -> None:
    async def main() -> None:
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            for cls in (RedisRegistry, RedisBroker, RedisPresence, RedisJobQueue):
                with pytest.raises(ValueError):
                    cls(client, "x:")
        finally:
            await client.aclose()

    asyncio.run(main())


async def _eq(coro: Awaitable[Any], value: Any) -> bool:
    return bool(await coro == value)


# --------------------------------------------------------------------------- job queue


def test_jobs_duplicate_delivery_of_finished_job_is_skipped(redis_url: str) -> None:
    async def body(b: RedisBackend) -> None:
        runs: list[str] = []

        async def handler(job_id: str, payload: bytes) -> None:
            runs.append(job_id)

        q = b.jobs()
        await q.consume("s", "g", "c1", handler)
        await q.enqueue("s", "j1", b"x")
        await eventually(lambda: runs == ["j1"], what="first run")
        # a second copy of the same job reaches the stream behind the enqueue dedupe
        await b.admin.xadd(f"{b.prefix}jobs:s", {"id": "j1", "p": b"x"})
        await q.enqueue("s", "j2", b"y")
        await eventually(lambda: runs == ["j1", "j2"], what="second job")
        await eventually(lambda: _pending_count(b, "s", "g", 0), what="all acknowledged")
        assert await b.admin.hgetall(f"{b.prefix}job:s:j1") == {b"_": b"q", b"g": b"d"}

    run_redis(body)


async def _pending_count(b: RedisBackend, stream: str, group: str, n: int) -> bool:
    info = await b.admin.xpending(f"{b.prefix}jobs:{stream}", group)
    return bool(info["pending"] == n)


def test_jobs_dead_letters(redis_url: str) -> None:
    async def body(b: RedisBackend) -> None:
        async def always_fails(job_id: str, payload: bytes) -> None:
            raise ValueError(f"bad {job_id}")

        q = b.jobs(claim_idle_ms=100, max_deliveries=2)
        assert isinstance(q, RedisJobQueue)
        await q.consume("s", "g", "c1", always_fails)
        await q.enqueue("s", "poison", b"\x00payload")
        await eventually(lambda: q.dead_letters("s"), 5.0, what="dead letter")
        assert await q.dead_letters("s") == [("poison", b"\x00payload", "ValueError('bad poison')")]
        await eventually(lambda: _pending_count(b, "s", "g", 0), what="acknowledged")

    run_redis(body)


def test_jobs_stream_length_is_bounded(redis_url: str) -> None:
    async def body(b: RedisBackend) -> None:
        q = b.jobs(maxlen=500)
        for start in range(0, 3000, 250):
            await asyncio.gather(*(q.enqueue("big", f"j{i}", b"x") for i in range(start, start + 250)))
        length = await b.admin.xlen(f"{b.prefix}jobs:big")
        assert 500 <= length < 800

    run_redis(body)


def test_jobs_consumer_survives_a_redis_restart(private_redis: RedisServer) -> None:
    async def body(b: RedisBackend) -> None:
        runs: list[str] = []

        async def handler(job_id: str, payload: bytes) -> None:
            runs.append(job_id)

        q = b.jobs(claim_idle_ms=300)
        await q.consume("s", "g", "c1", handler)
        await q.enqueue("s", "before", b"x")
        await eventually(lambda: runs == ["before"], what="first job")
        await private_redis.restart_after(0.5)  # the restart loses stream and group
        producer = b.jobs()

        async def enqueue_after() -> bool:
            try:
                await producer.enqueue("s", "after", b"y")
                return True
            except UnavailableError:
                return False

        await eventually(enqueue_after, 5.0, what="enqueue after restart")
        await eventually(lambda: runs == ["before", "after"], 8.0, what="job after restart")

    run_redis(body, private_redis.url)
