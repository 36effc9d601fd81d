"""Addressing over the shared (L2) cache (:mod:`gochat.messaging.l2`): "nodes" are Addressing
instances over one real SQLite store and one MemoryHub's shared cache (as cluster nodes share
PostgreSQL and Redis); the store's reads are counted to show which lookups reached it.

Covered: a change written through on one node is read from L2 on another without a store read;
a stale L2 entry is rejected after a newer invalidation; after a rebuild a node trusts only
entries written after it; an L2 outage (or a hung L2) never fails or stalls a lookup; usernames
and direct conversations are shared; the start-up warm-up; the metrics."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from gochat.cluster.memory import MemoryHub
from gochat.cluster.memory_cache import MemorySharedCache
from gochat.cluster.shared_cache import MAX_ENTRY_BYTES, Versioned, unpack_members
from gochat.errors import ErrorCode, RequestError
from gochat.ids import MAX_ID
from gochat.messaging import l2 as l2_module
from gochat.messaging.addressing import Addressing
from gochat.messaging.l2 import L2_TIMEOUT_S, SharedTier
from gochat.observability.metrics import Metrics
from gochat.protocol import Kind
from gochat.store.base import AppendRequest
from gochat.store.sqlite import SQLiteStore
from tests.conftest import run

COUNTED = ("members_versioned", "conversation_kind", "get_user", "direct_conversation", "recent_groups")


def count_calls(store: Any, names: Sequence[str] = COUNTED) -> Counter[str]:
    """Count calls of ``names`` on this store object (instance attributes wrap the methods)."""
    calls: Counter[str] = Counter()
    for name in names:
        method = getattr(store, name)

        def wrapper(*args: Any, _name: str = name, _method: Any = method, **kwargs: Any) -> Any:
            calls[_name] += 1
            return _method(*args, **kwargs)

        setattr(store, name, wrapper)
    return calls


@asynccontextmanager
async def nodes(tmp_path: Path, n: int = 3) -> AsyncIterator[tuple[list[Addressing], SQLiteStore, Counter[str], MemoryHub]]:
    store = SQLiteStore(tmp_path / "gochat.db")
    await store.open()
    hub = MemoryHub()
    try:
        calls = count_calls(store)
        yield [Addressing(store, MemorySharedCache(hub)) for _ in range(n)], store, calls, hub  # type: ignore[arg-type]
    finally:
        await store.close()


async def group(store: SQLiteStore, *names: str) -> tuple[int, list[int]]:
    ids = [await store.create_user(name, "scrypt$x") for name in names]
    info = await store.create_group(ids[0], "g", ids[1:])
    return info.conv, ids


async def settle(a: Addressing) -> None:
    """Wait for the background write-throughs of set_members."""
    while a._writes:
        await asyncio.gather(*a._writes)


def test_a_change_written_through_on_one_node_is_read_from_l2_on_another(tmp_path: Path) -> None:
    async def body() -> None:
        async with nodes(tmp_path) as ([a, b, _], store, calls, _hub):
            g, (owner, bob) = await group(store, "owner", "bob")
            carol = await store.create_user("carol", "scrypt$x")
            a.set_members(g, (owner, bob), 1)  # group.create's write-through (background)
            await settle(a)
            calls.clear()
            assert await b.group_members(g) == (owner, bob)
            assert calls == Counter()  # neither conversation_kind nor members_versioned
            assert (b.l2.members_stats.hits, b.members_cache.loads) == (1, 1)

            await store.add_member(g, carol)  # group.add on node a, under the group's lock ...
            await a.reload_members(g)  # ... reloads and writes through (awaited) ...
            assert b.members_changed(g, 2)  # ... then the event reaches node b
            calls.clear()
            assert await b.member_group(g, carol) == (owner, bob, carol)
            assert calls == Counter() and b.l2.members_stats.hits == 2
            assert b.version(g) == 2

    run(body())


def test_a_stale_l2_entry_is_rejected_after_a_newer_invalidation(tmp_path: Path) -> None:
    """The writer committed version 2 but its write-through never reached L2 (it crashed, or
    L2 failed): a node that saw the event ignores L2's version 1 and reads the store, and its
    write-back repairs L2 for the nodes that did not see the event."""

    async def body() -> None:
        async with nodes(tmp_path) as ([a, b, c], store, calls, _hub):
            g, (owner, bob) = await group(store, "owner", "bob")
            carol = await store.create_user("carol", "scrypt$x")
            await a.reload_members(g)  # L2: version 1
            await store.add_member(g, carol)  # version 2, not written to L2
            assert b.members_changed(g, 2)
            calls.clear()
            assert await b.group_members(g) == (owner, bob, carol)
            assert b.l2.members_stats.stale == 1 and calls["members_versioned"] == 1
            calls.clear()
            assert await c.group_members(g) == (owner, bob, carol)  # from the repaired L2
            assert calls == Counter() and c.l2.members_stats.hits == 1
            # a store read that finishes after a newer version is known stays out of L2
            await b.l2.put_members(g, 1, (owner,))
            (entry,), _ = await b.l2.shared.get_versioned("members", [str(g)])  # type: ignore[union-attr]
            assert entry is not None and entry.version == 2

    run(body())


def test_after_a_rebuild_a_node_trusts_only_entries_written_after_it(tmp_path: Path) -> None:
    async def body() -> None:
        async with nodes(tmp_path) as ([a, b, c], store, calls, _hub):
            g, (owner, bob) = await group(store, "owner", "bob")
            carol = await store.create_user("carol", "scrypt$x")
            await a.reload_members(g)  # version 1, written before b's rebuild
            b.clear()  # b could not replay what it missed
            calls.clear()
            assert await b.group_members(g) == (owner, bob)
            assert b.l2.members_stats.stale == 1 and calls["members_versioned"] == 1
            assert await c.group_members(g) == (owner, bob)  # c did not rebuild: it trusts L2
            assert c.l2.members_stats.hits == 1

            await store.add_member(g, carol)
            await a.reload_members(g)  # version 2, written after b's rebuild
            b.members_changed(g, 2)
            calls.clear()
            assert await b.group_members(g) == (owner, bob, carol)
            assert calls == Counter() and b.l2.members_stats.hits == 1

    run(body())


def test_an_l2_outage_never_fails_a_lookup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(l2_module, "L2_PAUSE_S", 0.2)

    async def body() -> None:
        async with nodes(tmp_path, 2) as ([a, b], store, calls, hub):
            g, (owner, bob) = await group(store, "owner", "bob")
            await a.reload_members(g)
            hub.available = False
            with caplog.at_level(logging.WARNING, logger="gochat.messaging.l2"):
                assert await b.group_members(g) == (owner, bob)
                assert await b.direct(owner, bob) > 0
                assert await b.user(bob) == "bob"
            assert calls["members_versioned"] == 2  # a's reload, b's lookup
            # one error turned L2 off: the other lookups went straight to the store
            assert b.l2.members_stats.errors == 1 and b.l2.direct_stats.errors == 0 and b.l2.users_stats.errors == 0
            assert len([r for r in caplog.records if r.name == "gochat.messaging.l2"]) == 1
            await asyncio.sleep(0.25)
            hub.available = True
            b.members_cache.clear()
            assert await b.group_members(g) == (owner, bob)
            assert b.l2.members_stats.hits == 1

    run(body())


class _Hung:
    """A shared cache that never answers (a black-holed Redis)."""

    async def get_versioned(self, space: str, keys: Sequence[str]) -> tuple[list[Versioned | None], int]:
        await asyncio.sleep(3600)
        raise AssertionError

    async def put_versioned(self, *args: Any, **kwargs: Any) -> bool:
        await asyncio.sleep(3600)
        raise AssertionError

    async def get(self, space: str, key: str) -> bytes | None:
        await asyncio.sleep(3600)
        raise AssertionError

    async def put_once(self, *args: Any) -> bool:
        await asyncio.sleep(3600)
        raise AssertionError

    async def close(self) -> None:
        pass


def test_a_hung_l2_delays_a_lookup_by_at_most_its_timeout(tmp_path: Path) -> None:
    async def body() -> None:
        store = SQLiteStore(tmp_path / "gochat.db")
        await store.open()
        try:
            g, (owner, bob) = await group(store, "owner", "bob")
            a = Addressing(store, _Hung())  # type: ignore[arg-type]
            started = time.monotonic()
            assert await a.group_members(g) == (owner, bob)
            assert await a.user(owner) == "owner"
            assert time.monotonic() - started < L2_TIMEOUT_S + 0.2
            assert a.l2.members_stats.errors == 1
        finally:
            await store.close()

    run(body())


def test_usernames_and_direct_conversations_are_shared(tmp_path: Path) -> None:
    async def body() -> None:
        async with nodes(tmp_path) as ([a, b, _], store, calls, _hub):
            ann = await store.create_user("ann", "scrypt$x")
            ben = await store.create_user("ben", "scrypt$x")
            assert await a.user(ann) == "ann" and calls["get_user"] == 1
            assert await a.user(ann) == "ann" and calls["get_user"] == 1  # L1
            assert await b.user(ann) == "ann" and calls["get_user"] == 1  # L2
            assert b.l2.users_stats.hits == 1 and a.l2.users_stats.writes == 1
            for missing in (ben + 100, 0, MAX_ID + 1):
                with pytest.raises(RequestError) as ei:
                    await b.user(missing)
                assert ei.value.code == ErrorCode.NOT_FOUND
            with pytest.raises(RequestError):
                await b.user(ben + 100)
            assert calls["get_user"] == 3  # an unknown user is not cached

            conv = await a.direct(ann, ben)
            assert calls["direct_conversation"] == 1
            assert await b.direct(ben, ann) == conv and calls["direct_conversation"] == 1
            assert b.l2.direct_stats.hits == 1
            assert await b.resolve(ann, Kind.DIRECT, ben) == conv

    run(body())


def test_a_member_list_over_the_entry_bound_is_not_shared() -> None:
    async def body() -> None:
        tier = SharedTier(MemorySharedCache(), members_ttl_s=60, direct_ttl_s=60, users_ttl_s=60)
        await tier.put_members(1, 1, tuple(range(1, MAX_ENTRY_BYTES // 8 + 2)))
        assert tier.members_stats.too_large == 1 and tier.members_stats.writes == 0
        await tier.put_members(1, 1, tuple(range(1, MAX_ENTRY_BYTES // 8 + 1)))
        assert tier.members_stats.writes == 1
        found, _ = await tier.members([1, 2], lambda g: 0)
        assert len(found[1][1]) == MAX_ENTRY_BYTES // 8 and tier.members_stats.misses == 1

    run(body())


async def _post(store: SQLiteStore, conv: int, sender: int) -> None:
    await store.append(
        AppendRequest(conv=conv, kind=Kind.GROUP, sender_id=sender, client_msg_id=os.urandom(16), content_type=1, body=b"x")
    )


def test_warm_up_loads_the_most_recently_active_groups(tmp_path: Path) -> None:
    """Node a warms up from the store (and fills L2); node b, starting later, from L2; neither
    reads the store for those groups afterwards; a rebuilt node warms up from the store."""

    async def body() -> None:
        async with nodes(tmp_path) as ([a, b, c], store, calls, _hub):
            owner = await store.create_user("owner", "scrypt$x")
            groups = [(await store.create_group(owner, f"g{i}", [])).conv for i in range(5)]
            for g in (groups[0], groups[3], groups[1], groups[4]):  # groups[2] never spoke
                await _post(store, g, owner)
            recent = [groups[4], groups[1], groups[3]]

            w = await a.warm_up(limit=3, batch=2)
            assert (w.from_l2, w.from_store, w.done, w.failed) == (0, 3, True, False)
            assert all(g in a.members_cache for g in recent) and groups[0] not in a.members_cache
            calls.clear()
            for g in recent:
                assert await a.member_group(g, owner) == (owner,)
            assert calls == Counter()

            w = await b.warm_up(limit=3)
            assert (w.from_l2, w.from_store) == (3, 0)
            assert calls == Counter({"recent_groups": 1})
            await b.warm_up(limit=3)  # what is cached already is not loaded again
            assert (b.warmup.from_l2, b.warmup.from_store) == (3, 0)

            c.clear()  # a node that rebuilt (first start without a cursor)
            w = await c.warm_up(limit=10)
            assert (w.from_l2, w.from_store) == (0, 4)

    run(body())


def test_a_failed_warm_up_logs_and_stops(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        async with nodes(tmp_path, 1) as ([a], store, _calls, _hub):

            async def broken(limit: int, scan: int = 100_000) -> list[int]:
                raise RuntimeError("store down")

            store.recent_groups = broken  # type: ignore[method-assign]
            with caplog.at_level(logging.WARNING, logger="gochat.messaging.addressing"):
                w = await a.warm_up()
            assert w.failed and w.done
            assert any("warm-up failed" in r.getMessage() for r in caplog.records)

    run(body())


def test_the_metrics_export_the_l2_counters_and_the_warm_up(tmp_path: Path) -> None:
    async def body() -> None:
        async with nodes(tmp_path, 2) as ([a, b], store, _calls, _hub):
            g, _ = await group(store, "owner", "bob")
            await a.reload_members(g)
            await b.group_members(g)
            await b.warm_up()
            metrics = Metrics()
            metrics.attach_caches(lambda: [cache.snapshot() for cache in b.caches])
            metrics.attach_shared_cache(lambda: b.l2_stats, lambda: b.warmup)
            text = metrics.render().decode()
            assert 'gochat_shared_cache_hits_total{cache="group_members"} 1.0' in text
            assert 'gochat_shared_cache_reads_total{cache="users"} 0.0' in text
            assert 'gochat_shared_cache_writes_total{cache="direct"} 0.0' in text
            assert 'gochat_cache_warmup_loaded{source="store"} 0.0' in text
            assert "gochat_cache_warmup_done 1.0" in text
            assert 'gochat_cache_entries{cache="users"} 0.0' in text

    run(body())


def test_l2_holds_the_packed_member_list(tmp_path: Path) -> None:
    async def body() -> None:
        async with nodes(tmp_path, 1) as ([a], store, _calls, hub):
            g, ids = await group(store, "owner", "bob", "carol")
            await a.reload_members(g)
            entry = hub.shared_cache[f"members:{g}"]
            assert entry.version == 1 and unpack_members(entry.data) == tuple(ids)

    run(body())

