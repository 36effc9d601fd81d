"""PostgreSQL schema: versioned migrations, the schema name check and :func:`migrate`.

``MIGRATIONS[i]`` migrates version ``i`` to ``i + 1``; :func:`migrate_schema` applies the missing
ones, each in one transaction under an advisory lock keyed by the schema name, so nodes starting
at once apply each migration exactly once. :func:`migrate` is ``gochat migrate``.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any, Final

import asyncpg

from gochat.clock import now_ms
from gochat.errors import GochatError, UnavailableError
from gochat.store.common import unavailable

__all__ = ["MESSAGE_PARTITIONS", "MIGRATIONS", "SCHEMA_VERSION", "check_schema", "migrate", "migrate_schema"]

log = logging.getLogger("gochat.store.postgres")

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
    # ---- version 2 ------------------------------------------------------------------------
    # A group's membership version: other nodes drop their cached member list only for an
    # event newer than what they hold (docs/consistency.md, Event bus).
    """
    ALTER TABLE {s}.conversations ADD COLUMN members_version bigint NOT NULL DEFAULT 1;
    """,
    # ---- version 3 ------------------------------------------------------------------------
    # A group's membership fence: the highest lock fence a membership write has carried (0:
    # none yet). A write with a lower fence was made under a lock that has expired and been
    # taken since, and is refused (docs/consistency.md, Distributed locks).
    """
    ALTER TABLE {s}.conversations ADD COLUMN members_fence bigint NOT NULL DEFAULT 0;
    """,
)
SCHEMA_VERSION: Final = len(MIGRATIONS)


def check_schema(schema: str) -> str:
    if not _SCHEMA_NAME.match(schema):
        raise ValueError(f"schema must match {_SCHEMA_NAME.pattern}, got {schema!r}")
    return f'"{schema}"'


async def migrate_schema(conn: Any, schema: str) -> int:
    """Bring ``schema`` to :data:`SCHEMA_VERSION`; returns the resulting version.

    Every step runs in one transaction holding a transaction-level advisory lock keyed by the
    schema name, so nodes that start at once apply each migration exactly once (the others
    wait, then find it done). A schema newer than this code is refused."""
    s = check_schema(schema)
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
    check_schema(schema)
    try:
        async with asyncio.timeout(timeout):
            conn = await asyncpg.connect(dsn)
            try:
                return await migrate_schema(conn, schema)
            finally:
                await conn.close()
    except GochatError:
        raise
    except Exception as exc:
        raise unavailable(exc, f"cannot migrate PostgreSQL schema {schema!r}: {exc}") from exc
