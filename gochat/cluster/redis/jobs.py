"""Durable jobs on Redis Streams: :class:`RedisJobQueue` (consumer groups, at least once and
idempotent per group, idle entries reclaimed, dead letters)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from gochat.cluster.base import JobHandler
from gochat.cluster.redis.client import _DOWN, DEFAULT_PREFIX, _Client, _s, cancel_tasks, log

__all__ = ["RedisJobQueue"]

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

    async def consume(
        self, stream: str, group: str, consumer: str, handler: JobHandler, concurrency: int = 1
    ) -> None:
        async with self.guard("jobs consume"):
            await self._create_group(self.stream_key(stream), group)
        self._tasks.append(
            asyncio.create_task(
                self._consume_loop(stream, group, consumer, handler, max(1, concurrency)),
                name=f"jobs-{stream}-{consumer}",
            )
        )

    async def _consume_loop(
        self, stream: str, group: str, consumer: str, handler: JobHandler, concurrency: int = 1
    ) -> None:
        key = self.stream_key(stream)
        loop = asyncio.get_running_loop()
        claim_every = max(0.02, self.claim_idle_ms / 2000)
        next_claim = 0.0
        backoff = self.retry.backoff()
        failing = False
        while True:
            try:
                if loop.time() >= next_claim:
                    next_claim = loop.time() + claim_every
                    await self._claim_idle(stream, key, group, consumer, handler)
                # a read takes at most ``concurrency`` entries, handled together: the node holds
                # no more jobs than it works on, and the rest stay for the other consumers
                resp: Any = await self.redis.xreadgroup(
                    group, consumer, {key: ">"}, count=min(self.batch, concurrency), block=self.block_ms
                )
                for _name, entries in resp or []:
                    await asyncio.gather(
                        *(self._process(stream, key, group, consumer, handler, eid, f, 1) for eid, f in entries)
                    )
                if failing:
                    log.warning("jobs %s/%s: redis is back, consuming again", stream, consumer)
                failing = False
                backoff.reset()
            except asyncio.CancelledError:
                raise
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    log.warning("jobs %s/%s: consumer group lost (redis restarted?); re-creating", stream, consumer)
                    with contextlib.suppress(Exception):
                        await self._create_group(key, group)
                else:
                    log.warning("jobs %s/%s: %r", stream, consumer, exc)
                    await asyncio.sleep(backoff.next())
            except _DOWN as exc:
                if not failing:
                    log.warning("jobs %s/%s: redis unavailable (%r); retrying", stream, consumer, exc)
                failing = True
                await asyncio.sleep(backoff.next())
            except Exception:
                log.exception("jobs %s/%s: consumer loop error", stream, consumer)
                await asyncio.sleep(backoff.next())

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
