"""The shared (L2) tier as the addressing caches use it: typed, best effort, bounded in time,
counted (docs/consistency.md, "Caches").

:class:`SharedTier` wraps the cluster's :class:`~gochat.cluster.shared_cache.SharedCache`
(Redis in a cluster, the hub's table in embedded mode) for :class:`~gochat.messaging.addressing.
Addressing`: group members (versioned), the direct-conversation directory and usernames
(write-once). No L2 operation may fail or stall a request: each is bounded by
:data:`L2_TIMEOUT_S`; an error (the backend down, a timeout, anything it raises) is counted,
logged at most once per :data:`LOG_EVERY_S`, and turns the tier off for :data:`L2_PAUSE_S`, so
that during an outage lookups go straight to the store instead of waiting for it each time.

Which member lists it trusts: an entry older than the version this node already knows (an
event's tombstone in the L1 cache) is *stale* and ignored; so is, after a rebuild (the node
could not replay the events it missed), every entry stamped before the rebuild: the tier then
takes the backend's clock at its next read as its *floor* and trusts only entries whose stamp
is later (their value was read from the store, or written under the group's lock, after the
rebuild began, so any change they miss reaches this node as an event).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from gochat.cluster.shared_cache import SharedCache, fits, pack_members, unpack_members

__all__ = ["L2_PAUSE_S", "L2_TIMEOUT_S", "LOG_EVERY_S", "L2Stats", "SharedTier"]

log = logging.getLogger("gochat.messaging.l2")

T = TypeVar("T")

#: one L2 operation waits at most this long (a healthy Redis answers in well under 1 ms)
L2_TIMEOUT_S = 0.25
#: after an L2 error the tier is off this long (lookups read the store directly)
L2_PAUSE_S = 1.0
#: L2 errors are logged at most once per this many seconds (with the count since)
LOG_EVERY_S = 30.0

_MEMBERS, _DIRECT, _USER = "members", "direct", "user"
_SKIPPED: Any = object()  # the operation did not run (off, or failed)


@dataclass(slots=True)
class L2Stats:
    """One cache's L2 counters (``cache`` label), read when ``/metrics`` is scraped."""

    name: str
    #: entries found and used
    hits: int = 0
    #: reads that found no entry
    misses: int = 0
    #: entries found and ignored: older than the version known here, or stamped before a rebuild
    stale: int = 0
    #: operations that failed or timed out (each turns the tier off for L2_PAUSE_S)
    errors: int = 0
    #: writes the backend stored
    writes: int = 0
    #: values not written: larger than MAX_ENTRY_BYTES
    too_large: int = 0
    #: reads that reached the backend, and the seconds they took
    reads: int = 0
    read_seconds: float = 0.0


