"""Fan-out tiers, priorities and the progress of fan-out jobs (docs/cluster.md, "Fan-out tiers").

A group message is fanned out by one of four tiers, chosen per message from the member count:

| tier | members (defaults) | how |
|---|---|---|
| ``INLINE`` | ≤ ``fanout_inline_max`` (100) | local sessions in the send path; other nodes in the router's next turn, first after direct messages |
| ``BATCHED`` | ≤ the large-group threshold (dynamic, 300–1,000) | local sessions in the send path; other nodes in per-node batches at the router's large-group priority |
| ``SHARDED`` | ≤ ``fanout_cascade_min`` (5,000) | durable stream jobs of ``fanout_shard_size`` members, taken by every node |
| ``CASCADED`` | above | one broadcast envelope; every node fans out to its own members of the group |

Sharded and cascaded messages are *fan-out jobs*: each node's local part runs in chunks of
``fanout_chunk`` recipients, one chunk per event-loop turn, so a 50,000-member group never
stalls a node, and each job's progress (parts done, recipients reached) is recorded in a
:class:`FanoutProgress` shared by the cluster (``GET /v1/admin/fanout``).

Shared state: the progress records. Owner: the node that sent the message creates a record;
every node that finishes a part of it adds that part, once (a part done twice, after a re-claimed
stream job, counts once). In-process in embedded mode, Redis in a cluster.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace
from enum import IntEnum
from typing import Any, Protocol, runtime_checkable

from gochat.clock import now_ms
from gochat.cluster.memory import MemoryHub

__all__ = [
    "PROGRESS_KEEP",
    "PROGRESS_TTL_S",
    "FanoutJob",
    "FanoutProgress",
    "MemoryFanoutProgress",
    "Priority",
    "Tier",
]

#: fan-out job records kept (the newest); older ones are dropped
PROGRESS_KEEP = 1000
#: how long a job record lives after it was created
PROGRESS_TTL_S = 3600


class Tier(IntEnum):
    """How a message is fanned out; also the ``tier`` label of the fan-out metrics."""

    INLINE = 0
    BATCHED = 1
    SHARDED = 2
    CASCADED = 3

    @property
    def label(self) -> str:
        return self.name.lower()


class Priority(IntEnum):
    """Who goes first when a node's fan-out work queues up: lower is sooner. Control messages
    (presence, revocations, kicks, configuration) are never queued: they are published at once."""

    CONTROL = 0
    DIRECT = 1
    SMALL_GROUP = 2
    LARGE_GROUP = 3
    ROOM = 4


@dataclass(frozen=True, slots=True)
class FanoutJob:
    """A fan-out job's record. ``parts_total``: the parts the job was cut into (a sharded job:
    its stream shards plus the sending node's own sessions; a cascaded job: the nodes it was
    broadcast to, the sender included). ``delivered``: connections the message was queued on."""

    job_id: str
    tier: str
    conv_id: int
    seq: int
    msg_id: int
    origin: str
    members: int
    parts_total: int
    created_ms: int
    parts_done: int = 0
    delivered: int = 0
    finished_ms: int = 0

    @property
    def percent(self) -> float:
        return 100.0 if self.parts_total <= 0 else round(100.0 * self.parts_done / self.parts_total, 1)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["percent"] = self.percent
        return out


@runtime_checkable
class FanoutProgress(Protocol):
    """Where fan-out jobs record their progress, readable from any node."""

    async def start(self, job: FanoutJob) -> None:
        """Record a new job (its parts and delivered count start at whatever parts already
        reported: a part may finish before the record is written)."""

    async def part_done(self, job_id: str, part: str, delivered: int) -> int:
        """Part ``part`` of the job finished, queuing the message on ``delivered`` connections;
        a part reported again is not counted again. Returns the parts done so far."""

    async def recent(self, limit: int = 50) -> list[FanoutJob]:
        """The newest jobs first."""

    async def get(self, job_id: str) -> FanoutJob | None: ...

    async def close(self) -> None: ...


@dataclass(slots=True)
class _Record:
    job: FanoutJob | None = None
    parts: set[str] = field(default_factory=set)
    delivered: int = 0
    finished_ms: int = 0


class MemoryFanoutProgress:
    """:class:`FanoutProgress` in one :class:`~gochat.cluster.memory.MemoryHub` (embedded mode,
    tests): the newest :data:`PROGRESS_KEEP` jobs."""

    def __init__(self, hub: MemoryHub | None = None, keep: int = PROGRESS_KEEP) -> None:
        self.hub = hub if hub is not None else MemoryHub()
        self.keep = keep
        self._jobs: OrderedDict[str, _Record] = self.hub.fanout_jobs

    def _record(self, job_id: str) -> _Record:
        rec = self._jobs.get(job_id)
        if rec is None:
            rec = self._jobs[job_id] = _Record()
            while len(self._jobs) > self.keep:
                self._jobs.popitem(last=False)
        return rec

    async def start(self, job: FanoutJob) -> None:
        self.hub.check()
        rec = self._record(job.job_id)
        rec.job = job
        # listed (and evicted) by creation, also when a part reported before the record
        self._jobs.move_to_end(job.job_id)
        self._finish_if_done(rec)

    async def part_done(self, job_id: str, part: str, delivered: int) -> int:
        self.hub.check()
        rec = self._record(job_id)
        if part not in rec.parts:
            rec.parts.add(part)
            rec.delivered += delivered
            self._finish_if_done(rec)
        return len(rec.parts)

    @staticmethod
    def _finish_if_done(rec: _Record) -> None:
        if rec.job is not None and not rec.finished_ms and len(rec.parts) >= rec.job.parts_total:
                rec.finished_ms = now_ms()

    def _view(self, rec: _Record) -> FanoutJob | None:
        if rec.job is None:
            return None
        return replace(
            rec.job, parts_done=len(rec.parts), delivered=rec.delivered, finished_ms=rec.finished_ms
        )

    async def recent(self, limit: int = 50) -> list[FanoutJob]:
        self.hub.check()
        out: list[FanoutJob] = []
        for rec in reversed(self._jobs.values()):
            view = self._view(rec)
            if view is not None:
                out.append(view)
                if len(out) >= limit:
                    break
        return out

    async def get(self, job_id: str) -> FanoutJob | None:
        self.hub.check()
        rec = self._jobs.get(job_id)
        return None if rec is None else self._view(rec)

    async def close(self) -> None:
        pass
