"""The SQLite engine: connections, the writer thread and its queue, the reader pool.

:class:`SQLiteEngine` is the base of :class:`~gochat.store.sqlite.SQLiteStore`; the repositories
(:mod:`.users`, :mod:`.tokens`, :mod:`.conversations`, :mod:`.messages`) run their SQL through
``_write`` (a job on the writer thread, inside the next group-commit transaction) and ``_read``
(a reader thread, one snapshot). The writer's loop and transactions are
:class:`~gochat.store.sqlite.commit.GroupCommit`.

* One **writer thread** owns the only writing connection; it migrates the schema
  (:func:`~gochat.store.sqlite.schema.migrate`) before the store accepts writes.
* Entries from the store's own event loop are handed to the writer once per loop tick, as one
  list (``_enqueue`` / ``_hand_over``); other loops put theirs directly.
* Reads run on ``readers`` threads, each with its own ``query_only`` connection (WAL: they run
  concurrently with the writer and see only committed data).
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import Future as ConcurrentFuture
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from gochat.clock import now_ms
from gochat.errors import ErrorCode, UnavailableError
from gochat.ids import IdGenerator
from gochat.observability.slow_queries import SlowQueryLog
from gochat.store.common import (
    DirectConversationCache,
    StoreCounters,
    StoreStats,
    resolve_ids,
    unavailable,
)
from gochat.store.sqlite.commit import STOP, Entry, GroupCommit, JobEntry, map_exception
from gochat.store.sqlite.schema import migrate
from gochat.store.sqlite.timing import finish, start, timed_connection_class

__all__ = ["SQLiteEngine", "SQLiteStoreStats"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class SQLiteStoreStats(StoreStats):
    """Writer counters (a snapshot). ``transactions`` counts committed write transactions;
    under concurrency it is far below ``appended`` (group commit)."""


class SQLiteEngine(GroupCommit):
    """Connections, threads, the write queue, ``_read``/``_write`` and the store's lifecycle.

    The constructor's parameters are those of :class:`~gochat.store.sqlite.SQLiteStore`."""

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
        slow_query_ms: float = 100.0,
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
        self._lock = threading.Lock()  # guards _accepting, _pending and queue ordering vs. STOP
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
        self._tick: list[Entry] = []  # this loop tick's entries, not yet handed to the writer
        #: the loop that opened the store: append_soon's callbacks run there
        self._open_loop: asyncio.AbstractEventLoop | None = None
        #: statements slower than ``slow_query_ms`` (docs/observability.md, "Slow queries")
        self.slow_queries = SlowQueryLog("sqlite", slow_query_ms)
        self._connection_class = timed_connection_class(self.slow_queries)

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
            factory=self._connection_class,
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
                self._queue.put(STOP)
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
        self, make: Callable[[asyncio.AbstractEventLoop, asyncio.Future[Any]], Entry]
    ) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._enqueue(make(loop, fut))
        return fut

    def _enqueue(self, entry: Entry) -> None:
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
        result: T = await self._submit(lambda loop, fut: JobEntry(loop, fut, fn))
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
            start(conn)
            conn.execute("BEGIN")  # one snapshot for multi-statement reads
            try:
                return fn(conn)
            finally:
                conn.execute("COMMIT")
                finish(conn)
        except sqlite3.Error as exc:
            raise map_exception(exc) from exc

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
            migrate(conn)
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

    # ---- provided by the repositories --------------------------------------------------------

    async def _direct_lookup(self, lo: int, hi: int) -> int:
        """Find or create the direct conversation (lo, hi): the resolver behind ``_direct``
        (:class:`~gochat.store.sqlite.conversations.ConversationRepository`)."""
        raise NotImplementedError
