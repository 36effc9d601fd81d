"""The PostgreSQL engine: configuration, the pool's lifecycle (open/close/ping) and stats.

:class:`PostgresEngine` is the base of :class:`~gochat.store.postgres.PostgresStore`. It stacks
:class:`~gochat.store.postgres.pool.PostgresPool` (``_with_conn``/``_read``/``_write`` and error
mapping) and :class:`~gochat.store.postgres.commit.GroupCommit` (the append queue and its
committer task); the repositories (:mod:`.users`, :mod:`.tokens`, :mod:`.conversations`,
:mod:`.messages`) run their SQL through them. ``open()`` creates the pool, migrates the schema
(:func:`~gochat.store.postgres.schema.migrate_schema`), purges expired tokens, seeds the msg_id
generator and starts the committer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
from collections import deque
from dataclasses import dataclass
from typing import Any, Final

import asyncpg

from gochat.clock import now_ms
from gochat.errors import GochatError, UnavailableError
from gochat.ids import IdGenerator, id_unix_ms
from gochat.observability.slow_queries import SlowQueryLog
from gochat.resilience import CircuitBreaker, RetryPolicy
from gochat.resilience.policy import DEFAULT_RETRY
from gochat.store.common import (
    DirectConversationCache,
    StoreCounters,
    StoreStats,
    resolve_ids,
    unavailable,
)
from gochat.store.postgres.commit import AppendEntry, GroupCommit
from gochat.store.postgres.explain import PlanSampler
from gochat.store.postgres.pool import check_int64
from gochat.store.postgres.schema import check_schema, migrate_schema
from gochat.store.postgres.timing import timed_connection_class

__all__ = ["PostgresEngine", "PostgresStoreStats"]


def _rolled_back(exc: BaseException) -> bool:
    """A transaction the server rolled back (deadlock, serialization failure): run it again."""
    return isinstance(exc, UnavailableError) and isinstance(exc.__cause__, asyncpg.TransactionRollbackError)


@dataclass(frozen=True, slots=True)
class PostgresStoreStats(StoreStats):
    """Counters (a snapshot). ``transactions`` counts committed write transactions (append
    batches and other writes); under concurrency it is far below ``appended`` (group commit)."""

    #: batches re-run after a deadlock / serialization failure between nodes
    retried_transactions: int


async def _noop_reset(conn: Any) -> None:
    """Pool reset: our sessions change no settings and take no session-level advisory locks,
    so skip asyncpg's default reset query (one round trip per release)."""


#: asyncpg >= 0.30 accepts a custom pool ``reset``; older versions keep their default reset query.
_POOL_RESET: Final[dict[str, Any]] = (
    {"reset": _noop_reset} if "reset" in inspect.signature(asyncpg.create_pool).parameters else {}
)


