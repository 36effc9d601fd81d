"""The hot queries of the PostgreSQL store: the statements its repositories run most, with the
indexes each must use and parameter values to plan it with (``gochat doctor`` plans them).

Kept next to the schema (:mod:`.schema`) and checked against the code by
``tests/test_slow_queries.py``: the store, run with every statement timed, runs each of these
(same fingerprint), and every index named here is created by the migrations.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Final, cast

from gochat.observability.findings import HotQuery
from gochat.store.common import MSG_COLUMNS
from gochat.store.postgres.commit import GroupCommit

__all__ = ["HOT_QUERIES", "hot_queries"]

_HISTORY = f"SELECT {MSG_COLUMNS} FROM {{s}}.messages m JOIN {{s}}.conversations c ON c.conv = m.conv"
_CMID = b"\0" * 16

#: the explain read of commit.py (``GroupCommit._explain``): appends the statement did not store
_APPEND_EXPLAIN = f"""
SELECT r.ord, c2.kind AS req_kind, {MSG_COLUMNS}
FROM unnest($1::bigint[], $2::bytea[], $3::bigint[], $4::integer[]) AS r(sender_id, client_msg_id, conv, ord)
LEFT JOIN {{s}}.message_keys k ON k.sender_id = r.sender_id AND k.client_msg_id = r.client_msg_id
LEFT JOIN {{s}}.messages m ON m.conv = k.conv AND m.msg_id = k.msg_id
LEFT JOIN {{s}}.conversations c ON c.conv = m.conv
LEFT JOIN {{s}}.conversations c2 ON c2.conv = r.conv
"""

HOT_QUERIES: Final[tuple[HotQuery, ...]] = (
    HotQuery(
        "append",
        "<group commit>",  # GroupCommit._build_append_sql(), see hot_queries()
        ([1], [1], [1], [_CMID], [1], [1], [b""], [0], 0),
        # its dedup rests on message_keys_pkey through ON CONFLICT DO NOTHING, which EXPLAIN does
        # not show (the arbiters are inferred when it runs): the indexes check covers that one
        ("conversations_pkey",),
        "the group-commit statement: the conversation rows of the batch",
    ),
    HotQuery(
        "append_dedup",
        _APPEND_EXPLAIN,
        ([1], [_CMID], [1], [0]),
        ("message_keys_pkey", "conversations_pkey"),
        "the dedup lookup of appends the statement did not store (duplicates)",
    ),
    HotQuery(
        "history_backward",
        _HISTORY + " WHERE m.conv = $1 AND m.seq <= $2 ORDER BY m.seq DESC LIMIT $3",
        (1, 100, 51),
        ("messages_pkey", "conversations_pkey"),
        "HISTORY paging back (the newest page first)",
    ),
    HotQuery(
        "history_forward",
        _HISTORY + " WHERE m.conv = $1 AND m.seq >= $2 ORDER BY m.seq LIMIT $3",
        (1, 1, 51),
        ("messages_pkey", "conversations_pkey"),
        "HISTORY and SYNC paging forward",
    ),
    HotQuery(
        "members_by_conv",
        "SELECT user_id FROM {s}.members WHERE conv = $1 ORDER BY user_id",
        (1,),
        ("members_conv",),
        "a group's members (fan-out, membership cache loads)",
    ),
    HotQuery(
        "members_versioned",
        "SELECT c.members_version,"
        " ARRAY(SELECT user_id FROM {s}.members m WHERE m.conv = c.conv ORDER BY user_id)"
        " FROM {s}.conversations c WHERE c.conv = $1",
        (1,),
        ("conversations_pkey", "members_conv"),
        "a group's members with its membership version (the addressing cache)",
    ),
    HotQuery(
        "conversations_of_user",
        "SELECT c.conv, c.kind, c.user_lo, c.user_hi, c.last_seq, m.read_seq, c.name"
        " FROM {s}.members m JOIN {s}.conversations c ON c.conv = m.conv"
        " WHERE m.user_id = $1 ORDER BY c.conv",
        (1,),
        ("members_pkey",),
        "SYNC and conversation.list: every conversation of a user",
    ),
    HotQuery(
        "direct_conversation",
        "SELECT conv FROM {s}.conversations WHERE user_lo = $1 AND user_hi = $2",
        (1, 2),
        ("conversations_user_lo_user_hi_key",),
        "the direct conversation of two users",
    ),
    HotQuery(
        "user_by_name",
        "SELECT user_id, username, password_hash, created_ms FROM {s}.users WHERE lower(username) = lower($1)",
        ("alice",),
        ("users_username_lower",),
        "login",
    ),
    HotQuery(
        "refresh_token",
        "UPDATE {s}.refresh_tokens SET spent = true"
        " WHERE jti = $1 AND NOT spent AND NOT revoked AND expires_ms > $2 RETURNING family, user_id",
        ("0" * 64, 0),
        ("refresh_tokens_pkey",),
        "token refresh",
    ),
    HotQuery(
        "revoke_family",
        "UPDATE {s}.refresh_tokens SET revoked = true WHERE family = $1 AND NOT revoked",
        ("f",),
        ("refresh_tokens_family",),
        "refresh-token reuse detection and logout",
    ),
    HotQuery(
        "revoke_user_tokens",
        "UPDATE {s}.refresh_tokens SET revoked = true WHERE user_id = $1 AND NOT revoked",
        (1,),
        ("refresh_tokens_user",),
        "logout everywhere",
    ),
    HotQuery(
        "expired_tokens_purge",
        "WITH t AS (DELETE FROM {s}.refresh_tokens WHERE expires_ms <= $1 RETURNING 1),"
        " j AS (DELETE FROM {s}.revoked_jtis WHERE expires_ms <= $1 RETURNING 1)"
        " SELECT (SELECT count(*) FROM t), (SELECT count(*) FROM j)",
        (0,),
        ("refresh_tokens_expires", "revoked_jtis_expires"),
        "the purge of expired refresh tokens and revoked jtis (the deny-list)",
    ),
    HotQuery(
        "recent_groups",
        "SELECT r.conv FROM (SELECT conv, max(msg_id) AS last FROM"
        " (SELECT conv, msg_id FROM {s}.messages ORDER BY msg_id DESC LIMIT $2) m GROUP BY conv) r"
        " JOIN {s}.conversations c ON c.conv = r.conv WHERE c.kind = 2 ORDER BY r.last DESC LIMIT $1",
        (1000, 100_000),
        ("messages_msg_id",),
        "the cache warm-up of a starting node (the newest messages)",
    ),
)


def hot_queries(quoted_schema: str) -> list[HotQuery]:
    """:data:`HOT_QUERIES` with the schema filled in (the append statement is the store's own)."""
    append_sql = GroupCommit._build_append_sql(cast(Any, SimpleNamespace(_s=quoted_schema)))
    return [
        HotQuery(q.name, append_sql if q.name == "append" else q.sql.replace("{s}", quoted_schema), q.params, q.indexes, q.purpose)
        for q in HOT_QUERIES
    ]
