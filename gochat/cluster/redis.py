"""Redis implementations of the cluster seams (``docs/cluster.md`` § Redis data model).

Every class takes a Redis URL (it then owns a client made by :func:`connect`) or a shared
``redis.asyncio.Redis`` client (never closed here; build it with bytes responses, i.e. without
``decode_responses``), and a key prefix so that several clusters or test runs share one server.
Backend outages surface as :class:`~gochat.errors.UnavailableError` within a bounded time; the
background loops (registry renewal, pub/sub readers, job consumers) log at WARNING and recover
by themselves when Redis comes back, re-creating what a restart without persistence lost.

All keys of one class live under its prefix. The Lua scripts touch keys they compute from the
prefix, which is fine on a single server (or a primary with replicas); on Redis Cluster put a
hash tag in the prefix (``"{gochat}:"``) so every key maps to one slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any

import orjson
from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gochat.cluster.base import (
    REGISTRY_RENEW_S,
    REGISTRY_TTL_S,
    JobHandler,
    NodeInfo,
    SessionLease,
)
from gochat.errors import UnavailableError

__all__ = [
    "DEFAULT_PREFIX",
    "RedisBroker",
    "RedisJobQueue",
    "RedisPresence",
    "RedisRegistry",
    "connect",
]

log = logging.getLogger("gochat.cluster.redis")

DEFAULT_PREFIX = "gochat:"

#: errors that mean "Redis is not reachable right now" (BusyLoadingError is a ConnectionError)
_DOWN: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ReadOnlyError,
    OSError,
    TimeoutError,
)
_RETRYABLE: tuple[type[BaseException], ...] = (UnavailableError, *_DOWN)


def connect(url: str, *, timeout_s: float = 2.0, max_connections: int = 128) -> Redis:
    """A client for the cluster seams: bytes responses, bounded socket timeouts, one quick
    retry, and a blocking pool (callers queue for a connection instead of failing)."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 1),
        health_check_interval=30,
    )
    return Redis.from_pool(pool)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@contextlib.asynccontextmanager
async def _guard(what: str, timeout_s: float) -> AsyncIterator[None]:
    """Bound an operation in time and map outages to UnavailableError."""
    try:
        async with asyncio.timeout(timeout_s):
            yield
    except _DOWN as exc:
        raise UnavailableError(f"redis unavailable ({what}): {exc or type(exc).__name__}") from exc


