"""SQLite schema: versioned migrations and the code that applies them.

``MIGRATIONS[i]`` migrates the schema from version ``i`` to ``i + 1``. :func:`migrate` runs each
missing one in its own ``BEGIN IMMEDIATE`` transaction together with the ``schema_version`` row
that records it, so a crash mid-migration leaves the previous version intact and concurrent
starters apply each migration once. A database newer than this code is refused.
"""

from __future__ import annotations

import logging
import sqlite3
from typing import Final

from gochat.clock import now_ms
from gochat.errors import UnavailableError

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "migrate"]

log = logging.getLogger("gochat.store.sqlite")

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
    # ---- version 3 ------------------------------------------------------------------------
    # A group's membership version: other nodes drop their cached member list only for an
    # event newer than what they hold (docs/consistency.md, Event bus).
    """
    ALTER TABLE conversations ADD COLUMN members_version INTEGER NOT NULL DEFAULT 1;
    """,
    # ---- version 4 ------------------------------------------------------------------------
    # A group's membership fence: the highest lock fence a membership write has carried (0:
    # none yet). A write with a lower fence was made under a lock that has expired and been
    # taken since, and is refused (docs/consistency.md, Distributed locks).
    """
    ALTER TABLE conversations ADD COLUMN members_fence INTEGER NOT NULL DEFAULT 0;
    """,
)
SCHEMA_VERSION: Final = len(MIGRATIONS)


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


def migrate(conn: sqlite3.Connection) -> None:
    """Bring the database on ``conn`` (the writer's connection) to :data:`SCHEMA_VERSION`.

    Reads :data:`MIGRATIONS` and :data:`SCHEMA_VERSION` of this module at call time."""
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
