"""End-to-end tests against a real ``gochat serve`` process (embedded defaults, SQLite).

Each test speaks the wire protocol through :class:`RawClient`, so what is asserted is exactly
what a client in any language would see.
"""

from __future__ import annotations

import asyncio
import os
import struct
import time
from pathlib import Path

import aiohttp
import jwt
import pytest
from picows import WSMsgType

from gochat.errors import ErrorCode
from gochat.protocol import FLAG_DUPLICATE, FLAG_MORE, EventType, Kind
from gochat.protocol.frames import (
    AuthOk,
    Call,
    CallResult,
    Deliver,
    Event,
    GoAway,
    History,
    HistoryResult,
    Ping,
    Pong,
    Read,
    ReadOk,
    SendAck,
    Subscribe,
    SubscribeOk,
    Sync,
    SyncEntry,
    SyncResult,
    Typing,
)
from tests.conftest import GochatProcess, UserCtx, create_user, run
from tests.e2e.rawclient import RawClient, connect, new_cmid, send_frame

pytestmark = pytest.mark.e2e

MAX_FRAME = 65536


async def online(server: GochatProcess, user: UserCtx, via_header: bool = False) -> RawClient:
    if via_header:
        c = await connect(server.ws_url, header_token=user.access_token)
    else:
        c = await connect(server.ws_url, user.access_token)
    ok = await c.expect(AuthOk)
    assert ok.user_id == user.user_id
    return c


async def call(c: RawClient, method: str, payload: bytes, rid: int) -> CallResult:
    c.send(Call(method, payload, rid=rid))
    return await c.expect(CallResult, skip=(Event,))


async def assert_healthy(server: GochatProcess) -> None:
    """Two fresh users can still exchange a message: the server keeps serving everyone."""
    a, b = await create_user(server.http_url, "ha"), await create_user(server.http_url, "hb")
    ca, cb = await online(server, a), await online(server, b)
    ca.send(send_frame(Kind.DIRECT, b.user_id, b"still alive", rid=7))
    await ca.expect(SendAck)
    d = await cb.expect(Deliver)
    assert d.message.body == b"still alive"
    ca.close()
    cb.close()


# ---- HTTP API ------------------------------------------------------------------------------------


