"""Distributed locks on Redis: :class:`RedisLocks` (owner token + hold count in a hash with a
PX TTL, Lua compare-and-release/renew, a FIFO queue of waiter tickets, fences from INCR,
wake-ups over pub/sub with polling as the fallback)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

from redis.asyncio import Redis

from gochat.cluster.locks import Lease, LockService, LockTimeoutError
from gochat.cluster.redis.client import DEFAULT_PREFIX, _Client, _s, _Subscriber, _wait_event, log
from gochat.errors import UnavailableError

__all__ = ["RedisLocks"]

# Every script reads the time from the server (TIME), so nodes' clocks never matter.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: lock, queue, waiter deadlines, fence counter
# ARGV: owner, ticket, ttl_ms, waiter_ttl_ms
# -> {1, fence} (held) or {0, the holder's PTTL, -2 when free but another waiter is first}
_ACQUIRE = _NOW + """
local dead = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
for i = 1, #dead do
  redis.call('ZREM', KEYS[2], dead[i])
  redis.call('ZREM', KEYS[3], dead[i])
end
local holder = redis.call('HGET', KEYS[1], 'owner')
local take = holder == ARGV[1]
if not holder then
  local head = redis.call('ZRANGE', KEYS[2], 0, 0)
  take = #head == 0 or head[1] == ARGV[2]
end
if take then
  local fence
  if holder then
    redis.call('HINCRBY', KEYS[1], 'count', 1)
    fence = tonumber(redis.call('HGET', KEYS[1], 'fence'))
  else
    if redis.call('EXISTS', KEYS[4]) == 0 then
      -- a new counter starts at the server's time in ms * 1000, so that fences still increase
      -- after a restart that lost the counter (fewer than 1000 acquires a ms ever happen)
      redis.call('SET', KEYS[4], t[1] .. string.format('%03d', math.floor(tonumber(t[2]) / 1000)) .. '000')
    end
    fence = redis.call('INCR', KEYS[4])
    redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'count', '1', 'fence', string.format('%d', fence))
  end
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  redis.call('ZREM', KEYS[2], ARGV[2])
  redis.call('ZREM', KEYS[3], ARGV[2])
  return {1, fence}
end
if not redis.call('ZSCORE', KEYS[2], ARGV[2]) then
  local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
  local seq = 1
  if #last > 0 then seq = tonumber(last[2]) + 1 end
  redis.call('ZADD', KEYS[2], seq, ARGV[2])
end
local wttl = tonumber(ARGV[4])
redis.call('ZADD', KEYS[3], now + wttl, ARGV[2])
redis.call('PEXPIRE', KEYS[2], 2 * wttl)
redis.call('PEXPIRE', KEYS[3], 2 * wttl)
return {0, redis.call('PTTL', KEYS[1])}
"""

# KEYS: lock; ARGV: owner, fence, channel, name -> acquires left, -1 when not the holder
_RELEASE = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'fence') ~= ARGV[2] then
  return -1
end
local n = redis.call('HINCRBY', KEYS[1], 'count', -1)
if n > 0 then return n end
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 0
"""

# KEYS: lock; ARGV: owner, fence, ttl_ms -> 1 renewed, 0 not the holder
_RENEW = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'fence') ~= ARGV[2] then
  return 0
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

