"""PostgreSQL group commit: the in-process append queue and its committer task.

``append()`` puts its request on the queue (synchronously, so call order is queue order) and
waits on a future. One **committer task** takes everything queued (up to ``max_batch``) and
writes it with **one statement**, which PostgreSQL runs as one transaction (see
``_build_append_sql``): the arrays of the batch are ``unnest()``-ed, the dedup keys go into
``message_keys`` with ``ON CONFLICT DO NOTHING``, the new messages of each conversation are
numbered in call order, each conversation's ``last_seq`` is advanced once (``UPDATE …
RETURNING``, a row lock against other nodes) and the messages are inserted. Requests the
statement did not store are explained by one follow-up read. Futures resolve in call order only
after the statement returned, i.e. after COMMIT.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, Final

from gochat.clock import now_ms
from gochat.errors import ErrorCode, GochatError, RequestError, UnavailableError
from gochat.ids import IdGenerator
from gochat.resilience import RetryPolicy
from gochat.store.base import AppendCallback, AppendRequest, AppendResult
from gochat.store.common import (
    MSG_COLUMNS,
    message_from_row,
    new_message,
    run_callback,
    validate_append,
)
from gochat.store.postgres.pool import PostgresPool, check_int64, map_exception

__all__ = ["AppendEntry", "GroupCommit", "check_append"]

log = logging.getLogger("gochat.store.postgres")

_MAX_ROUNDS: Final = 8


def check_append(request: AppendRequest) -> None:
    validate_append(request)
    # Values PostgreSQL cannot store fail here, alone, instead of breaking a batch.
    check_int64(request.conv, request.sender_id, request.content_type)
    if not isinstance(request.body, bytes | bytearray | memoryview):
        raise RequestError("body must be bytes", code=ErrorCode.BAD_REQUEST)


class AppendEntry:
    """One queued append. Its outcome goes to ``future`` or, when that is None, to ``done``."""

    __slots__ = ("done", "error", "future", "request", "result", "retry")

    def __init__(
        self,
        future: asyncio.Future[AppendResult] | None,
        request: AppendRequest,
        done: AppendCallback | None = None,
    ) -> None:
        self.future = future
        self.done = done
        self.request = request
        self.result: AppendResult | None = None
        self.error: BaseException | None = None
        self.retry = False  # outcome unexplained: run it again in the next round


class GroupCommit(PostgresPool):
    """The append queue and the committer task of
    :class:`~gochat.store.postgres.engine.PostgresEngine` (which sets the attributes below,
    builds ``_sql_append`` and starts ``_commit_loop`` at open)."""

    _s: str  # the quoted schema
    _loop: asyncio.AbstractEventLoop | None
    _queue: deque[AppendEntry]
    _pending: int
    _wakeup: asyncio.Event | None
    max_batch: int
    max_pending: int
    _ids: IdGenerator
    _last_ts: int
    _sql_append: str
    _retried: int
    #: the node's retry policy, retrying only a batch rolled back by a deadlock or a
    #: serialization failure between nodes (the engine builds it)
    _tx_retry: RetryPolicy

    def _build_append_sql(self) -> str:
        s = self._s
        return f"""
