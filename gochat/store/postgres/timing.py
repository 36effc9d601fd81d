"""Statement timing on PostgreSQL: an asyncpg connection class that times every statement.

The pool is created with ``connection_class=`` :func:`timed_connection_class` (one class per
store, carrying the store's :class:`~gochat.observability.slow_queries.SlowQueryLog`). Each
statement (``fetch``/``fetchrow``/``fetchval``/``execute`` with arguments go through
``Connection._execute``; ``execute`` without arguments is the simple-query protocol) reads the
monotonic clock once when it is sent: that read ends the previous statement of the connection
and starts this one. :meth:`~gochat.store.postgres.pool.PostgresPool._on_conn` calls
:func:`start` when it has acquired a connection and :func:`finish` when its operation is over,
before the connection goes back to the pool. A statement's time therefore runs from the moment
it is sent to the moment the next statement of the operation is sent or the operation ends: its
round trip and server time, plus the event loop's delay in resuming the operation (a busy loop
makes every statement look slower, as any timing done in asyncio does).

A fast statement costs a clock read, a comparison and two attribute stores: no object is made
for it (the wrapper is a plain function returning asyncpg's own coroutine). A slow one is
handed to the log (:meth:`~gochat.observability.slow_queries.SlowQueryLog.record`).
"""

from __future__ import annotations

from time import monotonic
from typing import Any

import asyncpg

from gochat.observability.slow_queries import SlowQueryLog

__all__ = ["TimedConnection", "finish", "start", "timed_connection_class"]

_execute = asyncpg.Connection._execute
_execute_simple = asyncpg.Connection.execute


class TimedConnection(asyncpg.Connection):  # type: ignore[misc]
    """An asyncpg connection that times its statements (see the module)."""

    __slots__ = ("_gochat_sql", "_gochat_t0")
    _gochat_log: SlowQueryLog

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._gochat_sql: str | None = None
        self._gochat_t0 = 0.0

    def _execute(
        self,
        query: str,
        args: Any,
        limit: int,
        timeout: float | None,
        *,
        return_status: bool = False,
        ignore_custom_codec: bool = False,
        record_class: Any = None,
    ) -> Any:
        now = monotonic()
        prev = self._gochat_sql
        if prev is not None and now - self._gochat_t0 >= self._gochat_log.threshold_s:
            self._gochat_log.record(prev, now - self._gochat_t0)
        self._gochat_sql = query
        self._gochat_t0 = now
        return _execute(
            self,
            query,
            args,
            limit,
            timeout,
            return_status=return_status,
            ignore_custom_codec=ignore_custom_codec,
            record_class=record_class,
        )

    def execute(self, query: str, *args: Any, timeout: float | None = None) -> Any:
        if args:  # a prepared statement: timed in _execute
            return _execute_simple(self, query, *args, timeout=timeout)
        now = monotonic()
        prev = self._gochat_sql
        if prev is not None and now - self._gochat_t0 >= self._gochat_log.threshold_s:
            self._gochat_log.record(prev, now - self._gochat_t0)
        self._gochat_sql = query
        self._gochat_t0 = now
        return _execute_simple(self, query, timeout=timeout)

    def _gochat_finish(self, failed: bool) -> None:
        prev = self._gochat_sql
        if prev is not None:
            elapsed = monotonic() - self._gochat_t0
            self._gochat_sql = None
            if elapsed >= self._gochat_log.threshold_s:
                self._gochat_log.record(prev, elapsed, failed=failed)


def timed_connection_class(log: SlowQueryLog) -> type[TimedConnection]:
    """The ``connection_class`` of a store's pool: :class:`TimedConnection` reporting to ``log``."""
    return type("GochatPgConnection", (TimedConnection,), {"__slots__": (), "_gochat_log": log})


# start/finish take the pool's connection proxy and reach the connection through its ``_con``
# slot (no isinstance: asyncpg's Connection metaclass checks instances in Python, 150 ns).


def start(conn: Any) -> None:
    """``conn`` (a pool's connection proxy) was just acquired: what ran on it before (at open,
    for instance) is not timed."""
    try:
        conn._con._gochat_sql = None
    except AttributeError:  # not a timed connection
        pass


def finish(conn: Any, failed: bool = False) -> None:
    """The operation on ``conn`` (a pool's connection proxy) is over: time its last statement."""
    try:
        done = conn._con._gochat_finish
    except AttributeError:  # not a timed connection
        return
    done(failed)
