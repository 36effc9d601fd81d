"""The :class:`~gochat.cluster.fanout.FanoutProgress` seam: the same behaviour tests against
:class:`~gochat.cluster.fanout.MemoryFanoutProgress` and
:class:`~gochat.cluster.redis.progress.RedisFanoutProgress` (each Redis test under its own key
prefix, deleted afterwards with :func:`tests.conftest.drop_redis_keys`).

Two instances made by one backend behave like two nodes of one cluster: what one records, the
other reads.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from gochat.cluster.fanout import FanoutJob, FanoutProgress, MemoryFanoutProgress
from gochat.cluster.memory import MemoryHub
from gochat.cluster.redis.progress import RedisFanoutProgress
from tests.conftest import drop_redis_keys, run

REDIS_URL = os.environ.get("GOCHAT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

Make = Callable[..., FanoutProgress]
Body = Callable[[Make], Awaitable[None]]


class _Memory:
    def __init__(self) -> None:
        self.hub = MemoryHub()

    def make(self, keep: int = 1000) -> FanoutProgress:
        return MemoryFanoutProgress(self.hub, keep=keep)

    async def cleanup(self) -> None:
        pass


class _Redis:
    def __init__(self) -> None:
        self.prefix = f"gtfp:{uuid.uuid4().hex[:12]}:"
        self.made: list[RedisFanoutProgress] = []

    def make(self, keep: int = 1000) -> FanoutProgress:
        p = RedisFanoutProgress(REDIS_URL, self.prefix, keep=keep)
        self.made.append(p)
        return p

    async def cleanup(self) -> None:
        for p in self.made:
            await p.close()
        await drop_redis_keys(REDIS_URL, self.prefix)


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> Callable[[Body], None]:
    def go(body: Body) -> None:
        async def main() -> None:
            b: Any = _Memory() if request.param == "memory" else _Redis()
            try:
                await body(b.make)
            finally:
                await b.cleanup()

        run(main())

    return go


def job(job_id: str, parts_total: int = 3, created_ms: int = 1_000, **kw: Any) -> FanoutJob:
    fields: dict[str, Any] = dict(
        job_id=job_id,
        tier="sharded",
        conv_id=77,
        seq=5,
        msg_id=123456789,
        origin="node-a",
        members=2500,
        parts_total=parts_total,
        created_ms=created_ms,
    )
    fields.update(kw)
    return FanoutJob(**fields)


def test_instances_satisfy_the_protocol(backend: Callable[[Body], None]) -> None:
    async def body(make: Make) -> None:
        assert isinstance(make(), FanoutProgress)

    backend(body)


def test_a_started_job_reads_back_with_its_fields(backend: Callable[[Body], None]) -> None:
    async def body(make: Make) -> None:
        a, b = make(), make()
        await a.start(job("j1", parts_total=3, created_ms=1234))
        got = await b.get("j1")  # another node reads it
        assert got is not None
        assert (got.job_id, got.tier, got.conv_id, got.seq, got.msg_id, got.origin) == (
            "j1", "sharded", 77, 5, 123456789, "node-a"
        )
        assert (got.members, got.parts_total, got.created_ms) == (2500, 3, 1234)
        assert (got.parts_done, got.delivered, got.finished_ms, got.percent) == (0, 0, 0, 0.0)
        d = got.as_dict()
        assert d["percent"] == 0.0 and d["parts_total"] == 3 and d["job_id"] == "j1"

    backend(body)


def test_get_of_an_unknown_job_is_none(backend: Callable[[Body], None]) -> None:
    async def body(make: Make) -> None:
        p = make()
        assert await p.get("no-such-job") is None
        # parts alone (the record not started yet) are no job either
        await p.part_done("early", "shard:0", 10)
        assert await p.get("early") is None
        assert [j.job_id for j in await p.recent()] == []

    backend(body)


def test_a_part_counts_once_and_delivered_sums(backend: Callable[[Body], None]) -> None:
    async def body(make: Make) -> None:
        a, b, c = make(), make(), make()
        await a.start(job("j2", parts_total=3))
        assert await a.part_done("j2", "node-a", 100) == 1
        assert await b.part_done("j2", "shard:0", 40) == 2
        # the same part again (a re-claimed stream job, reported by another node): not counted
        assert await c.part_done("j2", "shard:0", 40) == 2
        assert await b.part_done("j2", "node-a", 100) == 2
        got = await c.get("j2")
        assert got is not None
        assert (got.parts_done, got.delivered, got.finished_ms) == (2, 140, 0)
        assert got.percent == pytest.approx(66.7)

    backend(body)


def test_finished_when_every_part_is_in(backend: Callable[[Body], None]) -> None:
    async def body(make: Make) -> None:
        a, b = make(), make()
        await a.start(job("j3", parts_total=2))
        await a.part_done("j3", "node-a", 3)
        mid = await b.get("j3")
        assert mid is not None and mid.finished_ms == 0
        assert await b.part_done("j3", "shard:500", 4) == 2
        done = await a.get("j3")
        assert done is not None
        assert (done.parts_done, done.parts_total, done.delivered, done.percent) == (2, 2, 7, 100.0)
        assert done.finished_ms > 0
        first = done.finished_ms
        # a late duplicate neither counts nor moves the finish time
        assert await a.part_done("j3", "shard:500", 4) == 2
        again = await b.get("j3")
        assert again is not None and (again.parts_done, again.delivered, again.finished_ms) == (2, 7, first)

    backend(body)


def test_finished_when_the_record_is_started_after_its_parts(backend: Callable[[Body], None]) -> None:
    async def body(make: Make) -> None:
        a, b = make(), make()
        # every part reports before the origin writes the record (its start is a spawned task)
        assert await b.part_done("j4", "shard:0", 5) == 1
        assert await b.part_done("j4", "shard:500", 6) == 2
        assert await b.part_done("j4", "node-a", 7) == 3
        await a.start(job("j4", parts_total=3))
        got = await b.get("j4")
        assert got is not None
        assert (got.parts_done, got.delivered, got.percent) == (3, 18, 100.0)
        assert got.finished_ms > 0
        # some parts before, the last one after the start
        await b.part_done("j5", "shard:0", 1)
        await a.start(job("j5", parts_total=2))
        mid = await a.get("j5")
        assert mid is not None and (mid.parts_done, mid.delivered, mid.finished_ms) == (1, 1, 0)
        await b.part_done("j5", "node-a", 2)
        end = await a.get("j5")
        assert end is not None and (end.parts_done, end.delivered, end.percent) == (2, 3, 100.0)
        assert end.finished_ms > 0

    backend(body)


def test_recent_is_newest_first_and_limited(backend: Callable[[Body], None]) -> None:
    async def body(make: Make) -> None:
        a, b = make(), make()
        for i in range(5):
            await a.start(job(f"r{i}", created_ms=10_000 + i))
        await b.part_done("r3", "node-a", 9)
        recent = await b.recent()
        assert [j.job_id for j in recent] == ["r4", "r3", "r2", "r1", "r0"]
        assert recent[1].parts_done == 1 and recent[1].delivered == 9  # with its progress
        assert [j.job_id for j in await b.recent(limit=2)] == ["r4", "r3"]
        assert [j.job_id for j in await a.recent(limit=1)] == ["r4"]

    backend(body)


def test_recent_orders_by_creation_even_when_parts_came_first(backend: Callable[[Body], None]) -> None:
    """A part may report before its record is started (another node finished its shard first):
    the job still lists by when it was created, among the newest."""

    async def body(make: Make) -> None:
        a, b = make(), make()
        await b.part_done("late", "shard:0", 1)  # reported before either job was started
        await a.start(job("early", created_ms=20_000))
        await a.start(job("late", created_ms=20_001))
        assert [j.job_id for j in await b.recent()] == ["late", "early"]

    backend(body)


def test_recent_is_bounded_by_keep(backend: Callable[[Body], None]) -> None:
    async def body(make: Make) -> None:
        a = make(keep=3)
        for i in range(6):
            await a.start(job(f"k{i}", created_ms=30_000 + i))
        assert [j.job_id for j in await a.recent(limit=50)] == ["k5", "k4", "k3"]
        # the dropped ones are gone from the index; the newest keep stay readable
        assert await a.get("k5") is not None

    backend(body)
