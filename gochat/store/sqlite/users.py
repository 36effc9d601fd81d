"""Users on SQLite: create, look up by id or (case-insensitive) name."""

from __future__ import annotations

import sqlite3

from gochat.clock import now_ms
from gochat.errors import ErrorCode, RequestError
from gochat.store.base import UserRecord
from gochat.store.sqlite.engine import SQLiteEngine

__all__ = ["UserRepository"]


class UserRepository(SQLiteEngine):
    """The :class:`~gochat.store.base.UserStore` methods of :class:`~gochat.store.sqlite.SQLiteStore`."""

    async def create_user(self, username: str, password_hash: str) -> int:
        def job(conn: sqlite3.Connection) -> int:
            try:
                cur = conn.execute(
                    "INSERT INTO users (username, password_hash, created_ms) VALUES (?, ?, ?)",
                    (username, password_hash, now_ms()),
                )
            except sqlite3.IntegrityError as exc:
                raise RequestError("username is taken", code=ErrorCode.CONFLICT) from exc
            assert cur.lastrowid is not None
            return cur.lastrowid

        return await self._write(job)

    async def get_user(self, user_id: int) -> UserRecord | None:
        def read(conn: sqlite3.Connection) -> UserRecord | None:
            row = conn.execute(
                "SELECT user_id, username, password_hash, created_ms FROM users WHERE user_id = ?", (user_id,)
            ).fetchone()
            return UserRecord(*row) if row else None

        return await self._read(read)

    async def get_user_by_name(self, username: str) -> UserRecord | None:
        def read(conn: sqlite3.Connection) -> UserRecord | None:
            row = conn.execute(
                "SELECT user_id, username, password_hash, created_ms FROM users WHERE username = ?",
                (username,),
            ).fetchone()
            return UserRecord(*row) if row else None

        return await self._read(read)
