"""JWT signing keys: load or create, ``kid`` thumbprints, rotation and JWKS.

Files in the data directory (created ``0700``; key files ``0600``):

* ``jwt-ed25519.pem`` (EdDSA, the default) or ``jwt-rs256.pem`` (RS256, 2048-bit): the current
  signing key, PKCS#8 PEM, unencrypted.
* ``jwt-retired/<kid>.pem``: public keys of earlier signing keys. They still verify tokens
  (a rotation must not log everybody out) and are published in the JWKS until pruned.

``kid`` is the RFC 7638 JWK thumbprint (SHA-256 over the required public members, base64url),
so the same key gets the same ``kid`` on every node without any registry.

Rotation (:func:`rotate_key_files`): the current public key moves to ``jwt-retired/``, a new
signing key replaces the current file atomically, and old retired keys beyond ``keep`` are
deleted. Tokens signed with a pruned key stop verifying; keep retired keys for at least the
access-token lifetime. In a cluster every node must load the same files (shared volume or
configuration management) and reload after a rotation.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import secrets
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from gochat.errors import ConfigError

__all__ = [
    "ALGORITHMS",
    "DEFAULT_KEY_FILES",
    "RETIRED_DIR",
    "Algorithm",
    "JwtKey",
    "KeyRing",
    "PrivateKey",
    "PublicKey",
    "jwk_thumbprint",
    "public_jwk",
    "rotate_key_files",
]

log = logging.getLogger("gochat.auth.keys")

Algorithm = Literal["EdDSA", "RS256"]
ALGORITHMS: Final[tuple[Algorithm, ...]] = ("EdDSA", "RS256")
DEFAULT_KEY_FILES: Final[dict[str, str]] = {"EdDSA": "jwt-ed25519.pem", "RS256": "jwt-rs256.pem"}
RETIRED_DIR: Final = "jwt-retired"
RSA_BITS: Final = 2048

PrivateKey = ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
PublicKey = ed25519.Ed25519PublicKey | rsa.RSAPublicKey


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _b64url_uint(value: int) -> str:
    return _b64url(value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big"))


def public_jwk(key: PublicKey) -> dict[str, str]:
    """The RFC 7517 public JWK members of ``key`` (no ``kid``/``alg``/``use``)."""
    if isinstance(key, ed25519.Ed25519PublicKey):
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"kty": "OKP", "crv": "Ed25519", "x": _b64url(raw)}
    if isinstance(key, rsa.RSAPublicKey):
        numbers = key.public_numbers()
        return {"kty": "RSA", "n": _b64url_uint(numbers.n), "e": _b64url_uint(numbers.e)}
    raise ConfigError(f"unsupported JWT key type {type(key).__name__}")


def jwk_thumbprint(key: PublicKey) -> str:
    """RFC 7638 thumbprint: SHA-256 of the required members, lexicographic order, no spaces."""
    jwk = public_jwk(key)
    required = ("crv", "kty", "x") if jwk["kty"] == "OKP" else ("e", "kty", "n")
    canonical = json.dumps({k: jwk[k] for k in required}, separators=(",", ":"), sort_keys=True)
    return _b64url(hashlib.sha256(canonical.encode("ascii")).digest())


def _algorithm_of(key: PublicKey) -> Algorithm:
    return "EdDSA" if isinstance(key, ed25519.Ed25519PublicKey) else "RS256"


@dataclass(frozen=True, slots=True)
class JwtKey:
    """One key of the ring. ``private_key`` is None for verification-only (retired) keys."""

    kid: str
    algorithm: Algorithm
    public_key: PublicKey = field(repr=False)
    private_key: PrivateKey | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_private(cls, private_key: PrivateKey) -> JwtKey:
        public = private_key.public_key()
        return cls(jwk_thumbprint(public), _algorithm_of(public), public, private_key)

    @classmethod
    def from_public(cls, public_key: PublicKey) -> JwtKey:
        return cls(jwk_thumbprint(public_key), _algorithm_of(public_key), public_key, None)

    def jwk(self) -> dict[str, str]:
        """Public JWK with ``kid``, ``alg`` and ``use`` for the JWKS document."""
        return {**public_jwk(self.public_key), "kid": self.kid, "alg": self.algorithm, "use": "sig"}


def generate_private_key(algorithm: Algorithm) -> PrivateKey:
    if algorithm == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    if algorithm == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    raise ConfigError(f"unsupported JWT algorithm {algorithm!r} (use one of {', '.join(ALGORITHMS)})")


def _private_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _public_pem(key: PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(directory: Path, name: str, data: bytes) -> Path:
    tmp = directory / f".{name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # exact mode whatever the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    return tmp


def _create_exclusive(path: Path, data: bytes) -> bool:
    """Atomically create ``path`` (mode 0600) with ``data`` unless it exists. True if created.
    Concurrent creators (several processes starting at once) all end up with one winner's key."""
    tmp = _write_temp(path.parent, path.name, data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink()
    _fsync_dir(path.parent)
    return True


def _replace(path: Path, data: bytes) -> None:
    tmp = _write_temp(path.parent, path.name, data)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _check_mode(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("JWT key file %s had mode %o; tightening to 0600", path, mode)
        os.chmod(path, 0o600)


def _load_private(path: Path) -> PrivateKey:
    _check_mode(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"cannot load JWT signing key {path}: {exc}") from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey):
        raise ConfigError(f"JWT signing key {path} is neither Ed25519 nor RSA")
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size < RSA_BITS:
        raise ConfigError(f"RSA JWT signing key {path} is shorter than {RSA_BITS} bits")
    return key


def _load_public(path: Path) -> PublicKey:
    data = path.read_bytes()
    key: Any
    try:
        if b"PRIVATE KEY" in data:
            key = serialization.load_pem_private_key(data, password=None).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"cannot load JWT verification key {path}: {exc}") from exc
    if not isinstance(key, ed25519.Ed25519PublicKey | rsa.RSAPublicKey):
        raise ConfigError(f"JWT verification key {path} is neither Ed25519 nor RSA")
    return key


