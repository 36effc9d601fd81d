"""CALL methods (control-plane RPC over the WebSocket): groups, conversations, presence, users.

Each method takes the caller's connection and the JSON object of the request and returns the
JSON object of the result; a refusal raises :class:`~gochat.errors.GochatError` with the code
that docs/protocol.md lists for the method. The method table :data:`ControlCalls.methods` is
the one that docs/protocol.md documents (a test keeps them in step).

Membership changes (``group.add``, ``group.remove``, ``group.leave``) hold the group's
distributed lock (``group:{id}``, docs/consistency.md § Distributed locks) around reading the
members from the store, checking and writing: changes made on different nodes at once take
effect one after the other (a group never grows past ``max_group_members``, and each change's
event carries the version that change made). Each write carries the lock's fence, which the
store checks: a holder that stalled past the lock's TTL (and so may overlap a later holder) has
its write refused, and the CALL answers UNAVAILABLE (retryable; nothing changed).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson

from gochat._native.connection import Connection
from gochat.cluster.bus import GroupCreated, MemberAdded, MemberRemoved
from gochat.cluster.locks import Lease
from gochat.config import Settings
from gochat.errors import ErrorCode, RequestError, UnavailableError
from gochat.ids import MAX_ID
from gochat.messaging.addressing import Addressing, not_found, not_member
from gochat.messaging.delivery import Delivery
from gochat.messaging.watchers import PresenceWatchers
from gochat.protocol import EventType, Kind, encode, encode_event
from gochat.protocol.frames import CallResult
from gochat.resilience.degradation import Degradation
from gochat.store import Store
from gochat.store.base import StaleFenceError

if TYPE_CHECKING:
    from gochat.cluster.link import ClusterLink

__all__ = ["GROUP_LOCK_TTL_S", "GROUP_LOCK_WAIT_S", "GROUP_NAME_MAX", "PRESENCE_QUERY_MAX", "ControlCalls"]

GROUP_NAME_MAX = 128
PRESENCE_QUERY_MAX = 1000
#: a group's membership lock: held at most this long without renewal (a dead holder frees it
#: within it; the watchdog renews it while the change runs) ...
GROUP_LOCK_TTL_S = 5.0
#: ... and waited for at most this long (then the CALL answers UNAVAILABLE, retryable)
GROUP_LOCK_WAIT_S = 5.0

log = logging.getLogger("gochat.messaging.calls")

Method = Callable[[Connection, dict[str, Any]], Awaitable[dict[str, Any]]]


def _bad(message: str) -> RequestError:
    return RequestError(message, code=ErrorCode.BAD_REQUEST)


def _id(params: dict[str, Any], name: str) -> int:
    """A positive id field; an id above MAX_ID names nothing (NOT_FOUND)."""
    v = params.get(name)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise _bad(f"{name!r} must be a positive integer")
    if v > MAX_ID:
        raise not_found(name.removesuffix("_id"))
    return v


class ControlCalls:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        addressing: Addressing,
        delivery: Delivery,
        watchers: PresenceWatchers,
        link: ClusterLink,
        degradation: Degradation | None = None,
    ) -> None:
        self.degradation = degradation if degradation is not None else Degradation()
        self.max_group_members = settings.max_group_members
        self.store = store
        self.addressing = addressing
        self.delivery = delivery
        self.watchers = watchers
        self.link = link
        self.methods: dict[str, Method] = {
            "group.create": self.group_create,
            "group.info": self.group_info,
            "group.members": self.group_members,
            "group.add": self.group_add,
            "group.remove": self.group_remove,
            "group.leave": self.group_leave,
            "conversation.list": self.conversation_list,
            "presence.query": self.presence_query,
            "user.lookup": self.user_lookup,
            "user.get": self.user_get,
        }

    async def call(self, conn: Connection, method: str, payload: bytes, rid: int) -> bytes:
        handler = self.methods.get(method)
        if handler is None:
            raise RequestError(f"unknown method {method!r}", code=ErrorCode.UNKNOWN_METHOD)
        try:
            params = orjson.loads(payload) if payload else {}
        except orjson.JSONDecodeError as exc:
            raise RequestError(f"payload is not JSON: {exc}", code=ErrorCode.BAD_JSON) from None
        if not isinstance(params, dict):
            raise RequestError("payload must be a JSON object", code=ErrorCode.BAD_JSON)
        result = await handler(conn, params)
        return encode(CallResult(orjson.dumps(result), rid=rid))

    def _group_lock(self, conv: int) -> contextlib.AbstractAsyncContextManager[Lease]:
        """The distributed lock of group ``conv``'s membership (every node's changes of it)."""
        return self.link.backends.locks.lock(f"group:{conv}", ttl_s=GROUP_LOCK_TTL_S, timeout_s=GROUP_LOCK_WAIT_S)

    async def _locked_member_group(self, conv: int, user_id: int) -> tuple[int, ...]:
        """Under the group's lock: its members as stored now (the cache may not have heard of
        a change made on another node yet), cached; NOT_MEMBER unless ``user_id`` is one."""
        members = await self.addressing.reload_members(conv)
        if user_id not in members:
            raise not_member()
        return members

    @staticmethod
    def _lock_lost(exc: StaleFenceError) -> UnavailableError:
        """A membership write refused for its stale fence: this node's hold of the group's lock
        expired (stalled past the TTL) and a later holder has written since. Nothing changed;
        the client may retry (UNAVAILABLE)."""
        log.warning("group %d: membership write refused, the lock was lost (%s)", exc.conv, exc.message)
        return UnavailableError("the group changed meanwhile (lock lost); nothing was changed, retry")

    def _group_event(self, members: tuple[int, ...], etype: int, conv: int, actor: int, value: int) -> None:
        self.delivery.users(members, encode_event(etype, Kind.GROUP, conv, actor, value), None)

    # ---- groups ----------------------------------------------------------------------------------
    async def group_create(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        name = p.get("name", "")
        members = p.get("members", [])
        if not isinstance(name, str) or not 0 < len(name) <= GROUP_NAME_MAX:
            raise _bad(f"'name' must be 1–{GROUP_NAME_MAX} characters")
        if not isinstance(members, list) or not all(
            isinstance(m, int) and not isinstance(m, bool) and m > 0 for m in members
        ):
            raise _bad("'members' must be a list of user ids")
        if any(m > MAX_ID for m in members):
            raise not_found("user")
        if len(members) + 1 > self.max_group_members:
            raise _bad(f"at most {self.max_group_members} members")
        info = await self.store.create_group(conn.user_id, name, sorted(set(members)))
        self.addressing.set_members(info.conv, info.members, 1)  # a new group's version
        self.link.publish_event(GroupCreated(group_id=info.conv, owner_id=conn.user_id, version=1))
        # Every member hears of every other member: n² events. Above the inline tier (a group
        # created with more than fanout_inline_max members) that would be a fan-out storm (20,000
        # members: 400 million frames), so each added member hears only of itself there.
        large = len(info.members) > self.delivery.inline_max
        for uid in info.members:
            if uid != conn.user_id:
                event = encode_event(EventType.MEMBER_ADDED, Kind.GROUP, info.conv, conn.user_id, uid)
                self.delivery.users((uid,) if large else info.members, event, None)
        return {"group_id": info.conv, "name": info.name, "members": list(info.members)}

    async def group_info(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        conv = _id(p, "group_id")
        await self.addressing.member_group(conv, conn.user_id)
        info = await self.store.group_info(conv)
        if info is None:
            raise not_found("group")
        return {
            "group_id": info.conv,
            "name": info.name,
            "owner_id": info.owner_id,
            "created_ms": info.created_ms,
            "members": list(info.members),
            "last_seq": info.last_seq,
        }

    async def group_members(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        conv = _id(p, "group_id")
        members = await self.addressing.member_group(conv, conn.user_id)
        return {"group_id": conv, "members": list(members)}

    async def group_add(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        """Idempotent: adding a member again answers ``{"added": false}``."""
        conv, uid = _id(p, "group_id"), _id(p, "user_id")
        await self.addressing.member_group(conv, conn.user_id)  # NOT_FOUND / NOT_MEMBER early
        if await self.store.get_user(uid) is None:
            raise not_found("user")
        async with self._group_lock(conv) as lease:
            members = await self._locked_member_group(conv, conn.user_id)
            if uid in members:
                return {"added": False}
            if len(members) >= self.max_group_members:
                raise _bad("group is full")
            try:
                added = await self.store.add_member(conv, uid, fence=lease.fence)
            except StaleFenceError as exc:
                raise self._lock_lost(exc) from None
            if added:
                members = await self.addressing.reload_members(conv)
                version = self.addressing.version(conv)
        if added:
            self.link.publish_event(MemberAdded(group_id=conv, user_id=uid, actor_id=conn.user_id, version=version))
            self._group_event(members, EventType.MEMBER_ADDED, conv, conn.user_id, uid)
        return {"added": added}

    async def group_remove(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        conv, uid = _id(p, "group_id"), _id(p, "user_id")
        await self.addressing.member_group(conv, conn.user_id)
        info = await self.store.group_info(conv)
        if info is not None and uid != conn.user_id and info.owner_id != conn.user_id:
            raise RequestError("only the owner removes other members", code=ErrorCode.FORBIDDEN)
        async with self._group_lock(conv) as lease:
            members = await self._locked_member_group(conv, conn.user_id)
            try:
                removed = await self.store.remove_member(conv, uid, fence=lease.fence)
            except StaleFenceError as exc:
                raise self._lock_lost(exc) from None
            if removed:
                await self.addressing.reload_members(conv)
                version = self.addressing.version(conv)
        if removed:
            self.link.publish_event(MemberRemoved(group_id=conv, user_id=uid, actor_id=conn.user_id, version=version))
            self._group_event(members, EventType.MEMBER_REMOVED, conv, conn.user_id, uid)
        return {"removed": removed}

    async def group_leave(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        conv = _id(p, "group_id")
        me = conn.user_id
        await self.addressing.member_group(conv, me)
        async with self._group_lock(conv) as lease:
            members = await self._locked_member_group(conv, me)
            try:
                await self.store.remove_member(conv, me, fence=lease.fence)
            except StaleFenceError as exc:
                raise self._lock_lost(exc) from None
            await self.addressing.reload_members(conv)
            version = self.addressing.version(conv)
        self.link.publish_event(MemberRemoved(group_id=conv, user_id=me, actor_id=me, version=version))
        self._group_event(members, EventType.MEMBER_REMOVED, conv, me, me)
        return {"left": True}

    # ---- conversations, presence, users ----------------------------------------------------------
    async def conversation_list(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        out = []
        for c in await self.store.conversations(conn.user_id):
            wire = c.peer_id if c.kind == Kind.DIRECT else c.conv
            out.append(
                {
                    "kind": c.kind,
                    "conv_id": wire,
                    "last_seq": c.last_seq,
                    "read_seq": c.read_seq,
                    "name": c.name,
                }
            )
        return {"conversations": out}

    async def presence_query(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        """Who of ``user_ids`` is online; the connection then watches them (EVENT PRESENCE)."""
        ids = p.get("user_ids")
        if (
            not isinstance(ids, list)
            or not all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in ids)
            or len(ids) > PRESENCE_QUERY_MAX
        ):
            raise _bad(f"'user_ids' must be a list of at most {PRESENCE_QUERY_MAX} user ids")
        if any(i > MAX_ID for i in ids):
            raise not_found("user")
        if self.degradation.non_core_off:
            raise UnavailableError(
                "presence is off for now (degraded)", retry_after_ms=self.degradation.retry_after_ms
            )
        self.watchers.watch(conn, ids)
        online = await self.link.online(ids)
        return {"online": {str(i): online.get(i, False) for i in ids}}

    async def user_lookup(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        name = p.get("username")
        if not isinstance(name, str):
            raise _bad("'username' must be a string")
        user = await self.store.get_user_by_name(name)
        if user is None:
            raise not_found("user")
        return {"user_id": user.user_id, "username": user.username}

    async def user_get(self, conn: Connection, p: dict[str, Any]) -> dict[str, Any]:
        """A username by user id (the reverse of :meth:`user_lookup`), through the username
        caches (L1, then L2, then the store; NOT_FOUND when there is no such user)."""
        user_id = _id(p, "user_id")
        return {"user_id": user_id, "username": await self.addressing.user(user_id)}
