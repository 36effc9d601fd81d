"""The SQLite writer's group commit: from queued writes to one transaction.

:class:`GroupCommit` is the writer thread's half of :class:`~gochat.store.sqlite.engine.SQLiteEngine`
(which owns the connections, the queue and the thread). ``_writer_loop`` takes everything queued
(up to ``max_batch`` entries) and applies it in **one** ``BEGIN IMMEDIATE … COMMIT``:

* a run of consecutive appends goes in with multi-row ``INSERT OR IGNORE`` statements (≤ 1,024
  rows each) and one ``UPDATE conversations … FROM (VALUES …)``; a run that meets a duplicate
  or an invalid request is rolled back to its savepoint and redone row by row (dedup lookup,
  ``INSERT``, ``UPDATE``);
* every other write is a job, ``fn(conn)`` inside its own ``SAVEPOINT``, so a business error
  rolls back only that job;
* an unexpected failure of one request re-runs the batch with every request isolated.

Outcomes go back to each caller's event loop with one ``call_soon_threadsafe`` per loop per
batch. This module also holds the queue entries and the mapping of SQLite errors.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Final, cast

from gochat.clock import now_ms
from gochat.errors import ErrorCode, GochatError, RequestError
from gochat.ids import IdGenerator
from gochat.store.base import AppendCallback, AppendRequest, AppendResult, StoredMessage
from gochat.store.common import (
    MSG_COLUMNS,
    StoreCounters,
    conflict_error,
    invalid_value_error,
    message_from_row,
    new_message,
    run_callback,
    unavailable,
)
from gochat.store.sqlite.timing import finish, start

__all__ = ["STOP", "AppendEntry", "Entry", "GroupCommit", "JobEntry", "map_exception"]

log = logging.getLogger("gochat.store.sqlite")

# ---- queue entries ------------------------------------------------------------------------------


class Entry:
    """One queued write. Its outcome goes to ``future`` or, when that is None, to ``done``."""

    __slots__ = ("done", "future", "loop")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[Any] | None,
        done: AppendCallback | None = None,
    ) -> None:
        self.loop = loop
        self.future = future
        self.done = done


class AppendEntry(Entry):
    __slots__ = ("request",)

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[Any] | None,
        request: AppendRequest,
        done: AppendCallback | None = None,
    ) -> None:
        # No super().__init__ call: one of these is made per message on the event loop.
        self.loop = loop
        self.future = future
        self.done = done
        self.request = request


class JobEntry(Entry):
    __slots__ = ("fn",)

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[Any],
        fn: Callable[[sqlite3.Connection], Any],
    ) -> None:
        super().__init__(loop, future)
        self.fn = fn


STOP: Final = object()


_CONV_CACHE_MAX: Final = 1 << 16
#: a batch at least this large means the store is busy: the writer pauses before the next one
_BUSY_BATCH: Final = 16
#: how often that pause checks whether a full batch is already waiting
_GATHER_STEP_S: Final = 0.001
#: Rows per multi-row statement, 8 parameters a row: within SQLITE_MAX_VARIABLE_NUMBER (32,766
#: since SQLite 3.32; 999 before).
_ROWS_PER_STATEMENT: Final = 1024 if sqlite3.sqlite_version_info >= (3, 32, 0) else 64


@functools.lru_cache(maxsize=32)
def _insert_sql(rows: int) -> str:
    values = ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?)"] * rows)
    return (
        "INSERT OR IGNORE INTO messages"
        f" (conv, seq, msg_id, sender_id, ts_ms, client_msg_id, content_type, body) VALUES {values}"
    )


@functools.lru_cache(maxsize=32)
def _bump_sql(rows: int) -> str:
    values = ", ".join(["(?, ?)"] * rows)
    return (
        f"UPDATE conversations SET last_seq = v.column2 FROM (VALUES {values}) AS v"
        " WHERE conversations.conv = v.column1"
    )


def _execute_rows(conn: sqlite3.Connection, sql: Callable[[int], str], values: list[Any], width: int) -> None:
    """Run ``sql(k)`` over the rows in ``values`` (flat, ``width`` parameters a row) in chunks of
    power-of-two sizes (few distinct statements, all kept in the connection's statement cache)."""
    rows = len(values) // width
    i = 0
    while i < rows:
        k = min(_ROWS_PER_STATEMENT, 1 << ((rows - i).bit_length() - 1))
        conn.execute(sql(k), values[i * width : (i + k) * width])
        i += k


class _Fallback(Exception):
    """A batched run of appends must be applied row by row instead."""


class _Rerun(Exception):
    """An unexpected per-request failure inside an un-isolated batch: redo it isolated."""


def map_exception(exc: BaseException) -> BaseException:
    """Map a failure of one request to what its caller sees."""
    if isinstance(exc, GochatError):
        return exc
    if isinstance(exc, sqlite3.IntegrityError):
        return conflict_error(exc)
    if isinstance(exc, sqlite3.ProgrammingError | sqlite3.InterfaceError | OverflowError):
        # e.g. an integer outside the signed 64-bit range, a value of an unsupported type
        return invalid_value_error(exc)
    if isinstance(exc, sqlite3.Error):
        return unavailable(exc)
    return exc


def _is_io_error(exc: BaseException) -> bool:
    """Errors that doom the whole transaction (as opposed to one request's business error)."""
    return isinstance(exc, sqlite3.Error) and not isinstance(
        exc, sqlite3.IntegrityError | sqlite3.ProgrammingError | sqlite3.InterfaceError
    )


def _resolve(items: list[tuple[Entry, bool, Any]]) -> None:
    """Runs on the caller's event loop: one call per loop per batch, in queue order."""
    for entry, ok, value in items:
        fut = entry.future
        if fut is None:
            assert entry.done is not None
            run_callback(entry.done, value if ok else None, None if ok else value)
        elif fut.done():  # the caller was cancelled; the write is committed anyway
            continue
        elif ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)