async def _wait_event(event: asyncio.Event, timeout_s: float) -> None:
    """``event.wait()`` for at most ``timeout_s`` (asyncio.timeout: Python 3.11's wait_for can
    swallow a cancellation that races with the inner wait finishing)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await event.wait()


async def cancel_tasks(tasks: Iterable[asyncio.Task[Any] | None], timeout_s: float = 5.0) -> None:
    """Cancel background tasks and wait (bounded) until they are done; their errors are
    dropped, a cancellation of the caller is not.

    A task still running a moment after its cancel is cancelled again: redis-py can swallow
    a cancellation that lands while a command completes (the command returns normally), and
    the task's loop then goes on as if nothing happened (seen when every node of a cluster
    stopped at once: the registry watch outlived close() by seconds)."""
    live = [t for t in tasks if t is not None and not t.done()]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while live:
        for t in live:
            t.cancel()
        left = deadline - loop.time()
        if left <= 0:
            break
        _, pending = await asyncio.wait(live, timeout=min(left, 0.2))
        live = list(pending)


class _Client:
    """Holds the Redis client (owned when built from a URL) and the operation timeout."""

    def __init__(self, redis: Redis | str, prefix: str, timeout_s: float) -> None:
        if isinstance(redis, str):
            self.redis = connect(redis, timeout_s=timeout_s)
            self._owned = True
        else:
            if redis.connection_pool.connection_kwargs.get("decode_responses"):
                raise ValueError("the cluster seams need a Redis client without decode_responses")
            self.redis = redis
            self._owned = False
        self.prefix = prefix
        self.timeout_s = timeout_s
        #: bound for one public operation: socket timeout plus the retry
        self.op_timeout_s = 2 * timeout_s + 1.0

    def guard(self, what: str) -> contextlib.AbstractAsyncContextManager[None]:
        return _guard(what, self.op_timeout_s)

    async def _close_client(self) -> None:
        if self._owned:
            with contextlib.suppress(Exception):
                await self.redis.aclose()


class _Subscriber:
    """A pub/sub reader that survives Redis restarts.

    It owns a dedicated connection (cloned from the client's settings, without retries, so a
    broken connection surfaces at once), pings it when idle to notice half-open sockets, and on
    any connection loss reconnects with exponential backoff and subscribes again by itself.
    """

    def __init__(
        self,
        client: Redis,
        channels: Sequence[str],
        on_message: Callable[[bytes, bytes], None],
        *,
        name: str,
        timeout_s: float,
        ping_s: float = 5.0,
        max_backoff_s: float = 2.0,
        on_resubscribe: Callable[[], None] | None = None,
    ) -> None:
        base = client.connection_pool
        kwargs = dict(base.connection_kwargs)
        kwargs["retry"] = Retry(NoBackoff(), 0)
        kwargs["socket_timeout"] = timeout_s
        kwargs["socket_connect_timeout"] = timeout_s
        kwargs.pop("health_check_interval", None)
        kwargs["decode_responses"] = False
        self._pool = ConnectionPool(connection_class=base.connection_class, max_connections=4, **kwargs)
        self._client = Redis(connection_pool=self._pool)
        self.channels = list(channels)
        self._on_message = on_message
        self._on_resubscribe = on_resubscribe
        self.name = name
        self.timeout_s = timeout_s
        self.ping_s = ping_s
        self.max_backoff_s = max_backoff_s
        #: times the reader reconnected and subscribed again after losing its connection
        self.resubscribes = 0
        self._ps: PubSub | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Subscribe (confirmed by the server before this returns) and start reading."""
        self._ps = await self._subscribe()
        self._task = asyncio.create_task(self._run(), name=f"redis-sub-{self.name}")

    async def start_in_background(self) -> None:
        """Like :meth:`start`, but keep trying in the background while Redis is down."""
        try:
            await self.start()
        except UnavailableError as exc:
            log.warning("%s: cannot subscribe yet (%s); retrying in the background", self.name, exc)
            self._task = asyncio.create_task(self._run(), name=f"redis-sub-{self.name}")

    def _deliver(self, channel: bytes, data: bytes) -> None:
        try:
            self._on_message(channel, data)
        except Exception:
            log.exception("%s: message callback failed", self.name)

    async def _subscribe(self) -> PubSub:
        ps = self._client.pubsub()
        try:
            async with _guard(f"subscribe {self.name}", self.timeout_s * 2):
                await ps.subscribe(*self.channels)
                confirmed: set[str] = set()
                while len(confirmed) < len(self.channels):
                    msg = await ps.get_message(timeout=self.timeout_s)
                    if msg is None:
                        raise RedisTimeoutError("no subscribe confirmation")
                    if msg["type"] == "subscribe":
                        confirmed.add(_s(msg["channel"]))
                    elif msg["type"] == "message":
                        self._deliver(msg["channel"], msg["data"])
        except BaseException:
            await self._drop(ps)
            raise
        return ps

    async def _drop(self, ps: PubSub | None) -> None:
        if ps is not None:
            with contextlib.suppress(Exception):
                await ps.aclose()  # type: ignore[no-untyped-call]
        with contextlib.suppress(Exception):
            await self._pool.disconnect()

    async def _read(self, ps: PubSub) -> None:
        loop = asyncio.get_running_loop()
        last_rx = loop.time()
        ping_sent: float | None = None
        while True:
            msg = await ps.get_message(timeout=min(1.0, self.ping_s))
            now = loop.time()
            if msg is None:
                if ping_sent is not None:
                    if now - ping_sent > self.timeout_s:
                        raise RedisConnectionError("pub/sub connection did not answer a ping")
                elif now - last_rx >= self.ping_s:
                    await ps.ping()
                    ping_sent = now
                continue
            last_rx, ping_sent = now, None
            if msg["type"] == "message":
                self._deliver(msg["channel"], msg["data"])

    async def _run(self) -> None:
        while True:
            ps = self._ps
            if ps is not None:
                try:
                    await self._read(ps)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("%s: lost the redis pub/sub connection (%r); re-subscribing", self.name, exc)
                await self._drop(ps)
                self._ps = None
            delay = 0.05
            while self._ps is None:
                await asyncio.sleep(delay)
                try:
                    self._ps = await self._subscribe()
                except _RETRYABLE as exc:
                    delay = min(delay * 2, self.max_backoff_s)
                    log.debug("%s: re-subscribe failed (%r); next try in %.2fs", self.name, exc, delay)
                except Exception as exc:
                    # Anything else from a half-restarted Redis (or redis-py on a dying
                    # connection) must not end this task: without it the node never hears
                    # its channels again.
                    delay = min(delay * 2, self.max_backoff_s)
                    log.warning("%s: re-subscribe failed (%r); next try in %.2fs", self.name, exc, delay)
            self.resubscribes += 1
            log.warning("%s: re-subscribed to %s", self.name, ", ".join(self.channels))
            if self._on_resubscribe is not None:
                self._on_resubscribe()

    async def close(self) -> None:
        await cancel_tasks([self._task])
        self._task = None
        await self._drop(self._ps)
        self._ps = None


