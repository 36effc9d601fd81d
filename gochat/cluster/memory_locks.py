"""In-process distributed locks: :class:`MemoryLocks`, the :class:`~gochat.cluster.locks.Locks`
backend of embedded mode and the reference the Redis one follows.

The lock table lives with the :class:`~gochat.cluster.memory.MemoryHub`: instances built on one
hub behave like nodes of one cluster and share locks. Per lock name: the holder (owner, hold
count, fence, deadline on the monotonic clock) and a FIFO queue of waiters; fences come from a
per-name counter that survives the lock. ``hub.available = False`` makes every operation raise
UnavailableError.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections import deque
from dataclasses import dataclass, field

from gochat.cluster.locks import Lease, LockService, LockTimeoutError
from gochat.cluster.memory import MemoryHub
from gochat.errors import UnavailableError

__all__ = ["MemoryLocks"]

#: a waiter looks at the hub at least this often (notices an outage, a holder's expiry)
_POLL_S = 0.5


@dataclass(eq=False, slots=True)
class _Waiter:
    owner: str
    wake: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(slots=True)
class _Lock:
    owner: str | None = None
    count: int = 0
    fence: int = 0
    deadline: float = 0.0
    queue: deque[_Waiter] = field(default_factory=deque)


@dataclass(slots=True)
class _Table:
    locks: dict[str, _Lock] = field(default_factory=dict)
    fences: dict[str, int] = field(default_factory=dict)


_TABLES: weakref.WeakKeyDictionary[MemoryHub, _Table] = weakref.WeakKeyDictionary()


def _table(hub: MemoryHub) -> _Table:
    t = _TABLES.get(hub)
    if t is None:
        t = _TABLES[hub] = _Table()
    return t


class MemoryLocks(LockService):
    """:class:`~gochat.cluster.locks.Locks` over a :class:`MemoryHub` (one instance per node)."""

    def __init__(self, hub: MemoryHub | None = None, *, node: str | None = None) -> None:
        super().__init__(node=node)
        self.hub = hub if hub is not None else MemoryHub()
        self._table = _table(self.hub)

    def _get(self, name: str) -> _Lock:
        """The lock, expired holding dropped (the next waiter is woken)."""
        lk = self._table.locks.get(name)
        if lk is None:
            lk = self._table.locks[name] = _Lock()
        if lk.owner is not None and lk.deadline <= time.monotonic():
            lk.owner, lk.count = None, 0
            self._wake_head(lk)
        return lk

    def _take(self, name: str, lk: _Lock, owner: str, ttl_ms: int) -> int:
        if lk.owner == owner:
            lk.count += 1
        else:
            fence = self._table.fences.get(name, 0) + 1
            self._table.fences[name] = fence
            lk.owner, lk.count, lk.fence = owner, 1, fence
        lk.deadline = time.monotonic() + ttl_ms / 1000
        return lk.fence

    @staticmethod
    def _wake_head(lk: _Lock) -> None:
        if lk.queue:
            lk.queue[0].wake.set()

    def _forget(self, name: str, lk: _Lock) -> None:
        if lk.owner is None and not lk.queue and self._table.locks.get(name) is lk:
            del self._table.locks[name]

    async def _acquire(self, name: str, owner: str, ttl_ms: int, timeout_s: float | None, fresh: bool) -> int:
        self.hub.check()
        lk = self._get(name)
        if lk.owner == owner or (lk.owner is None and not lk.queue):
            return self._take(name, lk, owner, ttl_ms)
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        me = _Waiter(owner)
        lk.queue.append(me)
        try:
            while True:
                wait = _POLL_S
                if lk.owner is not None:
                    wait = min(wait, max(0.0, lk.deadline - time.monotonic()) + 0.001)
                if deadline is not None:
                    left = deadline - loop.time()
                    if left <= 0:
                        raise LockTimeoutError(
                            f"lock {name!r} not acquired within {timeout_s:g}s: held by another owner"
                        )
                    wait = min(wait, left)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await me.wake.wait()
                me.wake.clear()
                self.hub.check()
                if self._closed:
                    raise UnavailableError("locks closed")
                lk = self._get(name)
                if me not in lk.queue:  # the table was rebuilt (cannot happen today): line up again
                    lk.queue.append(me)
                if lk.owner == owner or (lk.owner is None and lk.queue[0] is me):
                    lk.queue.remove(me)
                    return self._take(name, lk, owner, ttl_ms)
        except BaseException:
            if me in lk.queue:
                was_head = lk.queue[0] is me
                lk.queue.remove(me)
                if was_head and lk.owner is None:
                    self._wake_head(lk)
                self._forget(name, lk)
            raise

    async def _release(self, name: str, owner: str, fence: int) -> int:
        self.hub.check()
        lk = self._get(name)
        if lk.owner != owner or lk.fence != fence:
            self._forget(name, lk)
            return -1
        lk.count -= 1
        if lk.count > 0:
            return lk.count
        lk.owner, lk.count = None, 0
        self._wake_head(lk)
        self._forget(name, lk)
        return 0

    async def _renew(self, name: str, owner: str, fence: int, ttl_ms: int) -> bool:
        self.hub.check()
        lk = self._get(name)
        if lk.owner != owner or lk.fence != fence:
            return False
        lk.deadline = time.monotonic() + ttl_ms / 1000
        return True

    async def holder(self, name: str) -> Lease | None:
        self.hub.check()
        lk = self._get(name)
        if lk.owner is None:
            self._forget(name, lk)
            return None
        return Lease(name, lk.owner, lk.fence)

    async def waiters(self, name: str) -> int:
        self.hub.check()
        lk = self._table.locks.get(name)
        return len(lk.queue) if lk is not None else 0

    async def fence(self, name: str) -> int:
        self.hub.check()
        return self._table.fences.get(name, 0)
