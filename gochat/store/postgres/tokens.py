"""Refresh tokens (rotation, reuse detection, revocation) and the access-token deny-list on
PostgreSQL.

Writes that must not interleave (adding a token to a family versus revoking that family or all
of a user's tokens) take transaction-level advisory locks on the family and the user, as
SQLite's single writer serializes them."""

from __future__ import annotations

from typing import Any

from gochat.errors import ErrorCode, RequestError
from gochat.store.base import RefreshStatus
from gochat.store.postgres.engine import PostgresEngine
from gochat.store.postgres.pool import check_int64

__all__ = ["TokenRepository"]


class TokenRepository(PostgresEngine):
    """The :class:`~gochat.store.base.TokenStore` methods of
    :class:`~gochat.store.postgres.PostgresStore`, and ``purge_expired``."""

    def _lock_sql(self, n: int) -> str:
        """Transaction-level advisory locks serialize a token family (or all of a user's
        families) between add / revoke, as SQLite's single writer does."""
        return "SELECT " + ", ".join(
            f"pg_advisory_xact_lock(hashtextextended(${i + 1}, 0))" for i in range(n)
        )

    def _family_key(self, family: str) -> str:
        return f"gochat.family:{self.schema}:{family}"

    def _user_key(self, user_id: int) -> str:
        return f"gochat.user-tokens:{self.schema}:{user_id}"

    async def add_refresh_token(self, jti: str, family: str, user_id: int, expires_ms: int) -> None:
        check_int64(user_id, expires_ms)
        s = self._s

        async def job(conn: Any) -> None:
            await conn.execute(self._lock_sql(2), self._user_key(user_id), self._family_key(family))
            # A token added to an already revoked family (a refresh racing a reuse detection)
            # is born revoked.
            done = await conn.fetchval(
                f"INSERT INTO {s}.refresh_tokens (jti, family, user_id, expires_ms, spent, revoked)"
                " SELECT $1, $2, $3, $4, false,"
                f" EXISTS (SELECT 1 FROM {s}.refresh_tokens WHERE family = $2 AND revoked)"
                f" WHERE EXISTS (SELECT 1 FROM {s}.users WHERE user_id = $3)"
                " RETURNING 1",
                jti,
                family,
                user_id,
                expires_ms,
            )
            if done is None:
                raise RequestError("no such user", code=ErrorCode.NOT_FOUND)

        await self._write(job, transaction=True)

    async def use_refresh_token(self, jti: str, now_ms: int) -> tuple[str, str, int]:
        check_int64(now_ms)
        s = self._s

        async def job(conn: Any) -> tuple[str, str, int]:
            row = await conn.fetchrow(
                f"UPDATE {s}.refresh_tokens SET spent = true"
                " WHERE jti = $1 AND NOT spent AND NOT revoked AND expires_ms > $2"
                " RETURNING family, user_id",
                jti,
                now_ms,
            )
            if row is not None:
                return RefreshStatus.OK, row[0], int(row[1])
            row = await conn.fetchrow(
                f"SELECT family, user_id, spent, revoked FROM {s}.refresh_tokens WHERE jti = $1", jti
            )
            if row is None:
                return RefreshStatus.UNKNOWN, "", 0
            family, user_id, spent, revoked = row
            if revoked:
                return RefreshStatus.REVOKED, family, int(user_id)
            if spent:
                return RefreshStatus.REUSED, family, int(user_id)
            return RefreshStatus.UNKNOWN, "", 0  # expired

        return await self._write(job)

    async def revoke_family(self, family: str) -> None:
        s = self._s

        async def job(conn: Any) -> None:
            await conn.execute(self._lock_sql(1), self._family_key(family))
            await conn.execute(
                f"UPDATE {s}.refresh_tokens SET revoked = true WHERE family = $1 AND NOT revoked", family
            )

        await self._write(job, transaction=True)

    async def revoke_user_tokens(self, user_id: int) -> None:
        check_int64(user_id)
        s = self._s

        async def job(conn: Any) -> None:
            await conn.execute(self._lock_sql(1), self._user_key(user_id))
            await conn.execute(
                f"UPDATE {s}.refresh_tokens SET revoked = true WHERE user_id = $1 AND NOT revoked", user_id
            )

        await self._write(job, transaction=True)

    async def revoke_jti(self, jti: str, expires_ms: int) -> None:
        check_int64(expires_ms)
        s = self._s
        await self._write(
            lambda conn: conn.execute(
                f"INSERT INTO {s}.revoked_jtis AS r (jti, expires_ms) VALUES ($1, $2)"
                " ON CONFLICT (jti) DO UPDATE SET expires_ms = GREATEST(r.expires_ms, excluded.expires_ms)",
                jti,
                expires_ms,
            )
        )

    async def revoked_jtis(self, now_ms: int) -> dict[str, int]:
        check_int64(now_ms)
        s = self._s
        rows = await self._read(
            lambda conn: conn.fetch(
                f"SELECT jti, expires_ms FROM {s}.revoked_jtis WHERE expires_ms > $1", now_ms
            )
        )
        return {r[0]: int(r[1]) for r in rows}

    async def purge_expired(self, now_ms: int) -> tuple[int, int]:
        """Delete expired refresh tokens and deny-list entries; returns (tokens, jtis) deleted.
        (Also done at every open; call it periodically on long-running nodes.)"""
        check_int64(now_ms)
        s = self._s
        row = await self._write(
            lambda conn: conn.fetchrow(
                f"WITH t AS (DELETE FROM {s}.refresh_tokens WHERE expires_ms <= $1 RETURNING 1),"
                f" j AS (DELETE FROM {s}.revoked_jtis WHERE expires_ms <= $1 RETURNING 1)"
                " SELECT (SELECT count(*) FROM t), (SELECT count(*) FROM j)",
                now_ms,
            )
        )
        return int(row[0]), int(row[1])