class PostgresEngine(GroupCommit):
    """Configuration, state, lifecycle and stats. The constructor's parameters are those of
    :class:`~gochat.store.postgres.PostgresStore`."""

    def __init__(
        self,
        dsn: str,
        *,
        node_id: int = 0,
        ids: IdGenerator | None = None,
        schema: str = "gochat",
        min_size: int = 2,
        max_size: int = 10,
        max_batch: int = 512,
        max_pending: int = 65536,
        command_timeout: float = 10.0,
        connect_timeout: float = 5.0,
        ping_timeout: float = 2.0,
        breaker: CircuitBreaker | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
        slow_query_ms: float = 100.0,
    ) -> None:
        if max_batch < 1 or max_pending < 1 or min_size < 0 or max_size < max(1, min_size):
            raise ValueError("max_batch, max_pending, max_size must be >= 1 and max_size >= min_size >= 0")
        if command_timeout <= 0 or connect_timeout <= 0 or ping_timeout <= 0:
            raise ValueError("timeouts must be > 0")
        self._s = check_schema(schema)
        self.dsn = dsn
        self.schema = schema
        self.node_id = node_id
        self.min_size = min_size
        self.max_size = max_size
        self.max_batch = max_batch
        self.max_pending = max_pending
        self.command_timeout = command_timeout
        self.connect_timeout = connect_timeout
        self.ping_timeout = ping_timeout
        self.breaker = breaker
        self._read_retry = dataclasses.replace(retry, retryable=self._dead_connection)
        self._tx_retry = dataclasses.replace(retry, retryable=_rolled_back)
        self._ids = resolve_ids(ids, node_id)
        self._pool: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accepting = False
        self._queue: deque[AppendEntry] = deque()
        self._pending = 0
        self._wakeup: asyncio.Event | None = None
        self._committer: asyncio.Task[None] | None = None
        # bound to the event loop of open(): one single-flight lookup per pair
        self._direct = DirectConversationCache(self._direct_lookup, per_loop=False, check=check_int64)
        self._last_ts = 0
        self._sql_append = self._build_append_sql()
        self._counters = StoreCounters()
        self._retried = 0
        #: statements slower than ``slow_query_ms``, with their plans (docs/observability.md)
        self.slow_queries = SlowQueryLog("postgres", slow_query_ms)
        self._connection_class = timed_connection_class(self.slow_queries)
        self._plans = PlanSampler(self.slow_queries, self._on_conn)
        self.slow_queries.on_new = self._plans.request

    @property
    def stats(self) -> PostgresStoreStats:
        return PostgresStoreStats(*self._counters.values(), self._retried)

    # ---- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        if self._pool is not None:
            return
        try:
            async with asyncio.timeout(self.connect_timeout + self.command_timeout):
                pool = await asyncpg.create_pool(
                    self.dsn,
                    **_POOL_RESET,
                    min_size=self.min_size,
                    max_size=self.max_size,
                    timeout=self.connect_timeout,
                    command_timeout=self.command_timeout,
                    connection_class=self._connection_class,
                    server_settings={
                        "application_name": "gochat",
                        # Plan every execution with its real arrays: the generic plan of the
                        # group-commit statement is ~3x slower (measured), planning costs <0.5 ms.
                        "plan_cache_mode": "force_custom_plan",
                        # a node that vanished mid-transaction must not hold row locks for long
                        "idle_in_transaction_session_timeout": str(int(self.command_timeout * 3000)),
                    },
                )
        except GochatError:
            raise
        except Exception as exc:
            raise unavailable(exc, f"cannot connect to PostgreSQL: {exc}") from exc
        try:
            async with asyncio.timeout(self.command_timeout * 6), pool.acquire() as conn:
                await migrate_schema(conn, self.schema)
                s = self._s
                now = now_ms()
                await conn.execute(f"DELETE FROM {s}.revoked_jtis WHERE expires_ms <= $1", now)
                await conn.execute(f"DELETE FROM {s}.refresh_tokens WHERE expires_ms <= $1", now)
                max_id = await conn.fetchval(f"SELECT max(msg_id) FROM {s}.messages")
        except BaseException as exc:
            pool.terminate()
            if isinstance(exc, GochatError | asyncio.CancelledError) or not isinstance(exc, Exception):
                raise
            raise unavailable(exc, f"cannot open PostgreSQL store: {exc}") from exc
        if max_id is not None:
            self._ids.observe(max_id)
            self._last_ts = id_unix_ms(max_id)
        self._pool = pool
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._accepting = True
        self._committer = self._loop.create_task(
            self._commit_loop(), name=f"gochat-pg-committer-{self.schema}"
        )

    async def close(self) -> None:
        """Stop accepting appends, commit those already queued (their futures resolve), then
        close the pool."""
        pool = self._pool
        if pool is None:
            return
        self._accepting = False
        if self._wakeup is not None:
            self._wakeup.set()
        committer = self._committer
        if committer is not None:
            await asyncio.wait([committer])  # drains the queue; never raises
        self._committer = None
        await self._plans.close()
        self._pool = None
        try:
            async with asyncio.timeout(self.command_timeout):
                await pool.close()
        except (TimeoutError, Exception):  # pragma: no cover - pool stuck on a dead link
            pool.terminate()

    async def ping(self) -> None:
        if self._pool is None or not self._accepting:
            raise UnavailableError("store is closed")
        if self._committer is None or self._committer.done():
            raise UnavailableError("store committer stopped")
        await self._with_conn(lambda conn: conn.fetchval("SELECT 1"), timeout=self.ping_timeout)

    # ---- provided by the repositories --------------------------------------------------------

    async def _direct_lookup(self, lo: int, hi: int) -> int:
        """Find or create the direct conversation (lo, hi): the resolver behind ``_direct``
        (:class:`~gochat.store.postgres.conversations.ConversationRepository`)."""
        raise NotImplementedError
