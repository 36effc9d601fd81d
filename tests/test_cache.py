"""The L1 cache (gochat/messaging/cache.py) and its use in Addressing: version ordering (a
property test), bounds with a million distinct keys, TTL, single flight, batch invalidation and
the /metrics families."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gochat.errors import ErrorCode, RequestError
from gochat.messaging import cache as cache_mod
from gochat.messaging.addressing import Addressing
from gochat.messaging.cache import ENTRY_OVERHEAD, HOT_SAMPLE, VersionedCache
from gochat.observability.metrics import Metrics
from gochat.protocol import Kind
from tests.conftest import run


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[Clock]:
    c = Clock()
    monkeypatch.setattr(cache_mod, "_monotonic", c)
    yield c


# ---- version ordering ----------------------------------------------------------------------------
KEYS = st.integers(0, 7)
VERSIONS = st.integers(0, 20)
OPS = st.one_of(
    st.tuples(st.just("put"), KEYS, VERSIONS, st.integers(0, 3)),  # (op, key, version, size class)
    st.tuples(st.just("invalidate"), KEYS, VERSIONS),
    st.tuples(st.just("get"), KEYS),
    st.tuples(st.just("tick"), st.floats(0, 40)),
    st.tuples(st.just("clear")),
    st.tuples(st.just("drop_odd")),
)


@settings(max_examples=400, deadline=None)
@given(ops=st.lists(OPS, max_size=80), max_entries=st.integers(1, 5), max_bytes=st.integers(ENTRY_OVERHEAD, 1500))
def test_an_older_version_never_wins(ops: list[tuple[Any, ...]], max_entries: int, max_bytes: int) -> None:
    """Any interleaving of puts, invalidations, reads, expiry, clears and evictions: a read
    never returns a value older than the newest version the cache was told about, and
    ``version(key)`` is that newest version (the tombstones hold every key here)."""
    clock = Clock()
    saved = cache_mod._monotonic
    cache_mod._monotonic = clock
    try:
        c: VersionedCache[int, tuple[int, int, int]] = VersionedCache(
            "p", max_entries=max_entries, max_bytes=max_bytes, ttl_s=30, size=lambda v: v[2], max_tombstones=8
        )
        newest: dict[int, int] = {}
        for op in ops:
            if op[0] == "put":
                _, k, v, size_class = op
                c.put(k, (k, v, size_class * 400), v)
                newest[k] = max(newest.get(k, 0), v)
            elif op[0] == "invalidate":
                _, k, v = op
                c.invalidate(k, v)
                newest[k] = max(newest.get(k, 0), v)
            elif op[0] == "get":
                got = c.get(op[1])
                if got is not None:
                    assert got[0] == op[1]
                    assert got[1] >= newest.get(op[1], 0), (got, newest)
            elif op[0] == "tick":
                clock.now += op[1]
            elif op[0] == "clear":
                c.clear()
            else:
                c.invalidate_where(lambda k, _v: k % 2 == 1)
            assert len(c) <= max_entries
            assert c.bytes <= max_bytes
            assert c.bytes == sum(e.size for e in c._data.values())
            for k in range(8):
                assert c.version(k) == newest.get(k, 0)
                peeked = c.peek(k)
                assert peeked is None or peeked[1] == newest[k]
    finally:
        cache_mod._monotonic = saved


def test_versions_basic() -> None:
    c: VersionedCache[int, str] = VersionedCache("v", max_entries=10, max_bytes=1 << 20, ttl_s=60)
    assert c.put(1, "v3", 3)
    assert not c.put(1, "v2", 2)  # older: ignored
    assert c.get(1) == "v3"
    assert not c.invalidate(1, 3)  # not newer than what is held
    assert c.invalidate(1, 4)
    assert c.get(1) is None and c.version(1) == 4
    assert not c.put(1, "v3 read late", 3)  # a lookup that raced with the change
    assert c.get(1) is None
    assert c.put(1, "v4", 4)  # the version of the change itself is current
    assert c.get(1) == "v4"
    assert not c.invalidate(1, 2)  # an old event replayed changes nothing
    assert c.get(1) == "v4"


# ---- bounds --------------------------------------------------------------------------------------
def test_a_million_distinct_keys_stay_within_the_bounds() -> None:
    """1M distinct conversations touched (put, then read back some): entries, bytes and
    tombstones stay within their bounds all along; evictions are counted by reason."""
    max_entries, max_bytes = 50_000, 8 << 20
    c: VersionedCache[int, tuple[int, ...]] = VersionedCache(
        "bound", max_entries=max_entries, max_bytes=max_bytes, ttl_s=3600, size=lambda m: 56 + 40 * len(m)
    )
    small, large = (1, 2, 3), tuple(range(200))  # 176 and 8,056 bytes + overhead
    for i in range(1_000_000):
        c.put(i, large if i % 64 == 0 else small, i & 7)
        if i % 3 == 0:
            c.get(i - 1000)
        if i % 10_000 == 0:
            assert len(c) <= max_entries and c.bytes <= max_bytes
            assert len(c._tombs) <= c.max_tombstones
    assert len(c) <= max_entries and c.bytes <= max_bytes
    assert c.bytes == sum(e.size for e in c._data.values())
    assert len(c._tombs) <= c.max_tombstones
    assert c.evicted_size + c.evicted_bytes == 1_000_000 - len(c)
    assert c.evicted_bytes > 0  # the byte bound was the binding one part of the time
    assert c.hits > 0


def test_addressing_caches_stay_bounded() -> None:
    """Through Addressing: many distinct direct conversations and groups, small bounds."""

    class Store:
        async def direct_conversation(self, a: int, b: int) -> int:
            return a * 1_000_000 + b

        async def conversation_kind(self, conv: int) -> int:
            return int(Kind.GROUP)

        async def members_versioned(self, conv: int) -> tuple[int, tuple[int, ...]]:
            return 1, tuple(range(conv % 50 + 1))

    async def body() -> None:
        a = Addressing(Store(), max_entries=1000, members_max_bytes=100_000)  # type: ignore[arg-type]
        for peer in range(2, 20_002):
            assert await a.direct(1, peer) == 1_000_000 + peer
        for conv in range(1, 5001):
            await a.group_members(conv)
        assert len(a.direct_cache) <= 1000
        assert len(a.members_cache) <= 1000 and a.members_cache.bytes <= 100_000
        assert a.direct_cache.evicted_size == 20_000 - len(a.direct_cache)
        assert a.members_cache.evicted_bytes > 0

    run(body())


def test_second_chance_keeps_a_hot_key() -> None:
    c: VersionedCache[int, int] = VersionedCache("h", max_entries=100, max_bytes=1 << 20, ttl_s=60)
    c.put(0, 0, 0)
    for i in range(1, 10_000):
        c.put(i, i, 0)
        assert c.get(0) == 0  # read between insertions: never evicted
    assert len(c) == 100


def test_a_value_larger_than_the_byte_bound_is_not_cached() -> None:
    c: VersionedCache[int, bytes] = VersionedCache(
        "b", max_entries=10, max_bytes=1000, ttl_s=60, size=len, max_tombstones=10
    )
    assert c.put(1, b"x", 1)
    assert not c.put(1, b"x" * 2000, 2)
    assert c.get(1) is None and c.version(1) == 2 and c.bytes == 0
    assert not c.put(1, b"y", 1)  # still older than what it was told


# ---- TTL -----------------------------------------------------------------------------------------
def test_an_entry_expires_after_its_ttl(clock: Clock) -> None:
    c: VersionedCache[int, str] = VersionedCache("t", max_entries=10, max_bytes=1 << 20, ttl_s=5)
    c.put(1, "a", 7)
    clock.now += 4.9
    assert c.get(1) == "a"
    clock.now += 0.2
    assert c.get(1) is None
    assert c.evicted_ttl == 1 and len(c) == 0 and c.bytes == 0
    assert c.version(1) == 7  # an expired entry's version is still known
    assert not c.put(1, "older", 6)
    c.put(2, "b", 0)
    c.put(3, "c", 0)
    clock.now += 10
    c.put(4, "d", 0)
    assert len(c) == 3
    c.max_entries = 1
    c.put(5, "e", 0)  # eviction finds 2, 3, 4 expired
    assert c.evicted_ttl == 3 and len(c) == 1


# ---- single flight -------------------------------------------------------------------------------
def test_concurrent_misses_share_one_load() -> None:
    async def body() -> None:
        c: VersionedCache[int, str] = VersionedCache("s", max_entries=10, max_bytes=1 << 20, ttl_s=60)
        calls = 0
        gate = asyncio.Event()

        async def load() -> tuple[int, str]:
            nonlocal calls
            calls += 1
            await gate.wait()
            return 1, "loaded"

        waiters = [asyncio.ensure_future(c.get_or_load(1, load)) for _ in range(20)]
        await asyncio.sleep(0)
        waiters[0].cancel()  # a cancelled waiter does not cancel the shared load
        await asyncio.sleep(0)
        gate.set()
        results = await asyncio.gather(*waiters[1:])
        assert results == ["loaded"] * 19 and calls == 1
        assert (c.misses, c.loads, c.hits) == (20, 1, 0)
        assert await c.get_or_load(1, load) == "loaded" and calls == 1 and c.hits == 1
        assert c.load_seconds > 0

        async def fail() -> tuple[int, str]:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0)
            raise RequestError("no such group", code=ErrorCode.NOT_FOUND)

        calls = 0
        failed = await asyncio.gather(*(c.get_or_load(2, fail) for _ in range(5)), return_exceptions=True)
        assert calls == 1 and all(isinstance(e, RequestError) for e in failed)
        assert c.get(2) is None and not c._inflight  # errors are not cached

    run(body())


def test_a_load_overtaken_by_an_invalidation_is_not_cached() -> None:
    """A load reads version 1; a change at version 2 arrives while it runs: its waiters get
    what it read, nothing is cached, and a lookup after the change starts a fresh load."""

    async def body() -> None:
        c: VersionedCache[int, str] = VersionedCache("r", max_entries=10, max_bytes=1 << 20, ttl_s=60)
        gate = asyncio.Event()
        versions = iter([(1, "v1"), (2, "v2")])

        async def load() -> tuple[int, str]:
            read = next(versions)
            await gate.wait()
            return read

        first = asyncio.ensure_future(c.get_or_load(7, load))
        await asyncio.sleep(0)
        assert c.invalidate(7, 2)
        second = asyncio.ensure_future(c.get_or_load(7, load))  # not joined to the stale load
        await asyncio.sleep(0)
        gate.set()
        assert await first == "v1"
        assert await second == "v2"
        assert c.get(7) == "v2" and c.version(7) == 2

    run(body())


# ---- batch invalidation and rebuild ---------------------------------------------------------------
def test_batch_invalidation_and_clear_keep_versions() -> None:
    c: VersionedCache[int, tuple[int, ...]] = VersionedCache("g", max_entries=100, max_bytes=1 << 20, ttl_s=60)
    for g in range(10):
        c.put(g, (1, 2) if g % 2 else (3, 4), g + 1)
    assert c.invalidate_where(lambda _g, members: 2 in members) == 5
    assert all(c.get(g) is None for g in range(1, 10, 2))
    assert c.invalidate_many([0, 2, 4], 100) == 3
    assert c.version(0) == 100 and c.get(6) == (3, 4)
    c.clear()
    assert len(c) == 0 and c.bytes == 0
    assert [c.version(g) for g in range(10)] == [100, 2, 100, 4, 100, 6, 7, 8, 9, 10]
    assert not c.put(9, (1,), 9)


def test_addressing_forgets_a_deleted_user() -> None:
    class Store:
        async def direct_conversation(self, a: int, b: int) -> int:
            return a * 100 + b

        async def conversation_kind(self, conv: int) -> int:
            return int(Kind.GROUP)

        async def members_versioned(self, conv: int) -> tuple[int, tuple[int, ...]]:
            return 3, (1, 2) if conv == 10 else (2, 3)

    async def body() -> None:
        a = Addressing(Store())  # type: ignore[arg-type]
        await a.direct(1, 2)
        await a.direct(2, 3)
        await a.group_members(10)
        await a.group_members(11)
        assert a.forget_user(1) == 2  # (1, 2) and group 10
        assert a.cached_target(2, Kind.DIRECT, 3) == (203, ())
        assert a.cached_target(1, Kind.DIRECT, 2) is None
        assert a.cached_target(2, Kind.GROUP, 10) is None
        assert a.cached_target(2, Kind.GROUP, 11) == (11, (2, 3))
        assert a.version(10) == 3
        assert not a.members_changed(10, 3) and a.members_changed(10, 4)
        assert a.groups_changed([10, 11], 5) == 2 and a.version(11) == 5

    run(body())


# ---- metrics -------------------------------------------------------------------------------------
def _sample(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^{name}\{{{re.escape(want)}\}} (\S+)$", text, re.M)
    assert m, f"{name}{{{want}}} not in /metrics"
    return float(m.group(1))


def test_metrics_export_the_cache_counters(clock: Clock) -> None:
    c: VersionedCache[int, str] = VersionedCache("demo", max_entries=2, max_bytes=1 << 20, ttl_s=10)
    metrics = Metrics()
    metrics.attach_caches(lambda: [c.snapshot()])

    async def body() -> None:
        async def load() -> tuple[int, str]:
            return 1, "x"

        await c.get_or_load(1, load)  # a miss and a load
        for _ in range(HOT_SAMPLE * 3):
            c.get(1)
        c.put(2, "y", 0)
        c.put(3, "z", 0)  # evicts 2 (1 was read: a second chance)
        clock.now += 11
        assert c.get(1) is None  # expired

    run(body())
    text = metrics.render().decode()
    assert _sample(text, "gochat_cache_hits_total", cache="demo") == HOT_SAMPLE * 3
    assert _sample(text, "gochat_cache_misses_total", cache="demo") == 1
    assert _sample(text, "gochat_cache_loads_total", cache="demo") == 1
    assert _sample(text, "gochat_cache_load_seconds_total", cache="demo") >= 0
    assert _sample(text, "gochat_cache_evictions_total", cache="demo", reason="size") == 1
    assert _sample(text, "gochat_cache_evictions_total", cache="demo", reason="ttl") == 1
    assert _sample(text, "gochat_cache_evictions_total", cache="demo", reason="bytes") == 0
    assert _sample(text, "gochat_cache_entries", cache="demo") == 1
    assert _sample(text, "gochat_cache_bytes", cache="demo") == ENTRY_OVERHEAD + 64
    assert _sample(text, "gochat_cache_hot_key_hits", cache="demo", key="1") == HOT_SAMPLE * 3


def test_hot_keys_rank_the_most_read() -> None:
    c: VersionedCache[tuple[int, int], int] = VersionedCache(
        "d", max_entries=1000, max_bytes=1 << 20, ttl_s=60, key_label=lambda k: f"{k[0]}:{k[1]}"
    )
    for i in range(200):
        c.put((i, i + 1), i, 0)
    for _ in range(50):
        for i in range(200):
            for _ in range(20 if i < 3 else 1):
                c.get((i, i + 1))
    top = c.hot_keys(3)
    assert {k for k, _ in top} == {"0:1", "1:2", "2:3"}
    assert all(n % HOT_SAMPLE == 0 and n > 0 for _, n in top)