# A waiter gives up (timeout, cancellation). KEYS: lock, queue, waiter deadlines
# ARGV: ticket, owner ('' or: the acquire may have succeeded unseen; undo a first acquire),
# channel, name
_LEAVE = """
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if ARGV[2] ~= '' and redis.call('HGET', KEYS[1], 'owner') == ARGV[2]
    and redis.call('HGET', KEYS[1], 'count') == '1' then
  redis.call('DEL', KEYS[1])
end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""

# KEYS: queue, waiter deadlines -> live waiters
_WAITERS = _NOW + """
return redis.call('ZCOUNT', KEYS[2], '(' .. now, '+inf')
"""


class RedisLocks(_Client, LockService):
    """:class:`~gochat.cluster.locks.Locks` on Redis.

    Keys per lock name: ``{prefix}lock:{name}`` (hash: owner, count, fence; PX the TTL),
    ``{prefix}lockq:{name}`` (sorted set: waiter ticket -> place in line),
    ``{prefix}lockw:{name}`` (sorted set: waiter ticket -> deadline in server ms; a waiter
    that stops polling for ``waiter_ttl_s`` loses its place), ``{prefix}fence:{name}`` (the
    fence counter, no TTL). Channel ``{prefix}locks``: the name of every lock freed, which wakes
    its waiters (who also poll every ``waiter_ttl_s / 4`` and at the holder's expiry).
    """

    def __init__(
        self,
        redis: Redis | str,
        prefix: str = DEFAULT_PREFIX,
        *,
        timeout_s: float = 2.0,
        waiter_ttl_s: float = 2.0,
        node: str | None = None,
    ) -> None:
        _Client.__init__(self, redis, prefix, timeout_s)
        LockService.__init__(self, node=node)
        self.waiter_ttl_ms = max(30, int(waiter_ttl_s * 1000))
        self.poll_s = waiter_ttl_s / 4
        self.channel = f"{prefix}locks"
        self._acquire_script = self.redis.register_script(_ACQUIRE)
        self._release_script = self.redis.register_script(_RELEASE)
        self._renew_script = self.redis.register_script(_RENEW)
        self._leave_script = self.redis.register_script(_LEAVE)
        self._waiters_script = self.redis.register_script(_WAITERS)
        self._sub: _Subscriber | None = None
        self._sub_lock = asyncio.Lock()
        self._events: dict[str, set[asyncio.Event]] = {}

    def _keys(self, name: str) -> list[str]:
        p = self.prefix
        return [f"{p}lock:{name}", f"{p}lockq:{name}", f"{p}lockw:{name}", f"{p}fence:{name}"]

    def _on_freed(self, _channel: bytes, data: bytes) -> None:
        for ev in self._events.get(_s(data), ()):
            ev.set()

    def _wake_all(self) -> None:
        for evs in self._events.values():
            for ev in evs:
                ev.set()

    async def _subscribe(self) -> None:
        if self._sub is not None:
            return
        async with self._sub_lock:
            if self._sub is None and not self._closed:
                sub = _Subscriber(
                    self.redis, [self.channel], self._on_freed, name="locks", timeout_s=self.timeout_s,
                    on_resubscribe=self._wake_all, retry=self.retry,
                )
                await sub.start_in_background()
                self._sub = sub

    async def _acquire(self, name: str, owner: str, ttl_ms: int, timeout_s: float | None, fresh: bool) -> int:
        keys = self._keys(name)
        ticket = f"{owner}|{uuid.uuid4().hex}"
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        ev = asyncio.Event()
        self._events.setdefault(name, set()).add(ev)
        in_script = False
        done = False
        try:
            while True:
                ev.clear()
                if self._closed:
                    raise UnavailableError("locks closed")
                in_script = True
                async with self.guard("lock acquire"):
                    got, value = await self._acquire_script(keys=keys, args=[owner, ticket, ttl_ms, self.waiter_ttl_ms])
                in_script = False
                if int(got) == 1:
                    done = True
                    return int(value)
                if self._sub is None:
                    # subscribed before waiting: a release from now on wakes us; try again at once
                    await self._subscribe()
                    continue
                wait = self.poll_s
                if int(value) >= 0:  # the holder's TTL left: wake up when it would expire
                    wait = min(wait, int(value) / 1000 + 0.002)
                if deadline is not None:
                    left = deadline - loop.time()
                    if left <= 0:
                        raise LockTimeoutError(
                            f"lock {name!r} not acquired within {timeout_s:g}s: held by another owner"
                        )
                    wait = min(wait, left)
                await _wait_event(ev, wait)
        finally:
            evs = self._events.get(name)
            if evs is not None:
                evs.discard(ev)
                if not evs:
                    del self._events[name]
            if not done:
                # shielded, bounded, best effort: a dead ticket also ages out after waiter_ttl_s
                undo = owner if in_script and fresh else ""
                with contextlib.suppress(BaseException):
                    await asyncio.shield(self._leave(keys, ticket, undo, name))

    async def _leave(self, keys: list[str], ticket: str, owner: str, name: str) -> None:
        try:
            async with self.guard("lock leave"):
                await self._leave_script(keys=keys[:3], args=[ticket, owner, self.channel, name])
        except Exception as exc:
            log.debug("lock %r: leaving the queue failed (%r)", name, exc)

    async def _release(self, name: str, owner: str, fence: int) -> int:
        async with self.guard("lock release"):
            return int(await self._release_script(keys=self._keys(name)[:1], args=[owner, fence, self.channel, name]))

    async def _renew(self, name: str, owner: str, fence: int, ttl_ms: int) -> bool:
        async with self.guard("lock renew"):
            return int(await self._renew_script(keys=self._keys(name)[:1], args=[owner, fence, ttl_ms])) == 1

    async def holder(self, name: str) -> Lease | None:
        async with self.guard("lock holder"):
            owner, fence = await self.redis.hmget(self._keys(name)[0], ["owner", "fence"])
        if owner is None or fence is None:
            return None
        return Lease(name, _s(owner), int(fence))

    async def waiters(self, name: str) -> int:
        keys = self._keys(name)
        async with self.guard("lock waiters"):
            return int(await self._waiters_script(keys=keys[1:3]))

    async def fence(self, name: str) -> int:
        """The last fence handed out for ``name`` (0: never held)."""
        async with self.guard("lock fence"):
            raw = await self.redis.get(self._keys(name)[3])
        return int(raw) if raw is not None else 0

    async def close(self) -> None:
        self._closed = True
        self._wake_all()  # waiters give up (UnavailableError)
        await LockService.close(self)
        if self._sub is not None:
            await self._sub.close()
            self._sub = None
        await self._close_client()
