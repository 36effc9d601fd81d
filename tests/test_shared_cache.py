"""The shared (L2) cache seam (:mod:`gochat.cluster.shared_cache`): one behaviour suite run on
the memory hub and on a real Redis (its own key prefix per test, deleted afterwards), the
member-list codec, and the backends' composition.

Every ``cache()`` of one backend behaves like another node of one cluster (for Redis, another
client, as another process would have)."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
import redis
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gochat.cluster.backends import ClusterBackends, memory_backends
from gochat.cluster.memory import MemoryHub
from gochat.cluster.memory_cache import MemorySharedCache
from gochat.cluster.shared_cache import (
    MAX_ENTRY_BYTES,
    SharedCache,
    Versioned,
    fits,
    pack_members,
    unpack_members,
)
from gochat.errors import UnavailableError
from gochat.ids import MAX_ID
from tests.conftest import drop_redis_keys

T = TypeVar("T")
REDIS_URL = os.environ.get("GOCHAT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


class CacheBackend:
    name = "abstract"

    def __init__(self) -> None:
        self.made: list[Any] = []

    def _new(self) -> Any:
        raise NotImplementedError

    def cache(self) -> SharedCache:
        c = self._new()
        self.made.append(c)
        return c  # type: ignore[no-any-return]

    def down(self) -> SharedCache:
        """A cache over a backend that is unreachable."""
        raise NotImplementedError

    async def lose_data(self) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        for c in reversed(self.made):
            try:
                await c.close()
            except Exception:
                pass


class MemoryCacheBackend(CacheBackend):
    name = "memory"

    def __init__(self) -> None:
        super().__init__()
        self.hub = MemoryHub()

    def _new(self) -> Any:
        return MemorySharedCache(self.hub)

    def down(self) -> SharedCache:
        hub = MemoryHub()
        hub.available = False
        return MemorySharedCache(hub)

    async def lose_data(self) -> None:
        self.hub.lose_data()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisCacheBackend(CacheBackend):
    name = "redis"

    def __init__(self, url: str = REDIS_URL) -> None:
        super().__init__()
        from gochat.cluster.redis.cache import RedisSharedCache

        self._cls = RedisSharedCache
        self.url = url
        self.prefix = f"gtest:{uuid.uuid4().hex[:12]}:"

    def _new(self) -> Any:
        return self._cls(self.url, self.prefix, timeout_s=1.0)

    def down(self) -> SharedCache:
        c = self._cls(f"redis://127.0.0.1:{_free_port()}/0", self.prefix, timeout_s=0.3)
        self.made.append(c)
        return c

    async def _delete(self) -> None:
        await drop_redis_keys(self.url, self.prefix)

    async def lose_data(self) -> None:
        await self._delete()

    async def aclose(self) -> None:
        await super().aclose()
        await self._delete()


@pytest.fixture(scope="module")
def redis_url() -> str:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is required for the shared cache tests and is unreachable at {REDIS_URL}: {exc}")
    finally:
        client.close()
    return REDIS_URL


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> Callable[[], CacheBackend]:
    if request.param == "memory":
        return MemoryCacheBackend
    url = request.getfixturevalue("redis_url")
    return lambda: RedisCacheBackend(url)


def run_with(factory: Callable[[], CacheBackend], body: Callable[[CacheBackend], Awaitable[T]], timeout: float = 30) -> T:
    async def main() -> T:
        b = factory()
        try:
            async with asyncio.timeout(timeout):
                return await body(b)
        finally:
            await b.aclose()

    return asyncio.run(main())


# --------------------------------------------------------------------------- behaviour


def test_the_backends_are_shared_caches(backend: Callable[[], CacheBackend]) -> None:
    async def body(b: CacheBackend) -> None:
        assert isinstance(b.cache(), SharedCache)

    run_with(backend, body)


def test_versioned_entries_are_shared_by_every_node(backend: Callable[[], CacheBackend]) -> None:
    async def body(b: CacheBackend) -> None:
        one, two = b.cache(), b.cache()
        (absent,), now0 = await one.get_versioned("members", ["7"])
        assert absent is None and now0 > 0
        assert await one.put_versioned("members", "7", 3, b"\x01\x02", 60) is True
        (got,), now1 = await two.get_versioned("members", ["7"])
        assert got is not None and (got.version, got.data) == (3, b"\x01\x02")
        assert now0 <= got.stamp_us <= now1  # stamped with the backend's clock at the write
        entries, _ = await two.get_versioned("members", ["7", "8", "7"])
        assert [e.version if e else None for e in entries] == [3, None, 3]
        nothing, now2 = await two.get_versioned("members", [])
        assert nothing == [] and now2 >= now1

    run_with(backend, body)


async def _clock(c: SharedCache) -> int:
    return (await c.get_versioned("members", []))[1]


def test_an_older_version_never_replaces_a_newer_one(backend: Callable[[], CacheBackend]) -> None:
    async def body(b: CacheBackend) -> None:
        one, two = b.cache(), b.cache()
        assert await one.put_versioned("members", "1", 5, b"five", 60)
        assert await two.put_versioned("members", "1", 4, b"four", 60) is False
        assert await two.put_versioned("members", "1", 1, b"one", 60) is False
        (e,), _ = await one.get_versioned("members", ["1"])
        assert e is not None and (e.version, e.data) == (5, b"five")
        assert await two.put_versioned("members", "1", 6, b"six", 60) is True
        (e,), _ = await one.get_versioned("members", ["1"])
        assert e is not None and (e.version, e.data) == (6, b"six")

    run_with(backend, body)


def test_the_same_version_keeps_its_value_and_moves_the_stamp_forward(backend: Callable[[], CacheBackend]) -> None:
    async def body(b: CacheBackend) -> None:
        c = b.cache()
        now = await _clock(c)
        assert await c.put_versioned("members", "2", 1, b"a", 60, stamp_us=now)
        assert await c.put_versioned("members", "2", 1, b"other", 60, stamp_us=now + 500) is False
        (e,), _ = await c.get_versioned("members", ["2"])
        assert e == Versioned(1, now + 500, b"a")
        assert await c.put_versioned("members", "2", 1, b"a", 60, stamp_us=now - 10) is False
        (e,), _ = await c.get_versioned("members", ["2"])
        assert e == Versioned(1, now + 500, b"a")  # never backwards

    run_with(backend, body)


def test_write_once_entries_are_never_replaced(backend: Callable[[], CacheBackend]) -> None:
    async def body(b: CacheBackend) -> None:
        one, two = b.cache(), b.cache()
        assert await one.get("direct", "1:2") is None
        assert await one.put_once("direct", "1:2", b"42", 60) is True
        assert await two.put_once("direct", "1:2", b"43", 60) is False
        assert await two.get("direct", "1:2") == b"42"
        assert await two.put_once("user", "9", "zoë".encode(), 60) is True
        assert (await one.get("user", "9") or b"").decode() == "zoë"

    run_with(backend, body)


def test_entries_expire_after_their_ttl(backend: Callable[[], CacheBackend]) -> None:
    async def body(b: CacheBackend) -> None:
        c = b.cache()
        await c.put_versioned("members", "3", 1, b"x", 0.05)
        await c.put_once("user", "3", b"x", 0.05)
        await c.put_versioned("members", "4", 1, b"y", 60)
        await asyncio.sleep(0.15)
        entries, _ = await c.get_versioned("members", ["3", "4"])
        assert entries[0] is None and entries[1] is not None
        assert await c.get("user", "3") is None
        # an expired entry does not hold back an older version any more
        assert await c.put_versioned("members", "3", 1, b"again", 60) is True

    run_with(backend, body)


def test_a_write_of_the_same_version_restarts_the_ttl(backend: Callable[[], CacheBackend]) -> None:
    async def body(b: CacheBackend) -> None:
        c = b.cache()
        await c.put_versioned("members", "5", 2, b"x", 0.2)
        await asyncio.sleep(0.12)
        assert await c.put_versioned("members", "5", 2, b"x", 0.2) is False
        await asyncio.sleep(0.12)  # 0.24 s after the first write
        (e,), _ = await c.get_versioned("members", ["5"])
        assert e is not None and e.data == b"x"

    run_with(backend, body)


def test_one_entry_holds_at_most_max_entry_bytes(backend: Callable[[], CacheBackend]) -> None:
    async def body(b: CacheBackend) -> None:
        c = b.cache()
        assert await c.put_versioned("members", "big", 1, b"\x00" * MAX_ENTRY_BYTES, 60) is True
        (e,), _ = await c.get_versioned("members", ["big"])
        assert e is not None and len(e.data) == MAX_ENTRY_BYTES
        with pytest.raises(ValueError):
            await c.put_versioned("members", "bigger", 1, b"\x00" * (MAX_ENTRY_BYTES + 1), 60)
        with pytest.raises(ValueError):
            await c.put_once("user", "1", b"\x00" * (MAX_ENTRY_BYTES + 1), 60)
        with pytest.raises(ValueError):
            await c.put_once("bad:space", "1", b"x", 60)

    run_with(backend, body)


def test_a_backend_that_lost_its_data_holds_nothing(backend: Callable[[], CacheBackend]) -> None:
    async def body(b: CacheBackend) -> None:
        c = b.cache()
        await c.put_versioned("members", "1", 9, b"x", 60)
        await c.put_once("direct", "1:1", b"5", 60)
        await b.lose_data()
        assert (await c.get_versioned("members", ["1"]))[0] == [None]
        assert await c.get("direct", "1:1") is None
        assert await c.put_versioned("members", "1", 1, b"y", 60) is True  # versions start over

    run_with(backend, body)


def test_backend_down_is_unavailable(backend: Callable[[], CacheBackend]) -> None:
    async def body(b: CacheBackend) -> None:
        c = b.down()
        with pytest.raises(UnavailableError):
            await c.get_versioned("members", ["1"])
        with pytest.raises(UnavailableError):
            await c.put_versioned("members", "1", 1, b"x", 60)
        with pytest.raises(UnavailableError):
            await c.get("user", "1")
        with pytest.raises(UnavailableError):
            await c.put_once("user", "1", b"x", 60)

    run_with(backend, body)


def test_concurrent_writers_leave_the_newest_version(backend: Callable[[], CacheBackend]) -> None:
    """Four nodes write versions 1..40 of one key at once, in shuffled order: the entry ends at
    40 with its value, and no reader ever sees the version go down."""

    async def body(b: CacheBackend) -> None:
        nodes = [b.cache() for _ in range(4)]
        versions = list(range(1, 41))
        random.Random(3).shuffle(versions)
        seen: list[int] = []

        async def reader() -> None:
            for _ in range(30):
                (e,), _ = await nodes[0].get_versioned("members", ["k"])
                if e is not None:
                    seen.append(e.version)
                await asyncio.sleep(0)

        await asyncio.gather(
            reader(),
            *(nodes[i % 4].put_versioned("members", "k", v, b"v%d" % v, 60) for i, v in enumerate(versions)),
        )
        (e,), _ = await nodes[1].get_versioned("members", ["k"])
        assert e is not None and (e.version, e.data) == (40, b"v40")
        assert seen == sorted(seen)

    run_with(backend, body)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 12), st.booleans()), min_size=1, max_size=25))
def test_property_no_write_order_lets_an_older_version_win(
    backend: Callable[[], CacheBackend], writes: list[tuple[int, int, bool]]
) -> None:
    """Any sequence of writes (node, version, concurrent with the previous one or not) on
    any backend: after each step the entry holds the highest version written so far, with
    that version's value (the first value written at it)."""

    async def body(b: CacheBackend) -> None:
        nodes = [b.cache() for _ in range(4)]
        best = 0
        pending: list[Awaitable[bool]] = []
        for node, version, concurrent in writes:
            pending.append(nodes[node].put_versioned("members", "p", version, b"%d" % version, 60))
            if not concurrent:
                await asyncio.gather(*pending)
                pending.clear()
            best = max(best, version)
            if not pending:
                (e,), _ = await nodes[(node + 1) % 4].get_versioned("members", ["p"])
                assert e is not None and (e.version, e.data) == (best, b"%d" % best)
        await asyncio.gather(*pending)
        (e,), _ = await nodes[0].get_versioned("members", ["p"])
        assert e is not None and (e.version, e.data) == (best, b"%d" % best)

    run_with(backend, body)


