"""Registration, login, refresh-token rotation, logout and access-token verification.

Sessions: a login starts a *family* (session id ``sid``). Every refresh spends the presented
refresh token and issues a new one in the same family (rotation). Presenting a spent token
again means it was copied: the whole family is revoked (OAuth 2.0 Security BCP, refresh token
reuse detection), the thief and the victim both have to log in again, and the family's access
tokens are deny-listed (``fam:<sid>``) until they would have expired anyway.

Revocations are persisted in the store (``revoked_jtis``) and applied to the in-memory deny-list
of this node; other nodes learn them via :meth:`AuthService.apply_revocation` (the cluster layer
forwards the ``on_revoke`` events) or :meth:`AuthService.reload_revocations`.

A node that may have missed revocations (its event reader is behind: the bus is unreachable or
the process was stalled) accepts no token until it has caught up: :meth:`AuthService.guard_freshness`
makes :meth:`AuthService.verify_access` answer UNAVAILABLE (retryable) meanwhile, and reloads the
deny-list from the store while the reader stays behind, which counts as caught up too.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from gochat.auth.keys import KeyRing
from gochat.auth.passwords import hash_password_async, verify_password_async
from gochat.auth.tokens import (
    Claims,
    TokenService,
    family_deny_key,
    new_family_id,
    new_refresh_token,
    refresh_token_jti,
)
from gochat.errors import AuthError, ErrorCode, GochatError, RequestError, UnavailableError
from gochat.store.base import RefreshStatus, Store

__all__ = ["AuthService", "RevokeCallback", "TokenPair", "validate_password", "validate_username"]

log = logging.getLogger("gochat.auth")

USERNAME_RE: Final = re.compile(r"[A-Za-z0-9_.-]{3,32}")
PASSWORD_MIN: Final = 8
PASSWORD_MAX: Final = 256
DEFAULT_ACCESS_TTL_S: Final = 900
DEFAULT_REFRESH_TTL_S: Final = 30 * 24 * 3600

#: ``callback(user_id, revoked_id)``: ``revoked_id`` is an access-token ``jti`` or
#: ``fam:<sid>`` for a whole session. The gateway should re-check each live session of
#: ``user_id`` with :meth:`AuthService.is_revoked` and disconnect those that are revoked.
RevokeCallback = Callable[[int, str], Awaitable[None] | None]

_BAD_CREDENTIALS: Final = "invalid username or password"
#: what a client waits before it sends its token again while the node catches up
CATCHING_UP_RETRY_MS: Final = 250


@dataclass(frozen=True, slots=True)
class TokenPair:
    user_id: int
    access_token: str
    #: Unix seconds.
    access_expires_at: int
    refresh_token: str
    #: Unix seconds.
    refresh_expires_at: int
    #: The session (refresh-token family) id; also the ``sid`` claim of the access token.
    session_id: str
    token_type: str = "Bearer"


def validate_username(username: object) -> str:
    if not isinstance(username, str) or USERNAME_RE.fullmatch(username) is None:
        raise RequestError(
            "username must be 3-32 characters of A-Z a-z 0-9 _ . -", code=ErrorCode.BAD_REQUEST
        )
    return username


def validate_password(password: object) -> str:
    if not isinstance(password, str) or not PASSWORD_MIN <= len(password) <= PASSWORD_MAX:
        raise RequestError(
            f"password must be {PASSWORD_MIN}-{PASSWORD_MAX} characters", code=ErrorCode.BAD_REQUEST
        )
    return password


class AuthService:
    """Authentication on top of a :class:`~gochat.store.base.Store` and a :class:`KeyRing`.

    Call :meth:`start` once (loads the deny-list) before verifying tokens.
    """

    def __init__(
        self,
        store: Store,
        keyring: KeyRing,
        *,
        access_ttl_s: int = DEFAULT_ACCESS_TTL_S,
        refresh_ttl_s: int = DEFAULT_REFRESH_TTL_S,
        clock: Callable[[], float] = time.time,
        issuer: str = "gochat",
    ) -> None:
        if refresh_ttl_s <= 0:
            raise ValueError("refresh_ttl_s must be positive")
        self.store = store
        self.keyring = keyring
        self.refresh_ttl_s = refresh_ttl_s
        self.clock = clock
        self.tokens = TokenService(keyring, issuer=issuer, access_ttl_s=access_ttl_s, clock=clock)
        self._callbacks: list[RevokeCallback] = []
        self._dummy_hash: str | None = None
        self._dummy_lock = asyncio.Lock()
        #: revocation freshness (guard_freshness): the event reader's, and the loop time at
        #: which the last deny-list reload from the store was issued
        self._caught_up: Callable[[], bool] | None = None
        self._fresh_s = 0.0
        self._reloaded_at = float("-inf")
        self._freshness_task: asyncio.Task[None] | None = None

    @property
    def access_ttl_s(self) -> int:
        return self.tokens.access_ttl_s

    async def start(self) -> None:
        await self.reload_revocations()

    async def reload_revocations(self) -> None:
        """Load every unexpired deny-list entry from the store."""
        issued = asyncio.get_running_loop().time()
        self.tokens.load_denied(await self.store.revoked_jtis(self.tokens.now_ms()))
        self._reloaded_at = issued  # every revocation stored before `issued` is known

    # ---- revocation freshness --------------------------------------------------------------------

    def guard_freshness(self, caught_up: Callable[[], bool], within_s: float) -> None:
        """Accept tokens only while this node knows every revocation older than ``within_s``:
        ``caught_up()`` (the event reader reached the end of the log within ``within_s``) or
        the deny-list was reloaded from the store within ``within_s``. A background task
        reloads it every ``within_s / 2`` while the reader is behind (the bus down), so logins
        keep working without the bus as long as the store answers. Stopped by :meth:`close`."""
        self._caught_up = caught_up
        self._fresh_s = within_s
        if self._freshness_task is None:
            self._freshness_task = asyncio.create_task(self._keep_fresh(), name="auth-freshness")

    def fresh(self) -> bool:
        """Whether this node may accept tokens now (see :meth:`guard_freshness`)."""
        caught_up = self._caught_up
        if caught_up is None or caught_up():
            return True
        return asyncio.get_running_loop().time() - self._reloaded_at <= self._fresh_s

    async def _keep_fresh(self) -> None:
        while True:
            await asyncio.sleep(self._fresh_s / 2)
            if self._caught_up is not None and not self._caught_up():
                try:
                    await self.reload_revocations()
                except GochatError as exc:
                    log.warning("event reader behind and the deny-list cannot be reloaded: %s", exc.message)

    async def close(self) -> None:
        task, self._freshness_task = self._freshness_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # ---- callbacks ---------------------------------------------------------------------------

    def on_revoke(self, callback: RevokeCallback) -> Callable[[], None]:
        """Register ``callback(user_id, revoked_id)``; returns a function that unregisters it."""
        self._callbacks.append(callback)

        def remove() -> None:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

        return remove

    async def _notify(self, user_id: int, revoked_id: str) -> None:
        for callback in list(self._callbacks):
            try:
                result = callback(user_id, revoked_id)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("on_revoke callback %r failed", callback)

    # ---- registration and login --------------------------------------------------------------

    async def register(self, username: str, password: str) -> int:
        """Create a user; BAD_REQUEST for an invalid name or password, CONFLICT if taken."""
        validate_username(username)
        validate_password(password)
        if await self.store.get_user_by_name(username) is not None:
            raise RequestError("username is taken", code=ErrorCode.CONFLICT)
        password_hash = await hash_password_async(password)
        return await self.store.create_user(username, password_hash)

    async def _dummy(self) -> str:
        if self._dummy_hash is None:
            async with self._dummy_lock:
                if self._dummy_hash is None:
                    self._dummy_hash = await hash_password_async(secrets.token_urlsafe(24))
        return self._dummy_hash

    async def login(self, username: str, password: str) -> TokenPair:
        """Check credentials and start a new session. Unknown user and wrong password give the
        same error after the same work (the KDF runs either way)."""
        user = None
        if isinstance(username, str) and USERNAME_RE.fullmatch(username):
            user = await self.store.get_user_by_name(username)
        candidate = password if isinstance(password, str) and len(password) <= PASSWORD_MAX else ""
        encoded = user.password_hash if user is not None else await self._dummy()
        ok = await verify_password_async(candidate, encoded)
        if user is None or not ok or not candidate:
            raise AuthError(_BAD_CREDENTIALS, code=ErrorCode.UNAUTHORIZED)
        return await self._issue_pair(user.user_id, new_family_id())

    async def _issue_pair(self, user_id: int, family: str) -> TokenPair:
        refresh = new_refresh_token()
        refresh_expires_ms = self.tokens.now_ms() + self.refresh_ttl_s * 1000
        await self.store.add_refresh_token(refresh_token_jti(refresh), family, user_id, refresh_expires_ms)
        access, claims = self.tokens.issue_access(user_id, sid=family)
        return TokenPair(
            user_id=user_id,
            access_token=access,
            access_expires_at=claims.exp,
            refresh_token=refresh,
            refresh_expires_at=refresh_expires_ms // 1000,
            session_id=family,
        )

    # ---- refresh and logout ------------------------------------------------------------------

    async def refresh(self, refresh_token: str) -> TokenPair:
        """Rotate: spend ``refresh_token`` and issue a new pair in the same session.

        UNAUTHORIZED for an unknown or expired token; TOKEN_REVOKED for a revoked session or a
        reused (already spent) token, which also revokes the whole session.
        """
        if not isinstance(refresh_token, str) or not 0 < len(refresh_token) <= 256:
            raise AuthError("invalid refresh token", code=ErrorCode.UNAUTHORIZED)
        status, family, user_id = await self.store.use_refresh_token(
            refresh_token_jti(refresh_token), self.tokens.now_ms()
        )
        if status == RefreshStatus.OK:
            return await self._issue_pair(user_id, family)
        if status == RefreshStatus.REUSED:
            log.warning("refresh token reuse for user %d: revoking session", user_id)
            await self._revoke_family(user_id, family)
            raise AuthError("refresh token reused; session revoked", code=ErrorCode.TOKEN_REVOKED)
        if status == RefreshStatus.REVOKED:
            raise AuthError("session revoked", code=ErrorCode.TOKEN_REVOKED)
        raise AuthError("invalid refresh token", code=ErrorCode.UNAUTHORIZED)

    async def _revoke_family(self, user_id: int, family: str) -> None:
        await self.store.revoke_family(family)
        key = family_deny_key(family)
        # Every access token of the family was issued before now: deny the session for one TTL.
        expires_ms = self.tokens.now_ms() + self.access_ttl_s * 1000
        await self.store.revoke_jti(key, expires_ms)
        self.tokens.deny(key, expires_ms)
        await self._notify(user_id, key)

    async def logout(self, access: Claims | str, refresh_token: str | None = None) -> None:
        """End a session.

        ``access`` is the verified claims of the access token (preferred) or a bare ``jti``.
        The access token is deny-listed until it expires; the session it belongs to and the
        session of ``refresh_token`` (if given) are revoked; ``on_revoke`` callbacks run.
        """
        now_ms = self.tokens.now_ms()
        if isinstance(access, Claims):
            jti, user_id, expires_ms, families = access.jti, access.user_id, access.expires_ms, {access.sid}
        else:
            jti, user_id, expires_ms, families = access, 0, now_ms + self.access_ttl_s * 1000, set()
        if refresh_token is not None and 0 < len(refresh_token) <= 256:
            status, family, owner = await self.store.use_refresh_token(
                refresh_token_jti(refresh_token), now_ms
            )
            if status != RefreshStatus.UNKNOWN:
                families.add(family)
                user_id = user_id or owner
        if jti:
            await self.store.revoke_jti(jti, expires_ms)
            self.tokens.deny(jti, expires_ms)
        for family in sorted(f for f in families if f):
            await self._revoke_family(user_id, family)
        if jti:
            await self._notify(user_id, jti)

    # ---- verification --------------------------------------------------------------------------

    def verify_access(self, token: str, *, require_fresh: bool = True) -> Claims:
        """Verify an access token (no I/O). Raises AuthError (UNAUTHORIZED / TOKEN_EXPIRED /
        TOKEN_REVOKED), or UnavailableError (retryable, ``retry_after_ms``) for a valid token
        while this node may have missed revocations (:meth:`guard_freshness`; not checked with
        ``require_fresh=False``: a logout revokes, so a missed revocation cannot matter)."""
        claims = self.tokens.verify_access(token)
        if require_fresh and not self.fresh():
            raise UnavailableError(
                "this node is catching up with revocations; send the token again", retry_after_ms=CATCHING_UP_RETRY_MS
            )
        return claims

    def is_revoked(self, claims: Claims) -> bool:
        return self.tokens.is_revoked(claims)

    def is_denied(self, jti: str, sid: str) -> bool:
        """True if the access token ``jti`` or the login session ``sid`` was revoked (no I/O)."""
        return self.tokens.is_denied(jti, sid)

    def apply_revocation(self, revoked_id: str, expires_ms: int) -> None:
        """Apply a revocation published by another node (already persisted there)."""
        self.tokens.deny(revoked_id, expires_ms)