# --------------------------------------------------------------------------- registry

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
                args=[info.node_id, _encode_node(info), max(1, int(self.ttl_s * 1000)), _now_ms(), self.channel],
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
                delay = self.renew_s
            except UnavailableError as exc:
                if not failing:
                    log.warning("registry: cannot renew %s: %s; retrying", self._info.node_id, exc)
                failing = True
                delay = min(self.renew_s, 1.0)
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


# --------------------------------------------------------------------------- broker


class RedisBroker(_Client):
    """:class:`~gochat.cluster.base.Broker` on Redis pub/sub: channel ``{prefix}node:{id}`` per
    node and ``{prefix}all`` for broadcasts; payloads are opaque bytes, delivery at most once.
    The reader re-subscribes by itself after losing Redis (counted in :attr:`resubscribes`)."""

    def __init__(
        self,
        redis: Redis | str,
        prefix: str = DEFAULT_PREFIX,
        *,
        timeout_s: float = 2.0,
        ping_s: float = 5.0,
    ) -> None:
        super().__init__(redis, prefix, timeout_s)
        self.ping_s = ping_s
        self.all_channel = f"{prefix}all"
        self.node_id = ""
        self._sub: _Subscriber | None = None

    def node_channel(self, node_id: str) -> str:
        return f"{self.prefix}node:{node_id}"

    @property
    def resubscribes(self) -> int:
        return self._sub.resubscribes if self._sub is not None else 0

    async def start(self, node_id: str, on_message: Callable[[bytes], None]) -> None:
        """Subscribe and return once Redis confirmed it (UnavailableError if it is down)."""
        if self._sub is not None:
            raise RuntimeError("broker already started")
        self.node_id = node_id
        sub = _Subscriber(
            self.redis,
            [self.node_channel(node_id), self.all_channel],
            lambda _ch, data: on_message(data),
            name=f"broker-{node_id}",
            timeout_s=self.timeout_s,
            ping_s=self.ping_s,
        )
        await sub.start()
        self._sub = sub

    async def send_to_node(self, node_id: str, payload: bytes) -> None:
        async with self.guard("broker publish"):
            await self.redis.publish(self.node_channel(node_id), payload)

    async def broadcast(self, payload: bytes) -> None:
        async with self.guard("broker broadcast"):
            await self.redis.publish(self.all_channel, payload)

    async def close(self) -> None:
        if self._sub is not None:
            await self._sub.close()
            self._sub = None
        await self._close_client()


# --------------------------------------------------------------------------- presence

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

    async def nodes_for(self, user_ids: Iterable[int]) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for uid, nodes in (await self._sessions(user_ids)).items():
            for node in nodes:
                out.setdefault(node, []).append(uid)
        return out

    async def online(self, user_ids: Iterable[int]) -> dict[int, bool]:
        uids = list(user_ids)
        sessions = await self._sessions(uids)
        return {uid: bool(sessions.get(uid)) for uid in uids}

    async def drop_node(self, node_id: str) -> list[int]:
        """Remove every session of ``node_id`` (a dead node, or this node at start-up before it
        accepts sessions, to clear what a previous incarnation left)."""
        self._local_nodes.discard(node_id)
        offline: list[int] = []
        async with self.guard("presence drop_node"):
            await self.redis.delete(self.live_prefix + node_id)
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
        the sessions recorded with it are gone too. SET NX re-marks in the same round trip."""
        async with self.guard("presence lost"):
            return bool(await self.redis.set(self.mark_key(node_id), b"1", nx=True))

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


# --------------------------------------------------------------------------- job queue

# KEYS: stream, marker hash; ARGV: job id, payload, dedupe ttl (s), maxlen
_ENQUEUE = """
if redis.call('HSETNX', KEYS[2], '_', 'q') == 1 then
  redis.call('EXPIRE', KEYS[2], ARGV[3])
  return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], '*', 'id', ARGV[1], 'p', ARGV[2])
