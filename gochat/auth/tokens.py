"""Access tokens (asymmetric JWTs) and opaque refresh tokens.

Access token: a JWT signed with the key ring's signing key (EdDSA by default, or RS256).

* header: ``alg``, ``typ: JWT``, ``kid`` (RFC 7638 thumbprint of the signing key);
* claims: ``iss`` (``gochat``), ``sub`` (user id as a decimal string), ``jti`` (random),
  ``iat``, ``exp`` (Unix seconds), ``typ: access`` and ``sid`` (the session: the refresh-token
  family the token was issued with).

Verification is strict and does no I/O: the ``kid`` must name a key of the ring and the header
``alg`` must be *that key's* algorithm (so ``alg: none``, ``HS256`` keyed with the public key
and any other algorithm substitution fail); signature, issuer, ``typ`` and the required claims
are checked, then expiry (with the injected clock) and finally the in-memory deny-list, which
holds revoked ``jti`` values and revoked sessions (``fam:<sid>`` entries).

Refresh token: ``secrets.token_urlsafe(32)`` (256 random bits), opaque to clients. The store
keeps only its ``jti`` = SHA-256 hex of the token, so a database leak does not leak usable
refresh tokens.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import jwt

from gochat.auth.keys import KeyRing
from gochat.clock import now_ms as wall_clock_ms
from gochat.errors import AuthError, ErrorCode

__all__ = [
    "ACCESS_TYPE",
    "FAMILY_PREFIX",
    "Claims",
    "TokenService",
    "family_deny_key",
    "new_family_id",
    "new_refresh_token",
    "refresh_token_jti",
]

ACCESS_TYPE: Final = "access"
#: Deny-list key prefix for a revoked session (refresh-token family).
FAMILY_PREFIX: Final = "fam:"
MAX_TOKEN_LENGTH: Final = 8192
#: verified tokens remembered (their signature is not checked again until they expire)
VERIFIED_CACHE_SIZE = 65536
MAX_REFRESH_TOKEN_LENGTH: Final = 256
_REQUIRED: Final = ["iss", "sub", "jti", "iat", "exp"]


@dataclass(frozen=True, slots=True)
class Claims:
    """A verified access token."""

    user_id: int
    jti: str
    #: Session id: the refresh-token family this token belongs to ("" if none).
    sid: str
    iat: int
    exp: int
    kid: str

    @property
    def sub(self) -> str:
        return str(self.user_id)

    @property
    def expires_ms(self) -> int:
        return self.exp * 1000


def new_refresh_token() -> str:
    return secrets.token_urlsafe(32)


def refresh_token_jti(token: str) -> str:
    """The stored id of a refresh token: SHA-256 hex of the token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_family_id() -> str:
    return secrets.token_urlsafe(16)


def family_deny_key(family: str) -> str:
    return FAMILY_PREFIX + family


def _unauthorized(message: str = "invalid token") -> AuthError:
    return AuthError(message, code=ErrorCode.UNAUTHORIZED)


def _int_claim(payload: Mapping[str, Any], name: str) -> int:
    value = payload.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _unauthorized(f"invalid {name} claim")
    return value


