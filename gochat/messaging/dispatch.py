"""This node's local part of fan-out jobs: chunked, in order, bounded (docs/cluster.md, "Fan-out tiers").

A message of the sharded or cascaded tier can have tens of thousands of recipients on one node.
Queuing it to all of them in one call would hold the event loop for milliseconds, delaying every
other client's frames. :class:`LocalJobs` queues it to ``chunk`` recipients per event-loop turn
instead, one job after the other (a conversation's messages reach each member in the order they
were committed), so direct messages and small groups, which are fanned out inline, wait at most
one chunk behind a huge group.

Bounded: at most ``max_jobs`` jobs wait; a job beyond that is shed (counted, and its recipients
on this node are sent EVENT RESYNC: they recover the message with SYNC) rather than memory. When its
last chunk is queued, a job with a progress record reports its part done.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gochat.cluster.fanout import FanoutProgress
from gochat.errors import GochatError

__all__ = ["DEFAULT_CHUNK", "DEFAULT_MAX_JOBS", "LocalJobs"]

log = logging.getLogger("gochat.messaging")

DEFAULT_CHUNK = 1000
DEFAULT_MAX_JOBS = 1024


class _Local(Protocol):
    def unordered(self, user_ids: Sequence[int], frame: bytes, droppable: bool, skip: Any = None) -> int: ...

    def observe(self, tier: int, frame: bytes) -> None: ...


@dataclass(slots=True)
class _Job:
    user_ids: Sequence[int]
    frame: bytes
    droppable: bool
    skip: Any
    tier: int
    job_id: str  # "" when the job has no progress record
    pos: int = 0
    delivered: int = 0


class LocalJobs:
    """The chunked local fan-out of one node (one worker task, started on first use)."""

    def __init__(
        self,
        local: _Local,
        progress: FanoutProgress,
        node_id: str,
        chunk: int = DEFAULT_CHUNK,
        max_jobs: int = DEFAULT_MAX_JOBS,
    ) -> None:
        self.local = local
        self.progress = progress
        self.node_id = node_id
        #: recipients queued per event-loop turn (reloadable: fanout_chunk)
        self.chunk = chunk
        #: jobs that may wait (reloadable: fanout_max_jobs)
        self.max_jobs = max_jobs
        #: called with a shed job's recipients (the node tells them to SYNC: EVENT RESYNC)
        self.on_shed: Callable[[Sequence[int]], None] | None = None
        self._jobs: deque[_Job] = deque()
        self._wake = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._reports: set[asyncio.Task[Any]] = set()
        self._closed = False
        # counters (gochat_fanout_local_*)
        self.started = 0
        self.finished = 0
        self.shed = 0
        self.chunks = 0
        self.recipients = 0

    @property
    def waiting(self) -> int:
        """Jobs queued or running here (a load signal of the dynamic threshold)."""
        return len(self._jobs)

    @property
    def pending_recipients(self) -> int:
        return sum(len(j.user_ids) - j.pos for j in self._jobs)

    def add(
        self, user_ids: Sequence[int], frame: bytes, droppable: bool, skip: Any, tier: int, job_id: str = ""
    ) -> bool:
        """Queue a job; False when it was shed (the queue is full, or the node is stopping)."""
        if self._closed or len(self._jobs) >= self.max_jobs:
            self.shed += 1
            log.warning("local fan-out job shed (%d jobs waiting): %s", len(self._jobs), job_id or "-")
            if not self._closed and self.on_shed is not None:
                self.on_shed(user_ids)
            return False
        self._jobs.append(_Job(user_ids, frame, droppable, skip, tier, job_id))
        self.started += 1
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="local-fanout-jobs")
        self._wake.set()
        return True

    async def _run(self) -> None:
        jobs = self._jobs
        while True:
            if not jobs:
                self._wake.clear()
                await self._wake.wait()
                continue
            job = jobs[0]
            end = job.pos + self.chunk
            try:
                job.delivered += self.local.unordered(job.user_ids[job.pos : end], job.frame, job.droppable, job.skip)
            except Exception:  # a bad job must not stop the worker
                log.exception("local fan-out chunk failed (job %s)", job.job_id or "-")
                end = len(job.user_ids)
            self.chunks += 1
            self.recipients += min(end, len(job.user_ids)) - job.pos
            job.pos = end
            if job.pos >= len(job.user_ids):
                jobs.popleft()
                self.finished += 1
                self.local.observe(job.tier, job.frame)
                if job.job_id:
                    self._report(job.job_id, job.delivered)
            # let the loop serve everything else before the next chunk
            await asyncio.sleep(0)

    def _report(self, job_id: str, delivered: int) -> None:
        task = asyncio.get_running_loop().create_task(self._report_part(job_id, delivered))
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    async def _report_part(self, job_id: str, delivered: int) -> None:
        try:
            await self.progress.part_done(job_id, self.node_id, delivered)
        except GochatError as exc:  # progress is best effort: the delivery itself is done
            log.info("fan-out progress of %s not recorded: %s", job_id, exc.message)

    async def idle(self) -> None:
        """Wait until every queued job is done (tests, drain)."""
        while self._jobs or self._reports:
            await asyncio.sleep(0.005)

    async def close(self) -> None:
        """Stop: jobs still queued are dropped (their recipients recover with SYNC)."""
        self._closed = True
        tasks = [t for t in (self._worker, *self._reports) if t is not None]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        self._jobs.clear()