class GroupCommit:
    """The writer thread's loop and transactions. Only the writer thread runs these methods.

    The attributes below are set by :class:`~gochat.store.sqlite.engine.SQLiteEngine`."""

    _queue: queue.SimpleQueue[object]
    _lock: threading.Lock  # guards _pending (and, in the engine, admission)
    _pending: int
    max_batch: int
    commit_delay_s: float
    _ids: IdGenerator
    _counters: StoreCounters  # written by the writer thread only
    _convs: dict[int, list[int]]  # writer thread only; see _transaction
    _last_ts: int

    def _writer_loop(self, conn: sqlite3.Connection) -> None:
        get = self._queue.get
        get_nowait = self._queue.get_nowait
        limit = self.max_batch
        # Entries taken from the queue but not run yet: a loop tick's list can be far larger
        # than max_batch when the loop falls behind, and one transaction of 40,000 appends
        # (seen under overload) delays every answer in it by the whole transaction.
        carry: list[Entry] = []
        stop = False
        while True:
            batch = carry[:limit]
            del carry[:limit]
            while not stop and len(batch) < limit:
                try:
                    item = get_nowait() if batch else get()
                except queue.Empty:
                    break
                if item is STOP:
                    stop = True  # STOP is always the last entry ever queued
                elif type(item) is list:
                    room = limit - len(batch)
                    batch.extend(item[:room])
                    carry.extend(item[room:])
                else:
                    assert isinstance(item, Entry)
                    batch.append(item)
            if not batch:
                if stop:
                    break
                continue
            started = time.monotonic()
            start(conn)
            try:
                self._run_batch(conn, batch)
            except BaseException as exc:  # pragma: no cover - a bug; never leave waiters hanging
                log.exception("sqlite writer failed")
                self._deliver([(e, False, map_exception(exc)) for e in batch])
            finish(conn)
            with self._lock:
                self._pending -= len(batch)
            if len(batch) >= _BUSY_BATCH and not stop:
                # Under load, let the next batch gather: each commit costs an fdatasync and
                # rewrites every page it touched, so fewer, larger commits cost far less CPU per
                # message (and this thread shares a core with the event loop). The wait is at
                # most as long as this transaction took (so the writer commits at least half
                # the time and a moderate load keeps a short latency) and at most
                # commit_delay_ms; a full batch ends it early.
                now = time.monotonic()
                deadline = now + min(self.commit_delay_s, now - started)
                while self._pending < limit and time.monotonic() < deadline:
                    time.sleep(_GATHER_STEP_S)

    def _run_batch(self, conn: sqlite3.Connection, batch: list[Entry]) -> None:
        self._counters.batch(len(batch))
        outcomes: list[tuple[Entry, bool, Any]]
        try:
            try:
                outcomes = self._transaction(conn, batch, isolate=False)
            except _Rerun:
                outcomes = self._transaction(conn, batch, isolate=True)
        except BaseException as exc:
            self._counters.failed_transactions += 1
            if _is_io_error(exc):
                log.warning(
                    "sqlite write transaction failed (%d requests not acknowledged): %s", len(batch), exc
                )
            else:
                log.exception("sqlite write transaction failed")
            err = map_exception(exc)
            outcomes = [(e, False, err) for e in batch]
        self._deliver(outcomes)

    def _transaction(
        self, conn: sqlite3.Connection, batch: list[Entry], *, isolate: bool
    ) -> list[tuple[Entry, bool, Any]]:
        outcomes: list[tuple[Entry, bool, Any]] = []
        # conv -> [kind, last_seq]. The writer thread is the only writer, so this cache stays
        # true across transactions; it is dropped when a job runs or a transaction fails.
        convs = self._convs
        if len(convs) > _CONV_CACHE_MAX:
            convs.clear()
        appended = duplicates = jobs = 0
        now = max(now_ms(), self._last_ts)
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Fast path: a run of consecutive appends goes in with one executemany. A run that
            # meets a duplicate or an invalid request is undone and redone one by one below.
            fast: dict[int, AppendResult] = {}
            if not isolate:
                start = 0
                while start < len(batch):
                    end = start
                    while end < len(batch) and isinstance(batch[end], AppendEntry):
                        end += 1
                    if end > start and self._append_run(conn, batch, start, end, convs, now, fast):
                        appended += end - start
                    start = end + 1
            for n, entry in enumerate(batch):
                if n in fast:
                    outcomes.append((entry, True, fast[n]))
                    continue
                if isinstance(entry, AppendEntry):
                    if isolate:
                        conn.execute("SAVEPOINT item")
                    try:
                        result = self._apply_append(conn, entry.request, convs, now)
                    except Exception as exc:
                        if _is_io_error(exc):
                            raise
                        if not isolate:
                            # Unexpected failure of one request: redo the batch with every
                            # request in its own savepoint so the others still commit.
                            raise _Rerun from exc
                        conn.execute("ROLLBACK TO item")
                        conn.execute("RELEASE item")
                        convs.clear()  # the cache may describe rolled-back state
                        outcomes.append((entry, False, map_exception(exc)))
                        continue
                    if isolate:
                        conn.execute("RELEASE item")
                    if isinstance(result, GochatError):
                        outcomes.append((entry, False, result))
                    else:
                        if result.duplicate:
                            duplicates += 1
                        else:
                            appended += 1
                        outcomes.append((entry, True, result))
                else:
                    assert isinstance(entry, JobEntry)
                    jobs += 1
                    conn.execute(f"SAVEPOINT job{n}")
                    try:
                        value = entry.fn(conn)
                    except Exception as exc:
                        if _is_io_error(exc):
                            raise
                        conn.execute(f"ROLLBACK TO job{n}")
                        conn.execute(f"RELEASE job{n}")
                        convs.clear()
                        outcomes.append((entry, False, map_exception(exc)))
                        continue
                    conn.execute(f"RELEASE job{n}")
                    convs.clear()  # a job may have changed conversations
                    outcomes.append((entry, True, value))
            conn.execute("COMMIT")
        except BaseException:
            convs.clear()
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:  # pragma: no cover
                    log.exception("ROLLBACK failed")
            raise
        self._last_ts = now
        counters = self._counters
        counters.transactions += 1
        counters.appended += appended
        counters.duplicates += duplicates
        counters.jobs += jobs
        return outcomes

    def _append_run(
        self,
        conn: sqlite3.Connection,
        batch: list[Entry],
        start: int,
        end: int,
        convs: dict[int, list[int]],
        now: int,
        results: dict[int, AppendResult],
    ) -> bool:
        """Insert ``batch[start:end]`` (all appends) with one ``INSERT OR IGNORE`` executemany.

        True when every row went in: their results are put in ``results`` by batch index.
        False when one was ignored (a duplicate, or a constraint the per-row path reports) or
        names a missing conversation or the wrong kind: then nothing of the run stays and the
        caller applies it row by row, which finds and reports exactly those cases.
        """
        values: list[Any] = []  # the rows' parameters, flat
        made: list[tuple[int, StoredMessage]] = []
        touched: dict[int, int] = {}  # conv -> its last seq after this run
        loaded: dict[int, list[int]] = {}  # conv -> [kind, last_seq] read by this run
        ids = self._ids.next_ids(end - start)  # a run that falls back leaves a gap: harmless
        conn.execute("SAVEPOINT run")
        try:
            for n, msg_id in zip(range(start, end), ids, strict=True):
                req = cast(AppendEntry, batch[n]).request
                state = convs.get(req.conv) or loaded.get(req.conv)
                if state is None:
                    crow = conn.execute(
                        "SELECT kind, last_seq FROM conversations WHERE conv = ?", (req.conv,)
                    ).fetchone()
                    if crow is None:
                        raise _Fallback
                    state = loaded[req.conv] = [crow[0], crow[1]]
                if state[0] != req.kind:
                    raise _Fallback
                seq = touched.get(req.conv, state[1]) + 1
                touched[req.conv] = seq
                message = new_message(req, seq, msg_id, now)
                made.append((n, message))
                values += (req.conv, seq, msg_id, req.sender_id, now, message.client_msg_id,
                           req.content_type, message.body)
            before = conn.total_changes
            # Multi-row statements: each sqlite3_step releases and re-takes the GIL, which the
            # event-loop thread holds most of the time, so statements, not rows, are counted.
            _execute_rows(conn, _insert_sql, values, 8)
            if conn.total_changes - before != len(made):
                raise _Fallback
            _execute_rows(conn, _bump_sql, [v for item in touched.items() for v in item], 2)
        except Exception as exc:
            if _is_io_error(exc):
                raise
            conn.execute("ROLLBACK TO run")
            conn.execute("RELEASE run")
            return False
        conn.execute("RELEASE run")
        convs.update(loaded)
        for conv, seq in touched.items():
            convs[conv][1] = seq
        for n, message in made:
            results[n] = AppendResult(message, False)
        return True

    def _apply_append(
        self, conn: sqlite3.Connection, req: AppendRequest, convs: dict[int, list[int]], now: int
    ) -> AppendResult | GochatError:
        # Dedup: the UNIQUE (client_msg_id, sender_id) index also sees rows inserted earlier in
        # this same transaction, so a duplicate inside one batch is found here too.
        row = conn.execute(
            f"SELECT {MSG_COLUMNS} FROM messages m JOIN conversations c ON c.conv = m.conv"
            " WHERE m.sender_id = ? AND m.client_msg_id = ?",
            (req.sender_id, req.client_msg_id),
        ).fetchone()
        if row is not None:
            return AppendResult(message_from_row(row), duplicate=True)
        state = convs.get(req.conv)
        if state is None:
            crow = conn.execute(
                "SELECT kind, last_seq FROM conversations WHERE conv = ?", (req.conv,)
            ).fetchone()
            if crow is None:
                return RequestError("no such conversation", code=ErrorCode.NOT_FOUND)
            state = convs[req.conv] = [crow[0], crow[1]]
        kind, last_seq = state
        if kind != req.kind:
            return RequestError("conversation kind mismatch", code=ErrorCode.BAD_REQUEST)
        seq = last_seq + 1
        msg_id = self._ids.next_id()
        message = new_message(req, seq, msg_id, now)
        conn.execute(
            "INSERT INTO messages (conv, seq, msg_id, sender_id, ts_ms, client_msg_id, content_type, body)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (req.conv, seq, msg_id, req.sender_id, now, req.client_msg_id, req.content_type, message.body),
        )
        conn.execute("UPDATE conversations SET last_seq = ? WHERE conv = ?", (seq, req.conv))
        state[1] = seq
        return AppendResult(message, duplicate=False)

    def _deliver(self, outcomes: Iterable[tuple[Entry, bool, Any]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Entry, bool, Any]]] = {}
        for outcome in outcomes:
            by_loop.setdefault(outcome[0].loop, []).append(outcome)
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, items)
            except RuntimeError:  # the caller's loop is closed; nobody is waiting
                pass