class KeyRing:
    """The signing key plus every key that may still verify tokens, indexed by ``kid``.

    Only the algorithms of the keys in the ring are ever accepted, and each ``kid`` accepts only
    its own key's algorithm.
    """

    __slots__ = ("_by_kid", "signing")

    def __init__(self, signing: JwtKey, verification: Iterable[JwtKey] = ()) -> None:
        if signing.private_key is None:
            raise ConfigError("the signing key needs its private half")
        self.signing = signing
        self._by_kid: dict[str, JwtKey] = {signing.kid: signing}
        for key in verification:
            self._by_kid.setdefault(key.kid, key)

    @classmethod
    def generate(cls, algorithm: Algorithm = "EdDSA") -> KeyRing:
        """An in-memory ring with a fresh key (tests, ephemeral nodes)."""
        return cls(JwtKey.from_private(generate_private_key(algorithm)))

    @classmethod
    def load_or_create(
        cls, data_dir: str | Path, algorithm: Algorithm = "EdDSA", *, filename: str | None = None
    ) -> KeyRing:
        """Load the signing key from ``data_dir`` (creating it on first start) and every retired
        key from ``data_dir/jwt-retired``."""
        if algorithm not in ALGORITHMS:
            raise ConfigError(f"unsupported JWT algorithm {algorithm!r} (use one of {', '.join(ALGORITHMS)})")
        directory = Path(data_dir)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = directory / (filename or DEFAULT_KEY_FILES[algorithm])
        if not path.exists():
            if _create_exclusive(path, _private_pem(generate_private_key(algorithm))):
                log.info("created JWT signing key %s (%s)", path, algorithm)
        signing = JwtKey.from_private(_load_private(path))
        if signing.algorithm != algorithm:
            raise ConfigError(f"JWT key {path} is {signing.algorithm}, but {algorithm} is configured")
        retired: list[JwtKey] = []
        retired_dir = directory / RETIRED_DIR
        if retired_dir.is_dir():
            for item in sorted(retired_dir.glob("*.pem"), key=lambda p: p.stat().st_mtime, reverse=True):
                retired.append(JwtKey.from_public(_load_public(item)))
        return cls(signing, retired)

    @property
    def keys(self) -> tuple[JwtKey, ...]:
        """Every key, the signing key first."""
        return tuple(self._by_kid.values())

    @property
    def algorithms(self) -> frozenset[str]:
        return frozenset(k.algorithm for k in self._by_kid.values())

    def get(self, kid: str) -> JwtKey | None:
        return self._by_kid.get(kid)

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        """The ``/.well-known/jwks.json`` document (public keys only)."""
        return {"keys": [k.jwk() for k in self._by_kid.values()]}


def rotate_key_files(
    data_dir: str | Path, algorithm: Algorithm = "EdDSA", *, filename: str | None = None, keep: int = 3
) -> KeyRing:
    """Retire the current signing key (its public half stays for verification), write a new one
    and prune all but the ``keep`` newest retired keys. Returns the new ring."""
    directory = Path(data_dir)
    current = KeyRing.load_or_create(directory, algorithm, filename=filename)
    retired_dir = directory / RETIRED_DIR
    retired_dir.mkdir(mode=0o700, exist_ok=True)
    old = current.signing
    _replace(retired_dir / f"{old.kid}.pem", _public_pem(old.public_key))
    _replace(
        directory / (filename or DEFAULT_KEY_FILES[algorithm]), _private_pem(generate_private_key(algorithm))
    )
    retired = sorted(retired_dir.glob("*.pem"), key=lambda p: p.stat().st_mtime, reverse=True)
    for stale in retired[max(0, keep) :]:
        stale.unlink(missing_ok=True)
    return KeyRing.load_or_create(directory, algorithm, filename=filename)