def test_http_accounts_tokens_and_health(gochat_server: GochatProcess) -> None:
    async def scenario() -> None:
        base = gochat_server.http_url
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{base}/v1/users", json={"username": "carol_1", "password": "pw-long-enough"}) as r:
                assert r.status == 201
                uid = (await r.json())["user_id"]
            async with http.post(f"{base}/v1/users", json={"username": "carol_1", "password": "pw-long-enough"}) as r:
                assert r.status == 409
                assert (await r.json())["error"]["code"] == ErrorCode.CONFLICT
            async with http.post(f"{base}/v1/users", data=b"{not json") as r:
                assert r.status == 400
                assert (await r.json())["error"]["code"] == ErrorCode.BAD_JSON
            async with http.post(f"{base}/v1/auth/login", json={"username": "carol_1", "password": "wrong-password"}) as r:
                assert r.status == 401
            async with http.post(f"{base}/v1/auth/login", json={"username": "carol_1", "password": "pw-long-enough"}) as r:
                assert r.status == 200
                tokens = await r.json()
            assert tokens["user_id"] == uid and tokens["expires_in"] > 0
            header = jwt.get_unverified_header(tokens["access_token"])
            assert header["alg"] == "EdDSA" and header["kid"]
            async with http.get(f"{base}/.well-known/jwks.json") as r:
                keys = (await r.json())["keys"]
            assert any(k["kid"] == header["kid"] for k in keys)
            # refresh rotates; reusing the spent token revokes the family
            async with http.post(f"{base}/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]}) as r:
                assert r.status == 200
                rotated = await r.json()
            assert rotated["refresh_token"] != tokens["refresh_token"]
            async with http.post(f"{base}/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]}) as r:
                assert r.status == 401
                assert (await r.json())["error"]["code"] == ErrorCode.TOKEN_REVOKED
            async with http.post(f"{base}/v1/auth/refresh", json={"refresh_token": rotated["refresh_token"]}) as r:
                assert r.status == 401, "the whole family is revoked"
            async with http.get(f"{base}/healthz") as r:
                assert r.status == 200
            async with http.get(f"{base}/readiness") as r:
                assert r.status == 200 and (await r.json())["ready"] is True
            async with http.get(f"{base}/v1/gateways") as r:
                gws = (await r.json())["gateways"]
            assert gws[0]["url"] == gochat_server.ws_url
            async with http.get(f"{base}/metrics") as r:
                text = await r.text()
            assert "gochat_connections" in text and "gochat_send_latency_seconds" in text

    run(scenario())


def test_logout_revokes_and_disconnects_sessions(gochat_server: GochatProcess) -> None:
    async def scenario() -> None:
        alice = await create_user(gochat_server.http_url, "alice")
        c1, c2 = await online(gochat_server, alice), await online(gochat_server, alice, via_header=True)
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{gochat_server.http_url}/v1/auth/logout",
                headers={"Authorization": f"Bearer {alice.access_token}"},
                json={"refresh_token": alice.refresh_token},
            ) as r:
                assert r.status == 204
            async with http.post(
                f"{gochat_server.http_url}/v1/auth/refresh", json={"refresh_token": alice.refresh_token}
            ) as r:
                assert r.status == 401
        for c in (c1, c2):
            g = await c.expect(GoAway)
            assert g.code == ErrorCode.TOKEN_REVOKED
            assert await c.wait_closed() == 4000 + ErrorCode.TOKEN_REVOKED
        # the revoked access token no longer authenticates
        c3 = await connect(gochat_server.ws_url, alice.access_token)
        await c3.expect_error(ErrorCode.TOKEN_REVOKED)
        assert await c3.wait_closed() == 4202

    run(scenario())


# ---- authentication on the gateway -----------------------------------------------------------------


def _sign_with_server_key(server: GochatProcess, claims: dict[str, object], alg: str = "EdDSA") -> str:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    pem = next(p for p in Path(server.data_dir).iterdir() if p.suffix == ".pem" and "ed25519" in p.name)
    assert oct(pem.stat().st_mode & 0o777) == "0o600"
    key = load_pem_private_key(pem.read_bytes(), None)
    header = jwt.get_unverified_header(
        jwt.encode({"x": 1}, key, algorithm=alg)  # type: ignore[arg-type]
    )
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": header.get("kid", "")})  # type: ignore[arg-type]


def test_bad_tokens_are_rejected(gochat_server: GochatProcess) -> None:
    async def scenario() -> None:
        alice = await create_user(gochat_server.http_url, "alice")
        # forged: signature bytes changed
        head, payload, sig = alice.access_token.split(".")
        forged = f"{head}.{payload}.{sig[:-4]}AAAA"
        none_alg = jwt.encode({"sub": str(alice.user_id), "typ": "access"}, None, algorithm="none")  # type: ignore[arg-type]
        for token in (forged, none_alg, "not-a-jwt", "x" * 4000):
            c = await connect(gochat_server.ws_url, token)
            err = await c.expect_error(ErrorCode.UNAUTHORIZED)
            assert err.rid == 1
            assert await c.wait_closed() == 4200
        # expired, with a correctly signed token: checked with the server's own key file
        keyring = _keyring_kid(gochat_server)
        expired = _sign_expired(gochat_server, alice.user_id, keyring)
        c = await connect(gochat_server.ws_url, expired)
        await c.expect_error(ErrorCode.TOKEN_EXPIRED)
        assert await c.wait_closed() == 4201
        # a bad token in the upgrade request: HTTP 401, no WebSocket
        with pytest.raises(Exception):  # noqa: B017 - picows raises its handshake error type
            await connect(gochat_server.ws_url, header_token=forged)
        await assert_healthy(gochat_server)

    run(scenario())


def _keyring_kid(server: GochatProcess) -> str:
    import urllib.request

    with urllib.request.urlopen(f"{server.http_url}/.well-known/jwks.json") as r:
        import json

        return str(json.load(r)["keys"][0]["kid"])


def _sign_expired(server: GochatProcess, user_id: int, kid: str) -> str:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    pem = next(p for p in Path(server.data_dir).iterdir() if p.suffix == ".pem")
    key = load_pem_private_key(pem.read_bytes(), None)
    now = int(time.time())
    claims = {"sub": str(user_id), "jti": "expired-1", "iat": now - 7200, "exp": now - 3600,
              "typ": "access", "iss": "gochat"}
    return jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": kid})  # type: ignore[arg-type]


def test_only_auth_and_ping_before_authentication(gochat_server: GochatProcess) -> None:
    async def scenario() -> None:
        c = await connect(gochat_server.ws_url)
        c.send(Ping(b"hi", rid=3))
        pong = await c.expect(Pong)
        assert pong.payload == b"hi" and pong.rid == 3
        c.send(send_frame(Kind.DIRECT, 1, b"x", rid=4))
        err = await c.expect_error(ErrorCode.NOT_AUTHENTICATED)
        assert err.rid == 4
        assert await c.wait_closed() == 4108

    run(scenario())


# ---- messaging -------------------------------------------------------------------------------------


def test_direct_multi_device_delivery_and_idempotent_retry(gochat_server: GochatProcess) -> None:
    async def scenario() -> None:
        alice = await create_user(gochat_server.http_url, "alice")
        bob = await create_user(gochat_server.http_url, "bob")
        a1, a2 = await online(gochat_server, alice), await online(gochat_server, alice)
        b1, b2 = await online(gochat_server, bob), await online(gochat_server, bob, via_header=True)
        cmid = new_cmid()
        a1.send(send_frame(Kind.DIRECT, bob.user_id, b"hello bob", rid=10, cmid=cmid))
        ack = await a1.expect(SendAck)
        assert (ack.rid, ack.kind, ack.conv_id, ack.seq, ack.flags) == (10, Kind.DIRECT, bob.user_id, 1, 0)
        for c in (b1, b2):
            m = (await c.expect(Deliver)).message
            assert (m.conv_id, m.sender_id, m.seq, m.msg_id, m.body) == (
                alice.user_id, alice.user_id, 1, ack.msg_id, b"hello bob"
            )
            assert m.client_msg_id == cmid
        mine = (await a2.expect(Deliver)).message
        assert mine.conv_id == bob.user_id and mine.msg_id == ack.msg_id
        await a1.no_frame()  # the sending connection gets the ACK only
        # a retry with the same client_msg_id: the original ACK, flagged, and no second DELIVER
        a1.send(send_frame(Kind.DIRECT, bob.user_id, b"hello bob", rid=11, cmid=cmid))
        dup = await a1.expect(SendAck)
        assert (dup.seq, dup.msg_id, dup.ts_ms, dup.rid) == (ack.seq, ack.msg_id, ack.ts_ms, 11)
        assert dup.flags & FLAG_DUPLICATE
        await b1.no_frame()
        # reply comes back with the next seq
        b1.send(send_frame(Kind.DIRECT, alice.user_id, b"hi alice", rid=1))
        assert (await b1.expect(SendAck)).seq == 2
        for c in (a1, a2):
            m = (await c.expect(Deliver)).message
            assert (m.conv_id, m.seq, m.body) == (bob.user_id, 2, b"hi alice")

    run(scenario())


def test_pipelined_sends_to_new_conversations_keep_arrival_order(gochat_server: GochatProcess) -> None:
    """390 SENDs in one WebSocket message, alternating between two conversations nobody has
    used yet: the first SEND to each needs a lookup, and everything behind it waits in the
    connection's send backlog. Every SEND is acknowledged, in arrival order, with consecutive
    seqs per conversation, and each peer receives its messages in seq order."""

    async def scenario() -> None:
        alice = await create_user(gochat_server.http_url, "pipe-alice")
        bob = await create_user(gochat_server.http_url, "pipe-bob")
        carol = await create_user(gochat_server.http_url, "pipe-carol")
        a, b, c = [await online(gochat_server, u) for u in (alice, bob, carol)]
        peers = [bob.user_id, carol.user_id]
        n = 390  # below the default rate-limit burst (400)
        a.send(*(send_frame(Kind.DIRECT, peers[i % 2], b"m%d" % i, rid=i + 1) for i in range(n)))
        acks = [await a.expect(SendAck, timeout=20) for _ in range(n)]
        assert [k.rid for k in acks] == list(range(1, n + 1))
        for p, peer in enumerate(peers):
            assert [k.seq for k in acks[p::2]] == list(range(1, n // 2 + 1))
            assert all(k.conv_id == peer for k in acks[p::2])
        for p, client in enumerate((b, c)):
            got = [(await client.expect(Deliver, timeout=20)).message for _ in range(n // 2)]
            assert [m.seq for m in got] == list(range(1, n // 2 + 1))
            assert [m.body for m in got] == [b"m%d" % i for i in range(p, n, 2)]
        await assert_healthy(gochat_server)

    run(scenario())


def test_group_fan_out_membership_and_events(gochat_server: GochatProcess) -> None:
    async def scenario() -> None:
        users = [await create_user(gochat_server.http_url, f"g{i}") for i in range(4)]
        owner, m1, m2, _outsider = users
        conns = [await online(gochat_server, u) for u in users]
        res = await call(conns[0], "group.create", b'{"name": "team", "members": [%d, %d]}' % (m1.user_id, m2.user_id), 20)
        import orjson

        group = orjson.loads(res.payload)
        gid = group["group_id"]
        assert sorted(group["members"]) == sorted([owner.user_id, m1.user_id, m2.user_id])
        for i in range(3):
            conns[0].send(send_frame(Kind.GROUP, gid, b"msg %d" % i, rid=30 + i))
        seqs = [(await conns[0].expect(SendAck, skip=(Event,))).seq for _ in range(3)]
        assert seqs == [1, 2, 3]
        for c in conns[1:3]:
            got = [(await c.expect(Deliver, skip=(Event,))).message for _ in range(3)]
            assert [m.seq for m in got] == [1, 2, 3]
            assert [m.body for m in got] == [b"msg 0", b"msg 1", b"msg 2"]
            assert all(m.conv_id == gid and m.kind == Kind.GROUP for m in got)
        # an outsider can neither send nor read; its connection stays open
        conns[3].send(send_frame(Kind.GROUP, gid, b"let me in", rid=40))
        await conns[3].expect_error(ErrorCode.NOT_MEMBER)
        conns[3].send(History(Kind.GROUP, gid, 1, 10, rid=41))
        await conns[3].expect_error(ErrorCode.NOT_MEMBER)
        conns[3].send(Ping(rid=42))
        await conns[3].expect(Pong)
        # unknown group
        conns[3].send(send_frame(Kind.GROUP, 987654321, b"?", rid=43))
        await conns[3].expect_error(ErrorCode.NOT_FOUND)
        # read receipt and typing reach the other members as EVENTs
        conns[1].send(Read(Kind.GROUP, gid, 2, rid=50))
        await conns[1].expect(ReadOk, skip=(Event,))
        ev = await conns[0].expect(Event)
        assert (ev.type, ev.conv_id, ev.actor_id, ev.value) == (EventType.READ, gid, m1.user_id, 2)
        conns[2].send(Typing(Kind.GROUP, gid))
        ev = await conns[0].expect(Event)
        assert (ev.type, ev.actor_id, ev.value) == (EventType.TYPING, m2.user_id, 1)
        # SYNC shows the read position
        conns[1].send(Sync([], rid=51))
        sync = await conns[1].expect(SyncResult, skip=(Event,))
        entry = next(e for e in sync.entries if e.conv_id == gid)
        assert (entry.kind, entry.last_seq, entry.read_seq) == (Kind.GROUP, 3, 2)
        # membership changes: removed member gets nothing more
        await call(conns[0], "group.remove", b'{"group_id": %d, "user_id": %d}' % (gid, m2.user_id), 60)
        conns[0].send(send_frame(Kind.GROUP, gid, b"after removal", rid=61))
        await conns[0].expect(SendAck, skip=(Event,))
        assert (await conns[1].expect(Deliver, skip=(Event,))).message.body == b"after removal"
        while True:
            try:
                f = await conns[2].recv(0.5)
            except TimeoutError:
                break
            assert not isinstance(f, Deliver), "removed member must not receive group messages"

    run(scenario())


def test_offline_recovery_with_sync_and_history(gochat_server: GochatProcess) -> None:
    async def scenario() -> None:
        alice = await create_user(gochat_server.http_url, "alice")
        bob = await create_user(gochat_server.http_url, "bob")
        a = await online(gochat_server, alice)
        for i in range(25):
            a.send(send_frame(Kind.DIRECT, bob.user_id, b"m%02d" % i, rid=100 + i))
        acks = [await a.expect(SendAck) for _ in range(25)]
        assert sorted(x.seq for x in acks) == list(range(1, 26))
        b = await online(gochat_server, bob)
        b.send(Sync([SyncEntry(Kind.DIRECT, alice.user_id, 0)], rid=1))
        sync = await b.expect(SyncResult)
        assert [(e.kind, e.conv_id, e.last_seq) for e in sync.entries] == [(Kind.DIRECT, alice.user_id, 25)]
        got = []
        seq, rid = 1, 2
        while True:
            b.send(History(Kind.DIRECT, alice.user_id, seq, 10, rid=rid))
            page = await b.expect(HistoryResult)
            got.extend(page.messages)
            if not page.flags & FLAG_MORE:
                break
            seq = page.messages[-1].seq + 1
            rid += 1
        assert [m.seq for m in got] == list(range(1, 26))
        assert [m.body for m in got] == [b"m%02d" % i for i in range(25)]
        # nothing new: SYNC with the known seq is empty
        b.send(Sync([SyncEntry(Kind.DIRECT, alice.user_id, 25)], rid=9))
        assert (await b.expect(SyncResult)).entries == []

    run(scenario())


def test_kill_9_after_ack_loses_nothing(gochat_server: GochatProcess) -> None:
    async def phase1() -> tuple[UserCtx, UserCtx, list[SendAck]]:
        alice = await create_user(gochat_server.http_url, "alice")
        bob = await create_user(gochat_server.http_url, "bob")
        a = await online(gochat_server, alice)
        for i in range(200):
            a.send(send_frame(Kind.DIRECT, bob.user_id, b"durable %03d" % i, rid=i + 1))
        acks = [await a.expect(SendAck) for _ in range(200)]
        return alice, bob, acks

    alice, bob, acks = run(phase1())
    gochat_server.kill()  # SIGKILL right after the ACKs: no drain, no flush
    gochat_server.start()

    async def phase2() -> None:
        b = await online(gochat_server, bob)
        b.send(History(Kind.DIRECT, alice.user_id, 1, 1000, rid=1))
        page = await b.expect(HistoryResult)
        assert [m.seq for m in page.messages] == list(range(1, 201))
        assert {m.msg_id for m in page.messages} == {x.msg_id for x in acks}
        assert [m.body for m in page.messages] == [b"durable %03d" % i for i in range(200)]

    run(phase2())


def test_rooms_are_ephemeral_broadcast(gochat_server: GochatProcess) -> None:
    async def scenario() -> None:
        users = [await create_user(gochat_server.http_url, f"r{i}") for i in range(3)]
        conns = [await online(gochat_server, u) for u in users]
        room = 777
        conns[0].send(send_frame(Kind.ROOM, room, b"too early", rid=1))
        await conns[0].expect_error(ErrorCode.NOT_MEMBER)
        for c in conns[:2]:
            c.send(Subscribe(room, rid=2))
            assert (await c.expect(SubscribeOk)).room_id == room
        conns[0].send(send_frame(Kind.ROOM, room, b"live!", rid=3))
        ack = await conns[0].expect(SendAck)
        assert ack.seq == 0 and ack.msg_id
        m = (await conns[1].expect(Deliver)).message
        assert (m.kind, m.conv_id, m.seq, m.body) == (Kind.ROOM, room, 0, b"live!")
        await conns[2].no_frame()
        conns[1].send(History(Kind.ROOM, room, 1, 10, rid=4))
        await conns[1].expect_error(ErrorCode.BAD_REQUEST)

    run(scenario())


def test_presence_events_for_watchers(gochat_server: GochatProcess) -> None:
    async def scenario() -> None:
        alice = await create_user(gochat_server.http_url, "alice")
        bob = await create_user(gochat_server.http_url, "bob")
        a = await online(gochat_server, alice)
        import orjson

        res = await call(a, "presence.query", b'{"user_ids": [%d]}' % bob.user_id, 5)
        assert orjson.loads(res.payload)["online"] == {str(bob.user_id): False}
        b = await online(gochat_server, bob)
        ev = await a.expect(Event)
        assert (ev.type, ev.actor_id, ev.value) == (EventType.PRESENCE, bob.user_id, 1)
        b.close()
        ev = await a.expect(Event)
        assert (ev.type, ev.actor_id, ev.value) == (EventType.PRESENCE, bob.user_id, 0)

    run(scenario())


# ---- bad input -------------------------------------------------------------------------------------


def _header(length: int, ver: int = 1, op: int = 0x02, flags: int = 0, rid: int = 9) -> bytes:
    return struct.pack("<IBBHI", length, ver, op, flags, rid)


@pytest.mark.parametrize(
    ("payload", "msg_type", "code"),
    [
        (os.urandom(3), WSMsgType.BINARY, ErrorCode.TRUNCATED_FRAME),
        (_header(8), WSMsgType.BINARY, ErrorCode.MALFORMED_FRAME),
        (_header(40), WSMsgType.BINARY, ErrorCode.TRUNCATED_FRAME),
        (_header(12, ver=2), WSMsgType.BINARY, ErrorCode.UNSUPPORTED_VERSION),
        (_header(12, op=0x33), WSMsgType.BINARY, ErrorCode.UNKNOWN_OP),
        (_header(12, op=0x02, flags=0x8000), WSMsgType.BINARY, ErrorCode.BAD_FLAGS),
        (_header(MAX_FRAME + 100) + bytes(MAX_FRAME + 88), WSMsgType.BINARY, ErrorCode.FRAME_TOO_LARGE),
        (_header(12, op=0x40), WSMsgType.BINARY, ErrorCode.BAD_BODY),
        (b"", WSMsgType.BINARY, ErrorCode.MALFORMED_FRAME),
        (b"hello", WSMsgType.TEXT, ErrorCode.TEXT_FRAME),
    ],
    ids=["random", "short-len", "truncated", "version", "unknown-op", "flags", "oversize", "deliver-from-client", "empty", "text"],
)
def test_protocol_violations_close_with_documented_code(
    shared_server: GochatProcess, payload: bytes, msg_type: WSMsgType, code: ErrorCode
) -> None:
    async def scenario() -> None:
        user = await create_user(shared_server.http_url, "bad")
        c = await online(shared_server, user)
        c.send_raw(payload, msg_type)
        err = await c.expect_error(code)
        assert err.message
        assert await c.wait_closed() == 4000 + code
        await assert_healthy(shared_server)

    run(scenario())


def test_request_errors_keep_the_connection(shared_server: GochatProcess) -> None:
    async def scenario() -> None:
        alice = await create_user(shared_server.http_url, "alice")
        c = await online(shared_server, alice)
        c.send(send_frame(Kind.DIRECT, 10**12, b"to nobody", rid=1))
        await c.expect_error(ErrorCode.NOT_FOUND)
        c.send(send_frame(Kind.DIRECT, alice.user_id, b"", rid=2))
        await c.expect_error(ErrorCode.EMPTY_BODY)
        c.send(send_frame(Kind.DIRECT, alice.user_id, b"x" * 40000, rid=3))
        await c.expect_error(ErrorCode.BODY_TOO_LARGE)
        c.send(Call("group.create", b"{broken json", rid=4))
        await c.expect_error(ErrorCode.BAD_JSON)
        c.send(Call("group.create", b"[1, 2]", rid=5))
        await c.expect_error(ErrorCode.BAD_JSON)
        c.send(Call("no.such.method", b"{}", rid=6))
        await c.expect_error(ErrorCode.UNKNOWN_METHOD)
        c.send(Call("group.create", b'{"name": ""}', rid=7))
        await c.expect_error(ErrorCode.BAD_REQUEST)
        # notes to self work, and the connection is still fine after all of that
        c.send(send_frame(Kind.DIRECT, alice.user_id, b"note", rid=8))
        assert (await c.expect(SendAck)).rid == 8

    run(scenario())


def test_flood_past_rate_limit_gets_rate_limited(shared_server: GochatProcess) -> None:
    async def scenario() -> None:
        alice = await create_user(shared_server.http_url, "flood")
        c = await online(shared_server, alice)
        # 1,000 pings in one burst: above the 400 burst, some must be refused
        for i in range(1000):
            c.send(Ping(rid=i + 1))
        codes = []
        for _ in range(1000):
            f = await c.recv()
            codes.append("pong" if isinstance(f, Pong) else f.code)
        assert codes.count("pong") >= 300
        limited = [x for x in codes if x == ErrorCode.RATE_LIMITED]
        assert limited, "a flood must be rate limited"
        await asyncio.sleep(1.5)
        c.send(Ping(rid=5000))
        assert isinstance(await c.recv(), Pong)
        await assert_healthy(shared_server)

    run(scenario())


def test_slow_consumer_is_bounded(shared_server: GochatProcess) -> None:
    """A subscriber that stops reading is cut off (4401) or loses droppable frames; the server's
    memory stays bounded and everyone else is served."""

    async def scenario() -> None:
        pub = await create_user(shared_server.http_url, "pub")
        slow = await create_user(shared_server.http_url, "slow")
        p, s = await online(shared_server, pub), await online(shared_server, slow)
        for c in (p, s):
            c.send(Subscribe(55, rid=1))
            await c.expect(SubscribeOk)
        assert s.transport is not None
        s.transport.underlying_transport.pause_reading()
        rss_before = _rss_kib(shared_server)
        body = b"z" * 30000
        total = 1000  # ~30 MB towards a client that reads nothing, paced under the rate limit
        for i in range(total):
            p.send(send_frame(Kind.ROOM, 55, body, rid=i + 2))
            if i % 100 == 99:
                await asyncio.sleep(0.5)
        replies = 0
        while replies < total:
            f = await p.recv(10)
            replies += isinstance(f, SendAck)
        growth = _rss_kib(shared_server) - rss_before
        assert growth < 16 * 1024, f"server grew by {growth} KiB for one slow client"
        await assert_healthy(shared_server)
        s.close()

    run(scenario())


def _rss_kib(server: GochatProcess) -> int:
    assert server.proc is not None
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_sigterm_drains_with_goaway(gochat_server: GochatProcess) -> None:
    async def scenario() -> None:
        alice = await create_user(gochat_server.http_url, "alice")
        c = await online(gochat_server, alice)
        loop = asyncio.get_running_loop()
        code_future = loop.run_in_executor(None, gochat_server.terminate)
        g = await c.expect(GoAway, timeout=10)
        assert g.code == ErrorCode.SHUTTING_DOWN
        assert await c.wait_closed(10) == 4502  # close_code_for(SHUTTING_DOWN), as the GOAWAY says
        assert await code_future == 0

    run(scenario())


def test_sends_are_shed_while_commits_lag_and_nothing_acknowledged_is_lost(tmp_path: Path) -> None:
    """Load shedding (docs/architecture.md, "Overload"). Another connection holds SQLite's write
    lock, so nothing commits. 1,024 SENDs wait in flight; SENDs arriving once that has lasted
    longer than overload_send_latency_ms are answered OVERLOADED at once, with a retry delay.
    When the lock is released, every accepted SEND is acknowledged and stored, none of the shed
    ones is, and the node accepts SENDs again."""
    import sqlite3

    server = GochatProcess(
        tmp_path / "data",
        {"GOCHAT_OVERLOAD_SEND_LATENCY_MS": "200", "GOCHAT_RATE_LIMIT_BURST": "5000",
         "GOCHAT_RATE_LIMIT_PER_S": "5000"},
    )
    server.start()

    async def scenario() -> None:
        alice = await create_user(server.http_url, "shed-alice")
        bob = await create_user(server.http_url, "shed-bob")
        a, b = await online(server, alice), await online(server, bob)
        a.send(send_frame(Kind.DIRECT, bob.user_id, b"before", rid=1))
        assert (await a.expect(SendAck)).seq == 1
        assert (await b.expect(Deliver)).message.body == b"before"

        blocker = sqlite3.connect(tmp_path / "data" / "gochat.db", isolation_level=None, timeout=10)
        blocker.execute("BEGIN IMMEDIATE")  # the server's writer now waits for this lock
        try:
            accepted, shed = range(2, 2 + 1024), range(2 + 1024, 2 + 1024 + 100)
            for start in range(accepted.start, accepted.stop, 256):
                a.send(*(send_frame(Kind.DIRECT, bob.user_id, b"a%d" % i, rid=i)
                         for i in range(start, min(start + 256, accepted.stop))))
            await a.no_frame(within=0.5)  # nothing commits, nothing is answered yet
            a.send(*(send_frame(Kind.DIRECT, bob.user_id, b"s%d" % i, rid=i) for i in shed))
            errors = [await a.expect_error(ErrorCode.OVERLOADED) for _ in shed]
            assert [e.rid for e in errors] == list(shed)
            assert all(e.retry_after_ms >= 100 for e in errors)
        finally:
            blocker.rollback()
            blocker.close()
        acks = [await a.expect(SendAck, timeout=20) for _ in accepted]
        assert [k.rid for k in acks] == list(accepted)
        assert [k.seq for k in acks] == list(range(2, 2 + 1024))
        got = [(await b.expect(Deliver, timeout=20)).message.body for _ in accepted]
        assert got == [b"a%d" % i for i in accepted]
        # the node recovers: the next SEND is accepted and follows the acknowledged ones
        a.send(send_frame(Kind.DIRECT, bob.user_id, b"after", rid=5000))
        assert (await a.expect(SendAck)).seq == 2 + 1024
        assert (await b.expect(Deliver)).message.body == b"after"
        # a burst into a node idle for longer than the limit is kept whole, also when its first
        # SEND needs a conversation lookup (everything behind it waits in the send backlog)
        carol = await create_user(server.http_url, "shed-carol")
        a2 = await online(server, alice)  # two connections: a backlog holds at most 1,024
        await asyncio.sleep(0.5)
        for start in range(6000, 6000 + 550, 275):
            for conn in (a, a2):
                conn.send(*(send_frame(Kind.DIRECT, carol.user_id, b"b%d" % i, rid=i) for i in range(start, start + 275)))
        acks = [await conn.expect(SendAck, timeout=20, skip=(Deliver,)) for conn in (a, a2) for _ in range(550)]
        assert sorted(k.seq for k in acks) == list(range(1, 1101))
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{server.http_url}/metrics") as r:
                text = await r.text()
        assert "gochat_sends_shed_total 100.0" in text
        assert 'gochat_errors_total{code="503"} 100.0' in text  # the ERROR counters saw them too

    try:
        run(scenario())
    finally:
        server.stop()
    db = sqlite3.connect(tmp_path / "data" / "gochat.db")
    try:
        seqs = [s for (s,) in db.execute("SELECT seq FROM messages ORDER BY conv, seq")]
    finally:
        db.close()
    assert seqs == list(range(1, 2 + 1024 + 1)) + list(range(1, 1101))  # acknowledged: stored; shed: not
