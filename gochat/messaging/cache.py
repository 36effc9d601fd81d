"""A bounded, versioned in-process (L1) cache: the member lists and conversation ids the send
path reads on every SEND (docs/consistency.md, "Caches").

:class:`VersionedCache` holds at most ``max_entries`` entries and about ``max_bytes`` bytes
(sizes are estimates: the caller gives a size function or a fixed size per entry). Every entry
expires ``ttl_s`` after it was stored (``time.monotonic``, checked when it is read) and carries
the version of the value it holds (0 for values that never change):

- ``put(key, value, version)`` is ignored when the cache already knows a newer version of the
  key, so a lookup that raced with a change never caches what it read before the change;
- ``invalidate(key, version)`` drops the entry when it is older than ``version`` and remembers
  ``version`` (a *tombstone*, in a bounded FIFO map) so a later ``put`` of an older value is
  refused; an entry evicted for room leaves its version there too.

Eviction is second-chance FIFO (CLOCK): a hit sets the entry's reference bit; when the cache is
over a bound it pops the oldest entry and, if the bit is set, clears it and moves the entry to
the back, at most :data:`SECOND_CHANCES` times per eviction (so an eviction is O(1) in the
worst case, not only amortized). A hit is a dict lookup, a clock read and a few integer
operations; one hit in :data:`HOT_SAMPLE` feeds a space-saving sketch of the most read keys.

Loads are single-flight: concurrent misses of one key share one load (``get_or_load``), and a
load that finishes after an invalidation of its key is returned to its waiters but cached only
if its version is not older than the invalidation. Event-loop thread only: nothing takes a lock.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = ["ENTRY_OVERHEAD", "HOT_SAMPLE", "SECOND_CHANCES", "CacheSnapshot", "VersionedCache"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

#: bytes counted per entry on top of the value's size: the entry object, its OrderedDict slot
#: and link, the key (an estimate for CPython 3.11 on 64 bits)
ENTRY_OVERHEAD = 200
#: one hit in this many (a power of two) is counted in the hot-key sketch
HOT_SAMPLE = 64
#: keys the hot-key sketch tracks (space-saving: a new key replaces the least counted one)
HOT_SLOTS = 32
#: referenced entries an eviction moves to the back before it evicts one anyway
SECOND_CHANCES = 8

_monotonic = time.monotonic
_HOT_MASK = HOT_SAMPLE - 1


class _Entry:
    __slots__ = ("expires", "ref", "size", "value", "version")

    def __init__(self, value: Any, version: int, expires: float, size: int) -> None:
        self.value = value
        self.version = version
        self.expires = expires
        self.size = size
        self.ref = False


@dataclass(frozen=True, slots=True)
class CacheSnapshot:
    """The counters of one cache, read when ``/metrics`` is scraped."""

    name: str
    hits: int
    misses: int
    loads: int
    load_seconds: float
    invalidations: int
    evictions: dict[str, int]  # reason (size, bytes, ttl) -> entries
    entries: int
    bytes: int
    hot: list[tuple[str, int]]  # (key, estimated hits), most hit first


class VersionedCache(Generic[K, V]):
    """A bounded L1 cache with TTL, per-key versions and single-flight loading (module doc)."""

    __slots__ = (
        "_data",
        "_hot",
        "_inflight",
        "_key_label",
        "_size",
        "_tombs",
        "bytes",
        "entry_size",
        "evicted_bytes",
        "evicted_size",
        "evicted_ttl",
        "hits",
        "invalidations",
        "load_seconds",
        "loads",
        "max_bytes",
        "max_entries",
        "max_tombstones",
        "misses",
        "name",
        "ttl_s",
    )

    def __init__(
        self,
        name: str,
        *,
        max_entries: int,
        max_bytes: int,
        ttl_s: float,
        size: Callable[[V], int] | None = None,
        entry_size: int = 64,
        max_tombstones: int | None = None,
        key_label: Callable[[K], str] = str,
    ) -> None:
        if max_entries < 1 or max_bytes < 1 or ttl_s <= 0:
            raise ValueError("a cache needs max_entries, max_bytes and ttl_s above 0")
        self.name = name
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        #: size of a value when ``size`` is None (bytes, ENTRY_OVERHEAD excluded)
        self.entry_size = entry_size
        self.max_tombstones = max_entries if max_tombstones is None else max_tombstones
        self._size = size
        self._key_label = key_label
        self._data: OrderedDict[K, _Entry] = OrderedDict()
        #: key -> newest version known of a key that has no entry (FIFO, bounded)
        self._tombs: OrderedDict[K, int] = OrderedDict()
        self._inflight: dict[K, asyncio.Task[V]] = {}
        self._hot: dict[K, int] = {}
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.loads = 0
        self.load_seconds = 0.0
        self.invalidations = 0
        self.evicted_size = 0
        self.evicted_bytes = 0
        self.evicted_ttl = 0

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: K) -> bool:
        e = self._data.get(key)
        return e is not None and e.expires >= _monotonic()

    # ---- reads ---------------------------------------------------------------------------------
    def get(self, key: K) -> V | None:
        """The cached value, or None (absent or expired). The send path's hit. A hit is
        counted here, a miss by :meth:`get_or_load` (so a lookup that tries ``get`` and then
        loads counts one miss)."""
        e = self._data.get(key)
        if e is not None and e.expires >= _monotonic():
            e.ref = True
            n = self.hits = self.hits + 1
            if not n & _HOT_MASK:
                self._sample(key)
            return e.value  # type: ignore[no-any-return]
        if e is not None:
            self._drop(key, e)
            self.evicted_ttl += 1
        return None

    def peek(self, key: K) -> V | None:
        """The cached value (even expired), or None; counts nothing and touches nothing."""
        e = self._data.get(key)
        return None if e is None else e.value  # type: ignore[no-any-return]

    def version(self, key: K) -> int:
        """The newest version of ``key`` this cache knows (its entry's, or a tombstone's; 0:
        none)."""
        e = self._data.get(key)
        if e is not None:
            return e.version
        return self._tombs.get(key, 0)

    async def get_or_load(self, key: K, load: Callable[[], Awaitable[tuple[int, V]]]) -> V:
        """The cached value, or ``load()``'s ``(version, value)`` cached and returned. Concurrent
        misses of one key share one load (they resume in call order); the load's errors reach
        every waiter and nothing is cached."""
        value = self.get(key)
        if value is not None:
            return value
        self.misses += 1
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load(key, load))
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._landed(key, t))
        return await asyncio.shield(task)

    async def _load(self, key: K, load: Callable[[], Awaitable[tuple[int, V]]]) -> V:
        started = _monotonic()
        try:
            version, value = await load()
        finally:
            self.loads += 1
            self.load_seconds += _monotonic() - started
        self.put(key, value, version)
        return value

    def _landed(self, key: K, task: asyncio.Task[V]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved: waiters that were cancelled do not leave it unread

    # ---- writes --------------------------------------------------------------------------------
    def put(self, key: K, value: V, version: int | None = None) -> bool:
        """Cache ``value`` of ``key`` read at ``version`` (None: the version already known).
        False when the cache knows a newer version (nothing changes) or the value alone is
        larger than ``max_bytes`` (not cached; its version is remembered)."""
        data = self._data
        old = data.get(key)
        known = old.version if old is not None else self._tombs.get(key, 0)
        if version is None:
            version = known
        elif version < known:
            return False
        size = ENTRY_OVERHEAD + (self.entry_size if self._size is None else self._size(value))
        if size > self.max_bytes:  # never cached; what was cached is older: drop it
            if old is not None:
                self._drop(key, old)
            if version:
                self._tomb(key, version)
            return False
        if old is not None:
            self.bytes -= old.size
            del data[key]
        elif known:
            del self._tombs[key]
        data[key] = _Entry(value, version, _monotonic() + self.ttl_s, size)
        self.bytes += size
        if len(data) > self.max_entries or self.bytes > self.max_bytes:
            self._evict()
        return True

    def invalidate(self, key: K, version: int) -> bool:
        """A change of ``key`` at ``version`` (from this node or the event bus): drop the entry
        when it is older and remember ``version``. True when ``version`` was newer than what
        the cache knew."""
        e = self._data.get(key)
        if e is not None:
            if version <= e.version:
                return False
            self._drop(key, e)
        elif version <= self._tombs.get(key, 0):
            return False
        self._tomb(key, version)
        self._inflight.pop(key, None)  # later misses start a load that sees the change
        self.invalidations += 1
        return True

    def invalidate_many(self, keys: Iterable[K], version: int) -> int:
        """:meth:`invalidate` each of ``keys`` at ``version``; how many were newer."""
        return sum(self.invalidate(k, version) for k in keys)

    def invalidate_where(self, predicate: Callable[[K, V], bool]) -> int:
        """Drop every entry whose ``(key, value)`` matches (keeping its version as a
        tombstone): a batch invalidation, such as a deleted user's conversations. O(entries)."""
        doomed = [(k, e) for k, e in self._data.items() if predicate(k, e.value)]
        for k, e in doomed:
            self._drop(k, e)
            if e.version:
                self._tomb(k, e.version)
            self._inflight.pop(k, None)
        self.invalidations += len(doomed)
        return len(doomed)

    def clear(self) -> None:
        """Drop every entry (a rebuild), keeping the versions they held as tombstones: versions
        only grow, so what was known stays a lower bound."""
        for k, e in self._data.items():
            if e.version:
                self._tomb(k, e.version)
        self.invalidations += len(self._data)
        self._data.clear()
        self._inflight.clear()
        self.bytes = 0

    # ---- internals -----------------------------------------------------------------------------
    def _drop(self, key: K, e: _Entry) -> None:
        del self._data[key]
        self.bytes -= e.size
        if e.version:
            self._tomb(key, e.version)

    def _tomb(self, key: K, version: int) -> None:
        tombs = self._tombs
        tombs[key] = max(version, tombs.pop(key, 0))  # popped: to the back of the FIFO
        if len(tombs) > self.max_tombstones:
            tombs.popitem(last=False)

    def _evict(self) -> None:
        data = self._data
        now = _monotonic()
        chances = SECOND_CHANCES
        while data and (len(data) > self.max_entries or self.bytes > self.max_bytes):
            key, e = data.popitem(last=False)
            if e.expires < now:
                self.evicted_ttl += 1
            elif e.ref and chances:
                chances -= 1
                e.ref = False
                data[key] = e  # a second chance: to the back
                continue
            elif len(data) >= self.max_entries:
                self.evicted_size += 1
            else:
                self.evicted_bytes += 1
            self.bytes -= e.size
            if e.version:
                self._tomb(key, e.version)

    def _sample(self, key: K) -> None:
        hot = self._hot
        n = hot.get(key)
        if n is not None:
            hot[key] = n + 1
        elif len(hot) < HOT_SLOTS:
            hot[key] = 1
        else:  # space-saving: the newcomer inherits the least count (an overestimate)
            least = min(hot, key=hot.__getitem__)
            hot[key] = hot.pop(least) + 1

    # ---- metrics -------------------------------------------------------------------------------
    def hot_keys(self, n: int = 10) -> list[tuple[str, int]]:
        """The ``n`` most read keys with their estimated hits (sampled: a multiple of
        HOT_SAMPLE)."""
        top = sorted(self._hot.items(), key=lambda kv: kv[1], reverse=True)[:n]
        return [(self._key_label(k), c * HOT_SAMPLE) for k, c in top]

    def snapshot(self) -> CacheSnapshot:
        return CacheSnapshot(
            name=self.name,
            hits=self.hits,
            misses=self.misses,
            loads=self.loads,
            load_seconds=self.load_seconds,
            invalidations=self.invalidations,
            evictions={"size": self.evicted_size, "bytes": self.evicted_bytes, "ttl": self.evicted_ttl},
            entries=len(self._data),
            bytes=self.bytes,
            hot=self.hot_keys(),
        )
