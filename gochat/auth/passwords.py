"""Password hashing with scrypt (``hashlib.scrypt``, OpenSSL; no extra dependency).

Encoded form: ``scrypt$<n>$<r>$<p>$<salt b64>$<hash b64>`` (standard base64 without padding).
The parameters travel with the hash, so they can be raised later and old hashes still verify
(:func:`needs_rehash` tells when a stored hash uses weaker parameters than the current ones).

One hash costs ~50 ms of CPU and 16 MiB of memory (n=2**14, r=8). The async helpers run it on a
small dedicated thread pool (``hashlib.scrypt`` releases the GIL), which also bounds how many
run at once so a login flood cannot exhaust memory.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import os
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Final

__all__ = [
    "SCRYPT_N",
    "SCRYPT_P",
    "SCRYPT_R",
    "hash_password",
    "hash_password_async",
    "needs_rehash",
    "verify_password",
    "verify_password_async",
]

SCRYPT_N: Final = 2**14
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1
SALT_BYTES: Final = 16
HASH_BYTES: Final = 32
_PREFIX: Final = "scrypt"
# Refuse to verify against absurd parameters (a corrupted or hostile hash must not allocate GiBs).
_MAX_N: Final = 2**20
_MAX_R: Final = 32
_MAX_P: Final = 16
_MAXMEM: Final = 256 * 1024 * 1024

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=_MAXMEM, dklen=dklen)


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """Hash ``password`` with a fresh random salt; returns the encoded string (blocking)."""
    salt = secrets.token_bytes(SALT_BYTES)
    digest = _scrypt(password, salt, n, r, p, HASH_BYTES)
    return f"{_PREFIX}${n}${r}${p}${_b64(salt)}${_b64(digest)}"


def _parse(encoded: str) -> tuple[int, int, int, bytes, bytes] | None:
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != _PREFIX:
        return None
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, digest = _unb64(parts[4]), _unb64(parts[5])
    except (ValueError, binascii.Error):
        return None
    if not (1 < n <= _MAX_N and n & (n - 1) == 0 and 0 < r <= _MAX_R and 0 < p <= _MAX_P):
        return None
    if not salt or not 16 <= len(digest) <= 64:
        return None
    return n, r, p, salt, digest


def verify_password(password: str, encoded: str) -> bool:
    """Constant-time check of ``password`` against an encoded hash (blocking). A malformed
    hash never matches."""
    parsed = _parse(encoded)
    if parsed is None:
        return False
    n, r, p, salt, digest = parsed
    candidate = _scrypt(password, salt, n, r, p, len(digest))
    return hmac.compare_digest(candidate, digest)


def needs_rehash(encoded: str) -> bool:
    """True when the hash is malformed or uses other parameters than the current defaults."""
    parsed = _parse(encoded)
    return parsed is None or parsed[:3] != (SCRYPT_N, SCRYPT_R, SCRYPT_P)


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            workers = max(1, min(4, os.cpu_count() or 1))
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gochat-kdf")
        return _pool


async def hash_password_async(password: str) -> str:
    """:func:`hash_password` on the KDF thread pool."""
    return await asyncio.get_running_loop().run_in_executor(_executor(), hash_password, password)


async def verify_password_async(password: str, encoded: str) -> bool:
    """:func:`verify_password` on the KDF thread pool."""
    return await asyncio.get_running_loop().run_in_executor(_executor(), verify_password, password, encoded)
