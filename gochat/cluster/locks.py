"""Distributed locks: the :class:`Locks` seam, its :class:`Lease`, its errors, and
:class:`LockService`, the part every backend shares (owners, reentrancy, the watchdog, the
``async with`` form). Backends: :class:`~gochat.cluster.memory_locks.MemoryLocks` (embedded
mode: in-process "nodes" that share a :class:`~gochat.cluster.memory.MemoryHub` share locks)
and :class:`~gochat.cluster.redis.locks.RedisLocks` (cluster mode). ``docs/consistency.md``
§ Distributed locks describes the guarantees.

A lock is named by a string; it is held by an *owner* (a string; by default one per asyncio
task and :class:`LockService` instance), reentrantly (the same owner may acquire it again and
must release it as many times), for at most ``ttl_s`` unless renewed (a watchdog renews it
every ``ttl_s / 3`` while this process holds it, so a holder that dies or stalls frees it within
the TTL), and fairly (waiters get it in the order they asked). Every time a lock passes from
free to held it gets a new *fence*, a number that increases strictly per lock name: a store that
remembers the highest fence it has seen for a resource can refuse a write made under a lock
that has since expired and been taken by someone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import uuid
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from gochat.errors import ErrorCode, GochatError, UnavailableError

__all__ = [
    "LOCK_TTL_S",
    "LOCK_WAIT_S",
    "Lease",
    "LockNotHeldError",
    "LockService",
    "LockTimeoutError",
    "Locks",
]

log = logging.getLogger("gochat.cluster.locks")

#: default time a lock stays held without renewal (a dead holder frees it within this)
LOCK_TTL_S = 10.0
#: default time :meth:`Locks.acquire` waits for a lock before raising LockTimeoutError
LOCK_WAIT_S = 10.0


@dataclass(frozen=True, slots=True)
class Lease:
    """One holding of a lock: what :meth:`Locks.acquire` returns and :meth:`Locks.release`
    takes. ``fence`` is the same for every reentrant acquire of one holding."""

    name: str
    owner: str
    fence: int


class LockTimeoutError(GochatError):
    """The lock was not acquired in time (someone else holds it); retryable (UNAVAILABLE)."""

    code = ErrorCode.UNAVAILABLE


class LockNotHeldError(GochatError):
    """The lease's owner does not hold the lock (any more): it was released, it expired, or it
    was never this owner's (CONFLICT)."""

    code = ErrorCode.CONFLICT


@runtime_checkable
class Locks(Protocol):
    """Distributed locks with owner tokens, reentrancy, FIFO waiters, TTL and fencing."""

    def lock(
        self, name: str, *, ttl_s: float = LOCK_TTL_S, owner: str | None = None, timeout_s: float | None = LOCK_WAIT_S
    ) -> contextlib.AbstractAsyncContextManager[Lease]:
        """``async with locks.lock(name) as lease:`` acquire, hold (renewed by the watchdog),
        release on exit, cancellation and errors included."""

    async def acquire(
        self, name: str, *, ttl_s: float = LOCK_TTL_S, owner: str | None = None, timeout_s: float | None = LOCK_WAIT_S
    ) -> Lease:
        """Wait (FIFO) for the lock, at most ``timeout_s`` (None: no limit), then hold it for
        ``ttl_s``, renewed every ``ttl_s / 3`` until released. Raises
        :class:`LockTimeoutError` after ``timeout_s``, :class:`~gochat.errors.UnavailableError`
        when the backend is down."""

    async def release(self, lease: Lease) -> None:
        """Undo one acquire; the lock is free once every acquire of the holding is undone.
        Raises :class:`LockNotHeldError` when ``lease`` does not hold the lock."""

    async def renew(self, lease: Lease) -> None:
        """Extend the lock's TTL now (the watchdog does this by itself). Raises
        :class:`LockNotHeldError` when ``lease`` does not hold the lock any more."""

    async def holder(self, name: str) -> Lease | None:
        """The current holding of ``name`` (None when free)."""

    async def waiters(self, name: str) -> int:
        """How many acquires wait for ``name``."""

    async def fence(self, name: str) -> int:
        """The last fence handed out for ``name`` (0: never held): a store can compare a
        writer's fence with it, or with the highest one it has recorded itself."""

    async def close(self) -> None:
        """Stop every watchdog and release what this instance still holds (best effort: what
        cannot be released expires within its TTL)."""


@dataclass(slots=True)
class _Hold:
    """What this process holds of one (name, owner): the lease, its local acquire count and
    its watchdog."""

    lease: Lease
    ttl_ms: int
    count: int = 1
    watchdog: asyncio.Task[None] | None = None
    lost: bool = False


def _ttl_ms(ttl_s: float) -> int:
    if not ttl_s > 0:
        raise ValueError("ttl_s must be positive")
    return max(1, int(ttl_s * 1000))


