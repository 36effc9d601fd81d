"""The node registry on Redis: :class:`RedisRegistry` (TTL entries renewed in the background,
join/update/leave/expire announcements on a channel, a watch that survives Redis restarts)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Iterable

import orjson
from redis.asyncio import Redis

from gochat.clock import now_ms
from gochat.cluster.base import REGISTRY_RENEW_S, REGISTRY_TTL_S, NodeInfo
from gochat.cluster.redis.client import (
    DEFAULT_PREFIX,
    _Client,
    _s,
    _Subscriber,
    _wait_event,
    cancel_tasks,
    log,
)
from gochat.errors import UnavailableError

__all__ = ["RedisRegistry"]


_REGISTER = """
local old = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
local ev = ''
if not old then ev = 'join' elseif old ~= ARGV[2] then ev = 'update' end
if ev ~= '' then redis.call('PUBLISH', ARGV[5], cjson.encode({event = ev, node_id = ARGV[1]})) end
return ev
"""

_DEREGISTER = """
local n = redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if n == 1 then redis.call('PUBLISH', ARGV[2], cjson.encode({event = 'leave', node_id = ARGV[1]})) end
return n
"""

_NODES = """
local ids = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local out = {}
local gone = 0
for i = 1, #ids, 2 do
  local v = redis.call('GET', ARGV[1] .. ids[i])
  if v then
    out[#out + 1] = v
    out[#out + 1] = ids[i + 1]
  else
    redis.call('ZREM', KEYS[1], ids[i])
    gone = gone + 1
  end
end
if gone > 0 then redis.call('PUBLISH', ARGV[2], cjson.encode({event = 'expire'})) end
return out
"""


def _encode_node(info: NodeInfo) -> bytes:
    d = dataclasses.asdict(info)
    del d["updated_ms"]
    return orjson.dumps(d, option=orjson.OPT_SORT_KEYS)


def _decode_node(raw: bytes, updated_ms: int) -> NodeInfo:
    d = orjson.loads(raw)
    fields = {f.name for f in dataclasses.fields(NodeInfo)}
    d = {k: v for k, v in d.items() if k in fields}
    d["updated_ms"] = updated_ms
    return NodeInfo(**d)


def _snapshot_key(nodes: Iterable[NodeInfo]) -> tuple[NodeInfo, ...]:
    return tuple(dataclasses.replace(n, updated_ms=0) for n in nodes)


class RedisRegistry(_Client):
    """:class:`~gochat.cluster.base.Registry` on Redis.

    Keys: ``{prefix}node:{node_id}`` (JSON metadata, PX ttl), ``{prefix}nodes`` (sorted set
    node_id -> last renewal in ms); channel ``{prefix}registry`` (JSON join/update/leave/expire
    announcements). One instance registers at most one node; any instance can list and watch.
    """

    def __init__(
        self,
        redis: Redis | str,
        prefix: str = DEFAULT_PREFIX,
        ttl_s: float = REGISTRY_TTL_S,
        renew_s: float = REGISTRY_RENEW_S,
        *,
        timeout_s: float = 2.0,
    ) -> None:
        if not 0 < renew_s < ttl_s:
            raise ValueError("need 0 < renew_s < ttl_s")
        super().__init__(redis, prefix, timeout_s)
        self.ttl_s = ttl_s
        self.renew_s = renew_s
        self.index_key = f"{prefix}nodes"
        self.channel = f"{prefix}registry"
        self._register = self.redis.register_script(_REGISTER)
        self._deregister = self.redis.register_script(_DEREGISTER)
        self._nodes = self.redis.register_script(_NODES)
        self._info: NodeInfo | None = None
        self._load: Callable[[], NodeInfo] | None = None
        self._renew_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._sub: _Subscriber | None = None
        self._watchers: list[tuple[Callable[[list[NodeInfo]], None], list[tuple[NodeInfo, ...] | None]]] = []
        self._kick = asyncio.Event()
        #: close() began: the watch calls no callback any more
        self._closed = False

    def node_key(self, node_id: str) -> str:
        return f"{self.prefix}node:{node_id}"

    async def _write(self, info: NodeInfo) -> str:
        async with self.guard("registry write"):
            ev = await self._register(
                keys=[self.node_key(info.node_id), self.index_key],
                args=[info.node_id, _encode_node(info), max(1, int(self.ttl_s * 1000)), now_ms(), self.channel],
            )
        return _s(ev)

    async def register(self, info: NodeInfo, load: Callable[[], NodeInfo] | None = None) -> None:
        if self._info is not None and self._info.node_id != info.node_id:
            raise ValueError("this registry already registered another node")
        await self._write(info)
        self._info, self._load = info, load
        if self._renew_task is None or self._renew_task.done():
            self._renew_task = asyncio.create_task(self._renew_loop(), name=f"registry-renew-{info.node_id}")

    async def _renew_loop(self) -> None:
        delay = self.renew_s
        failing = False
        backoff = self.retry.backoff()
        while True:
            await asyncio.sleep(delay)
            assert self._info is not None
            try:
                info = self._load() if self._load is not None else self._info
                if info.node_id != self._info.node_id:
                    raise ValueError("load() changed the node_id")
                self._info = info
                ev = await self._write(info)
                if failing or ev == "join":
                    log.warning("registry: %s registered again (%s)", info.node_id, ev or "renewed")
                failing = False
                backoff.reset()
                delay = self.renew_s
            except UnavailableError as exc:
                if not failing:
                    log.warning("registry: cannot renew %s: %s; retrying", self._info.node_id, exc)
                failing = True
                delay = min(self.renew_s, max(0.05, backoff.next()))
            except Exception:
                log.exception("registry: renew of %s failed", self._info.node_id)
                delay = self.renew_s

    async def deregister(self) -> None:
        """Stop renewing and delete the entry (announced as ``leave``). Raises UnavailableError
        when Redis is down; the entry then expires by itself within ``ttl_s``."""
        await cancel_tasks([self._renew_task])
        self._renew_task = None
        if self._info is None:
            return
        async with self.guard("registry deregister"):
            await self._deregister(
                keys=[self.node_key(self._info.node_id), self.index_key],
                args=[self._info.node_id, self.channel],
            )

    async def nodes(self) -> list[NodeInfo]:
        async with self.guard("registry nodes"):
            flat = await self._nodes(keys=[self.index_key], args=[f"{self.prefix}node:", self.channel])
        out: list[NodeInfo] = []
        for i in range(0, len(flat), 2):
            try:
                out.append(_decode_node(flat[i], int(float(flat[i + 1]))))
            except (ValueError, TypeError) as exc:
                log.warning("registry: ignoring a malformed entry: %r", exc)
        out.sort(key=lambda n: n.node_id)
        return out

    async def node_number(self) -> int:
        """INCR of ``{prefix}node-seq`` minus one (0 first for a new cluster)."""
        async with self.guard("registry node_number"):
            return int(await self.redis.incr(f"{self.prefix}node-seq")) - 1

    def watch(self, callback: Callable[[list[NodeInfo]], None]) -> None:
        """``callback(nodes)`` at once with the current nodes, then on every change: at once for
        announced ones (join, update, leave, expiry noticed by any reader), otherwise within
        ``renew_s`` (the periodic refresh also covers messages lost while Redis was away)."""
        self._watchers.append((callback, [None]))
        self._kick.set()
        if self._watch_task is None or self._watch_task.done():
            self._watch_task = asyncio.create_task(self._watch_loop(), name="registry-watch")

    async def _watch_loop(self) -> None:
        self._sub = _Subscriber(
            self.redis,
            [self.channel],
            lambda _ch, _data: self._kick.set(),
            name="registry-watch",
            timeout_s=self.timeout_s,
            ping_s=max(1.0, min(5.0, self.renew_s)),
            on_resubscribe=self._kick.set,
            retry=self.retry,
        )
        await self._sub.start_in_background()
        while True:
            await _wait_event(self._kick, self.renew_s)
            self._kick.clear()
            if self._closed:
                return
            try:
                nodes = await self.nodes()
            except UnavailableError:
                continue
            except Exception:
                log.exception("registry watch: reading the node list failed")
                continue
            if self._closed:
                return
            key = _snapshot_key(nodes)
            for callback, last in list(self._watchers):
                if last[0] != key:
                    last[0] = key
                    try:
                        callback(list(nodes))
                    except Exception:
                        log.exception("registry watch callback failed")

    @property
    def resubscribes(self) -> int:
        return self._sub.resubscribes if self._sub is not None else 0

    async def close(self) -> None:
        """Stop renewing and watching (without deregistering: the entry expires after
        ``ttl_s``, as after a crash; call :meth:`deregister` first for a graceful exit)."""
        self._closed = True
        await cancel_tasks([self._renew_task, self._watch_task])
        self._renew_task = self._watch_task = None
        if self._sub is not None:
            await self._sub.close()
            self._sub = None
        await self._close_client()