end
return false
"""


class RedisJobQueue(_Client):
    """:class:`~gochat.cluster.base.JobQueue` on Redis Streams with consumer groups.

    Keys: stream ``{prefix}jobs:{stream}`` (XADD MAXLEN ~ ``maxlen``: it bounds the backlog,
    so size it above the largest backlog you accept), job marker hash
    ``{prefix}job:{stream}:{job_id}`` (field ``_`` = ``q`` from enqueue, field ``{group}`` = ``d``
    once that group handled it; EX ``dedupe_ttl_s``), dead letters ``{prefix}dead:{stream}``.

    At least once and idempotent: a job id is enqueued once (HSETNX in the same script as XADD);
    a consumer skips (and acknowledges) a delivery its group already finished; it marks the job
    done for its group and XACKs in one transaction after the handler returns. Every group gets
    every job (one group per kind of work: audit, push, ...). While a handler runs its entry is kept
    fresh (XCLAIM JUSTID every third of ``claim_idle_ms``), so only entries of dead consumers
    and failed attempts go idle; XAUTOCLAIM hands those to a live consumer after
    ``claim_idle_ms``. After ``max_deliveries`` failed deliveries a job moves to dead letters.
    Consumers survive Redis restarts (the group is re-created if the restart lost it).
    """

    def __init__(
        self,
        redis: Redis | str,
        prefix: str = DEFAULT_PREFIX,
        *,
        claim_idle_ms: int = 30_000,
        maxlen: int = 100_000,
        max_deliveries: int = 16,
        dedupe_ttl_s: int = 86_400,
        batch: int = 32,
        block_ms: int = 1_000,
        timeout_s: float = 2.0,
    ) -> None:
        super().__init__(redis, prefix, timeout_s)
        self.claim_idle_ms = claim_idle_ms
        self.maxlen = maxlen
        self.max_deliveries = max_deliveries
        self.dedupe_ttl_s = dedupe_ttl_s
        self.batch = batch
        self.block_ms = max(10, min(block_ms, claim_idle_ms // 2, int(timeout_s * 500)))
        self._enqueue = self.redis.register_script(_ENQUEUE)
        self._tasks: list[asyncio.Task[None]] = []

    def stream_key(self, stream: str) -> str:
        return f"{self.prefix}jobs:{stream}"

    def dead_key(self, stream: str) -> str:
        return f"{self.prefix}dead:{stream}"

    def marker_key(self, stream: str, job_id: str) -> str:
        return f"{self.prefix}job:{stream}:{job_id}"

    async def enqueue(self, stream: str, job_id: str, payload: bytes) -> None:
        """Append the job unless ``job_id`` was enqueued within ``dedupe_ttl_s``."""
        async with self.guard("jobs enqueue"):
            await self._enqueue(
                keys=[self.stream_key(stream), self.marker_key(stream, job_id)],
                args=[job_id, payload, self.dedupe_ttl_s, self.maxlen],
            )

    async def dead_letters(self, stream: str) -> list[tuple[str, bytes, str]]:
        """(job_id, payload, last error) of the jobs given up on, oldest first."""
        async with self.guard("jobs dead letters"):
            entries: Any = await self.redis.xrange(self.dead_key(stream))
        return [(_s(f[b"id"]), bytes(f[b"p"]), _s(f[b"err"])) for _, f in entries]

    async def _create_group(self, key: str, group: str) -> None:
        try:
            await self.redis.xgroup_create(key, group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def consume(self, stream: str, group: str, consumer: str, handler: JobHandler) -> None:
        async with self.guard("jobs consume"):
            await self._create_group(self.stream_key(stream), group)
        self._tasks.append(
            asyncio.create_task(
                self._consume_loop(stream, group, consumer, handler), name=f"jobs-{stream}-{consumer}"
            )
        )

    async def _consume_loop(self, stream: str, group: str, consumer: str, handler: JobHandler) -> None:
        key = self.stream_key(stream)
        loop = asyncio.get_running_loop()
        claim_every = max(0.02, self.claim_idle_ms / 2000)
        next_claim = 0.0
        delay = 0.05
        failing = False
        while True:
            try:
                if loop.time() >= next_claim:
                    next_claim = loop.time() + claim_every
                    await self._claim_idle(stream, key, group, consumer, handler)
                resp: Any = await self.redis.xreadgroup(
                    group, consumer, {key: ">"}, count=self.batch, block=self.block_ms
                )
                for _name, entries in resp or []:
                    for eid, fields in entries:
                        await self._process(stream, key, group, consumer, handler, eid, fields, 1)
                if failing:
                    log.warning("jobs %s/%s: redis is back, consuming again", stream, consumer)
                failing, delay = False, 0.05
            except asyncio.CancelledError:
                raise
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    log.warning("jobs %s/%s: consumer group lost (redis restarted?); re-creating", stream, consumer)
                    with contextlib.suppress(Exception):
                        await self._create_group(key, group)
                else:
                    log.warning("jobs %s/%s: %r", stream, consumer, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
            except _DOWN as exc:
                if not failing:
                    log.warning("jobs %s/%s: redis unavailable (%r); retrying", stream, consumer, exc)
                failing = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            except Exception:
                log.exception("jobs %s/%s: consumer loop error", stream, consumer)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _claim_idle(self, stream: str, key: str, group: str, consumer: str, handler: JobHandler) -> None:
        start: bytes | str = "0-0"
        for _ in range(16):  # bounded work per pass
            res: Any = await self.redis.xautoclaim(
                key, group, consumer, min_idle_time=self.claim_idle_ms, start_id=start, count=self.batch
            )
            start, entries = res[0], [(eid, f) for eid, f in res[1] if f]
            if entries:
                ids = [eid for eid, _ in entries]
                pending = await self.redis.xpending_range(
                    key, group, min=ids[0], max=ids[-1], count=len(ids) + self.batch, consumername=consumer
                )
                deliveries = {p["message_id"]: int(p["times_delivered"]) for p in pending}
                for eid, fields in entries:
                    await self._process(stream, key, group, consumer, handler, eid, fields, deliveries.get(eid, 2))
            if _s(start) == "0-0":
                break

    async def _process(
        self,
        stream: str,
        key: str,
        group: str,
        consumer: str,
        handler: JobHandler,
        eid: bytes,
        fields: dict[bytes, bytes],
        deliveries: int,
    ) -> None:
        job_id = _s(fields.get(b"id", b""))
        payload = fields.get(b"p", b"")
        marker = self.marker_key(stream, job_id)
        if await self.redis.hget(marker, group) == b"d":
            await self.redis.xack(key, group, eid)  # a duplicate delivery of a finished job
            return
        if deliveries > self.max_deliveries:
            await self._dead_letter(stream, key, group, eid, job_id, payload, "too many deliveries")
            return
        heartbeat = asyncio.create_task(self._keep_fresh(key, group, consumer, eid))
        try:
            await handler(job_id, payload)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("job %s/%s failed (delivery %d): %r", stream, job_id, deliveries, exc)
            if deliveries >= self.max_deliveries:
                await self._dead_letter(stream, key, group, eid, job_id, payload, repr(exc))
            return
        finally:
            await cancel_tasks([heartbeat])
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(marker, group, b"d")
        pipe.expire(marker, self.dedupe_ttl_s)
        pipe.xack(key, group, eid)
        await pipe.execute()

    async def _dead_letter(
        self, stream: str, key: str, group: str, eid: bytes, job_id: str, payload: bytes, error: str
    ) -> None:
        log.warning("job %s/%s moved to dead letters: %s", stream, job_id, error)
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(
            self.dead_key(stream),
            {b"id": job_id, b"p": payload, b"err": error, b"entry": eid},
            maxlen=self.maxlen,
            approximate=True,
        )
        pipe.xack(key, group, eid)
        await pipe.execute()

    async def _keep_fresh(self, key: str, group: str, consumer: str, eid: bytes) -> None:
        """Reset the idle time of a running job so no other consumer claims it."""
        while True:
            await asyncio.sleep(self.claim_idle_ms / 3000)
            try:
                await self.redis.xclaim(key, group, consumer, 0, [eid], justid=True)
            except Exception as exc:
                log.debug("jobs: cannot refresh %r: %r", eid, exc)

    async def close(self) -> None:
        """Stop this instance's consumers at once: a running job stays pending, as if the
        consumer died, and another consumer claims it after ``claim_idle_ms``."""
        await cancel_tasks(self._tasks)
        self._tasks.clear()
        await self._close_client()
