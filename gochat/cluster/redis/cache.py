"""The shared (L2) cache on Redis: :class:`RedisSharedCache`
(:class:`~gochat.cluster.shared_cache.SharedCache`).

Keys: ``{prefix}cache:{space}:{key}``. A versioned entry is a hash ``v`` (version, decimal),
``t`` (stamp: server time in µs, decimal), ``d`` (the value's bytes), written by one Lua
script that compares versions (one round trip; a write never replaces a newer version). A
write-once entry is a string, ``SET NX PX``. Every key has a TTL (``PX``), so Redis drops what
nobody reads. Reads of versioned entries are one pipeline: ``TIME`` then ``HMGET`` per key.
The stamps come from the server's clock (``TIME``), so the nodes' clocks never matter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis

from gochat.cluster.redis.client import DEFAULT_PREFIX, _Client
from gochat.cluster.shared_cache import Versioned, check_entry

__all__ = ["RedisSharedCache"]

# KEYS: the entry; ARGV: version, data, stamp µs ('' = the server's time now), ttl ms
# -> 1 stored, 0 kept (the entry holds this version or a newer one)
_PUT_VERSIONED = """
local stamp = ARGV[3]
if stamp == '' then
  local t = redis.call('TIME')
  stamp = t[1] .. string.format('%06d', tonumber(t[2]))
end
local cur = redis.call('HMGET', KEYS[1], 'v', 't')
if cur[1] then
  local old = tonumber(cur[1])
  local v = tonumber(ARGV[1])
  if old > v then return 0 end
  if old == v then
    if not cur[2] or tonumber(cur[2]) < tonumber(stamp) then
      redis.call('HSET', KEYS[1], 't', stamp)
    end
    redis.call('PEXPIRE', KEYS[1], ARGV[4])
    return 0
  end
end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 't', stamp, 'd', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""


def _ms(ttl_s: float) -> int:
    return max(1, int(ttl_s * 1000))


class RedisSharedCache(_Client):
    """:class:`~gochat.cluster.shared_cache.SharedCache` on Redis (module doc)."""

    def __init__(self, redis: Redis | str, prefix: str = DEFAULT_PREFIX, *, timeout_s: float = 2.0) -> None:
        _Client.__init__(self, redis, prefix, timeout_s)
        self._put_script = self.redis.register_script(_PUT_VERSIONED)

    def key(self, space: str, key: str) -> str:
        return f"{self.prefix}cache:{space}:{key}"

    async def get_versioned(self, space: str, keys: Sequence[str]) -> tuple[list[Versioned | None], int]:
        async with self.guard("cache get"):
            pipe = self.redis.pipeline(transaction=False)
            pipe.time()
            for key in keys:
                pipe.hmget(self.key(space, key), ["v", "t", "d"])
            res: list[Any] = await pipe.execute()
        sec, usec = res[0]
        out: list[Versioned | None] = []
        for v, t, d in res[1:]:
            out.append(None if v is None or t is None or d is None else Versioned(int(v), int(t), bytes(d)))
        return out, int(sec) * 1_000_000 + int(usec)

    async def put_versioned(
        self, space: str, key: str, version: int, data: bytes, ttl_s: float, stamp_us: int | None = None
    ) -> bool:
        check_entry(space, key, data)
        args: list[Any] = [version, data, "" if stamp_us is None else stamp_us, _ms(ttl_s)]
        async with self.guard("cache put"):
            return int(await self._put_script(keys=[self.key(space, key)], args=args)) == 1

    async def get(self, space: str, key: str) -> bytes | None:
        async with self.guard("cache get"):
            raw = await self.redis.get(self.key(space, key))
        return raw.encode() if isinstance(raw, str) else raw  # bytes (the client never decodes)

    async def put_once(self, space: str, key: str, data: bytes, ttl_s: float) -> bool:
        check_entry(space, key, data)
        async with self.guard("cache put"):
            return bool(await self.redis.set(self.key(space, key), data, nx=True, px=_ms(ttl_s)))

    async def close(self) -> None:
        await self._close_client()
