"""The event bus (gochat/cluster/bus.py): one behaviour suite run against the in-process log
and a real Redis stream (its own key prefix per test, deleted afterwards).

Each ``bus()`` of a backend is another node of one cluster; a consumer name is a node's
stable name, so a new bus subscribing under an old name is that node after a restart.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest

from gochat.cluster.bus import (
    EVENT_FRESH_S,
    DomainEvent,
    EventBus,
    EventConsumer,
    EventOutbox,
    MemberAdded,
    TokenRevoked,
    decode_event,
    encode_event,
)
from gochat.cluster.memory import MemoryHub
from gochat.cluster.memory_bus import MemoryEventBus
from gochat.resilience import RetryPolicy
from tests.conftest import run

REDIS_URL = "redis://127.0.0.1:6379/0"


@dataclass(frozen=True, slots=True, kw_only=True)
class FutureThing(DomainEvent):
    """A type this code's registry does not know (published by a newer node)."""

    type: ClassVar[str] = "future.thing"
    x: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberAddedV2(MemberAdded):
    """A newer schema of a known type."""

    schema: ClassVar[int] = 2


class Backend:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.hub = MemoryHub()
        self.prefix = f"gtest:{uuid.uuid4().hex[:12]}:"
        self.made: list[Any] = []

    def bus(self, **kw: Any) -> EventBus:
        if self.kind == "memory":
            b: Any = MemoryEventBus(self.hub, **kw)
        else:
            from gochat.cluster.redis.bus import RedisEventBus

            b = RedisEventBus(REDIS_URL, self.prefix, block_ms=100, **kw)
        self.made.append(b)
        return b  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        for b in self.made:
            await b.close()
        if self.kind == "redis":
            from gochat.cluster.redis import connect

            admin = connect(REDIS_URL)
            try:
                keys = [k async for k in admin.scan_iter(match=f"{self.prefix}*")]
                if keys:
                    await admin.delete(*keys)
            finally:
                await admin.aclose()


class Recorder:
    """A node's handlers: what it applied, how often it rebuilt."""

    def __init__(self, fail: Callable[[DomainEvent], bool] = lambda _e: False) -> None:
        self.events: list[DomainEvent] = []
        self.attempts: list[str] = []
        self.rebuilds = 0
        self.fail = fail

    def apply(self, event: DomainEvent) -> None:
        self.attempts.append(event.event_id)
        if self.fail(event):
            raise RuntimeError("handler failed")
        self.events.append(event)

    async def rebuild(self) -> None:
        self.rebuilds += 1

    def ids(self) -> list[int]:
        return [e.user_id for e in self.events if isinstance(e, MemberAdded)]


async def consumer(bus: EventBus, name: str, rec: Recorder, **kw: Any) -> EventConsumer:
    c = EventConsumer(bus, name, rec.apply, rec.rebuild, **kw)
    await c.start()
    return c


def added(n: int, **kw: Any) -> MemberAdded:
    return MemberAdded(group_id=1, user_id=n, version=n, **kw)


