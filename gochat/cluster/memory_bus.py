"""The in-process :class:`~gochat.cluster.bus.EventBus` (embedded mode, tests): one log per
:class:`~gochat.cluster.memory.MemoryHub`, so buses built on one hub are the nodes of one
cluster. Same semantics as the Redis stream (:mod:`gochat.cluster.redis.bus`): entries in one
order, a persisted cursor per consumer name (it outlives the bus instance, as a Redis key
outlives a node process), trimming by length and age, a rebuild when a cursor fell behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections import deque
from dataclasses import dataclass, field

from gochat.cluster.bus import (
    EVENT_RETENTION_AGE_S,
    EVENT_RETENTION_LEN,
    DomainEvent,
    EntryHandler,
    Rebuild,
    encode_event,
)
from gochat.cluster.memory import MemoryHub
from gochat.errors import GochatError

__all__ = ["MemoryEventBus", "MemoryEventLog"]

log = logging.getLogger("gochat.cluster.memory")

DEAD_LETTERS_MAX = 10_000


@dataclass
class MemoryEventLog:
    """The shared log of one hub."""

    #: (index, monotonic time appended, payload), oldest first
    entries: deque[tuple[int, float, bytes]] = field(default_factory=deque)
    last_index: int = 0
    #: the highest index trimmed away (a cursor below it missed entries)
    trimmed_upto: int = 0
    cursors: dict[str, int] = field(default_factory=dict)
    dead: deque[tuple[str, str, bytes, str]] = field(default_factory=lambda: deque(maxlen=DEAD_LETTERS_MAX))
    waiters: set[asyncio.Event] = field(default_factory=set)

    def trim(self, maxlen: int, max_age_s: float) -> None:
        horizon = time.monotonic() - max_age_s
        while self.entries and (len(self.entries) > maxlen or self.entries[0][1] < horizon):
            self.trimmed_upto = self.entries.popleft()[0]

    def after(self, index: int) -> list[tuple[int, bytes]]:
        return [(i, p) for i, _, p in self.entries if i > index]


_LOGS: weakref.WeakKeyDictionary[MemoryHub, MemoryEventLog] = weakref.WeakKeyDictionary()


def event_log(hub: MemoryHub) -> MemoryEventLog:
    lg = _LOGS.get(hub)
    if lg is None:
        lg = _LOGS[hub] = MemoryEventLog()
    return lg


class MemoryEventBus:
    """:class:`~gochat.cluster.bus.EventBus` over a :class:`MemoryHub` (one instance per node)."""

    def __init__(
        self,
        hub: MemoryHub | None = None,
        *,
        maxlen: int = EVENT_RETENTION_LEN,
        max_age_s: float = EVENT_RETENTION_AGE_S,
    ) -> None:
        self.hub = hub if hub is not None else MemoryHub()
        self.log = event_log(self.hub)
        self.maxlen = maxlen
        self.max_age_s = max_age_s
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    async def publish(self, event: DomainEvent) -> str:
        self.hub.check()
        lg = self.log
        lg.last_index += 1
        lg.entries.append((lg.last_index, time.monotonic(), encode_event(event)))
        lg.trim(self.maxlen, self.max_age_s)
        for ev in lg.waiters:
            ev.set()
        return str(lg.last_index)

    async def _position(self, name: str, rebuild: Rebuild) -> int:
        """The index to read after: the cursor, or the end of the log after a rebuild."""
        cursor = self.log.cursors.get(name)
        if cursor is not None and cursor >= self.log.trimmed_upto:
            return cursor
        start = self.log.last_index
        if cursor is not None:
            log.warning("event consumer %s fell behind the retention; rebuilding", name)
        await rebuild()
        self.log.cursors[name] = start
        return start

    async def subscribe(self, name: str, handler: EntryHandler, rebuild: Rebuild) -> None:
        self.hub.check()
        if self._task is not None:
            raise RuntimeError("event bus already subscribed")
        cursor = await self._position(name, rebuild)
        self.log.waiters.add(self._wake)
        self._task = asyncio.create_task(self._run(name, handler, rebuild, cursor), name=f"events-{name}")

    async def _run(self, name: str, handler: EntryHandler, rebuild: Rebuild, cursor: int) -> None:
        while True:
            self._wake.clear()
            if self.hub.available:
                try:
                    if cursor < self.log.trimmed_upto:
                        cursor = await self._position(name, rebuild)
                    for index, payload in self.log.after(cursor):
                        await handler(str(index), payload)
                        cursor = self.log.cursors[name] = index
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("event consumer %s failed; retrying", name)
                    await asyncio.sleep(0.05)
                    continue
                if self.log.last_index > cursor:
                    continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await self._wake.wait()

    def caught_up(self, within_s: float) -> bool:
        # In-process: the log is in this process's memory and the reader runs on its loop, so
        # the reader is as fresh as the hub is reachable (tests take a hub down to simulate
        # an outage); an event published a moment ago is in flight, as on Redis.
        return self._task is not None and not self._task.done() and self.hub.available

    async def dead_letter(self, name: str, entry_id: str, payload: bytes, error: str) -> None:
        self.hub.check()
        self.log.dead.append((name, entry_id, bytes(payload), error))

    async def dead_letters(self) -> list[tuple[str, str, bytes, str]]:
        self.hub.check()
        return list(self.log.dead)

    async def close(self) -> None:
        self.log.waiters.discard(self._wake)
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, GochatError):
                await asyncio.wait([task], timeout=5.0)
