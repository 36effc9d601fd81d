"""Messages on PostgreSQL: appends (queued for the group commit), history, read positions.

The statement that stores appends is :class:`~gochat.store.postgres.commit.GroupCommit`'s; this
module validates and queues them before the first await (call order is queue order is seq
order)."""

from __future__ import annotations

from gochat.errors import ErrorCode, RequestError
from gochat.store.base import AppendCallback, AppendRequest, AppendResult, StoredMessage
from gochat.store.common import MAX_SEQ, MSG_COLUMNS, history_page, validate_history
from gochat.store.postgres.commit import check_append
from gochat.store.postgres.engine import PostgresEngine
from gochat.store.postgres.pool import check_int64

__all__ = ["MessageRepository"]


class MessageRepository(PostgresEngine):
    """The :class:`~gochat.store.base.MessageStore` methods of
    :class:`~gochat.store.postgres.PostgresStore`."""

    async def append(self, request: AppendRequest) -> AppendResult:
        check_append(request)
        # Enqueued before the first await: call order is queue order is seq order.
        fut = self._submit(request)
        assert fut is not None
        return await fut

    def append_soon(self, request: AppendRequest, done: AppendCallback) -> None:
        check_append(request)
        self._submit(request, done)

    async def history(
        self, conv: int, from_seq: int, limit: int, backward: bool
    ) -> tuple[list[StoredMessage], bool]:
        validate_history(from_seq, limit)
        check_int64(conv)
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
        check_int64(conv, user_id)
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
