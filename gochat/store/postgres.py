"""Cluster :class:`~gochat.store.base.Store` on PostgreSQL (asyncpg pool, group commit).

Same contract and semantics as :mod:`gochat.store.sqlite`; several gochat nodes share one
database (one schema). ``docs/storage-and-auth.md`` §8 describes the schema and the choices.

Group commit
------------
``append()`` puts its request on an in-process queue (synchronously, so call order is queue
order) and waits on a future. One **committer task** takes everything queued (up to
``max_batch``) and writes it with **one statement**, which PostgreSQL runs as one transaction:
the arrays of the batch are ``unnest()``-ed, the dedup keys go into ``message_keys`` with
``ON CONFLICT DO NOTHING`` (the UNIQUE (sender_id, client_msg_id) check, which waits for and
sees concurrent transactions of other nodes), the new messages of each conversation are numbered
in call order (``row_number()``), each conversation's ``last_seq`` is advanced once by the
number of new messages (``UPDATE … RETURNING``, which row-locks it against other nodes) and the
messages are inserted. One round trip and one WAL flush per batch. Requests the statement did
not store (duplicates, unknown conversations) are explained by one follow-up read. Futures are
resolved in call order only after the statement returned, i.e. after COMMIT.

Failures
--------
Connection errors, ``OSError``, timeouts, PostgreSQL shutting down (class 57), out of resources
(class 53) → :class:`~gochat.errors.UnavailableError` (retryable) for every request of the
batch; nothing is acknowledged that did not commit (an outcome that is unknown because the link
broke during COMMIT is reported as unavailable; a retry is safe thanks to dedup). The broken
connection is terminated; the pool opens a new one on the next use, so the store recovers by
itself when PostgreSQL is back. Every operation is bounded by ``command_timeout`` (``ping`` by
``ping_timeout``). A deadlock or serialization failure between nodes retries the batch.
Invalid values (integers outside bigint) → ``BAD_REQUEST``; integrity violations → ``CONFLICT``.

The store is bound to the event loop that called :meth:`PostgresStore.open`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import asyncpg

from gochat.errors import ErrorCode, GochatError, RequestError, UnavailableError
from gochat.ids import IdGenerator, id_unix_ms
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

__all__ = [
    "MESSAGE_PARTITIONS",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "PostgresStore",
    "PostgresStoreStats",
    "migrate",
]

log = logging.getLogger("gochat.store.postgres")

T = TypeVar("T")

_MIN_INT64: Final = -(1 << 63)
_MAX_ROUNDS: Final = 8
_MAX_TX_RETRIES: Final = 5
_SCHEMA_NAME: Final = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

#: Hash partitions of ``messages`` (``PARTITION BY HASH (conv)``). Baked into migration 1:
#: changing it needs a new migration that re-partitions, never an edit of this constant.
MESSAGE_PARTITIONS: Final = 16


def _partitions_sql(n: int) -> str:
    return "".join(
        f"CREATE TABLE {{s}}.messages_p{i:02d} PARTITION OF {{s}}.messages"
        f" FOR VALUES WITH (MODULUS {n}, REMAINDER {i});\n"
        for i in range(n)
    )


#: Versioned migrations. Entry ``i`` migrates the schema from version ``i`` to ``i + 1``; ``{s}``
#: stands for the (quoted) schema. Each runs in one transaction, under an advisory lock, with
#: the ``schema_version`` row that records it. Append new entries, never edit shipped ones.
#:
#: Sharding keys (for a later split over several databases): ``users``, ``refresh_tokens`` and
#: ``members`` are keyed by ``user_id`` first; ``conversations`` and ``messages`` by ``conv``;
#: ``message_keys`` by ``sender_id`` (a user id). No query joins across the two families except
#: ``members ⋈ conversations``, which a sharded deployment would answer per shard.
MIGRATIONS: Final[tuple[str, ...]] = (
    # ---- version 1 ------------------------------------------------------------------------
    """
    CREATE TABLE {s}.users (
        user_id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        username      text   NOT NULL,
        password_hash text   NOT NULL,
        created_ms    bigint NOT NULL
    );
    -- case-insensitive like SQLite's COLLATE NOCASE (usernames are ASCII)
    CREATE UNIQUE INDEX users_username_lower ON {s}.users (lower(username));

    CREATE TABLE {s}.refresh_tokens (
        jti        text    PRIMARY KEY,
        family     text    NOT NULL,
        user_id    bigint  NOT NULL REFERENCES {s}.users (user_id) ON DELETE CASCADE,
        expires_ms bigint  NOT NULL,
        spent      boolean NOT NULL DEFAULT false,
        revoked    boolean NOT NULL DEFAULT false
    );
    CREATE INDEX refresh_tokens_family ON {s}.refresh_tokens (family);
    CREATE INDEX refresh_tokens_user ON {s}.refresh_tokens (user_id);
    CREATE INDEX refresh_tokens_expires ON {s}.refresh_tokens (expires_ms);

    CREATE TABLE {s}.revoked_jtis (
        jti        text   PRIMARY KEY,
        expires_ms bigint NOT NULL
    );
    CREATE INDEX revoked_jtis_expires ON {s}.revoked_jtis (expires_ms);

    -- last_seq changes at every append: leave room for HOT updates
    CREATE TABLE {s}.conversations (
        conv       bigint   GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        kind       smallint NOT NULL CHECK (kind IN (1, 2)),
        name       text     NOT NULL DEFAULT '',
        owner_id   bigint   NOT NULL DEFAULT 0,
        created_ms bigint   NOT NULL,
        last_seq   bigint   NOT NULL DEFAULT 0,
        user_lo    bigint,
        user_hi    bigint,
        UNIQUE (user_lo, user_hi)
    ) WITH (fillfactor = 70);

    CREATE TABLE {s}.members (
        user_id   bigint NOT NULL REFERENCES {s}.users (user_id) ON DELETE CASCADE,
        conv      bigint NOT NULL REFERENCES {s}.conversations (conv) ON DELETE CASCADE,
        joined_ms bigint NOT NULL,
        read_seq  bigint NOT NULL DEFAULT 0,
        PRIMARY KEY (user_id, conv)
    ) WITH (fillfactor = 80);
    CREATE INDEX members_conv ON {s}.members (conv, user_id);

    -- A unique index of a partitioned table must contain the partition key, so the dedup key
    -- (global per sender) lives in its own table, written in the same statement as the message.
    CREATE TABLE {s}.message_keys (
        sender_id     bigint NOT NULL,
        client_msg_id bytea  NOT NULL CHECK (octet_length(client_msg_id) = 16),
        conv          bigint NOT NULL,
        msg_id        bigint NOT NULL,
        PRIMARY KEY (sender_id, client_msg_id)
    );

    CREATE TABLE {s}.messages (
        conv          bigint NOT NULL,
        seq           bigint NOT NULL,
        msg_id        bigint NOT NULL,
        sender_id     bigint NOT NULL,
        ts_ms         bigint NOT NULL,
        client_msg_id bytea  NOT NULL,
        content_type  bigint NOT NULL,
        body          bytea  NOT NULL,
        PRIMARY KEY (conv, seq)
    ) PARTITION BY HASH (conv);
    CREATE INDEX messages_msg_id ON {s}.messages (msg_id);
    """
    + _partitions_sql(MESSAGE_PARTITIONS),
)
SCHEMA_VERSION: Final = len(MIGRATIONS)


@dataclass(frozen=True, slots=True)
class PostgresStoreStats(StoreStats):
    """Counters (a snapshot). ``transactions`` counts committed write transactions (append
    batches and other writes); under concurrency it is far below ``appended`` (group commit)."""

    #: batches re-run after a deadlock / serialization failure between nodes
    retried_transactions: int


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


def _poisons_connection(exc: BaseException) -> bool:
    """After this the connection's protocol state is unknown: terminate it, never reuse it."""
    if isinstance(exc, asyncio.CancelledError | TimeoutError | OSError):
        return True
    if isinstance(exc, asyncpg.PostgresConnectionError | asyncpg.OperatorInterventionError):
        return True
    if isinstance(exc, asyncpg.PostgresError | GochatError) or _is_request_error(exc):
        return False
    return True  # InterfaceError, InternalClientError, anything unexpected


