"""Query plans on PostgreSQL, out of band: the shape of a plan, its scans, and the sampler that
fetches the plan of each new slow-statement fingerprint in the background.

:func:`generic_plan` asks for the plan PostgreSQL would use for any parameter values
(``plan_cache_mode = force_generic_plan`` for one transaction, ``PREPARE``, ``EXPLAIN (FORMAT
JSON) EXECUTE`` with NULLs, partition pruning off so that the NULLs do not prune every
partition; PostgreSQL 15 has no ``EXPLAIN (GENERIC_PLAN)``). Nothing is executed (no
``ANALYZE``). :func:`plan_shape` reduces a plan to its operators, relations and
indexes, the partitions of a table shown once (``messages_p*``). ``gochat doctor`` reads the
same plans (:func:`plan_scans`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import secrets
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

from gochat.observability.slow_queries import INTERNAL, SlowQueryLog, normalize_sql

__all__ = ["PlanSampler", "Scan", "generic_plan", "plan_fingerprint", "plan_scans", "plan_shape"]

log = logging.getLogger("gochat.store.postgres")

_PARAM = re.compile(r"\$(\d+)")
_PARTITION = re.compile(r"_p\d+(?=_|$)")
_EXPLAINABLE = ("select", "with", "insert", "update", "delete", "values")
#: new fingerprints waiting for their plan; more are not sampled
_QUEUE_MAX: Final = 64


@dataclass(frozen=True, slots=True)
class Scan:
    """One plan node that reads a relation or an index."""

    node: str  # "Seq Scan", "Index Scan", "Index Only Scan", "Bitmap Index Scan", …
    relation: str | None
    index: str | None


def _root(plan: Any) -> dict[str, Any]:
    """The top plan node of ``EXPLAIN (FORMAT JSON)`` output (text or decoded)."""
    if isinstance(plan, str):
        plan = json.loads(plan)
    if isinstance(plan, list):
        plan = plan[0]
    node = plan.get("Plan", plan)
    assert isinstance(node, dict)
    return node


def _walk(node: dict[str, Any]) -> list[dict[str, Any]]:
    out = [node]
    for child in node.get("Plans", ()):
        out += _walk(child)
    return out


def plan_scans(plan: Any) -> list[Scan]:
    """Every node of the plan that reads a table or an index, in plan order; the arbiter
    indexes of an ``INSERT … ON CONFLICT`` as ``Conflict Arbiter`` entries."""
    out = []
    for n in _walk(_root(plan)):
        if "Relation Name" in n or "Index Name" in n:
            out.append(Scan(n["Node Type"], n.get("Relation Name"), n.get("Index Name")))
        for index in n.get("Conflict Arbiter Indexes", ()):
            out.append(Scan("Conflict Arbiter", n.get("Relation Name"), index))
    return out


def _label(node: dict[str, Any]) -> str:
    parts = [node["Node Type"]]
    if node.get("Index Name"):
        parts.append("using " + _PARTITION.sub("_p*", node["Index Name"]))
    if node.get("Relation Name"):
        parts.append("on " + _PARTITION.sub("_p*", node["Relation Name"]))
    elif node.get("CTE Name"):
        parts.append("on " + node["CTE Name"])
    return " ".join(parts)


def _shape(node: dict[str, Any]) -> str:
    kids: list[str] = []
    counts: list[int] = []
    for child in node.get("Plans", ()):
        s = _shape(child)
        if kids and kids[-1] == s:
            counts[-1] += 1
        else:
            kids.append(s)
            counts.append(1)
    if not kids:
        return _label(node)
    inner = ", ".join(f"{n}× {k}" if n > 1 else k for k, n in zip(kids, counts, strict=True))
    return f"{_label(node)} ({inner})"


def plan_shape(plan: Any) -> str:
    """The plan as one line of operators, e.g. ``Limit (Nested Loop (Index Only Scan using
    messages_p*_pkey on messages_p*, Index Only Scan using conversations_pkey on
    conversations))``; identical consecutive children (partitions) appear once, with a count."""
    return _shape(_root(plan))


def plan_fingerprint(shape: str) -> str:
    return hashlib.blake2b(shape.encode(), digest_size=8).hexdigest()


async def generic_plan(conn: Any, sql: str) -> Any:
    """The generic plan of ``sql`` (``$n`` parameters allowed) on ``conn``, as decoded JSON.
    Runs in a transaction that is rolled back; the prepared statement is deallocated."""
    n = max((int(m) for m in _PARAM.findall(sql)), default=0)
    name = f"gochat_plan_{secrets.token_hex(6)}"
    args = f"({', '.join(['NULL'] * n)})" if n else ""
    prepared = False
    await conn.execute(f"{INTERNAL}BEGIN")
    try:
        await conn.execute(f"{INTERNAL}SET LOCAL plan_cache_mode = force_generic_plan")
        # EXECUTE's NULLs would prune every partition when the executor starts: show them all
        await conn.execute(f"{INTERNAL}SET LOCAL enable_partition_pruning = off")
        await conn.execute(f"{INTERNAL}PREPARE {name} AS {sql}")
        prepared = True
        raw = await conn.fetchval(f"{INTERNAL}EXPLAIN (FORMAT JSON) EXECUTE {name}{args}")
    finally:
        await conn.execute(f"{INTERNAL}ROLLBACK")
        if prepared:  # PREPARE is not transactional
            await conn.execute(f"{INTERNAL}DEALLOCATE {name}")
    return json.loads(raw) if isinstance(raw, str) else raw


def _explainer(sql: str) -> Callable[[Any], Awaitable[Any]]:
    return lambda conn: generic_plan(conn, sql)


RunOnConn = Callable[[Callable[[Any], Awaitable[Any]], float], Awaitable[Any]]


class PlanSampler:
    """Fetches the plan shape of each new slow fingerprint, one at a time, in a task of the
    store's event loop (never on the slow statement's path), and gives it to the log.

    ``run(fn, timeout)`` runs ``fn(conn)`` on a pooled connection (the store's ``_on_conn``,
    which bypasses the circuit breaker: a failed EXPLAIN says nothing about the database's
    health). At most :data:`_QUEUE_MAX` fingerprints wait; a plan is fetched once per
    fingerprint."""

    def __init__(self, slow: SlowQueryLog, run: RunOnConn, timeout_s: float = 5.0) -> None:
        self._slow = slow
        self._run = run
        self.timeout_s = timeout_s
        self._queue: deque[tuple[str, str]] = deque()
        self._task: asyncio.Task[None] | None = None
        #: plans fetched, and attempts that failed (for tests and debugging)
        self.fetched = 0
        self.failed = 0

    def request(self, fp: str, sql: str) -> None:
        """A new fingerprint (called by the log, on the event loop's thread)."""
        if len(self._queue) >= _QUEUE_MAX:
            return
        if not normalize_sql(sql).startswith(_EXPLAINABLE):
            return  # BEGIN, COMMIT, SET, …: no plan
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # pragma: no cover - PostgreSQL statements run on the loop
            return
        self._queue.append((fp, sql))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._drain(), name="gochat-pg-plan-sampler")

    async def _drain(self) -> None:
        while self._queue:
            fp, sql = self._queue.popleft()
            try:
                plan = await self._run(_explainer(sql), self.timeout_s)
                shape = plan_shape(plan)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.failed += 1
                reason = getattr(exc, "message", None) or str(exc) or type(exc).__name__
                self._slow.set_plan(fp, f"unavailable: {reason}"[:300], None)
                log.debug("no plan for slow statement %s: %r", fp, exc)
                continue
            self.fetched += 1
            self._slow.set_plan(fp, shape, plan_fingerprint(shape))

    async def close(self) -> None:
        """Stop fetching (the store is closing; a later slow statement starts again)."""
        self._queue.clear()
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def wait_idle(self, timeout: float = 10.0) -> None:
        """Until no plan is being fetched (tests)."""
        async with asyncio.timeout(timeout):
            while self._task is not None and not self._task.done():
                await asyncio.sleep(0.01)
