""":class:`RedisFanoutProgress`: fan-out job records in Redis, readable from every node."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from gochat.clock import now_ms
from gochat.cluster.fanout import PROGRESS_KEEP, PROGRESS_TTL_S, FanoutJob
from gochat.cluster.redis.client import DEFAULT_PREFIX, _Client, _s

__all__ = ["RedisFanoutProgress"]

# KEYS: record hash, parts set; ARGV: part, delivered, ttl (s), now (ms).
# A part counts once (SADD); the record is finished when every part is in.
_PART_DONE = """
if redis.call('SADD', KEYS[2], ARGV[1]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'delivered', ARGV[2])
  redis.call('EXPIRE', KEYS[2], ARGV[3])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
local done = redis.call('SCARD', KEYS[2])
local total = tonumber(redis.call('HGET', KEYS[1], 'parts_total') or '0')
if total > 0 and done >= total and redis.call('HEXISTS', KEYS[1], 'finished_ms') == 0 then
  redis.call('HSET', KEYS[1], 'finished_ms', ARGV[4])
end
return done
"""

# KEYS: record hash, parts set, index zset; ARGV: ttl, keep, created_ms, job_id, then field/value
_START = """
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('EXPIRE', KEYS[1], ARGV[1])
local done = redis.call('SCARD', KEYS[2])
local total = tonumber(redis.call('HGET', KEYS[1], 'parts_total'))
if total > 0 and done >= total and redis.call('HEXISTS', KEYS[1], 'finished_ms') == 0 then
  redis.call('HSET', KEYS[1], 'finished_ms', ARGV[3])
end
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -tonumber(ARGV[2]) - 1)
return 1
"""

_INT_FIELDS = ("conv_id", "seq", "msg_id", "members", "parts_total", "created_ms")


class RedisFanoutProgress(_Client):
    """:class:`~gochat.cluster.fanout.FanoutProgress` on Redis.

    Keys: ``{prefix}fanout:{job_id}`` (hash: the job's fields, ``delivered``, ``finished_ms``),
    ``{prefix}fanout:{job_id}:parts`` (set of the parts done), both expiring
    :data:`~gochat.cluster.fanout.PROGRESS_TTL_S` after the last change, and the index
    ``{prefix}fanouts`` (sorted set: job id by creation time, the newest ``keep`` kept)."""

    def __init__(
        self, redis: Redis | str, prefix: str = DEFAULT_PREFIX, *, keep: int = PROGRESS_KEEP, timeout_s: float = 2.0
    ) -> None:
        super().__init__(redis, prefix, timeout_s)
        self.keep = keep
        self.ttl_s = PROGRESS_TTL_S
        self._part_done = self.redis.register_script(_PART_DONE)
        self._start = self.redis.register_script(_START)

    def _key(self, job_id: str) -> str:
        return f"{self.prefix}fanout:{job_id}"

    @property
    def index_key(self) -> str:
        return f"{self.prefix}fanouts"

    async def start(self, job: FanoutJob) -> None:
        key = self._key(job.job_id)
        fields: list[Any] = []
        for name in ("tier", "origin", *_INT_FIELDS):
            fields += [name, getattr(job, name)]
        async with self.guard("fanout progress start"):
            await self._start(
                keys=[key, f"{key}:parts", self.index_key],
                args=[self.ttl_s, self.keep, job.created_ms, job.job_id, *fields],
            )

    async def part_done(self, job_id: str, part: str, delivered: int) -> int:
        key = self._key(job_id)
        async with self.guard("fanout progress part"):
            done = await self._part_done(
                keys=[key, f"{key}:parts"], args=[part, delivered, self.ttl_s, now_ms()]
            )
        return int(done)

    async def recent(self, limit: int = 50) -> list[FanoutJob]:
        async with self.guard("fanout progress list"):
            ids: Any = await self.redis.zrevrange(self.index_key, 0, max(0, limit - 1))
            if not ids:
                return []
            pipe = self.redis.pipeline(transaction=False)
            for raw in ids:
                key = self._key(_s(raw))
                pipe.hgetall(key)
                pipe.scard(f"{key}:parts")
            rows: Any = await pipe.execute()
        jobs = []
        for raw, i in zip(ids, range(0, len(rows), 2), strict=True):
            job = _job(_s(raw), rows[i], rows[i + 1])
            if job is not None:
                jobs.append(job)
        return jobs

    async def get(self, job_id: str) -> FanoutJob | None:
        key = self._key(job_id)
        async with self.guard("fanout progress get"):
            pipe = self.redis.pipeline(transaction=False)
            pipe.hgetall(key)
            pipe.scard(f"{key}:parts")
            h, done = await pipe.execute()
        return _job(job_id, h, done)

    async def close(self) -> None:
        await self._close_client()


def _job(job_id: str, h: dict[bytes, bytes], parts_done: int) -> FanoutJob | None:
    if not h or b"parts_total" not in h:
        return None  # expired, or only parts reported so far
    ints = {name: int(h.get(name.encode(), b"0")) for name in _INT_FIELDS}
    return FanoutJob(
        job_id=job_id,
        tier=_s(h.get(b"tier", b"")),
        origin=_s(h.get(b"origin", b"")),
        parts_done=int(parts_done),
        delivered=int(h.get(b"delivered", b"0")),
        finished_ms=int(h.get(b"finished_ms", b"0")),
        **ints,
    )
