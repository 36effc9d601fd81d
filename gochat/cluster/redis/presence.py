"""Cluster presence on Redis: :class:`RedisPresence` (sessions per user and node in hashes,
epoch fencing, node liveness keys, Lua scripts that keep each change atomic)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence

from redis.asyncio import Redis

from gochat.cluster.base import REGISTRY_TTL_S, SessionLease
from gochat.cluster.redis.client import DEFAULT_PREFIX, _Client, _s, cancel_tasks, log
from gochat.errors import UnavailableError

__all__ = ["PER_NODE_MIN", "RedisPresence"]

#: with candidate nodes given, ``nodes_for`` asks per node once there are this many users per
#: candidate (one SMISMEMBER per node instead of one HKEYS per user)
PER_NODE_MIN = 8

# Fields are "{node_id}:{session_id}"; a field counts only while its node's liveness key
# ({prefix}pn:{node_id}) exists.
_NODE_OF = "local function node_of(f) return string.match(f, '^(.*):[^:]*$') end\n"

_LIVE = """
local seen = {}
local function alive(node)
  local a = seen[node]
  if a == nil then
    a = redis.call('EXISTS', ARGV[3] .. node)
    seen[node] = a
  end
  return a == 1
end
"""

# KEYS: p:{uid}, epoch:{uid}, n:{node}, pn:{node}
# ARGV: field, uid, liveness prefix, epoch ttl (s), node ttl (ms)
_SESSION_UP = (
    _NODE_OF
    + _LIVE
    + """
redis.call('SET', KEYS[4], '1', 'PX', ARGV[5])
local live = 0
for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
  local node = node_of(f)
  if node and alive(node) then live = live + 1 end
end
local epoch = redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('HSET', KEYS[1], ARGV[1], epoch)
redis.call('SADD', KEYS[3], ARGV[2])
if live == 0 then return {1, epoch} end
return {0, epoch}
"""
)

# KEYS: p:{uid}, n:{node}
# ARGV: field, epoch ('' = any), liveness prefix, uid, node
_SESSION_DOWN = (
    _NODE_OF
    + _LIVE
    + """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur and (ARGV[2] == '' or cur == ARGV[2]) then redis.call('HDEL', KEYS[1], ARGV[1]) end
local live = 0
local mine = false
for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
  local node = node_of(f)
  if node == ARGV[5] then
    mine = true
    live = live + 1
  elseif node and alive(node) then
    live = live + 1
  end
end
if not mine then redis.call('SREM', KEYS[2], ARGV[4]) end
if live == 0 then return 1 end
return 0
"""
)

# KEYS: n:{node}
# ARGV: node, users per call, liveness prefix, user key prefix
# Pops a chunk of the node's users and removes the node's sessions from each, atomically (a
# failed call loses nothing: the next one carries on). Returns {popped, offline users}.
_DROP_NODE = (
    _NODE_OF
    + _LIVE
    + """
