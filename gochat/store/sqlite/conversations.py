"""Direct conversations, groups, membership and the conversation list on SQLite."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable

from gochat.clock import now_ms
from gochat.errors import ErrorCode, RequestError
from gochat.store.base import ConversationState, GroupInfo, StaleFenceError
from gochat.store.common import direct_peer
from gochat.store.sqlite.engine import SQLiteEngine

__all__ = ["ConversationRepository"]

_MIN_INT64, _MAX_INT64 = -(2**63), 2**63 - 1


class ConversationRepository(SQLiteEngine):
    """The :class:`~gochat.store.base.ConversationStore` methods of
    :class:`~gochat.store.sqlite.SQLiteStore`."""

    @staticmethod
    def _missing_users(conn: sqlite3.Connection, user_ids: Iterable[int]) -> list[int]:
        return [
            uid
            for uid in dict.fromkeys(user_ids)
            if conn.execute("SELECT 1 FROM users WHERE user_id = ?", (uid,)).fetchone() is None
        ]

    async def direct_conversation(self, a: int, b: int) -> int:
        """Cached and single-flight (:class:`~gochat.store.common.DirectConversationCache`)."""
        return await self._direct.get(a, b)

    async def _direct_lookup(self, lo: int, hi: int) -> int:
        def find(conn: sqlite3.Connection) -> int | None:
            row = conn.execute(
                "SELECT conv FROM conversations WHERE user_lo = ? AND user_hi = ?", (lo, hi)
            ).fetchone()
            return None if row is None else int(row[0])

        conv = await self._read(find)
        if conv is not None:
            return conv

        def create(conn: sqlite3.Connection) -> int:
            existing = find(conn)
            if existing is not None:
                return existing
            if self._missing_users(conn, (lo, hi)):
                raise RequestError("no such user", code=ErrorCode.NOT_FOUND)
            now = now_ms()
            cur = conn.execute(
                "INSERT INTO conversations (kind, name, owner_id, created_ms, last_seq, user_lo, user_hi)"
                " VALUES (1, '', 0, ?, 0, ?, ?)",
                (now, lo, hi),
            )
            new_conv = cur.lastrowid
            assert new_conv is not None
            conn.executemany(
                "INSERT OR IGNORE INTO members (conv, user_id, joined_ms, read_seq) VALUES (?, ?, ?, 0)",
                [(new_conv, lo, now), (new_conv, hi, now)],
            )
            return new_conv

        return await self._write(create)

    @staticmethod
    def _group_info(conn: sqlite3.Connection, conv: int) -> GroupInfo | None:
        row = conn.execute(
            "SELECT name, owner_id, created_ms, last_seq FROM conversations WHERE conv = ? AND kind = 2",
            (conv,),
        ).fetchone()
        if row is None:
            return None
        members = tuple(
            r[0] for r in conn.execute("SELECT user_id FROM members WHERE conv = ? ORDER BY user_id", (conv,))
        )
        return GroupInfo(
            conv=conv, name=row[0], owner_id=row[1], created_ms=row[2], members=members, last_seq=row[3]
        )

    async def create_group(self, owner_id: int, name: str, members: list[int]) -> GroupInfo:
        def job(conn: sqlite3.Connection) -> GroupInfo:
            everyone = [owner_id, *members]
            if self._missing_users(conn, everyone):
                raise RequestError("no such user", code=ErrorCode.NOT_FOUND)
            now = now_ms()
            cur = conn.execute(
                "INSERT INTO conversations (kind, name, owner_id, created_ms, last_seq) VALUES (2, ?, ?, ?, 0)",
                (name, owner_id, now),
            )
            conv = cur.lastrowid
            assert conv is not None
            conn.executemany(
                "INSERT INTO members (conv, user_id, joined_ms, read_seq) VALUES (?, ?, ?, 0)",
                [(conv, uid, now) for uid in dict.fromkeys(everyone)],
            )
            info = self._group_info(conn, conv)
            assert info is not None
            return info

        return await self._write(job)

    async def group_info(self, conv: int) -> GroupInfo | None:
        return await self._read(lambda conn: self._group_info(conn, conv))

    @staticmethod
    def _require_group(conn: sqlite3.Connection, conv: int, fence: int | None) -> int:
        """The group's last_seq; NOT_FOUND when there is no such group, StaleFenceError when
        ``fence`` is below the group's stored fence."""
        if fence is not None and (not isinstance(fence, int) or not _MIN_INT64 <= fence <= _MAX_INT64):
            raise RequestError("fence out of range", code=ErrorCode.BAD_REQUEST)
        row = conn.execute(
            "SELECT last_seq, members_fence FROM conversations WHERE conv = ? AND kind = 2", (conv,)
        ).fetchone()
        if row is None:
            raise RequestError("no such group", code=ErrorCode.NOT_FOUND)
        if fence is not None and fence < row[1]:
            raise StaleFenceError(conv, fence, int(row[1]))
        return int(row[0])

    async def add_member(self, conv: int, user_id: int, fence: int | None = None) -> bool:
        def job(conn: sqlite3.Connection) -> bool:
            last_seq = self._require_group(conn, conv, fence)
            if self._missing_users(conn, (user_id,)):
                raise RequestError("no such user", code=ErrorCode.NOT_FOUND)
            # A new member starts with everything before the join marked read.
            cur = conn.execute(
                "INSERT OR IGNORE INTO members (conv, user_id, joined_ms, read_seq) VALUES (?, ?, ?, ?)",
                (conv, user_id, now_ms(), last_seq),
            )
            changed = cur.rowcount == 1
            self._bump_members(conn, conv, changed, fence)
            return changed

        return await self._write(job)

    async def remove_member(self, conv: int, user_id: int, fence: int | None = None) -> bool:
        def job(conn: sqlite3.Connection) -> bool:
            self._require_group(conn, conv, fence)
            cur = conn.execute("DELETE FROM members WHERE conv = ? AND user_id = ?", (conv, user_id))
            changed = cur.rowcount == 1
            self._bump_members(conn, conv, changed, fence)
            return changed

        return await self._write(job)

    @staticmethod
    def _bump_members(conn: sqlite3.Connection, conv: int, changed: bool, fence: int | None) -> None:
        """In the write's transaction: the version grows by one if the membership changed; the
        stored fence becomes ``fence`` if that is higher (a no-op write under the lock counts)."""
        if fence is None and not changed:
            return
        conn.execute(
            "UPDATE conversations SET members_version = members_version + ?,"
            " members_fence = MAX(members_fence, ?) WHERE conv = ?",
            (int(changed), fence if fence is not None else 0, conv),
        )

    async def members_versioned(self, conv: int) -> tuple[int, tuple[int, ...]]:
        def read(conn: sqlite3.Connection) -> tuple[int, tuple[int, ...]]:
            # one statement: one snapshot of the version and the members
            rows = conn.execute(
                "SELECT c.members_version, m.user_id FROM conversations c"
                " LEFT JOIN members m ON m.conv = c.conv WHERE c.conv = ? ORDER BY m.user_id",
                (conv,),
            ).fetchall()
            if not rows:
                return 0, ()
            return int(rows[0][0]), tuple(r[1] for r in rows if r[1] is not None)

        return await self._read(read)

    async def members(self, conv: int) -> tuple[int, ...]:
        def read(conn: sqlite3.Connection) -> tuple[int, ...]:
            rows = conn.execute("SELECT user_id FROM members WHERE conv = ? ORDER BY user_id", (conv,))
            return tuple(r[0] for r in rows)

        return await self._read(read)

    async def conversation_kind(self, conv: int) -> int | None:
        def read(conn: sqlite3.Connection) -> int | None:
            row = conn.execute("SELECT kind FROM conversations WHERE conv = ?", (conv,)).fetchone()
            return None if row is None else int(row[0])

        return await self._read(read)

    async def conversations(self, user_id: int) -> list[ConversationState]:
        def read(conn: sqlite3.Connection) -> list[ConversationState]:
            rows = conn.execute(
                "SELECT c.conv, c.kind, c.user_lo, c.user_hi, c.last_seq, m.read_seq, c.name"
                " FROM members m JOIN conversations c ON c.conv = m.conv"
                " WHERE m.user_id = ? ORDER BY c.conv",
                (user_id,),
            )
            out = []
            for conv, kind, lo, hi, last_seq, read_seq, name in rows:
                peer = direct_peer(kind, lo, hi, user_id)
                out.append(ConversationState(conv, kind, peer, last_seq, read_seq, name))
            return out

        return await self._read(read)

    async def recent_groups(self, limit: int, scan: int = 100_000) -> list[int]:
        if limit <= 0 or scan <= 0:
            return []

        def read(conn: sqlite3.Connection) -> list[int]:
            # messages are keyed by msg_id: the newest `scan` are a reverse walk of the table
            rows = conn.execute(
                "SELECT r.conv FROM (SELECT conv, MAX(msg_id) AS last FROM"
                " (SELECT conv, msg_id FROM messages ORDER BY msg_id DESC LIMIT ?) GROUP BY conv) r"
                " JOIN conversations c ON c.conv = r.conv WHERE c.kind = 2 ORDER BY r.last DESC LIMIT ?",
                (scan, limit),
            )
            return [int(r[0]) for r in rows]

        return await self._read(read)
