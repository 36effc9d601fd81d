"""The in-process :class:`~gochat.cluster.shared_cache.SharedCache` (embedded mode, tests): one
table per :class:`~gochat.cluster.memory.MemoryHub` (``hub.shared_cache``), so caches built on
one hub are the nodes of one cluster, as they would share one Redis. Same semantics as
:class:`~gochat.cluster.redis.cache.RedisSharedCache` (versions, stamps, write-once entries,
TTLs, the entry bound), plus a bound on the whole table, which Redis leaves to its own
``maxmemory``: past :data:`MEMORY_MAX_ENTRIES` entries or :data:`MEMORY_MAX_BYTES` bytes of
values the oldest written entries go first. ``hub.available = False`` makes every operation
raise UnavailableError; ``hub.lose_data()`` empties the table (a Redis restart).

The stamps are the wall clock in µs (every in-process node reads the same one); TTLs run on
the monotonic clock.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from gochat.cluster.memory import MemoryHub
from gochat.cluster.shared_cache import Versioned, check_entry

__all__ = ["MEMORY_MAX_BYTES", "MEMORY_MAX_ENTRIES", "MemorySharedCache"]

#: entries the table of one hub holds at most (embedded mode also has each node's L1 caches)
MEMORY_MAX_ENTRIES = 1 << 16
#: bytes of values the table of one hub holds at most
MEMORY_MAX_BYTES = 64 << 20


@dataclass(slots=True)
class _Entry:
    data: bytes
    version: int | None  # None: a write-once entry
    stamp_us: int
    deadline: float  # time.monotonic()


def _now_us() -> int:
    return time.time_ns() // 1000


class MemorySharedCache:
    """:class:`~gochat.cluster.shared_cache.SharedCache` over a :class:`MemoryHub` (one
    instance per node)."""

    def __init__(
        self,
        hub: MemoryHub | None = None,
        *,
        max_entries: int = MEMORY_MAX_ENTRIES,
        max_bytes: int = MEMORY_MAX_BYTES,
    ) -> None:
        self.hub = hub if hub is not None else MemoryHub()
        self.max_entries = max_entries
        self.max_bytes = max_bytes

    def _live(self, space: str, key: str) -> _Entry | None:
        table = self.hub.shared_cache
        name = f"{space}:{key}"
        e: _Entry | None = table.get(name)
        if e is not None and e.deadline <= time.monotonic():
            del table[name]
            self.hub.shared_cache_bytes -= len(e.data)
            return None
        return e

    def _store(self, space: str, key: str, entry: _Entry) -> None:
        hub = self.hub
        table = hub.shared_cache
        name = f"{space}:{key}"
        old = table.pop(name, None)
        if old is not None:
            hub.shared_cache_bytes -= len(old.data)
        table[name] = entry  # to the back: the newest write
        hub.shared_cache_bytes += len(entry.data)
        while table and (len(table) > self.max_entries or hub.shared_cache_bytes > self.max_bytes):
            _, gone = table.popitem(last=False)
            hub.shared_cache_bytes -= len(gone.data)

    async def get_versioned(self, space: str, keys: Sequence[str]) -> tuple[list[Versioned | None], int]:
        self.hub.check()
        now = _now_us()
        out: list[Versioned | None] = []
        for key in keys:
            e = self._live(space, key)
            out.append(None if e is None or e.version is None else Versioned(e.version, e.stamp_us, e.data))
        return out, now

    async def put_versioned(
        self, space: str, key: str, version: int, data: bytes, ttl_s: float, stamp_us: int | None = None
    ) -> bool:
        check_entry(space, key, data)
        self.hub.check()
        stamp = _now_us() if stamp_us is None else stamp_us
        deadline = time.monotonic() + ttl_s
        e = self._live(space, key)
        if e is not None and e.version is not None and e.version >= version:
            if e.version == version:  # read again, still current
                e.stamp_us = max(e.stamp_us, stamp)
                e.deadline = deadline
            return False
        self._store(space, key, _Entry(data, version, stamp, deadline))
        return True

    async def get(self, space: str, key: str) -> bytes | None:
        self.hub.check()
        e = self._live(space, key)
        return None if e is None or e.version is not None else e.data

    async def put_once(self, space: str, key: str, data: bytes, ttl_s: float) -> bool:
        check_entry(space, key, data)
        self.hub.check()
        if self._live(space, key) is not None:
            return False
        self._store(space, key, _Entry(data, None, _now_us(), time.monotonic() + ttl_s))
        return True

    async def close(self) -> None:
        """Nothing to release: the table belongs to the hub (it outlives a node, as Redis
        does)."""