async def until(pred: Callable[[], Any], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.fixture(params=["memory", "redis"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def run_with(kind: str, body: Callable[[Backend], Awaitable[None]]) -> None:
    async def main() -> None:
        b = Backend(kind)
        try:
            async with asyncio.timeout(30):
                await body(b)
        finally:
            await b.aclose()

    run(main())


def test_codec_round_trip_and_skips() -> None:
    ev = TokenRevoked(user_id=7, revoked_id="j1", expires_ms=123, version=0, origin="n")
    assert decode_event(encode_event(ev)) == ev
    for bad in (b"not json", b"[1]", encode_event(FutureThing()), encode_event(MemberAddedV2(group_id=1, user_id=2))):
        with pytest.raises(Exception) as info:
            decode_event(bad)
        assert type(info.value).__name__ == "SkippedEvent"


def test_every_node_sees_every_event_in_log_order(kind: str) -> None:
    async def body(b: Backend) -> None:
        buses = [b.bus() for _ in range(3)]
        recs = [Recorder() for _ in range(3)]
        for i, (bus, rec) in enumerate(zip(buses, recs, strict=True)):
            await consumer(bus, f"n{i}", rec)
        for n in range(1, 31):
            await buses[n % 3].publish(added(n))
        await until(lambda: all(len(r.events) == 30 for r in recs))
        for rec in recs:
            assert rec.ids() == list(range(1, 31))
            assert rec.rebuilds == 1  # a new consumer (no cursor) rebuilds once, at start

    run_with(kind, body)


def test_restarted_node_replays_from_its_cursor(kind: str) -> None:
    async def body(b: Backend) -> None:
        publisher = b.bus()
        rec = Recorder()
        c = await consumer(b.bus(), "n1", rec)
        await publisher.publish(added(1))
        await until(lambda: rec.ids() == [1])
        await c.close()  # the node is gone (or disconnected) ...
        for n in (2, 3, 4):
            await publisher.publish(added(n))
        rec2 = Recorder()
        await consumer(b.bus(), "n1", rec2)  # ... and back under its name
        await until(lambda: rec2.ids() == [2, 3, 4])
        await publisher.publish(added(5))
        await until(lambda: rec2.ids() == [2, 3, 4, 5])
        assert rec2.rebuilds == 0  # it replayed, nothing to rebuild

    run_with(kind, body)


def test_cursor_behind_the_retention_rebuilds_instead(kind: str) -> None:
    async def body(b: Backend) -> None:
        publisher = b.bus(maxlen=10)
        rec = Recorder()
        c = await consumer(b.bus(), "n1", rec)
        await publisher.publish(added(1))
        await until(lambda: rec.ids() == [1])
        await c.close()
        # far more than the retention (Redis trims whole stream nodes of 100 entries)
        for n in range(2, 302):
            await publisher.publish(added(n))
        rec2 = Recorder()
        await consumer(b.bus(), "n1", rec2)
        assert rec2.rebuilds == 1
        await publisher.publish(added(1000))
        await until(lambda: 1000 in rec2.ids())
        assert rec2.ids() == [1000]  # nothing replayed from before the rebuild

    run_with(kind, body)


def test_redelivered_event_is_applied_once(kind: str) -> None:
    async def body(b: Backend) -> None:
        bus = b.bus()
        rec = Recorder()
        c = await consumer(bus, "n1", rec)
        ev = added(1)
        await bus.publish(ev)
        await bus.publish(ev)  # the same event id again (a publisher's retry)
        await bus.publish(added(2))
        await until(lambda: rec.ids() == [1, 2])
        await asyncio.sleep(0.1)
        assert rec.ids() == [1, 2]
        assert c.stats.duplicates == 1
        assert c.stats.applied == {"member.added": 2}

    run_with(kind, body)


def test_failing_handler_is_retried_then_dead_lettered(kind: str) -> None:
    async def body(b: Backend) -> None:
        bus = b.bus()
        flaky: list[int] = []

        def fail(e: DomainEvent) -> bool:
            if isinstance(e, MemberAdded) and e.user_id == 1:
                flaky.append(1)
                return len(flaky) <= 2  # fails twice, then works
            return isinstance(e, MemberAdded) and e.user_id == 2  # always fails

        rec = Recorder(fail)
        c = await consumer(bus, "n1", rec, retry=RetryPolicy(max_attempts=4, base_delay_s=0.01, max_delay_s=0.01))
        for n in (1, 2, 3):
            await bus.publish(added(n))
        await until(lambda: rec.ids() == [1, 3])
        assert rec.attempts.count(rec.events[0].event_id) == 3
        assert c.stats.retries == 2 + 3
        assert c.stats.dead == 1
        dead = await bus.dead_letters()
        assert [(name, decode_event(p).user_id) for name, _eid, p, _err in dead] == [("n1", 2)]  # type: ignore[attr-defined]
        assert "handler failed" in dead[0][3]

    run_with(kind, body)


def test_unknown_type_and_newer_schema_are_skipped_and_counted(kind: str) -> None:
    async def body(b: Backend) -> None:
        bus = b.bus()
        rec = Recorder()
        c = await consumer(bus, "n1", rec)
        await bus.publish(FutureThing(x=1))
        await bus.publish(MemberAddedV2(group_id=1, user_id=9, version=9))
        await bus.publish(added(1))
        await until(lambda: rec.ids() == [1])
        assert c.stats.skipped == 2
        assert c.stats.dead == 0

    run_with(kind, body)


def test_reader_is_caught_up_once_subscribed_and_behind_while_cut_off(kind: str) -> None:
    """``caught_up`` (what the auth service's freshness gate reads): true as soon as subscribe
    returned; false while the reader cannot have read the log (the backend down, or on Redis
    the process stalled past the bound), true again once it has read to the end."""

    async def body(b: Backend) -> None:
        bus = b.bus()
        await consumer(bus, "n1", Recorder())
        assert bus.caught_up(EVENT_FRESH_S)
        if kind == "memory":
            b.hub.available = False
            assert not bus.caught_up(EVENT_FRESH_S)
            b.hub.available = True
        else:
            time.sleep(EVENT_FRESH_S + 0.2)  # the loop stalls (as under SIGSTOP)
            assert not bus.caught_up(EVENT_FRESH_S)
        await until(lambda: bus.caught_up(EVENT_FRESH_S))

    run_with(kind, body)


def test_outbox_publishes_in_order_once_the_bus_is_back() -> None:
    """Events made while the bus is down wait in the node's outbox and go out, in order,
    once it is back; past its bound the oldest are dropped and counted."""

    async def main() -> None:
        hub = MemoryHub()
        bus, reader = MemoryEventBus(hub), MemoryEventBus(hub)
        rec = Recorder()
        await consumer(reader, "reader", rec)
        outbox = EventOutbox(bus, max_pending=5, retry=RetryPolicy(base_delay_s=0.01, max_delay_s=0.02))
        hub.available = False
        for n in range(1, 8):
            outbox.add(added(n))
        await asyncio.sleep(0.05)
        assert outbox.pending == 5 and outbox.dropped == 2 and outbox.retries > 0
        hub.available = True
        assert await outbox.flush(5.0)
        await until(lambda: rec.ids() == [3, 4, 5, 6, 7])
        assert outbox.published == 5
        outbox.add(added(8))
        assert await outbox.flush(5.0)
        await until(lambda: rec.ids()[-1] == 8)
        await outbox.close()
        await bus.close()
        await reader.close()

    run(main())