# --------------------------------------------------------------------------- codec, bounds, composition


def test_member_lists_pack_as_u64_little_endian() -> None:
    members = (1, 2, 300, MAX_ID)
    data = pack_members(members)
    assert data == b"".join(m.to_bytes(8, "little") for m in members)
    assert unpack_members(data) == members
    assert unpack_members(pack_members(())) == ()
    with pytest.raises(ValueError):
        unpack_members(b"\x00" * 7)
    assert fits(pack_members(range(MAX_ENTRY_BYTES // 8)))
    assert not fits(pack_members(range(MAX_ENTRY_BYTES // 8 + 1)))


def test_the_memory_table_is_bounded_oldest_first() -> None:
    async def main() -> None:
        hub = MemoryHub()
        c = MemorySharedCache(hub, max_entries=3, max_bytes=10)
        for i in range(5):
            await c.put_once("user", str(i), b"ab", 60)
        assert list(hub.shared_cache) == ["user:2", "user:3", "user:4"]
        assert hub.shared_cache_bytes == 6
        await c.put_versioned("members", "1", 1, b"12345678", 60)  # 8 bytes: the oldest go
        assert list(hub.shared_cache) == ["user:4", "members:1"] and hub.shared_cache_bytes == 10
        await c.put_versioned("members", "1", 2, b"1234", 60)  # replaced: its bytes counted once
        assert hub.shared_cache_bytes == 6

    asyncio.run(main())


def test_memory_backends_share_the_cache_through_the_hub() -> None:
    async def main() -> None:
        hub = MemoryHub()
        one, two = memory_backends(hub), memory_backends(hub)
        assert isinstance(one.cache, MemorySharedCache)
        await one.cache.put_once("user", "1", b"ann", 60)
        assert await two.cache.get("user", "1") == b"ann"
        alone = memory_backends()
        assert await alone.cache.get("user", "1") is None
        default = ClusterBackends(one.broker, one.presence, one.registry, one.jobs)
        assert isinstance(default.cache, MemorySharedCache) and default.cache.hub is not hub
        for b in (one, two, alone):
            await b.close()

    asyncio.run(main())


def test_redis_backends_have_a_redis_shared_cache(redis_url: str) -> None:
    from gochat.cluster.backends import redis_backends
    from gochat.cluster.redis.cache import RedisSharedCache

    async def main() -> None:
        prefix = f"gtest:{uuid.uuid4().hex[:12]}:"
        backends = redis_backends(redis_url, prefix, registry_ttl_s=10, registry_renew_s=5)
        assert isinstance(backends.cache, RedisSharedCache)
        await backends.cache.put_versioned("members", "12", 4, pack_members((1, 2)), 600)
        await backends.cache.put_once("direct", "1:2", b"77", 86400)
        admin = aioredis.Redis.from_url(redis_url)
        try:
            raw = await admin.hgetall(f"{prefix}cache:members:12")
            assert raw[b"v"] == b"4" and unpack_members(raw[b"d"]) == (1, 2) and int(raw[b"t"]) > 1.6e15
            assert 590_000 < await admin.pttl(f"{prefix}cache:members:12") <= 600_000
            assert await admin.get(f"{prefix}cache:direct:1:2") == b"77"
            assert 86_000_000 < await admin.pttl(f"{prefix}cache:direct:1:2") <= 86_400_000
        finally:
            await backends.close()
            await admin.aclose()
            await drop_redis_keys(REDIS_URL, prefix)

    asyncio.run(main())
