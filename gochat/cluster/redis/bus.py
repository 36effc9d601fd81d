"""The event bus on one Redis stream: :class:`RedisEventBus` (docs/consistency.md, Event bus).

Keys: the log ``{prefix}events`` (fields ``e``, the orjson-encoded event, and ``n``, its
ordinal from the counter ``{prefix}events:seq``), one cursor per consumer
``{prefix}events:cursor:{name}`` (``"{entry id} {ordinal}"`` of the last entry it handled, EX
``cursor_ttl_s``), dead letters ``{prefix}events:dead``. A publish is one script: INCR the
counter, ``XADD MAXLEN ~ maxlen``, ``XTRIM MINID ~`` (now − ``max_age_s``), so the log keeps at
least the newest ``maxlen`` events that are younger than ``max_age_s`` (approximate trimming
removes whole stream nodes, so a little more is kept).

Every node reads with plain XREAD (no consumer group: every node sees every entry) from its
own cursor. Ordinals make a gap visible: when the first entry the log still holds after the
cursor is not the one right after it, entries were trimmed before the node read them, so it
cannot replay and rebuilds instead (then reads on from the end of the log). The cursor is
saved with ``SET XX``: a cursor key that is gone (Redis restarted without persistence, and
the log with it) makes the node rebuild too.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from redis.asyncio import Redis

from gochat.clock import now_ms
from gochat.cluster.bus import (
    EVENT_FRESH_S,
    EVENT_RETENTION_AGE_S,
    EVENT_RETENTION_LEN,
    DomainEvent,
    EntryHandler,
    Rebuild,
    encode_event,
)
from gochat.cluster.redis.client import _RETRYABLE, DEFAULT_PREFIX, _Client, _s, cancel_tasks, log

__all__ = ["RedisEventBus"]

DEAD_LETTERS_MAX = 10_000

#: (entry id, ordinal) of the last entry a consumer handled
_Cursor = tuple[str, int]

# KEYS: stream, ordinal counter; ARGV: payload, maxlen, minid (age bound)
_PUBLISH = """
local n = redis.call('INCR', KEYS[2])
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'e', ARGV[1], 'n', n)
redis.call('XTRIM', KEYS[1], 'MINID', '~', ARGV[3])
return id
"""


class RedisEventBus(_Client):
    """:class:`~gochat.cluster.bus.EventBus` on a Redis stream (one instance per node)."""

    def __init__(
        self,
        redis: Redis | str,
        prefix: str = DEFAULT_PREFIX,
        *,
        maxlen: int = EVENT_RETENTION_LEN,
        max_age_s: float = EVENT_RETENTION_AGE_S,
        batch: int = 128,
        block_ms: int = int(EVENT_FRESH_S * 1000 / 3),
        cursor_ttl_s: int = 7 * 86_400,
        timeout_s: float = 2.0,
    ) -> None:
        super().__init__(redis, prefix, timeout_s)
        self.maxlen = maxlen
        self.max_age_s = max_age_s
        self.batch = batch
        self.block_ms = max(10, min(block_ms, int(timeout_s * 500)))
        self.cursor_ttl_s = cursor_ttl_s
        self.stream_key = f"{prefix}events"
        self.dead_key = f"{prefix}events:dead"
        self.seq_key = f"{prefix}events:seq"
        self._publish = self.redis.register_script(_PUBLISH)
        self._task: asyncio.Task[None] | None = None
        #: loop time at which the last read that reached the end of the log was issued
        #: (its entries all handled); -inf until the first
        self._fresh_at = float("-inf")
        self._first_catch_up = asyncio.Event()

    def caught_up(self, within_s: float) -> bool:
        # The issue time, not the reply's arrival: a reply that waited in the socket buffer
        # while the process was stopped says nothing about what was published meanwhile.
        return asyncio.get_running_loop().time() - self._fresh_at <= within_s

    def cursor_key(self, name: str) -> str:
        return f"{self.prefix}events:cursor:{name}"

    async def publish(self, event: DomainEvent) -> str:
        minid = f"{max(0, now_ms() - int(self.max_age_s * 1000))}-0"
        async with self.guard("events publish"):
            eid = await self._publish(
                keys=[self.stream_key, self.seq_key], args=[encode_event(event), self.maxlen, minid]
            )
        return _s(eid)

    async def _end(self) -> _Cursor:
        """The last entry of the log (the start of a consumer that rebuilds)."""
        last: Any = await self.redis.xrevrange(self.stream_key, count=1)
        if last:
            return _s(last[0][0]), int(last[0][1][b"n"])
        return "0-0", int(await self.redis.get(self.seq_key) or 0)

    async def _replayable(self, cursor: _Cursor) -> bool:
        """Whether the log still holds every entry after ``cursor`` (its first entry is at
        most the one right after it; an empty log: nothing was appended after it)."""
        first: Any = await self.redis.xrange(self.stream_key, count=1)
        if first:
            return int(first[0][1][b"n"]) <= cursor[1] + 1
        return int(await self.redis.get(self.seq_key) or 0) <= cursor[1]

    async def _save(self, name: str, cursor: _Cursor, *, create: bool) -> bool:
        value = f"{cursor[0]} {cursor[1]}"
        ok = await self.redis.set(self.cursor_key(name), value, ex=self.cursor_ttl_s, xx=not create)
        return bool(ok)

    async def _position(self, name: str, rebuild: Rebuild, cursor: _Cursor | None = None) -> _Cursor:
        """Where to read after: the saved cursor when the log still holds everything after
        it; else the end of the log, once ``rebuild()`` returned."""
        async with self.guard("events cursor"):
            raw = await self.redis.get(self.cursor_key(name))
            saved: _Cursor | None = None
            if raw is not None:
                eid, _, n = _s(raw).partition(" ")
                saved = (eid, int(n or 0))
                if await self._replayable(saved):
                    return saved
            start = await self._end()
        if saved is not None:
            why = "its cursor fell behind the retention"
        else:
            why = "no cursor yet" if cursor is None else "its cursor vanished (redis lost its data?)"
        (log.info if saved is None and cursor is None else log.warning)(
            "event consumer %s: %s; rebuilding", name, why
        )
        await rebuild()
        async with self.guard("events cursor"):
            await self._save(name, start, create=True)
        return start

    async def subscribe(self, name: str, handler: EntryHandler, rebuild: Rebuild) -> None:
        if self._task is not None:
            raise RuntimeError("event bus already subscribed")
        cursor = await self._position(name, rebuild)
        self._task = asyncio.create_task(self._run(name, handler, rebuild, cursor), name=f"events-{name}")
        # A node starts caught up (its first read replays what it missed), so it accepts tokens
        # from the start; a reader that cannot get there in time goes on in the background.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.timeout_s):
                await self._first_catch_up.wait()

    async def _run(self, name: str, handler: EntryHandler, rebuild: Rebuild, cursor: _Cursor) -> None:
        check = False
        backoff = self.retry.backoff()
        while True:
            try:
                if check:
                    cursor = await self._position(name, rebuild, cursor)
                    check = False
                issued = asyncio.get_running_loop().time()
                resp: Any = await self.redis.xread(
                    {self.stream_key: cursor[0]}, count=self.batch, block=self.block_ms
                )
                entries = [e for _name, es in resp or [] for e in es]
                if entries and int(entries[0][1].get(b"n", 0)) > cursor[1] + 1:
                    check = True  # the entries right after the cursor were trimmed: rebuild
                    continue
                for eid, fields in entries:
                    await handler(_s(eid), bytes(fields.get(b"e", b"")))
                    cursor = (_s(eid), int(fields.get(b"n", 0)))
                if entries and not await self._save(name, cursor, create=False):
                    check = True  # the cursor key is gone: redis lost its data
                elif len(entries) < self.batch:
                    self._fresh_at = issued  # everything published before `issued` is applied
                    self._first_catch_up.set()
                backoff.reset()
            except asyncio.CancelledError:
                raise
            except _RETRYABLE as exc:
                log.warning("event consumer %s: redis unavailable (%r); retrying", name, exc)
                check = True
                await asyncio.sleep(backoff.next())
            except Exception:
                log.exception("event consumer %s failed; retrying", name)
                check = True
                await asyncio.sleep(backoff.next())

    async def dead_letter(self, name: str, entry_id: str, payload: bytes, error: str) -> None:
        async with self.guard("events dead letter"):
            await self.redis.xadd(
                self.dead_key,
                {b"consumer": name, b"entry": entry_id, b"e": payload, b"err": error},
                maxlen=DEAD_LETTERS_MAX,
                approximate=True,
            )

    async def dead_letters(self) -> list[tuple[str, str, bytes, str]]:
        async with self.guard("events dead letters"):
            entries: Any = await self.redis.xrange(self.dead_key)
        return [(_s(f[b"consumer"]), _s(f[b"entry"]), bytes(f[b"e"]), _s(f[b"err"])) for _, f in entries]

    async def close(self) -> None:
        task, self._task = self._task, None
        await cancel_tasks([task])
        await self._close_client()