class LockService:
    """What every :class:`Locks` backend shares; a backend provides the five primitives below
    (each raising UnavailableError when the backend is down)."""

    def __init__(self, *, node: str | None = None) -> None:
        #: this instance's part of default owner tokens (unique per process and instance)
        self.token = node or uuid.uuid4().hex[:16]
        self._holds: dict[tuple[str, str], _Hold] = {}
        self._task_owners: weakref.WeakKeyDictionary[asyncio.Task[object], str] = weakref.WeakKeyDictionary()
        self._owner_seq = itertools.count(1)
        self._closed = False

    # -- primitives -------------------------------------------------------------------------

    async def _acquire(self, name: str, owner: str, ttl_ms: int, timeout_s: float | None, fresh: bool) -> int:
        """Wait in line for ``name`` and take it (or enter it again when ``owner`` holds it);
        return the holding's fence. ``fresh``: this process does not hold it for ``owner``."""
        raise NotImplementedError

    async def _release(self, name: str, owner: str, fence: int) -> int:
        """Undo one acquire; the holding's acquires left (0: the lock is free). -1 when
        ``(owner, fence)`` does not hold it."""
        raise NotImplementedError

    async def _renew(self, name: str, owner: str, fence: int, ttl_ms: int) -> bool:
        raise NotImplementedError

    async def holder(self, name: str) -> Lease | None:
        raise NotImplementedError

    async def waiters(self, name: str) -> int:
        raise NotImplementedError

    async def fence(self, name: str) -> int:
        raise NotImplementedError

    # -- the seam ---------------------------------------------------------------------------

    def default_owner(self) -> str:
        """One owner per asyncio task (and instance): nested ``lock()`` in a task re-enter."""
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("locks need a running asyncio task")
        owner = self._task_owners.get(task)
        if owner is None:
            owner = self._task_owners[task] = f"{self.token}:{next(self._owner_seq)}"
        return owner

    @contextlib.asynccontextmanager
    async def lock(
        self, name: str, *, ttl_s: float = LOCK_TTL_S, owner: str | None = None, timeout_s: float | None = LOCK_WAIT_S
    ) -> AsyncIterator[Lease]:
        lease = await self.acquire(name, ttl_s=ttl_s, owner=owner, timeout_s=timeout_s)
        try:
            yield lease
        finally:
            # shielded: a second cancellation must not leave the lock held until its TTL
            await asyncio.shield(self._release_quietly(lease))

    async def _release_quietly(self, lease: Lease) -> None:
        try:
            await self.release(lease)
        except LockNotHeldError:
            log.warning("lock %r was lost while %s held it (expired or taken over)", lease.name, lease.owner)
        except UnavailableError as exc:
            log.warning("lock %r: release failed (%s); it expires within its TTL", lease.name, exc)

    async def acquire(
        self, name: str, *, ttl_s: float = LOCK_TTL_S, owner: str | None = None, timeout_s: float | None = LOCK_WAIT_S
    ) -> Lease:
        if not name:
            raise ValueError("a lock needs a name")
        if self._closed:
            raise UnavailableError("locks closed")
        ttl_ms = _ttl_ms(ttl_s)
        owner = owner or self.default_owner()
        key = (name, owner)
        fence = await self._acquire(name, owner, ttl_ms, timeout_s, key not in self._holds)
        hold = self._holds.get(key)
        if hold is not None and hold.lease.fence == fence and not hold.lost:
            hold.count += 1
            return hold.lease
        if hold is not None:  # an older holding of ours was lost; this one is new
            self._stop(hold)
        hold = self._holds[key] = _Hold(Lease(name, owner, fence), ttl_ms)
        hold.watchdog = asyncio.create_task(self._watchdog(hold), name=f"lock-watchdog-{name}")
        return hold.lease

    async def release(self, lease: Lease) -> None:
        key = (lease.name, lease.owner)
        hold = self._holds.get(key)
        if hold is not None and hold.lease == lease:
            hold.count -= 1
            if hold.count <= 0:
                # stop renewing first: if the release below fails the lock still expires
                self._stop(hold)
                del self._holds[key]
        left = await self._release(lease.name, lease.owner, lease.fence)
        if left < 0:
            raise LockNotHeldError(f"lock {lease.name!r} is not held by {lease.owner!r} (fence {lease.fence})")

    async def renew(self, lease: Lease) -> None:
        hold = self._holds.get((lease.name, lease.owner))
        ttl_ms = hold.ttl_ms if hold is not None and hold.lease == lease else _ttl_ms(LOCK_TTL_S)
        if not await self._renew(lease.name, lease.owner, lease.fence, ttl_ms):
            raise LockNotHeldError(f"lock {lease.name!r} is not held by {lease.owner!r} (fence {lease.fence})")

    def _stop(self, hold: _Hold) -> None:
        if hold.watchdog is not None:
            hold.watchdog.cancel()
            hold.watchdog = None

    async def _watchdog(self, hold: _Hold) -> None:
        """Renew every ttl/3 while held; on a backend outage keep trying (the lock may expire);
        stop when the lock is found lost."""
        lease = hold.lease
        interval = hold.ttl_ms / 3000
        while True:
            await asyncio.sleep(interval)
            try:
                ok = await self._renew(lease.name, lease.owner, lease.fence, hold.ttl_ms)
            except UnavailableError as exc:
                log.warning("lock %r: renewal failed (%s); retrying", lease.name, exc)
                continue
            except Exception:
                log.exception("lock %r: renewal failed", lease.name)
                continue
            if not ok:
                hold.lost = True
                log.warning("lock %r held by %s expired before it was renewed", lease.name, lease.owner)
                return

    def abandon(self) -> None:
        """Stop renewing every lock this instance holds without releasing any: what a crash
        does (they expire within their TTL). For tests and for a process that must stop now."""
        for hold in self._holds.values():
            self._stop(hold)
        self._holds.clear()

    async def close(self) -> None:
        self._closed = True
        holds = list(self._holds.values())
        watchdogs = [h.watchdog for h in holds if h.watchdog is not None]
        self.abandon()
        if watchdogs:
            await asyncio.wait(watchdogs, timeout=1.0)
        for hold in holds:
            lease = hold.lease
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    while await self._release(lease.name, lease.owner, lease.fence) > 0:
                        pass
