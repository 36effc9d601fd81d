"""Users on PostgreSQL: create, look up by id or (case-insensitive) name."""

from __future__ import annotations

from gochat.clock import now_ms
from gochat.errors import ErrorCode, RequestError
from gochat.store.base import UserRecord
from gochat.store.postgres.engine import PostgresEngine
from gochat.store.postgres.pool import check_int64

__all__ = ["UserRepository"]


class UserRepository(PostgresEngine):
    """The :class:`~gochat.store.base.UserStore` methods of
    :class:`~gochat.store.postgres.PostgresStore`."""

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
        check_int64(user_id)
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
