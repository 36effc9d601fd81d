"""Direct conversations, groups, membership and the conversation list on PostgreSQL."""

from __future__ import annotations

from gochat.clock import now_ms
from gochat.errors import ErrorCode, RequestError, UnavailableError
from gochat.store.base import ConversationState, GroupInfo, StaleFenceError
from gochat.store.common import direct_peer
from gochat.store.postgres.engine import PostgresEngine
from gochat.store.postgres.pool import check_int64

__all__ = ["ConversationRepository"]


class ConversationRepository(PostgresEngine):
    """The :class:`~gochat.store.base.ConversationStore` methods of
    :class:`~gochat.store.postgres.PostgresStore`."""

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
        check_int64(*everyone)
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
        check_int64(conv)
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

    # Membership writes are one statement each. ``g`` locks the group's row (FOR UPDATE), so
    # the fence check and the write see the latest stored fence even when another writer
    # commits meanwhile; ``f`` is the group when the fence passes (or none was given).

    async def add_member(self, conv: int, user_id: int, fence: int | None = None) -> bool:
        check_int64(conv, user_id)
        if fence is not None:
            check_int64(fence)
        s = self._s
        # A new member starts with everything before the join marked read.
        row = await self._write(
            lambda conn: conn.fetchrow(
                f"""
WITH g AS (
    SELECT last_seq, members_fence FROM {s}.conversations WHERE conv = $1 AND kind = 2 FOR UPDATE
),
f AS (SELECT 1 FROM g WHERE $4::bigint IS NULL OR g.members_fence <= $4::bigint),
u AS (SELECT 1 FROM {s}.users WHERE user_id = $2),
ins AS (
    INSERT INTO {s}.members (user_id, conv, joined_ms, read_seq)
    SELECT $2, $1, $3, g.last_seq FROM g, u, f
    ON CONFLICT DO NOTHING
    RETURNING 1
),
v AS (
    UPDATE {s}.conversations
    SET members_version = members_version + (SELECT count(*) FROM ins),
        members_fence = GREATEST(members_fence, COALESCE($4::bigint, 0))
    WHERE conv = $1 AND EXISTS (SELECT 1 FROM f)
      AND (EXISTS (SELECT 1 FROM ins) OR members_fence < $4::bigint)
    RETURNING 1
)
SELECT (SELECT members_fence FROM g), EXISTS (SELECT 1 FROM f), EXISTS (SELECT 1 FROM u),
       EXISTS (SELECT 1 FROM ins)
""",
                conv,
                user_id,
                now_ms(),
                fence,
            )
        )
        if row[0] is None:
            raise RequestError("no such group", code=ErrorCode.NOT_FOUND)
        if not row[1]:
            assert fence is not None
            raise StaleFenceError(conv, fence, int(row[0]))
        if not row[2]:
            raise RequestError("no such user", code=ErrorCode.NOT_FOUND)
        return bool(row[3])

    async def remove_member(self, conv: int, user_id: int, fence: int | None = None) -> bool:
        check_int64(conv, user_id)
        if fence is not None:
            check_int64(fence)
        s = self._s
        row = await self._write(
            lambda conn: conn.fetchrow(
                f"""
WITH g AS (SELECT members_fence FROM {s}.conversations WHERE conv = $1 AND kind = 2 FOR UPDATE),
f AS (SELECT 1 FROM g WHERE $3::bigint IS NULL OR g.members_fence <= $3::bigint),
d AS (
    DELETE FROM {s}.members WHERE conv = $1 AND user_id = $2 AND EXISTS (SELECT 1 FROM f)
    RETURNING 1
),
v AS (
    UPDATE {s}.conversations
    SET members_version = members_version + (SELECT count(*) FROM d),
        members_fence = GREATEST(members_fence, COALESCE($3::bigint, 0))
    WHERE conv = $1 AND EXISTS (SELECT 1 FROM f)
      AND (EXISTS (SELECT 1 FROM d) OR members_fence < $3::bigint)
    RETURNING 1
)
SELECT (SELECT members_fence FROM g), EXISTS (SELECT 1 FROM f), EXISTS (SELECT 1 FROM d)
""",
                conv,
                user_id,
                fence,
            )
        )
        if row[0] is None:
            raise RequestError("no such group", code=ErrorCode.NOT_FOUND)
        if not row[1]:
            assert fence is not None
            raise StaleFenceError(conv, fence, int(row[0]))
        return bool(row[2])

    async def members_versioned(self, conv: int) -> tuple[int, tuple[int, ...]]:
        check_int64(conv)
        s = self._s
        # one statement: one snapshot of the version and the members
        row = await self._read(
            lambda conn: conn.fetchrow(
                f"SELECT c.members_version,"
                f" ARRAY(SELECT user_id FROM {s}.members m WHERE m.conv = c.conv ORDER BY user_id)"
                f" FROM {s}.conversations c WHERE c.conv = $1",
                conv,
            )
        )
        if row is None:
            return 0, ()
        return int(row[0]), tuple(int(u) for u in row[1])

    async def members(self, conv: int) -> tuple[int, ...]:
        check_int64(conv)
        s = self._s
        rows = await self._read(
            lambda conn: conn.fetch(f"SELECT user_id FROM {s}.members WHERE conv = $1 ORDER BY user_id", conv)
        )
        return tuple(int(r[0]) for r in rows)

    async def conversation_kind(self, conv: int) -> int | None:
        check_int64(conv)
        s = self._s
        kind = await self._read(
            lambda conn: conn.fetchval(f"SELECT kind FROM {s}.conversations WHERE conv = $1", conv)
        )
        return None if kind is None else int(kind)

    async def conversations(self, user_id: int) -> list[ConversationState]:
        check_int64(user_id)
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

    async def recent_groups(self, limit: int, scan: int = 100_000) -> list[int]:
        if limit <= 0 or scan <= 0:
            return []
        check_int64(limit, scan)
        s = self._s
        # the newest `scan` messages: a backward walk of each partition's msg_id index, merged
        rows = await self._read(
            lambda conn: conn.fetch(
                f"SELECT r.conv FROM (SELECT conv, max(msg_id) AS last FROM"
                f" (SELECT conv, msg_id FROM {s}.messages ORDER BY msg_id DESC LIMIT $2) m GROUP BY conv) r"
                f" JOIN {s}.conversations c ON c.conv = r.conv WHERE c.kind = 2 ORDER BY r.last DESC LIMIT $1",
                limit,
                scan,
            )
        )
        return [int(r[0]) for r in rows]
