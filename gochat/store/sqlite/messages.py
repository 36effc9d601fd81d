"""Messages on SQLite: appends (queued for the writer's group commit), history, read positions.

The transaction that stores appends is :class:`~gochat.store.sqlite.commit.GroupCommit`; this
module only validates and queues them (``append_soon`` is the SEND fast path: no coroutine,
Task or Future per message)."""

from __future__ import annotations

import sqlite3

from gochat.errors import ErrorCode, RequestError, UnavailableError
from gochat.store.base import AppendCallback, AppendRequest, AppendResult, StoredMessage
from gochat.store.common import MAX_SEQ, MSG_COLUMNS, history_page, validate_append, validate_history
from gochat.store.sqlite.commit import AppendEntry
from gochat.store.sqlite.engine import SQLiteEngine

__all__ = ["MessageRepository"]


class MessageRepository(SQLiteEngine):
    """The :class:`~gochat.store.base.MessageStore` methods of :class:`~gochat.store.sqlite.SQLiteStore`."""

    async def append(self, request: AppendRequest) -> AppendResult:
        validate_append(request)
        result: AppendResult = await self._submit(lambda loop, fut: AppendEntry(loop, fut, request))
        return result

    def append_soon(self, request: AppendRequest, done: AppendCallback) -> None:
        validate_append(request)
        loop = self._open_loop
        if loop is None:
            raise UnavailableError("store is closed")
        self._enqueue(AppendEntry(loop, None, request, done))

    async def history(
        self, conv: int, from_seq: int, limit: int, backward: bool
    ) -> tuple[list[StoredMessage], bool]:
        validate_history(from_seq, limit)

        def read(conn: sqlite3.Connection) -> tuple[list[StoredMessage], bool]:
            if backward:
                start = from_seq if from_seq > 0 else MAX_SEQ
                rows = conn.execute(
                    f"SELECT {MSG_COLUMNS} FROM messages m JOIN conversations c ON c.conv = m.conv"
                    " WHERE m.conv = ? AND m.seq <= ? ORDER BY m.seq DESC LIMIT ?",
                    (conv, start, limit + 1),
                ).fetchall()
            else:
                rows = conn.execute(
                    f"SELECT {MSG_COLUMNS} FROM messages m JOIN conversations c ON c.conv = m.conv"
                    " WHERE m.conv = ? AND m.seq >= ? ORDER BY m.seq LIMIT ?",
                    (conv, from_seq, limit + 1),
                ).fetchall()
            return history_page(rows, limit, backward)

        return await self._read(read)

    async def set_read(self, conv: int, user_id: int, seq: int) -> int:
        def job(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT c.last_seq, m.read_seq FROM conversations c"
                " LEFT JOIN members m ON m.conv = c.conv AND m.user_id = ? WHERE c.conv = ?",
                (user_id, conv),
            ).fetchone()
            if row is None:
                raise RequestError("no such conversation", code=ErrorCode.NOT_FOUND)
            last_seq, read_seq = row
            if read_seq is None:
                raise RequestError("not a member of the conversation", code=ErrorCode.NOT_MEMBER)
            new = max(read_seq, min(seq, last_seq))
            if new != read_seq:
                conn.execute(
                    "UPDATE members SET read_seq = ? WHERE conv = ? AND user_id = ?", (new, conv, user_id)
                )
            return int(new)

        return await self._write(job)
