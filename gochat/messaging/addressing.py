"""Conversation addressing: which stored conversation a (kind, conv_id) names for a user, and
who its members are, with the caches that let the send path find both without I/O.

A direct conversation is addressed by the peer's user id (viewer-relative) and stored under an
internal conversation id; a group by its id. Both caches are :class:`~gochat.messaging.cache.
VersionedCache` instances (docs/consistency.md, "Caches"): bounded by entries and bytes, with a
TTL, single-flight loading (concurrent first lookups of one key share one store query) and
versions. A group's member list carries its membership version, so a list read before a change
is never cached over a newer one; a direct conversation's id never changes (version 0, a long
TTL). Ids above :data:`~gochat.ids.MAX_ID` name nothing (NOT_FOUND), whatever the store's
integer width.
"""

from __future__ import annotations

from gochat.errors import ErrorCode, RequestError
from gochat.ids import MAX_ID
from gochat.messaging.cache import VersionedCache
from gochat.protocol import Kind
from gochat.store import Store

__all__ = [
    "CACHE_MAX_ENTRIES",
    "DIRECT_MAX_BYTES",
    "DIRECT_TTL_S",
    "MEMBERS_MAX_BYTES",
    "MEMBERS_TTL_S",
    "Addressing",
    "Target",
]

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

#: (internal conversation id, group members or () for a direct conversation)
Target = tuple[int, tuple[int, ...]]


def _members_size(members: tuple[int, ...]) -> int:
    # the tuple (56 + 8 a slot) and an int object per member (user ids above 2**30: 32 bytes)
    return 56 + 40 * len(members)


def _pair_label(key: tuple[int, int]) -> str:
    return f"{key[0]}:{key[1]}"


def not_found(what: str) -> RequestError:
    return RequestError(f"no such {what}", code=ErrorCode.NOT_FOUND)


def not_member() -> RequestError:
    return RequestError("not a member of this group", code=ErrorCode.NOT_MEMBER)


class Addressing:
    """The direct-conversation and group-member caches over the store."""

    def __init__(
        self,
        store: Store,
        max_entries: int = CACHE_MAX_ENTRIES,
        members_max_bytes: int = MEMBERS_MAX_BYTES,
        direct_max_bytes: int = DIRECT_MAX_BYTES,
    ) -> None:
        self.store = store
        self.max_entries = max_entries
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

    @property
    def caches(self) -> tuple[VersionedCache[tuple[int, int], int], VersionedCache[int, tuple[int, ...]]]:
        """Both caches, for ``/metrics``."""
        return self.direct_cache, self.members_cache

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
        this node."""
        self.members_cache.put(conv, members, version)

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
        """Drop every cached entry that names ``user_id`` (a deleted user): its direct
        conversations and the member lists that hold it (they reload from the store). A scan of
        both caches; how many entries went."""
        return self.direct_cache.invalidate_where(lambda k, _v: user_id in k) + self.members_cache.invalidate_where(
            lambda _k, members: user_id in members
        )

    def clear(self) -> None:
        """Forget every cached group member list (a rebuild: they refill from the store; the
        versions they were read at stay known)."""
        self.members_cache.clear()

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

        async def load() -> tuple[int, int]:
            return 0, await self.store.direct_conversation(me, peer)

        return await self.direct_cache.get_or_load((me, peer) if me <= peer else (peer, me), load)

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
        """Read group ``conv``'s members from the store again (after a change) and cache them."""
        version, members = await self.store.members_versioned(conv)
        self.set_members(conv, members, version)
        return members

    async def _load_members(self, conv: int) -> tuple[int, tuple[int, ...]]:
        if conv > MAX_ID or await self.store.conversation_kind(conv) != Kind.GROUP:
            raise not_found("group")
        return await self.store.members_versioned(conv)
