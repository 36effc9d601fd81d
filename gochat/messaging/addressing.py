"""Conversation addressing: which stored conversation a (kind, conv_id) names for a user, and
who its members are, with the caches that let the send path find both without I/O.

A direct conversation is addressed by the peer's user id (viewer-relative) and stored under an
internal conversation id; a group by its id. The caches are :class:`~gochat.messaging.cache.
VersionedCache` instances (docs/consistency.md, "Caches"): bounded by entries and bytes, with a
TTL, single-flight loading (concurrent first lookups of one key share one store query) and
versions. A group's member list carries its membership version, so a list read before a change
is never cached over a newer one; a direct conversation's id never changes (version 0, a long
TTL). Ids above :data:`~gochat.ids.MAX_ID` name nothing (NOT_FOUND), whatever the store's
integer width. A third cache holds usernames by user id (immutable: no rename exists).

Below the in-process caches is the cluster's shared (L2) cache (:mod:`gochat.messaging.l2`):
a miss asks it before the store and fills it after a store read; a change made here writes
its new member list through to it. It is best effort: when it fails, lookups read the store.
:meth:`Addressing.warm_up` fills the member cache with the most recently active groups when a
node starts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from gochat.cluster.shared_cache import SharedCache
from gochat.errors import ErrorCode, RequestError
from gochat.ids import MAX_ID
from gochat.messaging.cache import VersionedCache
from gochat.messaging.l2 import L2Stats, SharedTier
from gochat.protocol import Kind
from gochat.store import Store

__all__ = [
    "CACHE_MAX_ENTRIES",
    "DIRECT_MAX_BYTES",
    "DIRECT_TTL_S",
    "MEMBERS_MAX_BYTES",
    "MEMBERS_TTL_S",
    "USERS_MAX_BYTES",
    "USERS_TTL_S",
    "WARMUP_BATCH",
    "WARMUP_GROUPS",
    "Addressing",
    "Target",
    "WarmupStats",
]

log = logging.getLogger("gochat.messaging.addressing")

#: entries per cache (a bound on memory, with the byte bounds below)
CACHE_MAX_ENTRIES = 1 << 18
#: estimated bytes of the group-member cache (a group of 10,000 members is about 400 KB)
MEMBERS_MAX_BYTES = 256 << 20
#: estimated bytes of the direct-conversation directory (about 350 bytes an entry)
DIRECT_MAX_BYTES = 128 << 20
#: a cached member list is read again after this long even without an event (a safety net:
#: changes reach the cache through the event bus)
MEMBERS_TTL_S = 600.0
#: a direct conversation's id never changes: the TTL only ages out idle pairs
DIRECT_TTL_S = 86400.0
#: estimated bytes of the username cache (about 300 bytes an entry)
USERS_MAX_BYTES = 64 << 20
#: a username never changes (no rename exists): the TTL only ages out idle users
USERS_TTL_S = 86400.0
#: groups whose members a starting node loads (the most recently active ones) ...
WARMUP_GROUPS = 1000
#: ... this many at a time (one L2 read, then the store for what L2 did not have)
WARMUP_BATCH = 100

#: (internal conversation id, group members or () for a direct conversation)
Target = tuple[int, tuple[int, ...]]


def _members_size(members: tuple[int, ...]) -> int:
    # the tuple (56 + 8 a slot) and an int object per member (user ids above 2**30: 32 bytes)
    return 56 + 40 * len(members)


def _pair_label(key: tuple[int, int]) -> str:
    return f"{key[0]}:{key[1]}"


def _username_size(name: str) -> int:
    return 100 + len(name)  # the int key and the str


@dataclass(slots=True)
class WarmupStats:
    """What :meth:`Addressing.warm_up` did (exported in ``/metrics``)."""

    #: member lists loaded into the L1 cache, from L2 and from the store
    from_l2: int = 0
    from_store: int = 0
    seconds: float = 0.0
    done: bool = False
    failed: bool = False


def not_found(what: str) -> RequestError:
    return RequestError(f"no such {what}", code=ErrorCode.NOT_FOUND)


def not_member() -> RequestError:
    return RequestError("not a member of this group", code=ErrorCode.NOT_MEMBER)


class Addressing:
    """The direct-conversation, group-member and username caches over the shared cache
    (``shared``; None: none) and the store."""

    def __init__(
        self,
        store: Store,
        shared: SharedCache | None = None,
        max_entries: int = CACHE_MAX_ENTRIES,
        members_max_bytes: int = MEMBERS_MAX_BYTES,
        direct_max_bytes: int = DIRECT_MAX_BYTES,
    ) -> None:
        self.store = store
        self.max_entries = max_entries
        self.l2 = SharedTier(shared, members_ttl_s=MEMBERS_TTL_S, direct_ttl_s=DIRECT_TTL_S, users_ttl_s=USERS_TTL_S)
        self.warmup = WarmupStats()
        #: write-throughs of set_members still running (kept so that they are not collected)
        self._writes: set[asyncio.Task[None]] = set()
        #: (lo, hi) user pair -> internal conversation id (immutable: version 0)
        self.direct_cache: VersionedCache[tuple[int, int], int] = VersionedCache(
            "direct",
            max_entries=max_entries,
            max_bytes=direct_max_bytes,
            ttl_s=DIRECT_TTL_S,
            entry_size=150,  # the key tuple, two user ids and the conversation id
            max_tombstones=0,  # no versions to remember
            key_label=_pair_label,
        )
        #: group conv -> members, at the group's membership version
        self.members_cache: VersionedCache[int, tuple[int, ...]] = VersionedCache(
            "group_members",
            max_entries=max_entries,
            max_bytes=members_max_bytes,
            ttl_s=MEMBERS_TTL_S,
            size=_members_size,
        )
        #: user id -> username (immutable: version 0)
        self.users_cache: VersionedCache[int, str] = VersionedCache(
            "users",
            max_entries=max_entries,
            max_bytes=USERS_MAX_BYTES,
            ttl_s=USERS_TTL_S,
            size=_username_size,
            max_tombstones=0,
        )

    @property
    def caches(self) -> tuple[VersionedCache[tuple[int, int], int], VersionedCache[int, tuple[int, ...]], VersionedCache[int, str]]:
        """The L1 caches, for ``/metrics``."""
        return self.direct_cache, self.members_cache, self.users_cache

    @property
    def l2_stats(self) -> tuple[L2Stats, L2Stats, L2Stats]:
        """The shared (L2) tier's counters per cache, for ``/metrics``."""
        return self.l2.stats

    # ---- without I/O ---------------------------------------------------------------------------
    def cached_target(self, me: int, kind: int, conv_id: int) -> Target | None:
        """(conv, members) from the caches, or None on a miss. Raises NOT_MEMBER when cached
        and ``me`` is not a member."""
        if kind == Kind.GROUP:
            members = self.members_cache.get(conv_id)
            if members is None:
                return None
            if me not in members:
                raise not_member()
            return conv_id, members
        conv = self.direct_cache.get((me, conv_id) if me <= conv_id else (conv_id, me))
        return None if conv is None else (conv, ())

    def cached_members(self, conv: int) -> tuple[int, ...]:
        """The cached members of group ``conv`` (empty when not cached)."""
        return self.members_cache.get(conv) or ()

    def set_members(self, conv: int, members: tuple[int, ...], version: int | None = None) -> None:
        """Cache ``members`` of group ``conv`` (read at membership ``version``; not cached
        when this node already knows a newer version). The write-through of a change made on
        this node (``group.create``): to L2 too, in the background."""
        self.members_cache.put(conv, members, version)
        if version is not None and self.l2.shared is not None:
            try:
                task = asyncio.get_running_loop().create_task(self.l2.put_members(conv, version, members))
            except RuntimeError:  # no event loop: nothing to share with
                return
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)

    def version(self, conv: int) -> int:
        """The newest membership version of group ``conv`` known here (0: none)."""
        return self.members_cache.version(conv)

    def members_changed(self, conv: int, version: int) -> bool:
        """A membership change at ``version`` (from the event bus): drop the cached members
        when the change is newer than what is held (the next use reads the store). True when
        it was newer."""
        return self.members_cache.invalidate(conv, version)

    def groups_changed(self, convs: list[int], version: int) -> int:
        """A batch of groups changed at ``version`` at least: :meth:`members_changed` each."""
        return self.members_cache.invalidate_many(convs, version)

    def forget_user(self, user_id: int) -> int:
        """Drop every cached entry that names ``user_id`` (a deleted user): its username, its
        direct conversations and the member lists that hold it (they reload from the store). A
        scan of the L1 caches (L2 entries stay until their TTL: no user deletion exists yet);
        how many entries went."""
        return (
            self.users_cache.invalidate_where(lambda k, _v: k == user_id)
            + self.direct_cache.invalidate_where(lambda k, _v: user_id in k)
            + self.members_cache.invalidate_where(lambda _k, members: user_id in members)
        )

    def clear(self) -> None:
        """Forget every cached group member list (a rebuild: they refill from the store; the
        versions they were read at stay known), and stop trusting the member lists L2 holds
        from before now (events may have been missed: :class:`~gochat.messaging.l2.SharedTier`)."""
        self.members_cache.clear()
        self.l2.rebuilt()

    # ---- with a store lookup on a miss ---------------------------------------------------------
    async def target(self, me: int, kind: int, conv_id: int) -> Target:
        """(conv, members) of a conversation ``me`` may send to."""
        if kind == Kind.GROUP:
            return conv_id, await self.member_group(conv_id, me)
        return await self.direct(me, conv_id), ()

    async def resolve(self, me: int, kind: int, conv_id: int) -> int:
        """The internal id of a stored conversation ``me`` may read (rooms store nothing)."""
        if kind == Kind.DIRECT:
            return await self.direct(me, conv_id)
        if kind == Kind.GROUP:
            await self.member_group(conv_id, me)
            return conv_id
        raise RequestError("rooms have no history", code=ErrorCode.BAD_REQUEST)

    async def direct(self, me: int, peer: int) -> int:
        if peer == 0 or peer > MAX_ID:
            raise not_found("user")
        lo, hi = (me, peer) if me <= peer else (peer, me)

        async def load() -> tuple[int, int]:
            conv = await self.l2.direct(lo, hi)
            if conv is None:
                conv = await self.store.direct_conversation(me, peer)
                await self.l2.put_direct(lo, hi, conv)
            return 0, conv

        return await self.direct_cache.get_or_load((lo, hi), load)

    async def user(self, user_id: int) -> str:
        """The username of ``user_id`` (NOT_FOUND when there is none; not cached then)."""
        if user_id <= 0 or user_id > MAX_ID:
            raise not_found("user")

        async def load() -> tuple[int, str]:
            name = await self.l2.user(user_id)
            if name is None:
                record = await self.store.get_user(user_id)
                if record is None:
                    raise not_found("user")
                name = record.username
                await self.l2.put_user(user_id, name)
            return 0, name

        return await self.users_cache.get_or_load(user_id, load)

    async def member_group(self, conv: int, user_id: int) -> tuple[int, ...]:
        """The members of group ``conv``; NOT_MEMBER unless ``user_id`` is one of them."""
        members = await self.group_members(conv)
        if user_id not in members:
            raise not_member()
        return members

    async def group_members(self, conv: int) -> tuple[int, ...]:
        # Single flight: concurrent first lookups share one query and resume in call order.
        return await self.members_cache.get_or_load(conv, lambda: self._load_members(conv))

    async def reload_members(self, conv: int) -> tuple[int, ...]:
        """Read group ``conv``'s members from the store again (after a change, under the
        group's lock) and cache them, here and in L2 (awaited: the change's event, published
        after this, finds L2 up to date)."""
        version, members = await self.store.members_versioned(conv)
        self.members_cache.put(conv, members, version)
        await self.l2.put_members(conv, version, members)
        return members

    async def _load_members(self, conv: int) -> tuple[int, tuple[int, ...]]:
        if conv > MAX_ID:
            raise not_found("group")
        found, now_us = await self.l2.members([conv], self.members_cache.version)
        if conv in found:
            return found[conv]  # only groups are written to L2
        if await self.store.conversation_kind(conv) != Kind.GROUP:
            raise not_found("group")
        version, members = await self.store.members_versioned(conv)
        if now_us is not None:
            await self.l2.put_members(conv, version, members, now_us)
        return version, members

    # ---- warm-up -------------------------------------------------------------------------------
    async def warm_up(self, limit: int = WARMUP_GROUPS, batch: int = WARMUP_BATCH) -> WarmupStats:
        """Load the member lists of the ``limit`` most recently active groups into the L1
        cache, ``batch`` groups at a time: from L2 where it holds a usable entry, else from
        the store (then written to L2). Run in the background when a node starts; a failure is
        logged and ends it (the groups load on first use instead)."""
        w = self.warmup
        started = time.monotonic()
        try:
            groups = await self.store.recent_groups(limit)
            for i in range(0, len(groups), batch):
                chunk = [g for g in groups[i : i + batch] if g not in self.members_cache]
                found, now_us = await self.l2.members(chunk, self.members_cache.version)
                for g, (version, members) in found.items():
                    w.from_l2 += self.members_cache.put(g, members, version)
                rest = [g for g in chunk if g not in found]
                loaded = await asyncio.gather(*(self.store.members_versioned(g) for g in rest))
                writes = []
                for g, (version, members) in zip(rest, loaded, strict=True):
                    if version:
                        w.from_store += self.members_cache.put(g, members, version)
                        if now_us is not None:
                            writes.append(self.l2.put_members(g, version, members, now_us))
                await asyncio.gather(*writes)
        except asyncio.CancelledError:
            raise
        except Exception:
            w.failed = True
            log.warning("cache warm-up failed after %d groups; the rest load on first use", w.from_l2 + w.from_store, exc_info=True)
        finally:
            w.seconds = time.monotonic() - started
            w.done = True
        log.info(
            "cache warm-up: %d group member lists from L2, %d from the store in %.2fs", w.from_l2, w.from_store, w.seconds
        )
        return w
