"""Refresh tokens (rotation, reuse detection, revocation) and the access-token deny-list on SQLite.

Every write is a job on the writer thread, so spending a token and revoking its family never
interleave."""

from __future__ import annotations

import sqlite3

from gochat.errors import ErrorCode, RequestError
from gochat.store.base import RefreshStatus
from gochat.store.sqlite.engine import SQLiteEngine

__all__ = ["TokenRepository"]


class TokenRepository(SQLiteEngine):
    """The :class:`~gochat.store.base.TokenStore` methods of :class:`~gochat.store.sqlite.SQLiteStore`,
    and ``purge_expired``."""

    async def add_refresh_token(self, jti: str, family: str, user_id: int, expires_ms: int) -> None:
        def job(conn: sqlite3.Connection) -> None:
            if conn.execute("SELECT 1 FROM users WHERE user_id = ?", (user_id,)).fetchone() is None:
                raise RequestError("no such user", code=ErrorCode.NOT_FOUND)
            # A token added to an already revoked family (a refresh racing a reuse detection)
            # is born revoked.
            conn.execute(
                "INSERT INTO refresh_tokens (jti, family, user_id, expires_ms, spent, revoked)"
                " VALUES (?, ?, ?, ?, 0,"
                " EXISTS (SELECT 1 FROM refresh_tokens WHERE family = ? AND revoked = 1))",
                (jti, family, user_id, expires_ms, family),
            )

        await self._write(job)

    async def use_refresh_token(self, jti: str, now_ms: int) -> tuple[str, str, int]:
        def job(conn: sqlite3.Connection) -> tuple[str, str, int]:
            row = conn.execute(
                "SELECT family, user_id, expires_ms, spent, revoked FROM refresh_tokens WHERE jti = ?", (jti,)
            ).fetchone()
            if row is None:
                return RefreshStatus.UNKNOWN, "", 0
            family, user_id, expires_ms, spent, revoked = row
            if revoked:
                return RefreshStatus.REVOKED, family, user_id
            if spent:
                return RefreshStatus.REUSED, family, user_id
            if expires_ms <= now_ms:
                return RefreshStatus.UNKNOWN, "", 0
            conn.execute("UPDATE refresh_tokens SET spent = 1 WHERE jti = ?", (jti,))
            return RefreshStatus.OK, family, user_id

        return await self._write(job)

    async def revoke_family(self, family: str) -> None:
        await self._write(
            lambda conn: conn.execute(
                "UPDATE refresh_tokens SET revoked = 1 WHERE family = ? AND revoked = 0", (family,)
            )
        )

    async def revoke_user_tokens(self, user_id: int) -> None:
        await self._write(
            lambda conn: conn.execute(
                "UPDATE refresh_tokens SET revoked = 1 WHERE user_id = ? AND revoked = 0", (user_id,)
            )
        )

    async def revoke_jti(self, jti: str, expires_ms: int) -> None:
        await self._write(
            lambda conn: conn.execute(
                "INSERT INTO revoked_jtis (jti, expires_ms) VALUES (?, ?)"
                " ON CONFLICT (jti) DO UPDATE SET expires_ms = MAX(expires_ms, excluded.expires_ms)",
                (jti, expires_ms),
            )
        )

    async def revoked_jtis(self, now_ms: int) -> dict[str, int]:
        def read(conn: sqlite3.Connection) -> dict[str, int]:
            rows = conn.execute("SELECT jti, expires_ms FROM revoked_jtis WHERE expires_ms > ?", (now_ms,))
            return {jti: exp for jti, exp in rows}

        return await self._read(read)

    async def purge_expired(self, now_ms: int) -> tuple[int, int]:
        """Delete expired refresh tokens and deny-list entries; returns (tokens, jtis) deleted.
        (Also done at every open; call it periodically on long-running nodes.)"""

        def job(conn: sqlite3.Connection) -> tuple[int, int]:
            tokens = conn.execute("DELETE FROM refresh_tokens WHERE expires_ms <= ?", (now_ms,)).rowcount
            jtis = conn.execute("DELETE FROM revoked_jtis WHERE expires_ms <= ?", (now_ms,)).rowcount
            return tokens, jtis

        return await self._write(job)