def _map_exception(exc: BaseException) -> BaseException:
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


def _check_int64(*values: int) -> None:
    for v in values:
        if not isinstance(v, int) or not _MIN_INT64 <= v <= MAX_SEQ:
            raise RequestError("integer out of range", code=ErrorCode.BAD_REQUEST)


def _check_schema(schema: str) -> str:
    if not _SCHEMA_NAME.match(schema):
        raise ValueError(f"schema must match {_SCHEMA_NAME.pattern}, got {schema!r}")
    return f'"{schema}"'


async def _noop_reset(conn: Any) -> None:
    """Pool reset: our sessions change no settings and take no session-level advisory locks,
    so skip asyncpg's default reset query (one round trip per release)."""


#: asyncpg >= 0.30 accepts a custom pool ``reset``; older versions keep their default reset query.
_POOL_RESET: Final[dict[str, Any]] = (
    {"reset": _noop_reset} if "reset" in inspect.signature(asyncpg.create_pool).parameters else {}
)


# ---- migrations ---------------------------------------------------------------------------------


async def _migrate(conn: Any, schema: str) -> int:
    """Bring ``schema`` to :data:`SCHEMA_VERSION`; returns the resulting version.

    Every step runs in one transaction holding a transaction-level advisory lock keyed by the
    schema name, so nodes that start at once apply each migration exactly once (the others
    wait, then find it done). A schema newer than this code is refused."""
    s = _check_schema(schema)
    lock_key = f"gochat.migrate:{schema}"
    while True:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", lock_key)
            # Only CREATE what is missing: a pre-created schema needs no CREATE privilege on
            # the database.
            if not await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)", schema
            ):
                await conn.execute(f"CREATE SCHEMA {s}")
            if await conn.fetchval("SELECT to_regclass($1)", f"{s}.schema_version") is None:
                await conn.execute(
                    f"CREATE TABLE {s}.schema_version (version integer PRIMARY KEY, applied_ms bigint NOT NULL)"
                )
            version = int(await conn.fetchval(f"SELECT COALESCE(max(version), 0) FROM {s}.schema_version"))
            if version > SCHEMA_VERSION:
                raise UnavailableError(
                    f"database schema {schema!r} version {version} is newer than this gochat ({SCHEMA_VERSION})"
                )
            if version == SCHEMA_VERSION:
                return version
            target = version + 1
            await conn.execute(MIGRATIONS[target - 1].replace("{s}", s))
            await conn.execute(f"INSERT INTO {s}.schema_version VALUES ($1, $2)", target, now_ms())
            log.info("migrated PostgreSQL schema %s to version %d", schema, target)


