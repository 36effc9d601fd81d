"""Embedded :class:`~gochat.store.base.Store` on SQLite (WAL, one writer thread, group commit).

Threads and connections
-----------------------
* One **writer thread** owns the only writing connection. Every write (appends, users, tokens,
  groups, read positions) is a queue entry; the thread takes everything queued (up to
  ``max_batch`` entries) and applies it in **one** ``BEGIN IMMEDIATE … COMMIT`` transaction,
  then resolves the waiting asyncio futures with one ``loop.call_soon_threadsafe`` per event
  loop per batch. Under load, hundreds of appends share one fsync.
* Reads run on a small pool of reader threads, each with its own connection (WAL lets readers
  run concurrently with the writer and see only committed data). Multi-statement reads use one
  read transaction, so they see one snapshot.

Durability: ``journal_mode=WAL`` with ``synchronous=FULL``: the WAL is fsynced at every commit,
so a message whose future resolved survives ``kill -9`` and power loss. Nothing resolves before
the commit returns.

Failure mapping: ``sqlite3.OperationalError`` / ``DatabaseError`` (disk full, I/O error, locked
past ``busy_timeout_ms``, corrupt file) → :class:`~gochat.errors.UnavailableError` for every
request of the failed transaction (nothing was committed, nothing is acknowledged). Business
errors (unknown user → ``NOT_FOUND``, name taken → ``CONFLICT``, ...) fail only their own
request: generic write jobs run inside a ``SAVEPOINT``; appends are validated before they write.
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
from concurrent.futures import Future as ConcurrentFuture
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar, cast

from gochat.errors import ErrorCode, GochatError, RequestError, UnavailableError
from gochat.ids import IdGenerator
from gochat.store.base import (
    AppendCallback,
    AppendRequest,
    AppendResult,
    ConversationState,
    GroupInfo,
    RefreshStatus,
    StoredMessage,
    UserRecord,
)
from gochat.store.common import (
    MAX_SEQ,
    MSG_COLUMNS,
    DirectConversationCache,
    StoreCounters,
    StoreStats,
    conflict_error,
    direct_peer,
    history_page,
    invalid_value_error,
    message_from_row,
    new_message,
    now_ms,
    resolve_ids,
    run_callback,
    unavailable,
    validate_append,
    validate_history,
)

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "SQLiteStore", "SQLiteStoreStats"]

log = logging.getLogger("gochat.store.sqlite")

T = TypeVar("T")

#: Versioned migrations. Entry ``i`` migrates the schema from version ``i`` to ``i + 1``; it runs
#: in one transaction together with the ``schema_version`` row that records it. Append new
#: entries, never edit shipped ones.
MIGRATIONS: Final[tuple[str, ...]] = (
    # ---- version 1 ------------------------------------------------------------------------
    """
    CREATE TABLE users (
        user_id       INTEGER PRIMARY KEY AUTOINCREMENT,
        username      TEXT    NOT NULL COLLATE NOCASE UNIQUE,
        password_hash TEXT    NOT NULL,
        created_ms    INTEGER NOT NULL
    );

    CREATE TABLE refresh_tokens (
        jti        TEXT    PRIMARY KEY,
        family     TEXT    NOT NULL,
        user_id    INTEGER NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
        expires_ms INTEGER NOT NULL,
        spent      INTEGER NOT NULL DEFAULT 0,
        revoked    INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX refresh_tokens_family ON refresh_tokens(family);
    CREATE INDEX refresh_tokens_user ON refresh_tokens(user_id);
    CREATE INDEX refresh_tokens_expires ON refresh_tokens(expires_ms);

    CREATE TABLE revoked_jtis (
        jti        TEXT    PRIMARY KEY,
        expires_ms INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX revoked_jtis_expires ON revoked_jtis(expires_ms);

    CREATE TABLE conversations (
        conv       INTEGER PRIMARY KEY AUTOINCREMENT,
        kind       INTEGER NOT NULL CHECK (kind IN (1, 2)),
        name       TEXT    NOT NULL DEFAULT '',
        owner_id   INTEGER NOT NULL DEFAULT 0,
        created_ms INTEGER NOT NULL,
        last_seq   INTEGER NOT NULL DEFAULT 0,
        user_lo    INTEGER,
        user_hi    INTEGER,
        UNIQUE (user_lo, user_hi)
    );

    CREATE TABLE members (
        conv      INTEGER NOT NULL REFERENCES conversations(conv) ON DELETE CASCADE,
        user_id   INTEGER NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
        joined_ms INTEGER NOT NULL,
        read_seq  INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (conv, user_id)
    ) WITHOUT ROWID;
    CREATE INDEX members_user ON members(user_id, conv);

    CREATE TABLE messages (
        conv          INTEGER NOT NULL REFERENCES conversations(conv) ON DELETE CASCADE,
        seq           INTEGER NOT NULL,
        msg_id        INTEGER NOT NULL,
        sender_id     INTEGER NOT NULL,
        ts_ms         INTEGER NOT NULL,
        client_msg_id BLOB    NOT NULL,
        content_type  INTEGER NOT NULL,
        body          BLOB    NOT NULL,
        PRIMARY KEY (conv, seq),
        UNIQUE (sender_id, client_msg_id)
    );
    CREATE UNIQUE INDEX messages_msg_id ON messages(msg_id);
    """,
    # ---- version 2 ------------------------------------------------------------------------
    # Pages a commit rewrites, not rows, are what a durable append costs (every dirty page is
    # written to the WAL whole, then again at checkpoint). Version 1 kept each row in rowid
    # order with three indexes, two of them with one insertion point per conversation or per
    # sender, so a commit of N appends dirtied about 2*min(N, active conversations) random
    # pages. Version 2 keys rows by msg_id (which grows, so rows append), drops the separate
    # msg_id index, and orders the dedup index by client_msg_id first: the SDK's UUIDv7 ids
    # grow with time, so that index appends too. Only the (conv, seq) index still has one
    # insertion point per active conversation. Half the bytes per append at the same batch
    # size (docs/storage-and-auth.md).
    """
    CREATE TABLE messages_v2 (
        msg_id        INTEGER PRIMARY KEY,
        conv          INTEGER NOT NULL REFERENCES conversations(conv) ON DELETE CASCADE,
        seq           INTEGER NOT NULL,
        sender_id     INTEGER NOT NULL,
        ts_ms         INTEGER NOT NULL,
        client_msg_id BLOB    NOT NULL,
        content_type  INTEGER NOT NULL,
        body          BLOB    NOT NULL,
        UNIQUE (conv, seq),
        UNIQUE (client_msg_id, sender_id)
    );
    INSERT INTO messages_v2 (msg_id, conv, seq, sender_id, ts_ms, client_msg_id, content_type, body)
        SELECT msg_id, conv, seq, sender_id, ts_ms, client_msg_id, content_type, body
        FROM messages ORDER BY msg_id;
    DROP TABLE messages;
    ALTER TABLE messages_v2 RENAME TO messages;
    """,
)
SCHEMA_VERSION: Final = len(MIGRATIONS)


@dataclass(frozen=True, slots=True)
class SQLiteStoreStats(StoreStats):
    """Writer counters (a snapshot). ``transactions`` counts committed write transactions;
    under concurrency it is far below ``appended`` (group commit)."""


# ---- queue entries ------------------------------------------------------------------------------


class _Entry:
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


class _Append(_Entry):
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


class _Job(_Entry):
    __slots__ = ("fn",)

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[Any],
        fn: Callable[[sqlite3.Connection], Any],
    ) -> None:
        super().__init__(loop, future)
        self.fn = fn


_STOP: Final = object()


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


def _map_exception(exc: BaseException) -> BaseException:
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


def _split_sql(script: str) -> list[str]:
    """Split a migration script into complete statements (triggers included)."""
    statements: list[str] = []
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                statements.append(buf.strip())
            buf = ""
    if buf.strip():
        raise ValueError(f"incomplete SQL statement in migration: {buf.strip()[:80]!r}")
    return statements


def _resolve(items: list[tuple[_Entry, bool, Any]]) -> None:
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


class SQLiteStore:
    """SQLite implementation of :class:`gochat.store.base.Store`.

    ``path`` is the database file (its directory must exist). ``node_id`` feeds the ``msg_id``
    generator. ``max_batch`` caps the entries applied in one transaction; ``max_pending``
    caps queued writes (beyond it writes fail fast with ``OVERLOADED`` instead of growing memory
    without bound). ``readers`` is the number of reader threads/connections. ``ids`` is the
    process's msg_id generator (shared with the messaging core, which numbers room messages);
    without it the store makes its own. ``commit_delay_ms``: after a busy commit (at least 16
    writes) the writer waits, at most this long and at most as long as that commit took, or
    until ``max_batch`` writes are queued, before the next one, so that batches grow under
    load; a lone write at low load is never delayed.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        node_id: int = 0,
        busy_timeout_ms: int = 5000,
        max_batch: int = 512,
        max_pending: int = 65536,
        readers: int = 4,
        ids: IdGenerator | None = None,
        commit_delay_ms: float = 8.0,
    ) -> None:
        if max_batch < 1 or max_pending < 1 or readers < 1 or busy_timeout_ms < 0:
            raise ValueError("max_batch, max_pending and readers must be >= 1, busy_timeout_ms >= 0")
        self.path = Path(path)
        self.node_id = node_id
        self.busy_timeout_ms = busy_timeout_ms
        self.max_batch = max_batch
        self.max_pending = max_pending
        self.commit_delay_s = commit_delay_ms / 1000
        # Share the process's generator when there is one; open() advances it past the
        # largest stored msg_id.
        self._ids = resolve_ids(ids, node_id)
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards _accepting, _pending and queue ordering vs. _STOP
        self._accepting = False
        self._pending = 0
        self._writer: threading.Thread | None = None
        self._readers: ThreadPoolExecutor | None = None
        self._reader_local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._n_readers = readers
        # the store may be used from several event loops: single-flight per loop
        self._direct = DirectConversationCache(self._direct_lookup, per_loop=True)
        self._last_ts = 0
        self._counters = StoreCounters()  # written by the writer thread only
        self._convs: dict[int, list[int]] = {}  # writer thread only; see _transaction
        self._tick: list[_Entry] = []  # this loop tick's entries, not yet handed to the writer
        #: the loop that opened the store: append_soon's callbacks run there
        self._open_loop: asyncio.AbstractEventLoop | None = None

    # ---- lifecycle ---------------------------------------------------------------------------

    @property
    def stats(self) -> SQLiteStoreStats:
        return SQLiteStoreStats(*self._counters.values())

    def _connect(self, *, writer: bool) -> sqlite3.Connection:
        conn = sqlite3.connect(
            str(self.path),
            timeout=self.busy_timeout_ms / 1000,
            isolation_level=None,  # we issue BEGIN/COMMIT ourselves
            check_same_thread=writer,
            cached_statements=256,
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            conn.execute("PRAGMA foreign_keys = ON")
            if writer:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise UnavailableError(f"cannot enable WAL journal mode on {self.path} (got {mode})")
                conn.execute("PRAGMA synchronous = FULL")
                conn.execute("PRAGMA journal_size_limit = 67108864")
            else:
                conn.execute("PRAGMA query_only = ON")
        except BaseException:
            conn.close()
            raise
        return conn

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " version INTEGER PRIMARY KEY, applied_ms INTEGER NOT NULL)"
        )
        for version in range(1, SCHEMA_VERSION + 1):
            conn.execute("BEGIN IMMEDIATE")
            try:
                current = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0]
                if current > SCHEMA_VERSION:
                    raise UnavailableError(
                        f"database schema version {current} is newer than this gochat ({SCHEMA_VERSION})"
                    )
                if current < version:
                    for statement in _split_sql(MIGRATIONS[version - 1]):
                        conn.execute(statement)
                    conn.execute("INSERT INTO schema_version VALUES (?, ?)", (version, now_ms()))
                    log.info("migrated database to schema version %d", version)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    async def open(self) -> None:
        if self._writer is not None:
            return
        ready: ConcurrentFuture[None] = ConcurrentFuture()
        self._writer = threading.Thread(
            target=self._writer_main,
            args=(ready,),
            name=f"gochat-sqlite-writer-{self.path.name}",
            daemon=True,
        )
        self._writer.start()
        self._open_loop = asyncio.get_running_loop()
        try:
            await asyncio.wrap_future(ready)
        except sqlite3.Error as exc:
            self._writer = None
            raise unavailable(exc) from exc
        except BaseException:
            self._writer = None
            raise
        self._readers = ThreadPoolExecutor(
            max_workers=self._n_readers, thread_name_prefix="gochat-sqlite-read"
        )
        with self._lock:
            self._accepting = True

    async def close(self) -> None:
        writer = self._writer
        if writer is None:
            return
        with self._lock:
            was_accepting = self._accepting
            self._accepting = False
            if self._tick:
                self._queue.put(self._tick)
                self._tick = []
            if was_accepting:
                self._queue.put(_STOP)
        await asyncio.to_thread(writer.join)
        readers = self._readers
        self._readers = None
        if readers is not None:
            await asyncio.to_thread(readers.shutdown, True)
        for conn in self._reader_conns:
            conn.close()
        self._reader_conns.clear()
        self._reader_local = threading.local()
        self._writer = None

    async def ping(self) -> None:
        writer = self._writer
        if writer is None or not writer.is_alive() or not self._accepting:
            raise UnavailableError("store is closed")
        await self._read(lambda conn: conn.execute("SELECT 1").fetchone())

    # ---- plumbing ----------------------------------------------------------------------------

    def _submit(
        self, make: Callable[[asyncio.AbstractEventLoop, asyncio.Future[Any]], _Entry]
    ) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._enqueue(make(loop, fut))
        return fut

    def _enqueue(self, entry: _Entry) -> None:
        with self._lock:
            if not self._accepting:
                raise UnavailableError("store is closed")
            if self._pending >= self.max_pending:
                raise UnavailableError("store write queue is full", code=ErrorCode.OVERLOADED)
            self._pending += 1
            if entry.loop is not self._open_loop:
                self._queue.put(entry)
                return
            # Entries from the store's own loop are handed to the writer once per loop tick, as
            # one list: one queue operation and at most one thread wake-up per tick, not one
            # per message (the writer shares the core with the event loop).
            tick = self._tick
            tick.append(entry)
            if len(tick) == 1:
                entry.loop.call_soon(self._hand_over)

    def _hand_over(self) -> None:
        with self._lock:
            tick, self._tick = self._tick, []
            if tick:
                self._queue.put(tick)

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` on the writer thread inside the next write transaction."""
        result: T = await self._submit(lambda loop, fut: _Job(loop, fut, fn))
        return result

    def _reader_conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._reader_local, "conn", None)
        if conn is None:
            conn = self._connect(writer=False)
            self._reader_local.conn = conn
            with self._lock:
                self._reader_conns.append(conn)
        return conn

    def _run_read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            conn = self._reader_conn()
            conn.execute("BEGIN")  # one snapshot for multi-statement reads
            try:
                return fn(conn)
            finally:
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise _map_exception(exc) from exc

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        readers = self._readers
        if readers is None:
            raise UnavailableError("store is closed")
        return await asyncio.get_running_loop().run_in_executor(readers, self._run_read, fn)

    # ---- writer thread ---------------------------------------------------------------------

    def _writer_main(self, ready: ConcurrentFuture[None]) -> None:
        try:
            conn = self._connect(writer=True)
        except BaseException as exc:
            ready.set_exception(exc)
            return
        try:
            self._migrate(conn)
            now = now_ms()
            conn.execute("DELETE FROM revoked_jtis WHERE expires_ms <= ?", (now,))
            conn.execute("DELETE FROM refresh_tokens WHERE expires_ms <= ?", (now,))
            max_id = conn.execute("SELECT MAX(msg_id) FROM messages").fetchone()[0]
            if max_id is not None:
                self._ids.observe(max_id)
            # The writer never lets ts_ms go backwards along msg_id order, so the newest row's
            # stamp is the largest (one rowid lookup, not a scan).
            last = conn.execute("SELECT ts_ms FROM messages ORDER BY msg_id DESC LIMIT 1").fetchone()
            self._last_ts = last[0] if last is not None else 0
        except BaseException as exc:
            conn.close()
            ready.set_exception(exc)
            return
        ready.set_result(None)
        try:
            self._writer_loop(conn)
        finally:
            conn.close()

    def _writer_loop(self, conn: sqlite3.Connection) -> None:
        get = self._queue.get
        get_nowait = self._queue.get_nowait
        limit = self.max_batch
        # Entries taken from the queue but not run yet: a loop tick's list can be far larger
        # than max_batch when the loop falls behind, and one transaction of 40,000 appends
        # (seen under overload) delays every answer in it by the whole transaction.
        carry: list[_Entry] = []
        stop = False
        while True:
            batch = carry[:limit]
            del carry[:limit]
            while not stop and len(batch) < limit:
                try:
                    item = get_nowait() if batch else get()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True  # _STOP is always the last entry ever queued
                elif type(item) is list:
                    room = limit - len(batch)
                    batch.extend(item[:room])
                    carry.extend(item[room:])
                else:
                    assert isinstance(item, _Entry)
                    batch.append(item)
            if not batch:
                if stop:
                    break
                continue
            started = time.monotonic()
            try:
                self._run_batch(conn, batch)
            except BaseException as exc:  # pragma: no cover - a bug; never leave waiters hanging
                log.exception("sqlite writer failed")
                self._deliver([(e, False, _map_exception(exc)) for e in batch])
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

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Entry]) -> None:
        self._counters.batch(len(batch))
        outcomes: list[tuple[_Entry, bool, Any]]
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
            err = _map_exception(exc)
            outcomes = [(e, False, err) for e in batch]
        self._deliver(outcomes)

    def _transaction(
        self, conn: sqlite3.Connection, batch: list[_Entry], *, isolate: bool
    ) -> list[tuple[_Entry, bool, Any]]:
        outcomes: list[tuple[_Entry, bool, Any]] = []
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
                    while end < len(batch) and isinstance(batch[end], _Append):
                        end += 1
                    if end > start and self._append_run(conn, batch, start, end, convs, now, fast):
                        appended += end - start
                    start = end + 1
            for n, entry in enumerate(batch):
                if n in fast:
                    outcomes.append((entry, True, fast[n]))
                    continue
                if isinstance(entry, _Append):
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
                        outcomes.append((entry, False, _map_exception(exc)))
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
                    assert isinstance(entry, _Job)
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
                        outcomes.append((entry, False, _map_exception(exc)))
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
        batch: list[_Entry],
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
                req = cast(_Append, batch[n]).request
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

    def _deliver(self, outcomes: Iterable[tuple[_Entry, bool, Any]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Entry, bool, Any]]] = {}
        for outcome in outcomes:
            by_loop.setdefault(outcome[0].loop, []).append(outcome)
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, items)
            except RuntimeError:  # the caller's loop is closed; nobody is waiting
                pass

    # ---- users -----------------------------------------------------------------------------

    async def create_user(self, username: str, password_hash: str) -> int:
        def job(conn: sqlite3.Connection) -> int:
            try:
                cur = conn.execute(
                    "INSERT INTO users (username, password_hash, created_ms) VALUES (?, ?, ?)",
                    (username, password_hash, now_ms()),
                )
            except sqlite3.IntegrityError as exc:
                raise RequestError("username is taken", code=ErrorCode.CONFLICT) from exc
            assert cur.lastrowid is not None
            return cur.lastrowid

        return await self._write(job)

    async def get_user(self, user_id: int) -> UserRecord | None:
        def read(conn: sqlite3.Connection) -> UserRecord | None:
            row = conn.execute(
                "SELECT user_id, username, password_hash, created_ms FROM users WHERE user_id = ?", (user_id,)
            ).fetchone()
            return UserRecord(*row) if row else None

        return await self._read(read)

    async def get_user_by_name(self, username: str) -> UserRecord | None:
        def read(conn: sqlite3.Connection) -> UserRecord | None:
            row = conn.execute(
                "SELECT user_id, username, password_hash, created_ms FROM users WHERE username = ?",
                (username,),
            ).fetchone()
            return UserRecord(*row) if row else None

        return await self._read(read)

    # ---- refresh tokens and revocation --------------------------------------------------------

    async def add_refresh_token(self, jti: str, family: str, user_id: int, expires_ms: int) -> None:
        def job(conn: sqlite3.Connection) -> None:
            if conn.execute("SELECT 1 FROM users WHERE user_id = ?", (user_id,)).fetchone() is None:
                raise RequestError("no such user", code=ErrorCode.NOT_FOUND)
            # A token added to an already revoked family (a refresh racing a reuse detection)
            # is born revoked.
            conn.execute(
                "INSERT INTO refresh_tokens (jti, family, user_id, expires_ms, spent, revoked)"
                " VALUES (?, ?, ?, ?, 0,"
                " EXISTS (SELECT 1 FROM refresh_tokens WHERE family = ? AND revoked = 1))",
                (jti, family, user_id, expires_ms, family),
            )

        await self._write(job)

    async def use_refresh_token(self, jti: str, now_ms: int) -> tuple[str, str, int]:
        def job(conn: sqlite3.Connection) -> tuple[str, str, int]:
            row = conn.execute(
                "SELECT family, user_id, expires_ms, spent, revoked FROM refresh_tokens WHERE jti = ?", (jti,)
            ).fetchone()
            if row is None:
                return RefreshStatus.UNKNOWN, "", 0
            family, user_id, expires_ms, spent, revoked = row
            if revoked:
                return RefreshStatus.REVOKED, family, user_id
            if spent:
                return RefreshStatus.REUSED, family, user_id
            if expires_ms <= now_ms:
                return RefreshStatus.UNKNOWN, "", 0
            conn.execute("UPDATE refresh_tokens SET spent = 1 WHERE jti = ?", (jti,))
            return RefreshStatus.OK, family, user_id

        return await self._write(job)

    async def revoke_family(self, family: str) -> None:
        await self._write(
            lambda conn: conn.execute(
                "UPDATE refresh_tokens SET revoked = 1 WHERE family = ? AND revoked = 0", (family,)
            )
        )

    async def revoke_user_tokens(self, user_id: int) -> None:
        await self._write(
            lambda conn: conn.execute(
                "UPDATE refresh_tokens SET revoked = 1 WHERE user_id = ? AND revoked = 0", (user_id,)
            )
        )

    async def revoke_jti(self, jti: str, expires_ms: int) -> None:
        await self._write(
            lambda conn: conn.execute(
                "INSERT INTO revoked_jtis (jti, expires_ms) VALUES (?, ?)"
                " ON CONFLICT (jti) DO UPDATE SET expires_ms = MAX(expires_ms, excluded.expires_ms)",
                (jti, expires_ms),
            )
        )

    async def revoked_jtis(self, now_ms: int) -> dict[str, int]:
        def read(conn: sqlite3.Connection) -> dict[str, int]:
            rows = conn.execute("SELECT jti, expires_ms FROM revoked_jtis WHERE expires_ms > ?", (now_ms,))
            return {jti: exp for jti, exp in rows}

        return await self._read(read)

    async def purge_expired(self, now_ms: int) -> tuple[int, int]:
        """Delete expired refresh tokens and deny-list entries; returns (tokens, jtis) deleted.
        (Also done at every open; call it periodically on long-running nodes.)"""

        def job(conn: sqlite3.Connection) -> tuple[int, int]:
            tokens = conn.execute("DELETE FROM refresh_tokens WHERE expires_ms <= ?", (now_ms,)).rowcount
            jtis = conn.execute("DELETE FROM revoked_jtis WHERE expires_ms <= ?", (now_ms,)).rowcount
            return tokens, jtis

        return await self._write(job)

    # ---- conversations -------------------------------------------------------------------------

    @staticmethod
    def _missing_users(conn: sqlite3.Connection, user_ids: Iterable[int]) -> list[int]:
        return [
            uid
            for uid in dict.fromkeys(user_ids)
            if conn.execute("SELECT 1 FROM users WHERE user_id = ?", (uid,)).fetchone() is None
        ]

    async def direct_conversation(self, a: int, b: int) -> int:
        """Cached and single-flight (:class:`~gochat.store.common.DirectConversationCache`)."""
        return await self._direct.get(a, b)

    async def _direct_lookup(self, lo: int, hi: int) -> int:
        def find(conn: sqlite3.Connection) -> int | None:
            row = conn.execute(
                "SELECT conv FROM conversations WHERE user_lo = ? AND user_hi = ?", (lo, hi)
            ).fetchone()
            return None if row is None else int(row[0])

        conv = await self._read(find)
        if conv is not None:
            return conv

        def create(conn: sqlite3.Connection) -> int:
            existing = find(conn)
            if existing is not None:
                return existing
            if self._missing_users(conn, (lo, hi)):
                raise RequestError("no such user", code=ErrorCode.NOT_FOUND)
            now = now_ms()
            cur = conn.execute(
                "INSERT INTO conversations (kind, name, owner_id, created_ms, last_seq, user_lo, user_hi)"
                " VALUES (1, '', 0, ?, 0, ?, ?)",
                (now, lo, hi),
            )
            new_conv = cur.lastrowid
            assert new_conv is not None
            conn.executemany(
                "INSERT OR IGNORE INTO members (conv, user_id, joined_ms, read_seq) VALUES (?, ?, ?, 0)",
                [(new_conv, lo, now), (new_conv, hi, now)],
            )
            return new_conv

        return await self._write(create)

    @staticmethod
    def _group_info(conn: sqlite3.Connection, conv: int) -> GroupInfo | None:
        row = conn.execute(
            "SELECT name, owner_id, created_ms, last_seq FROM conversations WHERE conv = ? AND kind = 2",
            (conv,),
        ).fetchone()
        if row is None:
            return None
        members = tuple(
            r[0] for r in conn.execute("SELECT user_id FROM members WHERE conv = ? ORDER BY user_id", (conv,))
        )
        return GroupInfo(
            conv=conv, name=row[0], owner_id=row[1], created_ms=row[2], members=members, last_seq=row[3]
        )

    async def create_group(self, owner_id: int, name: str, members: list[int]) -> GroupInfo:
        def job(conn: sqlite3.Connection) -> GroupInfo:
            everyone = [owner_id, *members]
            if self._missing_users(conn, everyone):
                raise RequestError("no such user", code=ErrorCode.NOT_FOUND)
            now = now_ms()
            cur = conn.execute(
                "INSERT INTO conversations (kind, name, owner_id, created_ms, last_seq) VALUES (2, ?, ?, ?, 0)",
                (name, owner_id, now),
            )
            conv = cur.lastrowid
            assert conv is not None
            conn.executemany(
                "INSERT INTO members (conv, user_id, joined_ms, read_seq) VALUES (?, ?, ?, 0)",
                [(conv, uid, now) for uid in dict.fromkeys(everyone)],
            )
            info = self._group_info(conn, conv)
            assert info is not None
            return info

        return await self._write(job)

    async def group_info(self, conv: int) -> GroupInfo | None:
        return await self._read(lambda conn: self._group_info(conn, conv))

    @staticmethod
    def _require_group(conn: sqlite3.Connection, conv: int) -> int:
        row = conn.execute(
            "SELECT last_seq FROM conversations WHERE conv = ? AND kind = 2", (conv,)
        ).fetchone()
        if row is None:
            raise RequestError("no such group", code=ErrorCode.NOT_FOUND)
        return int(row[0])

    async def add_member(self, conv: int, user_id: int) -> bool:
        def job(conn: sqlite3.Connection) -> bool:
            last_seq = self._require_group(conn, conv)
            if self._missing_users(conn, (user_id,)):
                raise RequestError("no such user", code=ErrorCode.NOT_FOUND)
            # A new member starts with everything before the join marked read.
            cur = conn.execute(
                "INSERT OR IGNORE INTO members (conv, user_id, joined_ms, read_seq) VALUES (?, ?, ?, ?)",
                (conv, user_id, now_ms(), last_seq),
            )
            return cur.rowcount == 1

        return await self._write(job)

    async def remove_member(self, conv: int, user_id: int) -> bool:
        def job(conn: sqlite3.Connection) -> bool:
            self._require_group(conn, conv)
            cur = conn.execute("DELETE FROM members WHERE conv = ? AND user_id = ?", (conv, user_id))
            return cur.rowcount == 1

        return await self._write(job)

    async def members(self, conv: int) -> tuple[int, ...]:
        def read(conn: sqlite3.Connection) -> tuple[int, ...]:
            rows = conn.execute("SELECT user_id FROM members WHERE conv = ? ORDER BY user_id", (conv,))
            return tuple(r[0] for r in rows)

        return await self._read(read)

    async def conversation_kind(self, conv: int) -> int | None:
        def read(conn: sqlite3.Connection) -> int | None:
            row = conn.execute("SELECT kind FROM conversations WHERE conv = ?", (conv,)).fetchone()
            return None if row is None else int(row[0])

        return await self._read(read)

    async def conversations(self, user_id: int) -> list[ConversationState]:
        def read(conn: sqlite3.Connection) -> list[ConversationState]:
            rows = conn.execute(
                "SELECT c.conv, c.kind, c.user_lo, c.user_hi, c.last_seq, m.read_seq, c.name"
                " FROM members m JOIN conversations c ON c.conv = m.conv"
                " WHERE m.user_id = ? ORDER BY c.conv",
                (user_id,),
            )
            out = []
            for conv, kind, lo, hi, last_seq, read_seq, name in rows:
                peer = direct_peer(kind, lo, hi, user_id)
                out.append(ConversationState(conv, kind, peer, last_seq, read_seq, name))
            return out

        return await self._read(read)

    # ---- messages --------------------------------------------------------------------------------

    async def append(self, request: AppendRequest) -> AppendResult:
        validate_append(request)
        result: AppendResult = await self._submit(lambda loop, fut: _Append(loop, fut, request))
        return result

    def append_soon(self, request: AppendRequest, done: AppendCallback) -> None:
        validate_append(request)
        loop = self._open_loop
        if loop is None:
            raise UnavailableError("store is closed")
        self._enqueue(_Append(loop, None, request, done))

    async def history(
        self, conv: int, from_seq: int, limit: int, backward: bool
    ) -> tuple[list[StoredMessage], bool]:
        validate_history(from_seq, limit)

        def read(conn: sqlite3.Connection) -> tuple[list[StoredMessage], bool]:
            if backward:
                start = from_seq if from_seq > 0 else MAX_SEQ
                rows = conn.execute(
                    f"SELECT {MSG_COLUMNS} FROM messages m JOIN conversations c ON c.conv = m.conv"
                    " WHERE m.conv = ? AND m.seq <= ? ORDER BY m.seq DESC LIMIT ?",
                    (conv, start, limit + 1),
                ).fetchall()
            else:
                rows = conn.execute(
                    f"SELECT {MSG_COLUMNS} FROM messages m JOIN conversations c ON c.conv = m.conv"
                    " WHERE m.conv = ? AND m.seq >= ? ORDER BY m.seq LIMIT ?",
                    (conv, from_seq, limit + 1),
                ).fetchall()
            return history_page(rows, limit, backward)

        return await self._read(read)

    async def set_read(self, conv: int, user_id: int, seq: int) -> int:
        def job(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT c.last_seq, m.read_seq FROM conversations c"
                " LEFT JOIN members m ON m.conv = c.conv AND m.user_id = ? WHERE c.conv = ?",
                (user_id, conv),
            ).fetchone()
            if row is None:
                raise RequestError("no such conversation", code=ErrorCode.NOT_FOUND)
            last_seq, read_seq = row
            if read_seq is None:
                raise RequestError("not a member of the conversation", code=ErrorCode.NOT_MEMBER)
            new = max(read_seq, min(seq, last_seq))
            if new != read_seq:
                conn.execute(
                    "UPDATE members SET read_seq = ? WHERE conv = ? AND user_id = ?", (new, conv, user_id)
                )
            return int(new)

        return await self._write(job)
