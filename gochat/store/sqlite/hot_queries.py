"""The hot queries of the SQLite store: the statements its repositories run most, with the
indexes each must use and parameter values to plan it with (``gochat doctor`` plans them with
``EXPLAIN QUERY PLAN``). A query listing no index must still find its rows through a primary
key: any full scan (``SCAN``) is a finding.

Kept next to the schema (:mod:`.schema`) and checked against the code by
``tests/test_slow_queries.py``: the store, run with every statement timed, runs each of these
(same fingerprint), and every index named here is created by the migrations.
"""

from __future__ import annotations

from typing import Final

from gochat.observability.findings import HotQuery
from gochat.store.common import MSG_COLUMNS

__all__ = ["HOT_QUERIES"]

_HISTORY = f"SELECT {MSG_COLUMNS} FROM messages m JOIN conversations c ON c.conv = m.conv"

HOT_QUERIES: Final[tuple[HotQuery, ...]] = (
    HotQuery(
        "history_backward",
        _HISTORY + " WHERE m.conv = ? AND m.seq <= ? ORDER BY m.seq DESC LIMIT ?",
        (1, 100, 51),
        ("sqlite_autoindex_messages_1",),
        "HISTORY paging back (the newest page first)",
    ),
    HotQuery(
        "history_forward",
        _HISTORY + " WHERE m.conv = ? AND m.seq >= ? ORDER BY m.seq LIMIT ?",
        (1, 1, 51),
        ("sqlite_autoindex_messages_1",),
        "HISTORY and SYNC paging forward",
    ),
    HotQuery(
        "append_dedup",
        _HISTORY + " WHERE m.sender_id = ? AND m.client_msg_id = ?",
        (1, b"\0" * 16),
        ("sqlite_autoindex_messages_2",),
        "the dedup lookup of an append that meets a (sender, client_msg_id) already stored",
    ),
    HotQuery(
        "append_conversation",
        "SELECT kind, last_seq FROM conversations WHERE conv = ?",
        (1,),
        (),
        "the conversation row of an append (rowid)",
    ),
    HotQuery(
        "members_by_conv",
        "SELECT user_id FROM members WHERE conv = ? ORDER BY user_id",
        (1,),
        (),
        "a group's members (fan-out, membership cache loads; primary key)",
    ),
    HotQuery(
        "members_versioned",
        "SELECT c.members_version, m.user_id FROM conversations c"
        " LEFT JOIN members m ON m.conv = c.conv WHERE c.conv = ? ORDER BY m.user_id",
        (1,),
        (),
        "a group's members with its membership version (the addressing cache)",
    ),
    HotQuery(
        "conversations_of_user",
        "SELECT c.conv, c.kind, c.user_lo, c.user_hi, c.last_seq, m.read_seq, c.name"
        " FROM members m JOIN conversations c ON c.conv = m.conv"
        " WHERE m.user_id = ? ORDER BY c.conv",
        (1,),
        ("members_user",),
        "SYNC and conversation.list: every conversation of a user",
    ),
    HotQuery(
        "direct_conversation",
        "SELECT conv FROM conversations WHERE user_lo = ? AND user_hi = ?",
        (1, 2),
        ("sqlite_autoindex_conversations_1",),
        "the direct conversation of two users",
    ),
    HotQuery(
        "user_by_name",
        "SELECT user_id, username, password_hash, created_ms FROM users WHERE username = ?",
        ("alice",),
        ("sqlite_autoindex_users_1",),
        "login",
    ),
    HotQuery(
        "refresh_token",
        "SELECT family, user_id, expires_ms, spent, revoked FROM refresh_tokens WHERE jti = ?",
        ("0" * 64,),
        ("sqlite_autoindex_refresh_tokens_1",),
        "token refresh",
    ),
    HotQuery(
        "revoke_family",
        "UPDATE refresh_tokens SET revoked = 1 WHERE family = ? AND revoked = 0",
        ("f",),
        ("refresh_tokens_family",),
        "refresh-token reuse detection and logout",
    ),
    HotQuery(
        "revoke_user_tokens",
        "UPDATE refresh_tokens SET revoked = 1 WHERE user_id = ? AND revoked = 0",
        (1,),
        ("refresh_tokens_user",),
        "logout everywhere",
    ),
    HotQuery(
        "revoked_jtis_purge",
        "DELETE FROM revoked_jtis WHERE expires_ms <= ?",
        (0,),
        ("revoked_jtis_expires",),
        "the purge of expired revoked jtis (the deny-list)",
    ),
    HotQuery(
        "refresh_tokens_purge",
        "DELETE FROM refresh_tokens WHERE expires_ms <= ?",
        (0,),
        ("refresh_tokens_expires",),
        "the purge of expired refresh tokens",
    ),
)