WITH input AS (
    SELECT * FROM unnest($1::bigint[], $2::smallint[], $3::bigint[], $4::bytea[], $5::bigint[],
                         $6::bigint[], $7::bytea[], $8::integer[])
        AS t(conv, kind, sender_id, client_msg_id, msg_id, content_type, body, ord)
),
valid AS (
    SELECT i.* FROM input i JOIN {s}.conversations c ON c.conv = i.conv AND c.kind = i.kind
),
fresh AS (
    INSERT INTO {s}.message_keys (sender_id, client_msg_id, conv, msg_id)
    SELECT sender_id, client_msg_id, conv, msg_id FROM valid ORDER BY sender_id, client_msg_id
    ON CONFLICT DO NOTHING
    RETURNING msg_id
),
numbered AS (
    SELECT v.*, row_number() OVER (PARTITION BY v.conv ORDER BY v.ord) AS rn,
           count(*) OVER (PARTITION BY v.conv) AS n
    FROM valid v JOIN fresh f ON f.msg_id = v.msg_id
),
bumped AS (
    UPDATE {s}.conversations c SET last_seq = c.last_seq + b.n
    FROM (SELECT conv, max(n) AS n FROM numbered GROUP BY conv ORDER BY conv) b
    WHERE c.conv = b.conv
    RETURNING c.conv, c.last_seq - b.n AS base
),
stored AS (
    INSERT INTO {s}.messages (conv, seq, msg_id, sender_id, ts_ms, client_msg_id, content_type, body)
    SELECT nb.conv, bp.base + nb.rn, nb.msg_id, nb.sender_id, $9, nb.client_msg_id, nb.content_type, nb.body
    FROM numbered nb JOIN bumped bp ON bp.conv = nb.conv
    RETURNING msg_id, seq
)
SELECT msg_id, seq FROM stored
"""

    def _submit(
        self, request: AppendRequest, done: AppendCallback | None = None
    ) -> asyncio.Future[AppendResult] | None:
        if not self._accepting or self._wakeup is None or self._loop is None:
            raise UnavailableError("store is closed")
        if self._pending >= self.max_pending:
            raise UnavailableError("store write queue is full", code=ErrorCode.OVERLOADED)
        fut: asyncio.Future[AppendResult] | None = None if done is not None else self._loop.create_future()
        self._queue.append(AppendEntry(fut, request, done))
        self._pending += 1
        self._wakeup.set()
        return fut

    async def _commit_loop(self) -> None:
        assert self._wakeup is not None
        queue = self._queue
        batch: list[AppendEntry] = []
        try:
            while True:
                if not queue:
                    if not self._accepting:
                        return
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                batch = [queue.popleft() for _ in range(min(len(queue), self.max_batch))]
                try:
                    await self._commit_batch(batch)
                except asyncio.CancelledError:
                    raise
                except BaseException as exc:  # pragma: no cover - a bug; never leave waiters hanging
                    log.exception("PostgreSQL committer failed")
                    self._fail(batch, map_exception(exc))
                self._pending -= len(batch)
                self._deliver(batch)
                batch = []
        finally:
            # Cancelled (event loop shutting down without close()): nobody waits forever.
            left = batch + list(queue)
            queue.clear()
            if left:
                self._accepting = False
                self._pending = 0
                self._fail(left, UnavailableError("store is closing"))
                self._deliver(left)

    @staticmethod
    def _fail(batch: list[AppendEntry], err: BaseException) -> None:
        for e in batch:
            if e.result is None and e.error is None:
                e.error = err

    @staticmethod
    def _deliver(batch: list[AppendEntry]) -> None:
        """Resolve futures and run callbacks in call order (after commit)."""
        for e in batch:
            fut = e.future
            if fut is None:
                assert e.done is not None
                if e.result is not None:
                    run_callback(e.done, e.result, None)
                else:
                    run_callback(e.done, None, e.error if e.error is not None else UnavailableError("not stored"))
                continue
            if fut.done():  # the caller was cancelled; the write is committed anyway
                continue
            if e.result is not None:
                fut.set_result(e.result)
            else:
                fut.set_exception(e.error if e.error is not None else UnavailableError("not stored"))

    async def _commit_batch(self, batch: list[AppendEntry]) -> None:
        self._counters.batch(len(batch))
        pending = batch
        for _round in range(_MAX_ROUNDS):
            # One occurrence of each dedup key per round; repeats get the first one's message.
            firsts: list[AppendEntry] = []
            repeats: list[tuple[AppendEntry, AppendEntry]] = []
            seen: dict[tuple[int, bytes], AppendEntry] = {}
            for e in pending:
                key = (e.request.sender_id, bytes(e.request.client_msg_id))
                first = seen.get(key)
                if first is None:
                    seen[key] = e
                    firsts.append(e)
                else:
                    repeats.append((e, first))
            await self._apply(firsts)
            nxt: list[AppendEntry] = []
            for e in firsts:
                if e.retry:
                    e.retry = False
                    nxt.append(e)
            for e, first in repeats:
                if first.result is not None:
                    e.result = AppendResult(first.result.message, duplicate=True)
                    self._counters.duplicates += 1
                elif isinstance(first.error, RequestError) or first.retry or first in nxt:
                    nxt.append(e)  # the first failed on its own merits: this one gets its turn
                else:
                    e.error = first.error
            if not nxt:
                return
            pending = sorted(nxt, key=batch.index) if len(nxt) > 1 else nxt
        self._fail(pending, UnavailableError("append could not be resolved"))

    async def _apply(self, entries: list[AppendEntry]) -> None:
        """Store ``entries`` (distinct dedup keys) with one statement; set result/error/retry."""
        if not entries:
            return
        reqs = [e.request for e in entries]
        msg_ids = [self._ids.next_id() for _ in reqs]
        now = max(now_ms(), self._last_ts)
        args = (
            [r.conv for r in reqs],
            [r.kind for r in reqs],
            [r.sender_id for r in reqs],
            [bytes(r.client_msg_id) for r in reqs],
            msg_ids,
            [r.content_type for r in reqs],
            [bytes(r.body) for r in reqs],
            list(range(len(reqs))),
            now,
        )
        sql = self._sql_append
        def rolled_back(_attempt: int, exc: BaseException, _wait: float) -> None:
            self._retried += 1
            log.info("append batch rolled back (%s); retrying", exc.__cause__)

        try:
            rows: list[Any] = await self._tx_retry.run(
                lambda: self._with_conn(lambda conn: conn.fetch(sql, *args)), what="append batch", on_retry=rolled_back
            )
        except RequestError as exc:
            if len(entries) > 1:
                # One request's values broke the statement: store each on its own.
                log.warning(
                    "append batch failed (%s); retrying its %d requests one by one", exc.__cause__, len(entries)
                )
                await self._apply_isolated(entries)
                return
            self._counters.failed_transactions += 1
            entries[0].error = exc
            return
        except UnavailableError as exc:
            self._counters.failed_transactions += 1
            log.warning("append batch failed, %d requests not acknowledged: %r", len(entries), exc.__cause__)
            for e in entries:
                e.error = exc
            return
        self._counters.transactions += 1
        self._last_ts = now
        stored = {int(r[0]): int(r[1]) for r in rows}
        missing: list[int] = []
        for i, (e, req) in enumerate(zip(entries, reqs, strict=True)):
            seq = stored.get(msg_ids[i])
            if seq is None:
                missing.append(i)
                continue
            e.result = AppendResult(new_message(req, seq, msg_ids[i], now), duplicate=False)
        self._counters.appended += len(entries) - len(missing)
        if missing:
            await self._explain([entries[i] for i in missing])

    async def _apply_isolated(self, entries: list[AppendEntry]) -> None:
        for n, e in enumerate(entries):
            await self._apply([e])
            if isinstance(e.error, UnavailableError):
                for rest in entries[n + 1 :]:
                    rest.error = e.error
                return

    async def _explain(self, entries: list[AppendEntry]) -> None:
        """Requests the append statement did not store: duplicates (committed before, by any
        node) get the original; the others get NOT_FOUND / BAD_REQUEST."""
        s = self._s
        reqs = [e.request for e in entries]
        sql = f"""