async def migrate(dsn: str, schema: str = "gochat", *, timeout: float = 60.0) -> int:
    """Create or migrate gochat's tables in ``schema`` (``gochat migrate``); returns the version.

    Safe to run while nodes start or run (advisory lock). Raises :class:`UnavailableError` if
    the database cannot be reached or its schema is newer than this code."""
    _check_schema(schema)
    try:
        async with asyncio.timeout(timeout):
            conn = await asyncpg.connect(dsn)
            try:
                return await _migrate(conn, schema)
            finally:
                await conn.close()
    except GochatError:
        raise
    except Exception as exc:
        raise unavailable(exc, f"cannot migrate PostgreSQL schema {schema!r}: {exc}") from exc


# ---- queue entries ------------------------------------------------------------------------------


def _check_append(request: AppendRequest) -> None:
    validate_append(request)
    # Values PostgreSQL cannot store fail here, alone, instead of breaking a batch.
    _check_int64(request.conv, request.sender_id, request.content_type)
    if not isinstance(request.body, bytes | bytearray | memoryview):
        raise RequestError("body must be bytes", code=ErrorCode.BAD_REQUEST)


class _Append:
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


class PostgresStore:
    """PostgreSQL implementation of :class:`gochat.store.base.Store`.

    ``dsn`` is an asyncpg/libpq connection string. ``schema`` holds every table (created by
    :func:`migrate` or at :meth:`open`). ``node_id``/``ids``: the ``msg_id`` generator, as for
    :class:`~gochat.store.sqlite.SQLiteStore` (share the process's one). ``min_size``/``max_size``:
    the connection pool. ``max_batch``: appends per group-commit statement. ``max_pending``:
    queued appends beyond which appends fail fast with ``OVERLOADED``. ``command_timeout``
    bounds every operation (acquiring a connection included), ``connect_timeout`` every new
    connection, ``ping_timeout`` the readiness probe.
    """

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
    ) -> None:
        if max_batch < 1 or max_pending < 1 or min_size < 0 or max_size < max(1, min_size):
            raise ValueError("max_batch, max_pending, max_size must be >= 1 and max_size >= min_size >= 0")
        if command_timeout <= 0 or connect_timeout <= 0 or ping_timeout <= 0:
            raise ValueError("timeouts must be > 0")
        self._s = _check_schema(schema)
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
        self._ids = resolve_ids(ids, node_id)
        self._pool: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accepting = False
        self._queue: deque[_Append] = deque()
        self._pending = 0
        self._wakeup: asyncio.Event | None = None
        self._committer: asyncio.Task[None] | None = None
        # bound to the event loop of open(): one single-flight lookup per pair
        self._direct = DirectConversationCache(self._direct_lookup, per_loop=False, check=_check_int64)
        self._last_ts = 0
        self._sql_append = self._build_append_sql()
        self._counters = StoreCounters()
        self._retried = 0

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
                await _migrate(conn, self.schema)
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

    # ---- plumbing ----------------------------------------------------------------------------

    async def _with_conn(self, fn: Callable[[Any], Awaitable[T]], *, timeout: float | None = None) -> T:
        """Run ``fn(conn)`` on a pooled connection, bounded by ``timeout``; map failures.

        A connection whose state is unknown after a failure (timeout, cancellation, I/O error)
        is terminated; the pool replaces it on a later acquire."""
        pool = self._pool
        if pool is None:
            raise UnavailableError("store is closed")
        try:
            async with asyncio.timeout(timeout or self.command_timeout):
                conn = await pool.acquire()
                try:
                    return await fn(conn)
                except BaseException as exc:
                    if _poisons_connection(exc):
                        conn.terminate()
                    raise
                finally:
                    await pool.release(conn)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            mapped = _map_exception(exc)
            if mapped is exc:
                raise
            raise mapped from exc

    async def _read(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        """Reads are idempotent: one retry when a pooled connection turned out to be dead."""
        try:
            return await self._with_conn(fn)
        except UnavailableError as exc:
            cause = exc.__cause__
            if cause is None or isinstance(cause, TimeoutError) or not _poisons_connection(cause):
                raise
            if self._pool is None:
                raise
            log.debug("retrying a read after %r", cause)
            return await self._with_conn(fn)

    async def _write(self, fn: Callable[[Any], Awaitable[T]], *, transaction: bool = False) -> T:
        """A write other than an append: one statement (its own transaction) or, with
        ``transaction``, ``fn`` inside BEGIN … COMMIT."""

        async def in_tx(conn: Any) -> T:
            await conn.execute("BEGIN")
            try:
                result = await fn(conn)
            except BaseException as exc:
                if _poisons_connection(exc):
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

    # ---- group commit ------------------------------------------------------------------------

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
        self._queue.append(_Append(fut, request, done))
        self._pending += 1
        self._wakeup.set()
        return fut

    async def _commit_loop(self) -> None:
        assert self._wakeup is not None
        queue = self._queue
        batch: list[_Append] = []
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
                    self._fail(batch, _map_exception(exc))
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
    def _fail(batch: list[_Append], err: BaseException) -> None:
        for e in batch:
            if e.result is None and e.error is None:
                e.error = err

    @staticmethod
    def _deliver(batch: list[_Append]) -> None:
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

    async def _commit_batch(self, batch: list[_Append]) -> None:
        self._counters.batch(len(batch))
        pending = batch
        for _round in range(_MAX_ROUNDS):
            # One occurrence of each dedup key per round; repeats get the first one's message.
            firsts: list[_Append] = []
            repeats: list[tuple[_Append, _Append]] = []
            seen: dict[tuple[int, bytes], _Append] = {}
            for e in pending:
                key = (e.request.sender_id, bytes(e.request.client_msg_id))
                first = seen.get(key)
                if first is None:
                    seen[key] = e
                    firsts.append(e)
                else:
                    repeats.append((e, first))
            await self._apply(firsts)
            nxt: list[_Append] = []
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

    async def _apply(self, entries: list[_Append]) -> None:
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
        rows: list[Any] | None = None
        for attempt in range(_MAX_TX_RETRIES + 1):
            try:
                rows = await self._with_conn(lambda conn: conn.fetch(sql, *args))
                break
            except RequestError as exc:
                cause = exc.__cause__
                if len(entries) > 1:
                    # One request's values broke the statement: store each on its own.
                    log.warning(
                        "append batch failed (%s); retrying its %d requests one by one", cause, len(entries)
                    )
                    await self._apply_isolated(entries)
                    return
                self._counters.failed_transactions += 1
                entries[0].error = exc
                return
            except UnavailableError as exc:
                cause = exc.__cause__
                if isinstance(cause, asyncpg.TransactionRollbackError) and attempt < _MAX_TX_RETRIES:
                    self._retried += 1
                    log.info("append batch rolled back (%s); retrying", cause)
                    continue
                self._counters.failed_transactions += 1
                log.warning("append batch failed, %d requests not acknowledged: %r", len(entries), cause)
                for e in entries:
                    e.error = exc
                return
        assert rows is not None
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

    async def _apply_isolated(self, entries: list[_Append]) -> None:
        for n, e in enumerate(entries):
            await self._apply([e])
            if isinstance(e.error, UnavailableError):
                for rest in entries[n + 1 :]:
                    rest.error = e.error
                return

    async def _explain(self, entries: list[_Append]) -> None:
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

    # ---- users -------------------------------------------------------------------------------

    async def create_user(self, username: str, password_hash: str) -> int:
        s = self._s
        uid = await self._write(
            lambda conn: conn.fetchval(
                f"INSERT INTO {s}.users (username, password_hash, created_ms) VALUES ($1, $2, $3)"
                " ON CONFLICT DO NOTHING RETURNING user_id",
                username,
                password_hash,
                now_ms(),
            )
        )
        if uid is None:
            raise RequestError("username is taken", code=ErrorCode.CONFLICT)
        return int(uid)

    async def get_user(self, user_id: int) -> UserRecord | None:
        _check_int64(user_id)
        s = self._s
        row = await self._read(
            lambda conn: conn.fetchrow(
                f"SELECT user_id, username, password_hash, created_ms FROM {s}.users WHERE user_id = $1",
                user_id,
            )
        )
        return UserRecord(*row) if row else None

    async def get_user_by_name(self, username: str) -> UserRecord | None:
        s = self._s
        row = await self._read(
            lambda conn: conn.fetchrow(
                f"SELECT user_id, username, password_hash, created_ms FROM {s}.users"
                " WHERE lower(username) = lower($1)",
                username,
            )
        )
        return UserRecord(*row) if row else None

    # ---- refresh tokens and revocation --------------------------------------------------------

    def _lock_sql(self, n: int) -> str:
        """Transaction-level advisory locks serialize a token family (or all of a user's
        families) between add / revoke, as SQLite's single writer does."""
        return "SELECT " + ", ".join(
            f"pg_advisory_xact_lock(hashtextextended(${i + 1}, 0))" for i in range(n)
        )

    def _family_key(self, family: str) -> str:
        return f"gochat.family:{self.schema}:{family}"

    def _user_key(self, user_id: int) -> str:
        return f"gochat.user-tokens:{self.schema}:{user_id}"

    async def add_refresh_token(self, jti: str, family: str, user_id: int, expires_ms: int) -> None:
        _check_int64(user_id, expires_ms)
        s = self._s

        async def job(conn: Any) -> None:
            await conn.execute(self._lock_sql(2), self._user_key(user_id), self._family_key(family))
            # A token added to an already revoked family (a refresh racing a reuse detection)
            # is born revoked.
            done = await conn.fetchval(
                f"INSERT INTO {s}.refresh_tokens (jti, family, user_id, expires_ms, spent, revoked)"
                " SELECT $1, $2, $3, $4, false,"
                f" EXISTS (SELECT 1 FROM {s}.refresh_tokens WHERE family = $2 AND revoked)"
                f" WHERE EXISTS (SELECT 1 FROM {s}.users WHERE user_id = $3)"
                " RETURNING 1",
                jti,
                family,
                user_id,
                expires_ms,
            )
            if done is None:
                raise RequestError("no such user", code=ErrorCode.NOT_FOUND)

        await self._write(job, transaction=True)

    async def use_refresh_token(self, jti: str, now_ms: int) -> tuple[str, str, int]:
        _check_int64(now_ms)
        s = self._s

        async def job(conn: Any) -> tuple[str, str, int]:
            row = await conn.fetchrow(
                f"UPDATE {s}.refresh_tokens SET spent = true"
                " WHERE jti = $1 AND NOT spent AND NOT revoked AND expires_ms > $2"
                " RETURNING family, user_id",
                jti,
                now_ms,
            )
            if row is not None:
                return RefreshStatus.OK, row[0], int(row[1])
            row = await conn.fetchrow(
                f"SELECT family, user_id, spent, revoked FROM {s}.refresh_tokens WHERE jti = $1", jti
            )
            if row is None:
                return RefreshStatus.UNKNOWN, "", 0
            family, user_id, spent, revoked = row
            if revoked:
                return RefreshStatus.REVOKED, family, int(user_id)
            if spent:
                return RefreshStatus.REUSED, family, int(user_id)
            return RefreshStatus.UNKNOWN, "", 0  # expired

        return await self._write(job)

    async def revoke_family(self, family: str) -> None:
        s = self._s

        async def job(conn: Any) -> None:
            await conn.execute(self._lock_sql(1), self._family_key(family))
            await conn.execute(
                f"UPDATE {s}.refresh_tokens SET revoked = true WHERE family = $1 AND NOT revoked", family
            )

        await self._write(job, transaction=True)

    async def revoke_user_tokens(self, user_id: int) -> None:
        _check_int64(user_id)
        s = self._s

        async def job(conn: Any) -> None:
            await conn.execute(self._lock_sql(1), self._user_key(user_id))
            await conn.execute(
                f"UPDATE {s}.refresh_tokens SET revoked = true WHERE user_id = $1 AND NOT revoked", user_id
            )

        await self._write(job, transaction=True)

    async def revoke_jti(self, jti: str, expires_ms: int) -> None:
        _check_int64(expires_ms)
        s = self._s
        await self._write(
            lambda conn: conn.execute(
                f"INSERT INTO {s}.revoked_jtis AS r (jti, expires_ms) VALUES ($1, $2)"
                " ON CONFLICT (jti) DO UPDATE SET expires_ms = GREATEST(r.expires_ms, excluded.expires_ms)",
                jti,
                expires_ms,
            )
        )

    async def revoked_jtis(self, now_ms: int) -> dict[str, int]:
        _check_int64(now_ms)
        s = self._s
        rows = await self._read(
            lambda conn: conn.fetch(
                f"SELECT jti, expires_ms FROM {s}.revoked_jtis WHERE expires_ms > $1", now_ms
            )
        )
        return {r[0]: int(r[1]) for r in rows}

    async def purge_expired(self, now_ms: int) -> tuple[int, int]:
        """Delete expired refresh tokens and deny-list entries; returns (tokens, jtis) deleted.
        (Also done at every open; call it periodically on long-running nodes.)"""
        _check_int64(now_ms)
        s = self._s
        row = await self._write(
            lambda conn: conn.fetchrow(
                f"WITH t AS (DELETE FROM {s}.refresh_tokens WHERE expires_ms <= $1 RETURNING 1),"
                f" j AS (DELETE FROM {s}.revoked_jtis WHERE expires_ms <= $1 RETURNING 1)"
                " SELECT (SELECT count(*) FROM t), (SELECT count(*) FROM j)",
                now_ms,
            )
        )
        return int(row[0]), int(row[1])

    # ---- conversations -------------------------------------------------------------------------

    async def direct_conversation(self, a: int, b: int) -> int:
        """Cached and single-flight (:class:`~gochat.store.common.DirectConversationCache`)."""
        return await self._direct.get(a, b)

    async def _direct_lookup(self, lo: int, hi: int) -> int:
        s = self._s
        find_sql = f"SELECT conv FROM {s}.conversations WHERE user_lo = $1 AND user_hi = $2"
        conv = await self._read(lambda conn: conn.fetchval(find_sql, lo, hi))
        if conv is None:
            users = [lo] if lo == hi else [lo, hi]
            row = await self._write(
                lambda conn: conn.fetchrow(
                    f"""
WITH u AS (SELECT count(*) AS n FROM {s}.users WHERE user_id = ANY($1::bigint[])),
ins AS (
    INSERT INTO {s}.conversations (kind, name, owner_id, created_ms, last_seq, user_lo, user_hi)
    SELECT 1, '', 0, $2, 0, $3, $4 FROM u WHERE u.n = $5
    ON CONFLICT (user_lo, user_hi) DO NOTHING
    RETURNING conv
),
mem AS (
    INSERT INTO {s}.members (user_id, conv, joined_ms, read_seq)
    SELECT x, ins.conv, $2, 0 FROM ins, unnest($1::bigint[]) AS x
    RETURNING 1
)
SELECT (SELECT n FROM u), (SELECT conv FROM ins)
""",
                    users,
                    now_ms(),
                    lo,
                    hi,
                    len(users),
                )
            )
            if row[0] < len(users):
                raise RequestError("no such user", code=ErrorCode.NOT_FOUND)
            conv = row[1]
            if conv is None:  # another node created it meanwhile
                conv = await self._read(lambda conn: conn.fetchval(find_sql, lo, hi))
                if conv is None:  # pragma: no cover - conversations are never deleted
                    raise UnavailableError("direct conversation vanished")
        return int(conv)

    async def create_group(self, owner_id: int, name: str, members: list[int]) -> GroupInfo:
        everyone = list(dict.fromkeys([owner_id, *members]))
        _check_int64(*everyone)
        s = self._s
        now = now_ms()
        row = await self._write(
            lambda conn: conn.fetchrow(
                f"""
WITH u AS (SELECT count(*) AS n FROM {s}.users WHERE user_id = ANY($1::bigint[])),
ins AS (
    INSERT INTO {s}.conversations (kind, name, owner_id, created_ms, last_seq)
    SELECT 2, $2, $3, $4, 0 FROM u WHERE u.n = $5
    RETURNING conv
),
mem AS (
    INSERT INTO {s}.members (user_id, conv, joined_ms, read_seq)
    SELECT x, ins.conv, $4, 0 FROM ins, unnest($1::bigint[]) AS x
    RETURNING 1
)
SELECT (SELECT n FROM u), (SELECT conv FROM ins)
""",
                everyone,
                name,
                owner_id,
                now,
                len(everyone),
            )
        )
        if row[1] is None:
            raise RequestError("no such user", code=ErrorCode.NOT_FOUND)
        return GroupInfo(
            conv=int(row[1]),
            name=name,
            owner_id=owner_id,
            created_ms=now,
            members=tuple(sorted(everyone)),
            last_seq=0,
        )

    async def group_info(self, conv: int) -> GroupInfo | None:
        _check_int64(conv)
        s = self._s
        row = await self._read(
            lambda conn: conn.fetchrow(
                f"SELECT c.name, c.owner_id, c.created_ms, c.last_seq,"
                f" ARRAY(SELECT user_id FROM {s}.members m WHERE m.conv = c.conv ORDER BY user_id)"
                f" FROM {s}.conversations c WHERE c.conv = $1 AND c.kind = 2",
                conv,
            )
        )
        if row is None:
            return None
        return GroupInfo(
            conv=conv,
            name=row[0],
            owner_id=int(row[1]),
            created_ms=int(row[2]),
            members=tuple(int(u) for u in row[4]),
            last_seq=int(row[3]),
        )

    async def add_member(self, conv: int, user_id: int) -> bool:
        _check_int64(conv, user_id)
        s = self._s
        # A new member starts with everything before the join marked read.
        row = await self._write(
            lambda conn: conn.fetchrow(
                f"""
WITH g AS (SELECT last_seq FROM {s}.conversations WHERE conv = $1 AND kind = 2),
u AS (SELECT 1 FROM {s}.users WHERE user_id = $2),
ins AS (
    INSERT INTO {s}.members (user_id, conv, joined_ms, read_seq)
    SELECT $2, $1, $3, g.last_seq FROM g, u
    ON CONFLICT DO NOTHING
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM g), EXISTS (SELECT 1 FROM u), EXISTS (SELECT 1 FROM ins)
""",
                conv,
                user_id,
                now_ms(),
            )
        )
        if not row[0]:
            raise RequestError("no such group", code=ErrorCode.NOT_FOUND)
        if not row[1]:
            raise RequestError("no such user", code=ErrorCode.NOT_FOUND)
        return bool(row[2])

    async def remove_member(self, conv: int, user_id: int) -> bool:
        _check_int64(conv, user_id)
        s = self._s
        row = await self._write(
            lambda conn: conn.fetchrow(
                f"""
WITH g AS (SELECT 1 FROM {s}.conversations WHERE conv = $1 AND kind = 2),
d AS (
    DELETE FROM {s}.members WHERE conv = $1 AND user_id = $2 AND EXISTS (SELECT 1 FROM g)
    RETURNING 1
)
SELECT EXISTS (SELECT 1 FROM g), EXISTS (SELECT 1 FROM d)
""",
                conv,
                user_id,
            )
        )
        if not row[0]:
            raise RequestError("no such group", code=ErrorCode.NOT_FOUND)
        return bool(row[1])

    async def members(self, conv: int) -> tuple[int, ...]:
        _check_int64(conv)
        s = self._s
        rows = await self._read(
            lambda conn: conn.fetch(f"SELECT user_id FROM {s}.members WHERE conv = $1 ORDER BY user_id", conv)
        )
        return tuple(int(r[0]) for r in rows)

    async def conversation_kind(self, conv: int) -> int | None:
        _check_int64(conv)
        s = self._s
        kind = await self._read(
            lambda conn: conn.fetchval(f"SELECT kind FROM {s}.conversations WHERE conv = $1", conv)
        )
        return None if kind is None else int(kind)

    async def conversations(self, user_id: int) -> list[ConversationState]:
        _check_int64(user_id)
        s = self._s
        rows = await self._read(
            lambda conn: conn.fetch(
                f"SELECT c.conv, c.kind, c.user_lo, c.user_hi, c.last_seq, m.read_seq, c.name"
                f" FROM {s}.members m JOIN {s}.conversations c ON c.conv = m.conv"
                " WHERE m.user_id = $1 ORDER BY c.conv",
                user_id,
            )
        )
        out = []
        for conv, kind, lo, hi, last_seq, read_seq, name in rows:
            peer = direct_peer(kind, lo, hi, user_id)
            out.append(ConversationState(int(conv), int(kind), int(peer), int(last_seq), int(read_seq), name))
        return out

    # ---- messages --------------------------------------------------------------------------------

    async def append(self, request: AppendRequest) -> AppendResult:
        _check_append(request)
        # Enqueued before the first await: call order is queue order is seq order.
        fut = self._submit(request)
        assert fut is not None
        return await fut

    def append_soon(self, request: AppendRequest, done: AppendCallback) -> None:
        _check_append(request)
        self._submit(request, done)

    async def history(
        self, conv: int, from_seq: int, limit: int, backward: bool
    ) -> tuple[list[StoredMessage], bool]:
        validate_history(from_seq, limit)
        _check_int64(conv)
        s = self._s
        limit = min(limit, MAX_SEQ - 1)
        from_seq = min(from_seq, MAX_SEQ)
        if backward:
            start = from_seq if from_seq > 0 else MAX_SEQ
            rows = await self._read(
                lambda conn: conn.fetch(
                    f"SELECT {MSG_COLUMNS} FROM {s}.messages m JOIN {s}.conversations c ON c.conv = m.conv"
                    " WHERE m.conv = $1 AND m.seq <= $2 ORDER BY m.seq DESC LIMIT $3",
                    conv,
                    start,
                    limit + 1,
                )
            )
        else:
            rows = await self._read(
                lambda conn: conn.fetch(
                    f"SELECT {MSG_COLUMNS} FROM {s}.messages m JOIN {s}.conversations c ON c.conv = m.conv"
                    " WHERE m.conv = $1 AND m.seq >= $2 ORDER BY m.seq LIMIT $3",
                    conv,
                    from_seq,
                    limit + 1,
                )
            )
        return history_page(rows, limit, backward)

    async def set_read(self, conv: int, user_id: int, seq: int) -> int:
        _check_int64(conv, user_id)
        seq = min(max(seq, 0), MAX_SEQ)
        s = self._s
        row = await self._write(
            lambda conn: conn.fetchrow(
                f"""
WITH cur AS (
    SELECT m.read_seq, c.last_seq FROM {s}.members m JOIN {s}.conversations c ON c.conv = m.conv
    WHERE m.conv = $1 AND m.user_id = $2
),
upd AS (
    UPDATE {s}.members m SET read_seq = LEAST($3, cur.last_seq) FROM cur
    WHERE m.conv = $1 AND m.user_id = $2 AND m.read_seq < LEAST($3, cur.last_seq)
    RETURNING m.read_seq
)
SELECT (SELECT read_seq FROM upd), (SELECT GREATEST(read_seq, LEAST($3, last_seq)) FROM cur),
       EXISTS (SELECT 1 FROM {s}.conversations WHERE conv = $1)
""",
                conv,
                user_id,
                seq,
            )
        )
        if row[0] is not None:
            return int(row[0])
        if row[1] is not None:
            return int(row[1])
        if not row[2]:
            raise RequestError("no such conversation", code=ErrorCode.NOT_FOUND)
        raise RequestError("not a member of the conversation", code=ErrorCode.NOT_MEMBER)