local uids = redis.call('SPOP', KEYS[1], ARGV[2])
local offline = {}
for _, uid in ipairs(uids) do
  local key = ARGV[4] .. uid
  local live = 0
  for _, f in ipairs(redis.call('HKEYS', key)) do
    local node = node_of(f)
    if node == ARGV[1] then
      redis.call('HDEL', key, f)
    elseif node and alive(node) then
      live = live + 1
    end
  end
  if live == 0 then offline[#offline + 1] = uid end
end
return {#uids, offline}
"""
)


def _chunks(items: Sequence[int], n: int) -> Iterable[Sequence[int]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


class RedisPresence(_Client):
    """:class:`~gochat.cluster.base.Presence` on Redis, multi-device safe.

    Keys: ``{prefix}p:{uid}`` hash ``"{node_id}:{session_id}"`` -> epoch; ``{prefix}epoch:{uid}``
    fencing counter (INCR per session_up, expires after ``epoch_ttl_s`` idle);
    ``{prefix}n:{node_id}`` set of the users with sessions on that node (for :meth:`drop_node`);
    ``{prefix}pn:{node_id}`` node liveness (PX ``node_ttl_s``), refreshed every third of it by
    the instance that recorded sessions for the node. Sessions of a node whose liveness key
    expired are ignored by every read (a crashed node stops counting within ``node_ttl_s``
    even before someone calls :meth:`drop_node`, which removes them for good).
    """

    def __init__(
        self,
        redis: Redis | str,
        prefix: str = DEFAULT_PREFIX,
        *,
        node_ttl_s: float = REGISTRY_TTL_S,
        epoch_ttl_s: int = 30 * 86_400,
        chunk: int = 1000,
        timeout_s: float = 2.0,
    ) -> None:
        super().__init__(redis, prefix, timeout_s)
        self.node_ttl_s = node_ttl_s
        self.epoch_ttl_s = epoch_ttl_s
        self.chunk = chunk
        self.live_prefix = f"{prefix}pn:"
        self._up = self.redis.register_script(_SESSION_UP)
        self._down = self.redis.register_script(_SESSION_DOWN)
        self._drop = self.redis.register_script(_DROP_NODE)
        self._local_nodes: set[str] = set()
        self._heartbeat_task: asyncio.Task[None] | None = None

    def user_key(self, user_id: int) -> str:
        return f"{self.prefix}p:{user_id}"

    def node_users_key(self, node_id: str) -> str:
        return f"{self.prefix}n:{node_id}"

    def _node_ttl_ms(self) -> int:
        return max(1, int(self.node_ttl_s * 1000))

    async def session_up(self, user_id: int, node_id: str, session_id: int) -> SessionLease:
        self._local_nodes.add(node_id)
        if self._heartbeat_task is None or self._heartbeat_task.done():
            self._heartbeat_task = asyncio.create_task(self._heartbeat(), name="presence-heartbeat")
        async with self.guard("presence session_up"):
            came, epoch = await self._up(
                keys=[
                    self.user_key(user_id),
                    f"{self.prefix}epoch:{user_id}",
                    self.node_users_key(node_id),
                    self.live_prefix + node_id,
                ],
                args=[f"{node_id}:{session_id}", user_id, self.live_prefix, self.epoch_ttl_s, self._node_ttl_ms()],
            )
        return SessionLease(bool(came), int(epoch))

    async def session_down(
        self, user_id: int, node_id: str, session_id: int, epoch: int | None = None
    ) -> bool:
        async with self.guard("presence session_down"):
            gone = await self._down(
                keys=[self.user_key(user_id), self.node_users_key(node_id)],
                args=[
                    f"{node_id}:{session_id}",
                    "" if epoch is None else str(epoch),
                    self.live_prefix,
                    user_id,
                    node_id,
                ],
            )
        return bool(gone)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.node_ttl_s / 3)
            nodes = sorted(self._local_nodes)
            if not nodes:
                continue
            try:
                async with self.guard("presence heartbeat"):
                    pipe = self.redis.pipeline(transaction=False)
                    for node in nodes:
                        pipe.set(self.live_prefix + node, b"1", px=self._node_ttl_ms())
                    await pipe.execute()
            except UnavailableError as exc:
                log.warning("presence: cannot refresh node liveness of %s: %s", ", ".join(nodes), exc)
            except Exception:
                log.exception("presence heartbeat failed")

    async def _sessions(self, user_ids: Iterable[int]) -> dict[int, list[str]]:
        """user -> the live nodes that hold its sessions (pipelined, ``chunk`` users a trip)."""
        uids = list(dict.fromkeys(user_ids))
        per_user: dict[int, list[str]] = {}
        all_nodes: dict[str, bool] = {}
        async with self.guard("presence read"):
            for part in _chunks(uids, self.chunk):
                pipe = self.redis.pipeline(transaction=False)
                for uid in part:
                    pipe.hkeys(self.user_key(uid))
                for uid, fields in zip(part, await pipe.execute(), strict=True):
                    if fields:
                        nodes = list(dict.fromkeys(_s(f).rpartition(":")[0] for f in fields))
                        per_user[uid] = nodes
                        for node in nodes:
                            all_nodes[node] = False
            names = list(all_nodes)
            for i in range(0, len(names), self.chunk):
                part_n = names[i : i + self.chunk]
                values = await self.redis.mget([self.live_prefix + n for n in part_n])
                for node, v in zip(part_n, values, strict=True):
                    all_nodes[node] = v is not None
        return {uid: [n for n in nodes if all_nodes[n]] for uid, nodes in per_user.items()}

    async def nodes_for(
        self, user_ids: Iterable[int], candidates: Sequence[str] | None = None
    ) -> dict[str, list[int]]:
        if candidates:
            uids = list(dict.fromkeys(user_ids))
            if len(uids) >= PER_NODE_MIN * len(candidates):
                return await self._nodes_for_per_node(uids, list(dict.fromkeys(candidates)))
        out: dict[str, list[int]] = {}
        for uid, nodes in (await self._sessions(user_ids)).items():
            for node in nodes:
                out.setdefault(node, []).append(uid)
        return out

    async def _nodes_for_per_node(self, uids: list[int], nodes: list[str]) -> dict[str, list[int]]:
        """:meth:`nodes_for` asked per node: one SMISMEMBER of the node's user set per
        ``chunk`` users, for each live candidate (a fan-out shard of 500 users on 3 nodes: 3
        commands, not 500)."""
        out: dict[str, list[int]] = {}
        async with self.guard("presence read"):
            live = await self.redis.mget([self.live_prefix + n for n in nodes])
            alive = [n for n, v in zip(nodes, live, strict=True) if v is not None]
            if not alive:
                return out
            pipe = self.redis.pipeline(transaction=False)
            parts = list(_chunks(uids, self.chunk))
            for node in alive:
                for part in parts:
                    pipe.smismember(self.node_users_key(node), list(part))
            replies = iter(await pipe.execute())
        for node in alive:
            found = [uid for part in parts for uid, hit in zip(part, next(replies), strict=True) if hit]
            if found:
                out[node] = found
        return out

    async def online(self, user_ids: Iterable[int]) -> dict[int, bool]:
        uids = list(user_ids)
        sessions = await self._sessions(uids)
        return {uid: bool(sessions.get(uid)) for uid in uids}

    async def drop_node(self, node_id: str) -> list[int]:
        """Remove every session of ``node_id`` (a dead node, or this node at start-up before it
        accepts sessions, to clear what a previous incarnation left), and its mark: a node
        that was only thought dead (its registry entry lapsed during a Redis outage) sees the
        mark gone at its next presence check and records its sessions again."""
        self._local_nodes.discard(node_id)
        offline: list[int] = []
        async with self.guard("presence drop_node"):
            await self.redis.delete(self.live_prefix + node_id, self.mark_key(node_id))
        while True:
            async with self.guard("presence drop_node"):
                popped, gone = await self._drop(
                    keys=[self.node_users_key(node_id)],
                    args=[node_id, self.chunk, self.live_prefix, f"{self.prefix}p:"],
                )
            offline.extend(int(u) for u in gone)
            if not popped:
                break
        return sorted(offline)

    def mark_key(self, node_id: str) -> str:
        return f"{self.prefix}pmark:{node_id}"

    async def mark(self, node_id: str) -> None:
        async with self.guard("presence mark"):
            await self.redis.set(self.mark_key(node_id), b"1")

    async def lost(self, node_id: str) -> bool:
        """Redis keeps nothing across a restart without persistence: when the mark is gone,
        the sessions recorded with it are gone too."""
        async with self.guard("presence lost"):
            return not await self.redis.exists(self.mark_key(node_id))

    async def unmark(self, node_id: str) -> None:
        async with self.guard("presence unmark"):
            await self.redis.delete(self.mark_key(node_id))

    async def ping(self) -> None:
        async with self.guard("presence ping"):
            await self.redis.ping()

    async def close(self) -> None:
        """Stop refreshing node liveness (sessions stay until session_down / drop_node, and stop
        counting after ``node_ttl_s``)."""
        await cancel_tasks([self._heartbeat_task])
        self._heartbeat_task = None
        await self._close_client()
