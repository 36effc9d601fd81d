"""Auth: passwords, key ring, JWT access tokens, refresh rotation and revocation.

Real SQLite store and real key files in tmp_path; a fake clock only where expiry is tested."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from gochat.auth import AuthService, Claims, KeyRing, TokenPair, jwk_thumbprint, rotate_key_files
from gochat.auth.keys import Algorithm, JwtKey, PrivateKey
from gochat.auth.passwords import hash_password, needs_rehash, verify_password
from gochat.errors import AuthError, ConfigError, ErrorCode, GochatError, RequestError
from gochat.store.sqlite import SQLiteStore

T = TypeVar("T")


class Clock:
    def __init__(self) -> None:
        self.t = time.time()

    def __call__(self) -> float:
        return self.t


class Env:
    def __init__(self, store: SQLiteStore, auth: AuthService, keyring: KeyRing, clock: Clock) -> None:
        self.store, self.auth, self.keyring, self.clock = store, auth, keyring, clock


def run(
    tmp_path: Path,
    body: Callable[[Env], Awaitable[T]],
    *,
    algorithm: Algorithm = "EdDSA",
    clock: Clock | None = None,
) -> T:
    async def main() -> T:
        store = SQLiteStore(tmp_path / "auth.db")
        await store.open()
        keyring = KeyRing.load_or_create(tmp_path / "keys", algorithm)
        clk = clock or Clock()
        auth = AuthService(store, keyring, clock=clk)
        await auth.start()
        try:
            return await body(Env(store, auth, keyring, clk))
        finally:
            await store.close()

    return asyncio.run(main())


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def unsigned_parts(header: dict[str, Any], payload: dict[str, Any]) -> str:
    return b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(payload).encode())


def payload_of(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


def signer(ring: KeyRing) -> PrivateKey:
    key = ring.signing.private_key
    assert key is not None
    return key


def code_of(fn: Callable[[], object]) -> ErrorCode:
    with pytest.raises(AuthError) as ei:
        fn()
    return ei.value.code


# ---- passwords ------------------------------------------------------------------------------


def test_password_hash_format_and_verify() -> None:
    encoded = hash_password("correct horse")
    scheme, n, r, p, salt, digest = encoded.split("$")
    assert len(base64.b64decode(digest + "==")) == 32
    assert (scheme, n, r, p) == ("scrypt", "16384", "8", "1")
    assert len(base64.b64decode(salt + "==")) == 16
    assert verify_password("correct horse", encoded)
    assert not verify_password("correct horsf", encoded)
    assert hash_password("correct horse") != encoded  # fresh salt
    assert not verify_password("x", "garbage")
    assert not verify_password("x", "scrypt$3$8$1$AAAA$AAAA")  # n not a power of two
    assert not verify_password("x", "scrypt$1073741824$8$1$AAAAAAAAAAAAAAAAAAAAAA$" + "A" * 43)  # absurd n
    assert not needs_rehash(encoded)
    assert needs_rehash(hash_password("pw", n=2**10))


# ---- registration and login -------------------------------------------------------------------


def test_register_and_login(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        uid = await env.auth.register("alice", "s3cret-pass")
        rec = await env.store.get_user(uid)
        assert rec is not None and rec.username == "alice" and rec.password_hash.startswith("scrypt$")
        pair = await env.auth.login("alice", "s3cret-pass")
        assert isinstance(pair, TokenPair) and pair.user_id == uid and pair.token_type == "Bearer"
        claims = env.auth.verify_access(pair.access_token)
        assert isinstance(claims, Claims)
        assert (
            claims.user_id == uid and claims.sid == pair.session_id and claims.kid == env.keyring.signing.kid
        )
        assert claims.exp - claims.iat == 900 and pair.access_expires_at == claims.exp
        assert pair.refresh_expires_at - int(env.clock()) in range(30 * 86400 - 1, 30 * 86400 + 1)
        header = jwt.get_unverified_header(pair.access_token)
        assert header["alg"] == "EdDSA" and header["kid"] == env.keyring.signing.kid
        payload = payload_of(pair.access_token)
        assert payload["sub"] == str(uid) and payload["iss"] == "gochat" and payload["typ"] == "access"
        assert {"jti", "iat", "exp"} <= payload.keys()
        # the store never sees the refresh token itself
        assert pair.refresh_token not in repr(await env.store.revoked_jtis(0))
        with pytest.raises(AttributeError):
            pair.user_id = 5  # type: ignore[misc]
        with pytest.raises(AttributeError):
            claims.user_id = 5  # type: ignore[misc]

    run(tmp_path, body)


@pytest.mark.parametrize(
    ("username", "password"),
    [
        ("ab", "password1"),
        ("a" * 33, "password1"),
        ("bad name", "password1"),
        ("bad/name", "password1"),
        ("trailing\n", "password1"),
        ("ünïcode", "password1"),
        ("alice", "short"),
        ("alice", "x" * 257),
    ],
)
def test_register_validation(tmp_path: Path, username: str, password: str) -> None:
    async def body(env: Env) -> None:
        with pytest.raises(RequestError) as ei:
            await env.auth.register(username, password)
        assert ei.value.code == ErrorCode.BAD_REQUEST

    run(tmp_path, body)


def test_register_duplicate_is_conflict(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        await env.auth.register("a.b-c_1", "password1")
        for name in ("a.b-c_1", "A.B-C_1"):  # names are case-insensitive
            with pytest.raises(RequestError) as ei:
                await env.auth.register(name, "password2")
            assert ei.value.code == ErrorCode.CONFLICT

    run(tmp_path, body)


def test_login_failures_look_the_same(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        await env.auth.register("alice", "password1")
        errors = []
        timings: dict[str, float] = {}
        for name, pw in (("alice", "wrong-password"), ("nobody", "password1"), ("no way!", "password1")):
            best = float("inf")
            for _ in range(2):
                t0 = time.perf_counter()
                with pytest.raises(AuthError) as ei:
                    await env.auth.login(name, pw)
                best = min(best, time.perf_counter() - t0)
            timings[name] = best
            errors.append((ei.value.code, ei.value.message))
        assert len(set(errors)) == 1 and errors[0][0] == ErrorCode.UNAUTHORIZED
        # the KDF runs for unknown users too: no fast path that reveals which names exist
        assert timings["nobody"] > 0.4 * timings["alice"]
        assert timings["no way!"] > 0.4 * timings["alice"]
        # login is case-insensitive on the name, like registration
        assert (await env.auth.login("ALICE", "password1")).user_id > 0

    run(tmp_path, body)


# ---- refresh rotation ---------------------------------------------------------------------------


def test_refresh_rotation(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        uid = await env.auth.register("alice", "password1")
        first = await env.auth.login("alice", "password1")
        second = await env.auth.refresh(first.refresh_token)
        assert second.user_id == uid and second.session_id == first.session_id
        assert second.refresh_token != first.refresh_token and second.access_token != first.access_token
        third = await env.auth.refresh(second.refresh_token)
        assert env.auth.verify_access(third.access_token).sid == first.session_id
        with pytest.raises(AuthError) as ei:
            await env.auth.refresh("not-a-token")
        assert ei.value.code == ErrorCode.UNAUTHORIZED

    run(tmp_path, body)


def test_refresh_reuse_revokes_family(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        uid = await env.auth.register("alice", "password1")
        events: list[tuple[int, str]] = []

        async def on_revoke(user_id: int, revoked: str) -> None:
            events.append((user_id, revoked))

        env.auth.on_revoke(on_revoke)
        other_session = await env.auth.login("alice", "password1")
        first = await env.auth.login("alice", "password1")
        second = await env.auth.refresh(first.refresh_token)
        # the stolen (already spent) token is presented again
        with pytest.raises(AuthError) as ei:
            await env.auth.refresh(first.refresh_token)
        assert ei.value.code == ErrorCode.TOKEN_REVOKED
        # the whole family is dead: the legitimate latest token too ...
        with pytest.raises(AuthError) as ei:
            await env.auth.refresh(second.refresh_token)
        assert ei.value.code == ErrorCode.TOKEN_REVOKED
        # ... and the family's access tokens
        assert code_of(lambda: env.auth.verify_access(second.access_token)) == ErrorCode.TOKEN_REVOKED
        assert events == [(uid, "fam:" + first.session_id)]
        # other sessions of the same user are untouched
        env.auth.verify_access(other_session.access_token)
        await env.auth.refresh(other_session.refresh_token)

    run(tmp_path, body)


def test_concurrent_refresh_with_one_token(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        await env.auth.register("alice", "password1")
        pair = await env.auth.login("alice", "password1")
        results = await asyncio.gather(
            env.auth.refresh(pair.refresh_token), env.auth.refresh(pair.refresh_token), return_exceptions=True
        )
        winners = [r for r in results if isinstance(r, TokenPair)]
        losers = [r for r in results if isinstance(r, AuthError)]
        assert len(winners) == 1 and len(losers) == 1 and losers[0].code == ErrorCode.TOKEN_REVOKED
        # the winner's new token was issued into a family that is now revoked
        with pytest.raises(AuthError) as ei:
            await env.auth.refresh(winners[0].refresh_token)
        assert ei.value.code == ErrorCode.TOKEN_REVOKED

    run(tmp_path, body)


# ---- logout and deny-list -------------------------------------------------------------------------


def test_logout_revokes(tmp_path: Path) -> None:
    async def body(env: Env) -> tuple[str, str]:
        uid = await env.auth.register("alice", "password1")
        events: list[tuple[int, str]] = []
        env.auth.on_revoke(lambda user_id, revoked: events.append((user_id, revoked)))
        pair = await env.auth.login("alice", "password1")
        keep = await env.auth.login("alice", "password1")
        claims = env.auth.verify_access(pair.access_token)
        await env.auth.logout(claims, pair.refresh_token)
        assert code_of(lambda: env.auth.verify_access(pair.access_token)) == ErrorCode.TOKEN_REVOKED
        with pytest.raises(AuthError) as ei:
            await env.auth.refresh(pair.refresh_token)
        assert ei.value.code == ErrorCode.TOKEN_REVOKED
        assert (uid, claims.jti) in events and (uid, "fam:" + pair.session_id) in events
        env.auth.verify_access(keep.access_token)  # another device stays logged in
        denied = await env.store.revoked_jtis(int(env.clock() * 1000))
        assert denied[claims.jti] == claims.exp * 1000
        # logout by bare jti
        other = env.auth.verify_access(keep.access_token)
        await env.auth.logout(other.jti)
        assert code_of(lambda: env.auth.verify_access(keep.access_token)) == ErrorCode.TOKEN_REVOKED
        return pair.access_token, keep.access_token

    tokens = run(tmp_path, body)

    async def after_restart(env: Env) -> None:
        # a fresh node loads the deny-list from the store at start
        for token in tokens:
            assert code_of(lambda t=token: env.auth.verify_access(t)) == ErrorCode.TOKEN_REVOKED  # type: ignore[misc]

    run(tmp_path, after_restart)


def test_apply_revocation_from_another_node(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        await env.auth.register("alice", "password1")
        pair = await env.auth.login("alice", "password1")
        claims = env.auth.verify_access(pair.access_token)
        env.auth.apply_revocation(claims.jti, claims.exp * 1000)
        assert env.auth.is_revoked(claims)
        assert code_of(lambda: env.auth.verify_access(pair.access_token)) == ErrorCode.TOKEN_REVOKED

    run(tmp_path, body)


def test_expired_access_token(tmp_path: Path) -> None:
    clock = Clock()

    async def body(env: Env) -> None:
        await env.auth.register("alice", "password1")
        pair = await env.auth.login("alice", "password1")
        clock.t += 899
        env.auth.verify_access(pair.access_token)
        clock.t += 1
        assert code_of(lambda: env.auth.verify_access(pair.access_token)) == ErrorCode.TOKEN_EXPIRED
        # an expired refresh token is simply invalid
        clock.t += 31 * 86400
        with pytest.raises(AuthError) as ei:
            await env.auth.refresh(pair.refresh_token)
        assert ei.value.code == ErrorCode.UNAUTHORIZED

    run(tmp_path, body, clock=clock)


# ---- forged and confused tokens ------------------------------------------------------------------


def _claims_payload(env: Env, **overrides: Any) -> dict[str, Any]:
    now = int(env.clock())
    return {
        "iss": "gochat",
        "sub": "1",
        "jti": "j",
        "iat": now,
        "exp": now + 600,
        "typ": "access",
        **overrides,
    }


def test_forged_tokens_rejected(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        await env.auth.register("alice", "password1")
        pair = await env.auth.login("alice", "password1")
        kid = env.keyring.signing.kid
        verify = env.auth.verify_access

        # signed by another key that claims our kid
        attacker = ed25519.Ed25519PrivateKey.generate()
        forged = jwt.encode(_claims_payload(env), attacker, algorithm="EdDSA", headers={"kid": kid})
        assert code_of(lambda: verify(forged)) == ErrorCode.UNAUTHORIZED

        # payload changed after signing (sub 1 -> 2)
        head, payload, sig = pair.access_token.split(".")
        claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
        claims["sub"] = str(int(claims["sub"]) + 1)
        tampered = f"{head}.{b64url(json.dumps(claims).encode())}.{sig}"
        assert code_of(lambda: verify(tampered)) == ErrorCode.UNAUTHORIZED

        # alg: none
        for alg in ("none", "None", "NONE"):
            none_token = unsigned_parts({"alg": alg, "typ": "JWT", "kid": kid}, _claims_payload(env)) + "."
            assert code_of(lambda t=none_token: verify(t)) == ErrorCode.UNAUTHORIZED  # type: ignore[misc]

        # HS256 keyed with the public key (algorithm confusion)
        public_pem = env.keyring.signing.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        raw_public = env.keyring.signing.public_key.public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        for secret in (public_pem, raw_public):
            signing_input = unsigned_parts({"alg": "HS256", "typ": "JWT", "kid": kid}, _claims_payload(env))
            mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
            hs_token = signing_input + "." + b64url(mac)
            assert code_of(lambda t=hs_token: verify(t)) == ErrorCode.UNAUTHORIZED  # type: ignore[misc]

        # unknown kid, missing kid
        other = KeyRing.generate()
        foreign = jwt.encode(
            _claims_payload(env), signer(other), algorithm="EdDSA", headers={"kid": other.signing.kid}
        )
        assert code_of(lambda: verify(foreign)) == ErrorCode.UNAUTHORIZED
        priv = signer(env.keyring)
        no_kid = jwt.encode(_claims_payload(env), priv, algorithm="EdDSA")
        assert code_of(lambda: verify(no_kid)) == ErrorCode.UNAUTHORIZED

        # correctly signed, but not an access token / wrong issuer / missing claims / bad sub
        for bad in (
            _claims_payload(env, typ="refresh"),
            _claims_payload(env, iss="someone-else"),
            {k: v for k, v in _claims_payload(env).items() if k != "jti"},
            {k: v for k, v in _claims_payload(env).items() if k != "exp"},
            _claims_payload(env, sub="alice"),
            _claims_payload(env, sub="-1"),
        ):
            token = jwt.encode(bad, priv, algorithm="EdDSA", headers={"kid": kid})
            assert code_of(lambda t=token: verify(t)) == ErrorCode.UNAUTHORIZED  # type: ignore[misc]

        # a well-formed token we sign ourselves passes: the checks above are not vacuous
        good = jwt.encode(_claims_payload(env), priv, algorithm="EdDSA", headers={"kid": kid})
        assert verify(good).user_id == 1

        for garbage in ("", "a.b.c", "x" * 10_000, "....", pair.access_token + "x"):
            assert code_of(lambda t=garbage: verify(t)) == ErrorCode.UNAUTHORIZED  # type: ignore[misc]

    run(tmp_path, body)


def test_rs256_mode(tmp_path: Path) -> None:
    async def body(env: Env) -> None:
        assert env.keyring.signing.algorithm == "RS256"
        assert isinstance(env.keyring.signing.private_key, rsa.RSAPrivateKey)
        assert env.keyring.signing.private_key.key_size == 2048
        assert (tmp_path / "keys" / "jwt-rs256.pem").exists()
        uid = await env.auth.register("alice", "password1")
        pair = await env.auth.login("alice", "password1")
        assert jwt.get_unverified_header(pair.access_token)["alg"] == "RS256"
        assert env.auth.verify_access(pair.access_token).user_id == uid
        # HS256 keyed with the RSA public key PEM is rejected
        pem = env.keyring.signing.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        signing_input = unsigned_parts(
            {"alg": "HS256", "typ": "JWT", "kid": env.keyring.signing.kid}, _claims_payload(env, sub=str(uid))
        )
        token = signing_input + "." + b64url(hmac.new(pem, signing_input.encode(), hashlib.sha256).digest())
        assert code_of(lambda: env.auth.verify_access(token)) == ErrorCode.UNAUTHORIZED
        # an RS-keyed token presented with a different RSA alg (PS256 / RS512) is rejected too
        priv = signer(env.keyring)
        for alg in ("PS256", "RS512"):
            other_alg = jwt.encode(
                _claims_payload(env), priv, algorithm=alg, headers={"kid": env.keyring.signing.kid}
            )
            assert code_of(lambda t=other_alg: env.auth.verify_access(t)) == ErrorCode.UNAUTHORIZED  # type: ignore[misc]
        jwks = env.keyring.jwks()
        (jwk,) = jwks["keys"]
        assert jwk["kty"] == "RSA" and jwk["alg"] == "RS256" and jwk["use"] == "sig" and jwk["e"] == "AQAB"
        assert jwk["kid"] == env.keyring.signing.kid
        assert not {"d", "p", "q", "dp", "dq", "qi"} & jwk.keys()

    run(tmp_path, body, algorithm="RS256")


# ---- keys -------------------------------------------------------------------------------------------


def test_jwks_contents(tmp_path: Path) -> None:
    ring = KeyRing.load_or_create(tmp_path)
    jwks = ring.jwks()
    assert json.loads(json.dumps(jwks)) == jwks  # plain JSON
    (jwk,) = jwks["keys"]
    assert jwk.keys() == {"kty", "crv", "x", "kid", "alg", "use"}
    assert (jwk["kty"], jwk["crv"], jwk["alg"], jwk["use"]) == ("OKP", "Ed25519", "EdDSA", "sig")
    assert jwk["kid"] == ring.signing.kid == jwk_thumbprint(ring.signing.public_key)
    # the published JWK verifies our tokens (what a third party would do)
    public = jwt.PyJWK(jwk)
    token = jwt.encode({"sub": "1"}, signer(ring), algorithm="EdDSA", headers={"kid": ring.signing.kid})
    assert jwt.decode(token, public, algorithms=["EdDSA"]) == {"sub": "1"}


def test_kid_is_rfc7638_thumbprint() -> None:
    # RFC 7638 section 3.1 example
    n = (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiF"
        "V4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9"
        "c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1"
        "jF44-csFCur-kEgU8awapJzKnqDKgw"
    )
    n_int = int.from_bytes(base64.urlsafe_b64decode(n + "=" * (-len(n) % 4)), "big")
    rsa_key = rsa.RSAPublicNumbers(65537, n_int).public_key()
    assert jwk_thumbprint(rsa_key) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    # RFC 8037 appendix A.3
    x = base64.urlsafe_b64decode("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo=")
    ed_key = ed25519.Ed25519PublicKey.from_public_bytes(x)
    assert jwk_thumbprint(ed_key) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


def test_key_file_mode_and_reuse_across_restart(tmp_path: Path) -> None:
    keys = tmp_path / "data"
    first = KeyRing.load_or_create(keys)
    path = keys / "jwt-ed25519.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    assert b"PRIVATE KEY" in path.read_bytes()
    assert [p.name for p in keys.iterdir()] == ["jwt-ed25519.pem"]  # no temp files left
    second = KeyRing.load_or_create(keys)
    assert second.signing.kid == first.signing.kid
    assert first.signing.private_key is not None
    token = jwt.encode(
        {"sub": "1"}, first.signing.private_key, algorithm="EdDSA", headers={"kid": first.signing.kid}
    )
    key = second.get(first.signing.kid)
    assert key is not None and jwt.decode(token, key.public_key, algorithms=["EdDSA"]) == {"sub": "1"}
    # a loosened mode is tightened on load
    os.chmod(path, 0o644)
    KeyRing.load_or_create(keys)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_tokens_survive_restart(tmp_path: Path) -> None:
    async def first(env: Env) -> str:
        await env.auth.register("alice", "password1")
        return (await env.auth.login("alice", "password1")).access_token

    token = run(tmp_path, first)

    async def second(env: Env) -> None:
        assert env.auth.verify_access(token).user_id > 0

    run(tmp_path, second)


def test_key_rotation(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    ring = KeyRing.load_or_create(keys)
    old_kid = ring.signing.kid

    async def issue(env: Env) -> str:
        await env.auth.register("alice", "password1")
        return (await env.auth.login("alice", "password1")).access_token

    old_token = run(tmp_path, issue)
    rotated = rotate_key_files(keys, keep=2)
    assert rotated.signing.kid != old_kid
    assert [k.kid for k in rotated.keys] == [rotated.signing.kid, old_kid]
    assert {k["kid"] for k in rotated.jwks()["keys"]} == {rotated.signing.kid, old_kid}
    retired = keys / "jwt-retired" / f"{old_kid}.pem"
    assert retired.exists() and b"PRIVATE" not in retired.read_bytes()

    async def after_rotation(env: Env) -> None:
        assert env.keyring.signing.kid == rotated.signing.kid
        assert env.auth.verify_access(old_token).user_id > 0  # old tokens still verify
        fresh = (await env.auth.login("alice", "password1")).access_token
        assert jwt.get_unverified_header(fresh)["kid"] == rotated.signing.kid

    run(tmp_path, after_rotation)
    rotate_key_files(keys, keep=0)  # prune every retired key

    async def after_prune(env: Env) -> None:
        assert code_of(lambda: env.auth.verify_access(old_token)) == ErrorCode.UNAUTHORIZED

    run(tmp_path, after_prune)


def test_keyring_rejects_mismatched_algorithm(tmp_path: Path) -> None:
    KeyRing.load_or_create(tmp_path, "EdDSA")
    with pytest.raises(ConfigError, match="RS256"):
        KeyRing.load_or_create(tmp_path, "RS256", filename="jwt-ed25519.pem")
    with pytest.raises(ConfigError):
        KeyRing(JwtKey.from_public(ed25519.Ed25519PrivateKey.generate().public_key()))


def test_a_node_behind_on_revocations_accepts_no_token_until_it_caught_up(tmp_path: Path) -> None:
    """guard_freshness: while the event reader is behind, a valid token gets UNAVAILABLE
    (retryable, retry_after_ms) and a revoked one TOKEN_REVOKED as soon as it is known; the
    deny-list is reloaded from the store meanwhile, which catches the node up without the bus
    (a revocation another node stored shows up); logout itself never waits for freshness."""

    async def body(env: Env) -> None:
        await env.auth.register("frank", "s3cret-pass")
        one = await env.auth.login("frank", "s3cret-pass")
        two = await env.auth.login("frank", "s3cret-pass")
        reader = {"caught_up": True}
        env.auth.guard_freshness(lambda: reader["caught_up"], 0.2)
        try:
            env.auth.verify_access(one.access_token)
            reader["caught_up"] = False
            await asyncio.sleep(0.15)  # the reader is behind: the deny-list is reloaded meanwhile
            env.auth.verify_access(one.access_token)
            time.sleep(0.3)  # the process stalls (as under SIGSTOP): the last reload is too old
            with pytest.raises(GochatError) as info:
                env.auth.verify_access(one.access_token)
            assert info.value.code == ErrorCode.UNAVAILABLE and info.value.retry_after_ms > 0
            env.auth.verify_access(one.access_token, require_fresh=False)
            # ... another node revokes `two` (stored; this node missed the event)
            claims = env.auth.tokens.verify_access(two.access_token)
            await env.store.revoke_jti(claims.jti, claims.exp * 1000)
            await asyncio.sleep(0.15)  # the freshness task reloads the deny-list from the store
            env.auth.verify_access(one.access_token)
            with pytest.raises(AuthError) as revoked:
                env.auth.verify_access(two.access_token)
            assert revoked.value.code == ErrorCode.TOKEN_REVOKED
        finally:
            await env.auth.close()

    run(tmp_path, body)
