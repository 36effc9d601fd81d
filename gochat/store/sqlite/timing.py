"""Statement timing on SQLite: a :class:`sqlite3.Connection` that times every statement it runs.

Each ``execute``/``executemany`` reads the monotonic clock once: that read ends the previous
statement of the connection and starts this one. :func:`finish` ends the last one when the
engine's operation is over (a read, a writer batch), :func:`start` forgets whatever ran before
the operation. A statement's time therefore runs from its start to the start of the next
statement of the operation or the operation's end: it includes stepping through its rows
(SQLite produces them lazily, as they are fetched) and the Python work on them. A statement at
or above the store's threshold goes to its :class:`~gochat.observability.slow_queries.SlowQueryLog`;
a faster one costs the clock read, a comparison and two attribute stores (measured in
docs/observability.md, "Slow queries").
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from time import monotonic
from typing import Any

from gochat.observability.slow_queries import SlowQueryLog

__all__ = ["TimedConnection", "finish", "start", "timed_connection_class"]

_execute = sqlite3.Connection.execute
_executemany = sqlite3.Connection.executemany


class TimedConnection(sqlite3.Connection):
    """A connection that times its statements (made by :func:`timed_connection_class`, which
    sets the store's log)."""

    __slots__ = ("_gochat_sql", "_gochat_t0")
    _gochat_log: SlowQueryLog

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._gochat_sql: str | None = None
        self._gochat_t0 = 0.0

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        now = monotonic()
        prev = self._gochat_sql
        if prev is not None and now - self._gochat_t0 >= self._gochat_log.threshold_s:
            self._gochat_log.record(prev, now - self._gochat_t0)
        self._gochat_sql = sql
        self._gochat_t0 = now
        return _execute(self, sql, parameters)

    def executemany(self, sql: str, parameters: Iterable[Any], /) -> sqlite3.Cursor:
        now = monotonic()
        prev = self._gochat_sql
        if prev is not None and now - self._gochat_t0 >= self._gochat_log.threshold_s:
            self._gochat_log.record(prev, now - self._gochat_t0)
        self._gochat_sql = sql
        self._gochat_t0 = now
        return _executemany(self, sql, parameters)

    def finish_statements(self, failed: bool = False) -> None:
        prev = self._gochat_sql
        if prev is not None:
            elapsed = monotonic() - self._gochat_t0
            self._gochat_sql = None
            if elapsed >= self._gochat_log.threshold_s:
                self._gochat_log.record(prev, elapsed, failed=failed)


def timed_connection_class(log: SlowQueryLog) -> type[TimedConnection]:
    """The connection class (``sqlite3.connect(factory=…)``) of a store whose log is ``log``."""
    return type("GochatSQLiteConnection", (TimedConnection,), {"__slots__": (), "_gochat_log": log})


def start(conn: sqlite3.Connection) -> None:
    """An operation begins on ``conn``: what ran before it is not timed."""
    if isinstance(conn, TimedConnection):
        conn._gochat_sql = None


def finish(conn: sqlite3.Connection, failed: bool = False) -> None:
    """The operation on ``conn`` is over: time its last statement."""
    if isinstance(conn, TimedConnection):
        conn.finish_statements(failed)
