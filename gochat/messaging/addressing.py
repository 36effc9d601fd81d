"""Conversation addressing: which stored conversation a (kind, conv_id) names for a user, and
who its members are, with the caches that let the send path find both without I/O.

A direct conversation is addressed by the peer's user id (viewer-relative) and stored under an
internal conversation id; a group by its id. Both caches are bounded: past ``max_entries`` a
cache is cleared and refills on demand (a miss costs one store lookup, and concurrent first
lookups of one group share it: single flight). Ids above :data:`~gochat.ids.MAX_ID` name
nothing (NOT_FOUND), whatever the store's integer width.
"""

from __future__ import annotations

import asyncio

from gochat.errors import ErrorCode, RequestError
from gochat.ids import MAX_ID
from gochat.protocol import Kind
from gochat.store import Store

__all__ = ["CACHE_MAX_ENTRIES", "Addressing", "Target"]

#: entries per cache before it is cleared (a bound on memory)
CACHE_MAX_ENTRIES = 1 << 18

#: (internal conversation id, group members or () for a direct conversation)
Target = tuple[int, tuple[int, ...]]


def not_found(what: str) -> RequestError:
    return RequestError(f"no such {what}", code=ErrorCode.NOT_FOUND)


def not_member() -> RequestError:
    return RequestError("not a member of this group", code=ErrorCode.NOT_MEMBER)


class Addressing:
    """The direct-conversation and group-member caches over the store."""

    def __init__(self, store: Store, max_entries: int = CACHE_MAX_ENTRIES) -> None:
        self.store = store
        self.max_entries = max_entries
        self._direct: dict[tuple[int, int], int] = {}  # (lo, hi) -> conv
        self._members: dict[int, tuple[int, ...]] = {}  # group conv -> members
        #: group conv -> the newest membership version known here (from the store or the
        #: event bus); a member list read at an older version is not cached
        self._versions: dict[int, int] = {}
        self._inflight: dict[int, asyncio.Task[tuple[int, ...]]] = {}

    # ---- without I/O ---------------------------------------------------------------------------
    def cached_target(self, me: int, kind: int, conv_id: int) -> Target | None:
        """(conv, members) from the caches, or None on a miss. Raises NOT_MEMBER when cached
        and ``me`` is not a member."""
        if kind == Kind.GROUP:
            members = self._members.get(conv_id)
            if members is None:
                return None
            if me not in members:
                raise not_member()
            return conv_id, members
        conv = self._direct.get((me, conv_id) if me <= conv_id else (conv_id, me))
        return None if conv is None else (conv, ())

    def cached_members(self, conv: int) -> tuple[int, ...]:
        """The cached members of group ``conv`` (empty when not cached)."""
        return self._members.get(conv, ())

    def set_members(self, conv: int, members: tuple[int, ...], version: int | None = None) -> None:
        """Cache ``members`` of group ``conv`` (read at membership ``version``; not cached
        when this node already knows a newer version)."""
        if version is not None:
            if version < self._versions.get(conv, 0):
                return
            if len(self._versions) >= self.max_entries:
                self._versions.clear()
            self._versions[conv] = version
        if len(self._members) >= self.max_entries:
            self._members.clear()
        self._members[conv] = members

    def version(self, conv: int) -> int:
        """The newest membership version of group ``conv`` known here (0: none)."""
        return self._versions.get(conv, 0)

    def members_changed(self, conv: int, version: int) -> bool:
        """A membership change at ``version`` (from the event bus): drop the cached members
        when the change is newer than what is held (the next use reads the store). True when
        it was newer."""
        if version <= self._versions.get(conv, 0):
            return False
        if len(self._versions) >= self.max_entries:
            self._versions.clear()
        self._versions[conv] = version
        self._members.pop(conv, None)
        return True

    def clear(self) -> None:
        """Forget every cached group member list (a rebuild: they refill from the store)."""
        self._members.clear()

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
        key = (me, peer) if me <= peer else (peer, me)
        conv = self._direct.get(key)
        if conv is None:
            if peer == 0 or peer > MAX_ID:
                raise not_found("user")
            conv = await self.store.direct_conversation(me, peer)
            if len(self._direct) >= self.max_entries:
                self._direct.clear()
            self._direct[key] = conv
        return conv

    async def member_group(self, conv: int, user_id: int) -> tuple[int, ...]:
        """The members of group ``conv``; NOT_MEMBER unless ``user_id`` is one of them."""
        members = await self.group_members(conv)
        if user_id not in members:
            raise not_member()
        return members

    async def group_members(self, conv: int) -> tuple[int, ...]:
        members = self._members.get(conv)
        if members is not None:
            return members
        # Single flight: concurrent first lookups share one query and resume in call order.
        task = self._inflight.get(conv)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load_members(conv))
            self._inflight[conv] = task
            task.add_done_callback(lambda _t: self._inflight.pop(conv, None))
        return await asyncio.shield(task)

    async def reload_members(self, conv: int) -> tuple[int, ...]:
        """Read group ``conv``'s members from the store again (after a change) and cache them."""
        version, members = await self.store.members_versioned(conv)
        self.set_members(conv, members, version)
        return members

    async def _load_members(self, conv: int) -> tuple[int, ...]:
        if conv > MAX_ID or await self.store.conversation_kind(conv) != Kind.GROUP:
            raise not_found("group")
        version, members = await self.store.members_versioned(conv)
        self.set_members(conv, members, version)
        return members
