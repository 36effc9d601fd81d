"""Authentication: password hashing, JWT keys, access/refresh tokens and the auth service."""

from gochat.auth.keys import JwtKey, KeyRing, jwk_thumbprint, rotate_key_files
from gochat.auth.passwords import hash_password, needs_rehash, verify_password
from gochat.auth.service import AuthService, RevokeCallback, TokenPair
from gochat.auth.tokens import Claims, TokenService

__all__ = [
    "AuthService",
    "Claims",
    "JwtKey",
    "KeyRing",
    "RevokeCallback",
    "TokenPair",
    "TokenService",
    "hash_password",
    "jwk_thumbprint",
    "needs_rehash",
    "rotate_key_files",
    "verify_password",
]
