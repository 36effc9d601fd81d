"""PostgreSQL connections: ``_with_conn``/``_read``/``_write`` on the asyncpg pool, and the
mapping of asyncpg errors to what callers see.

Every operation is bounded by ``command_timeout`` (acquiring a connection included). A
connection whose state is unknown after a failure (timeout, cancellation, I/O error) is
terminated, never reused; the pool opens a new one on a later acquire. Reads are retried on a
dead connection (the node's retry policy: docs/resilience.md). Every operation passes the
store's circuit breaker when it has one (``breaker``): while it is open, operations fail at once
with UnavailableError (``retry_after_ms`` until it probes again) instead of waiting on a
database that does not answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import asyncpg

from gochat.errors import ErrorCode, GochatError, RequestError, UnavailableError
from gochat.resilience import CircuitBreaker, RetryPolicy
from gochat.store.common import MAX_SEQ, StoreCounters, conflict_error, invalid_value_error, unavailable
from gochat.store.postgres.timing import finish, start

__all__ = ["PostgresPool", "check_int64", "map_exception", "poisons_connection"]

log = logging.getLogger("gochat.store.postgres")

T = TypeVar("T")

_MIN_INT64: Final = -(1 << 63)


def _is_request_error(exc: BaseException) -> bool:
    """Failures caused by one request's values (not by the link or the server)."""
    return isinstance(
        exc,
        asyncpg.DataError
        | asyncpg.IntegrityConstraintViolationError
        | asyncpg.ProgramLimitExceededError
        | OverflowError
        | ValueError
        | TypeError,
    ) and not isinstance(exc, asyncpg.InterfaceError | GochatError)


def poisons_connection(exc: BaseException) -> bool:
    """After this the connection's protocol state is unknown: terminate it, never reuse it."""
    if isinstance(exc, asyncio.CancelledError | TimeoutError | OSError):
        return True
    if isinstance(exc, asyncpg.PostgresConnectionError | asyncpg.OperatorInterventionError):
        return True
    if isinstance(exc, asyncpg.PostgresError | GochatError) or _is_request_error(exc):
        return False
    return True  # InterfaceError, InternalClientError, anything unexpected


def map_exception(exc: BaseException) -> BaseException:
    """Map a failure to what the caller sees."""
    if isinstance(exc, GochatError):
        return exc
    if isinstance(exc, asyncpg.IntegrityConstraintViolationError):
        return conflict_error(exc)
    if _is_request_error(exc):
        return invalid_value_error(exc)
    if isinstance(exc, TimeoutError):
        return unavailable(exc, "storage timed out")
    if isinstance(exc, Exception):
        # connection errors, OSError, shutdown, out of resources, missing schema, bugs:
        # nothing was acknowledged, the client may retry
        return unavailable(exc)
    return exc


def check_int64(*values: int) -> None:
    for v in values:
        if not isinstance(v, int) or not _MIN_INT64 <= v <= MAX_SEQ:
            raise RequestError("integer out of range", code=ErrorCode.BAD_REQUEST)


class PostgresPool:
    """Pooled connections for :class:`~gochat.store.postgres.engine.PostgresEngine` (which sets
    the attributes below and opens the pool)."""

    _pool: Any  # asyncpg.Pool, None while closed
    _accepting: bool
    command_timeout: float
    _counters: StoreCounters
    #: the store's circuit breaker (None: none)
    breaker: CircuitBreaker | None
    #: the node's retry policy, retrying only a read that met a dead pooled connection
    _read_retry: RetryPolicy

    def _dead_connection(self, exc: BaseException) -> bool:
        """A read failed on a pooled connection that turned out to be dead (not a timeout, not
        a refusal): another connection may well work."""
        cause = exc.__cause__
        return (
            isinstance(exc, UnavailableError)
            and cause is not None
            and not isinstance(cause, TimeoutError)
            and poisons_connection(cause)
            and self._pool is not None
        )

    async def _with_conn(self, fn: Callable[[Any], Awaitable[T]], *, timeout: float | None = None) -> T:
        """Run ``fn(conn)`` on a pooled connection, bounded by ``timeout``, through the breaker;
        map failures."""
        breaker = self.breaker
        if breaker is None:
            return await self._on_conn(fn, timeout)
        async with breaker.guard():
            return await self._on_conn(fn, timeout)

    async def _on_conn(self, fn: Callable[[Any], Awaitable[T]], timeout: float | None) -> T:
        """``fn(conn)`` on a pooled connection. A connection whose state is unknown after a
        failure (timeout, cancellation, I/O error) is terminated; the pool replaces it on a
        later acquire. Its statements are timed (:mod:`~gochat.store.postgres.timing`)."""
        pool = self._pool
        if pool is None:
            raise UnavailableError("store is closed")
        try:
            async with asyncio.timeout(timeout or self.command_timeout):
                conn = await pool.acquire()
                start(conn)
                try:
                    return await fn(conn)
                except BaseException as exc:
                    finish(conn, True)  # before terminate(), which detaches the connection
                    if poisons_connection(exc):
                        conn.terminate()
                    raise
                finally:
                    finish(conn)
                    await pool.release(conn)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            mapped = map_exception(exc)
            if mapped is exc:
                raise
            raise mapped from exc

    async def _read(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        """Reads are idempotent: retried (the node's policy) when a pooled connection turned out
        to be dead."""
        return await self._read_retry.run(lambda: self._with_conn(fn), what="store read")

    async def _write(self, fn: Callable[[Any], Awaitable[T]], *, transaction: bool = False) -> T:
        """A write other than an append: one statement (its own transaction) or, with
        ``transaction``, ``fn`` inside BEGIN … COMMIT."""

        async def in_tx(conn: Any) -> T:
            await conn.execute("BEGIN")
            try:
                result = await fn(conn)
            except BaseException as exc:
                if poisons_connection(exc):
                    raise  # _with_conn terminates the connection: the server rolls back
                try:
                    async with asyncio.timeout(self.command_timeout):
                        await conn.execute("ROLLBACK")
                except BaseException:
                    conn.terminate()
                raise
            await conn.execute("COMMIT")
            return result

        if not self._accepting and self._pool is None:
            raise UnavailableError("store is closed")
        try:
            result = await self._with_conn(in_tx if transaction else fn)
        except GochatError as exc:
            if isinstance(exc, UnavailableError):
                self._counters.failed_transactions += 1
            raise
        self._counters.jobs += 1
        self._counters.transactions += 1
        return result