SELECT r.ord, c2.kind AS req_kind, {MSG_COLUMNS}
FROM unnest($1::bigint[], $2::bytea[], $3::bigint[], $4::integer[]) AS r(sender_id, client_msg_id, conv, ord)
LEFT JOIN {s}.message_keys k ON k.sender_id = r.sender_id AND k.client_msg_id = r.client_msg_id
LEFT JOIN {s}.messages m ON m.conv = k.conv AND m.msg_id = k.msg_id
LEFT JOIN {s}.conversations c ON c.conv = m.conv
LEFT JOIN {s}.conversations c2 ON c2.conv = r.conv
"""
        try:
            rows = await self._read(
                lambda conn: conn.fetch(
                    sql,
                    [r.sender_id for r in reqs],
                    [bytes(r.client_msg_id) for r in reqs],
                    [r.conv for r in reqs],
                    list(range(len(reqs))),
                )
            )
        except GochatError as exc:
            for e in entries:
                e.error = exc
            return
        for row in rows:
            e = entries[row[0]]
            if row["seq"] is not None:
                e.result = AppendResult(message_from_row(row, 2), duplicate=True)
                self._counters.duplicates += 1
            elif row["req_kind"] is None:
                e.error = RequestError("no such conversation", code=ErrorCode.NOT_FOUND)
            elif row["req_kind"] != e.request.kind:
                e.error = RequestError("conversation kind mismatch", code=ErrorCode.BAD_REQUEST)
            else:
                e.retry = True  # e.g. its dedup key was being deleted: run it again