class SharedTier:
    """The L2 operations of :class:`~gochat.messaging.addressing.Addressing` (module doc).
    ``shared=None``: no L2 (every read misses, nothing is written)."""

    def __init__(self, shared: SharedCache | None, *, members_ttl_s: float, direct_ttl_s: float, users_ttl_s: float) -> None:
        self.shared = shared
        self.members_ttl_s = members_ttl_s
        self.direct_ttl_s = direct_ttl_s
        self.users_ttl_s = users_ttl_s
        self.members_stats = L2Stats("group_members")
        self.direct_stats = L2Stats("direct")
        self.users_stats = L2Stats("users")
        #: member entries stamped at or before this (backend µs) are not trusted
        self.floor_us = -1
        #: a rebuild happened: the next read sets the floor
        self.floor_pending = False
        self._off_until = 0.0
        self._logged_at = -LOG_EVERY_S
        self._unlogged = 0

    @property
    def stats(self) -> tuple[L2Stats, L2Stats, L2Stats]:
        return self.direct_stats, self.members_stats, self.users_stats

    def rebuilt(self) -> None:
        """This node could not replay the events it missed: distrust member entries written
        before now (the floor is the backend's clock at the next read)."""
        self.floor_pending = True

    # ---- group members (versioned) -------------------------------------------------------------
    async def members(
        self, groups: list[int], known: Callable[[int], int]
    ) -> tuple[dict[int, tuple[int, tuple[int, ...]]], int | None]:
        """The usable entries of ``groups`` as ``{group: (version, members)}`` and the backend's
        clock (µs, read before the entries; None when L2 was not read). ``known(group)``: the
        newest version this node knows (an entry below it is stale)."""
        st = self.members_stats
        shared = self.shared
        if shared is None or not groups:
            return {}, None
        got = await self._run(st, lambda: shared.get_versioned(_MEMBERS, [str(g) for g in groups]), read=True)
        if got is _SKIPPED:
            return {}, None
        entries, now_us = got
        if self.floor_pending:
            self.floor_pending = False
            self.floor_us = now_us
        found: dict[int, tuple[int, tuple[int, ...]]] = {}
        for group, e in zip(groups, entries, strict=True):
            if e is None:
                st.misses += 1
            elif e.version < known(group) or e.stamp_us <= self.floor_us:
                st.stale += 1
            else:
                try:
                    found[group] = (e.version, unpack_members(e.data))
                except ValueError:
                    st.stale += 1  # not a member list: never written by this code
                    continue
                st.hits += 1
        return found, now_us

    async def put_members(self, group: int, version: int, members: tuple[int, ...], stamp_us: int | None = None) -> None:
        """Write ``members`` at ``version`` (kept only if newer than the entry). ``stamp_us``:
        the backend clock read before the store was (a reader); None: the write's own time (a
        writer under the group's lock, where nothing else changes the group meanwhile)."""
        st = self.members_stats
        shared = self.shared
        if shared is None or version <= 0:
            return
        data = pack_members(members)
        if not fits(data):
            st.too_large += 1
            return
        stored = await self._run(
            st, lambda: shared.put_versioned(_MEMBERS, str(group), version, data, self.members_ttl_s, stamp_us)
        )
        if stored is True:
            st.writes += 1

    # ---- the direct-conversation directory and usernames (write-once) -------------------------
    async def direct(self, lo: int, hi: int) -> int | None:
        raw = await self._get(self.direct_stats, _DIRECT, f"{lo}:{hi}")
        return None if raw is None else int(raw)

    async def put_direct(self, lo: int, hi: int, conv: int) -> None:
        await self._put_once(self.direct_stats, _DIRECT, f"{lo}:{hi}", b"%d" % conv, self.direct_ttl_s)

    async def user(self, user_id: int) -> str | None:
        raw = await self._get(self.users_stats, _USER, str(user_id))
        return None if raw is None else raw.decode()

    async def put_user(self, user_id: int, username: str) -> None:
        await self._put_once(self.users_stats, _USER, str(user_id), username.encode(), self.users_ttl_s)

    async def _get(self, st: L2Stats, space: str, key: str) -> bytes | None:
        shared = self.shared
        if shared is None:
            return None
        raw = await self._run(st, lambda: shared.get(space, key), read=True)
        if raw is _SKIPPED:
            return None
        if raw is None:
            st.misses += 1
            return None
        st.hits += 1
        return raw  # type: ignore[no-any-return]

    async def _put_once(self, st: L2Stats, space: str, key: str, data: bytes, ttl_s: float) -> None:
        shared = self.shared
        if shared is None:
            return
        if not fits(data):
            st.too_large += 1
            return
        if await self._run(st, lambda: shared.put_once(space, key, data, ttl_s)) is True:
            st.writes += 1

    # ---- every operation -----------------------------------------------------------------------
    async def _run(self, st: L2Stats, op: Callable[[], Awaitable[T]], read: bool = False) -> T:
        """``await op()`` within L2_TIMEOUT_S, or _SKIPPED (the tier is off, or it failed)."""
        started = time.monotonic()
        if started < self._off_until:
            return _SKIPPED  # type: ignore[no-any-return]
        try:
            async with asyncio.timeout(L2_TIMEOUT_S):
                result = await op()
        except Exception as exc:  # best effort: nothing L2 does may fail a request
            st.errors += 1
            now = time.monotonic()
            self._off_until = now + L2_PAUSE_S
            self._failed(st.name, exc, now)
            return _SKIPPED  # type: ignore[no-any-return]
        if read:
            st.reads += 1
            st.read_seconds += time.monotonic() - started
        return result

    def _failed(self, name: str, exc: Exception, now: float) -> None:
        self._unlogged += 1
        if now - self._logged_at < LOG_EVERY_S:
            return
        log.warning(
            "shared cache (L2) unavailable (%s: %r); %d error(s) since the last report; lookups read the store",
            name,
            exc,
            self._unlogged,
        )
        self._logged_at = now
        self._unlogged = 0