class TokenService:
    """Issues and verifies access tokens; holds the in-memory deny-list.

    ``clock`` returns Unix seconds (float); tests inject one to expire tokens.
    """

    def __init__(
        self,
        keyring: KeyRing,
        *,
        issuer: str = "gochat",
        access_ttl_s: int = 900,
        leeway_s: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if access_ttl_s <= 0:
            raise ValueError("access_ttl_s must be positive")
        self.keyring = keyring
        self.issuer = issuer
        self.access_ttl_s = access_ttl_s
        self.leeway_s = leeway_s
        self.clock = clock
        self._denied: dict[str, int] = {}  # jti or fam:<sid> -> expires_ms
        # digest of the token -> claims, signature already checked. Keyed by a 128-bit BLAKE2b
        # digest (49 B) rather than the token itself (~435 B): one entry per connected token.
        self._verified: dict[bytes, Claims] = {}
        self._last_prune_ms = 0

    def now_ms(self) -> int:
        """``clock`` in milliseconds: :func:`gochat.clock.now_ms` unless a clock was injected."""
        if self.clock is time.time:
            return wall_clock_ms()
        return int(self.clock() * 1000)

    # ---- issue / verify ----------------------------------------------------------------------

    def issue_access(self, user_id: int, *, sid: str = "") -> tuple[str, Claims]:
        key = self.keyring.signing
        assert key.private_key is not None
        iat = int(self.clock())
        claims = Claims(
            user_id=user_id,
            jti=secrets.token_urlsafe(16),
            sid=sid,
            iat=iat,
            exp=iat + self.access_ttl_s,
            kid=key.kid,
        )
        payload: dict[str, Any] = {
            "iss": self.issuer,
            "sub": claims.sub,
            "jti": claims.jti,
            "iat": claims.iat,
            "exp": claims.exp,
            "typ": ACCESS_TYPE,
        }
        if sid:
            payload["sid"] = sid
        token = jwt.encode(payload, key.private_key, algorithm=key.algorithm, headers={"kid": key.kid})
        return token, claims

    def verify_access(self, token: str) -> Claims:
        """Verify an access token; raise :class:`AuthError` with UNAUTHORIZED (malformed, forged,
        unknown key, wrong algorithm), TOKEN_EXPIRED or TOKEN_REVOKED."""
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LENGTH:
            raise _unauthorized()
        digest = hashlib.blake2b(token.encode(), digest_size=16).digest()
        cached = self._verified.get(digest)
        if cached is not None:
            # Reconnect storms present the same tokens again: the signature of these exact
            # bytes was checked already; expiry and the deny-list are checked on every use.
            if self.clock() >= cached.exp + self.leeway_s:
                del self._verified[digest]
                raise AuthError("token expired", code=ErrorCode.TOKEN_EXPIRED)
            if self.is_revoked(cached):
                raise AuthError("token revoked", code=ErrorCode.TOKEN_REVOKED)
            return cached
        claims = self._verify_signed(token)
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            del self._verified[next(iter(self._verified))]  # oldest first
        self._verified[digest] = claims
        return claims

    def _verify_signed(self, token: str) -> Claims:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise _unauthorized() from exc
        kid = header.get("kid")
        key = self.keyring.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise _unauthorized("token signed with an unknown key")
        if header.get("alg") != key.algorithm:
            raise _unauthorized("token algorithm not accepted")
        try:
            payload = jwt.decode(
                token,
                key.public_key,
                algorithms=[key.algorithm],
                issuer=self.issuer,
                options={
                    "require": _REQUIRED,
                    # Time claims are checked below with the injected clock.
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                },
            )
        except jwt.PyJWTError as exc:
            raise _unauthorized() from exc
        if payload.get("typ") != ACCESS_TYPE:
            raise _unauthorized("not an access token")
        sub = payload["sub"]
        if not isinstance(sub, str) or not sub.isdecimal() or not sub.isascii() or len(sub) > 20:
            raise _unauthorized("invalid sub claim")
        exp = _int_claim(payload, "exp")
        iat = _int_claim(payload, "iat")
        sid = payload.get("sid", "")
        if not isinstance(sid, str):
            raise _unauthorized("invalid sid claim")
        now = self.clock()
        if now >= exp + self.leeway_s:
            raise AuthError("token expired", code=ErrorCode.TOKEN_EXPIRED)
        claims = Claims(user_id=int(sub), jti=payload["jti"], sid=sid, iat=iat, exp=exp, kid=key.kid)
        if self.is_revoked(claims):
            raise AuthError("token revoked", code=ErrorCode.TOKEN_REVOKED)
        return claims

    # ---- deny-list ----------------------------------------------------------------------------

    def is_revoked(self, claims: Claims) -> bool:
        """True if the token's ``jti`` or its session is deny-listed (no I/O)."""
        denied = self._denied
        if claims.jti in denied:
            return True
        return bool(claims.sid) and family_deny_key(claims.sid) in denied

    def is_denied(self, jti: str, sid: str) -> bool:
        """True if the access token ``jti`` or the login session ``sid`` is deny-listed."""
        denied = self._denied
        return jti in denied or (bool(sid) and family_deny_key(sid) in denied)

    def deny(self, jti: str, expires_ms: int) -> None:
        """Deny-list ``jti`` (or ``fam:<sid>``) until ``expires_ms``."""
        now = self.now_ms()
        if expires_ms > now:
            self._denied[jti] = max(expires_ms, self._denied.get(jti, 0))
        if now - self._last_prune_ms > 60_000:
            self.prune(now)

    def load_denied(self, entries: Mapping[str, int]) -> None:
        for jti, expires_ms in entries.items():
            self._denied[jti] = max(expires_ms, self._denied.get(jti, 0))
        self.prune(self.now_ms())

    def prune(self, now_ms: int) -> None:
        self._last_prune_ms = now_ms
        expired = [jti for jti, exp in self._denied.items() if exp <= now_ms]
        for jti in expired:
            del self._denied[jti]

    @property
    def denied_count(self) -> int:
        return len(self._denied)
