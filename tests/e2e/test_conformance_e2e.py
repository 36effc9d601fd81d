"""The server agrees with its own documentation (docs/protocol.md, docs/http-api.md), tried from
outside against a real ``gochat serve`` process: id ranges, DUPLICATE acknowledgements, the
per-frame rate limit, HTTP error codes, idempotent group membership and the drain's close code.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import orjson
import pytest

from gochat.errors import ErrorCode, close_code_for
from gochat.protocol import FLAG_BACKWARD, FLAG_DUPLICATE, FLAG_MORE, Kind
from gochat.protocol.frames import (
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
    Sync,
    SyncResult,
)
from tests.conftest import GochatProcess, create_user, run
from tests.e2e.rawclient import RawClient, new_cmid, send_frame
from tests.e2e.test_server_e2e import assert_healthy, online

pytestmark = pytest.mark.e2e

U64_MAX = (1 << 64) - 1
U63 = 1 << 63


async def _call(c: RawClient, method: str, payload: dict[str, object], rid: int) -> CallResult:
    c.send(Call(method, orjson.dumps(payload), rid=rid))
    return await c.expect(CallResult, skip=(Event,))


async def _call_error(c: RawClient, method: str, payload: bytes, rid: int, code: ErrorCode) -> None:
    c.send(Call(method, payload, rid=rid))
    while True:
        f = await c.recv()
        if isinstance(f, Event):
            continue
        assert not isinstance(f, CallResult), f"{method} {payload!r}: expected error {code}, got {f!r}"
        assert f.rid == rid and f.code == code, f"{method} {payload!r}: {f!r}"
        assert f.retry_after_ms == 0, "a request error is not retryable"
        return


def test_ids_above_2_63_are_not_found_never_retryable(shared_server: GochatProcess) -> None:
    """Ids are at most 2**63-1 although the wire fields are u64: a larger id names nothing that
    exists (301 NOT_FOUND, no retry hint), a larger seq reads as "beyond the newest"."""

    async def scenario() -> None:
        alice = await create_user(shared_server.http_url, "bigid-a")
        bob = await create_user(shared_server.http_url, "bigid-b")
        c = await online(shared_server, alice)
        rid = 10
        for kind in (Kind.DIRECT, Kind.GROUP):
            for conv in (U63, U64_MAX):
                rid += 1
                c.send(send_frame(kind, conv, b"x", rid=rid))
                err = await c.expect_error(ErrorCode.NOT_FOUND)
                assert err.rid == rid and err.retry_after_ms == 0
                rid += 1
                c.send(History(kind, conv, 1, 10, rid=rid))
                err = await c.expect_error(ErrorCode.NOT_FOUND)
                assert err.retry_after_ms == 0
                rid += 1
                c.send(Read(kind, conv, 1, rid=rid))
                err = await c.expect_error(ErrorCode.NOT_FOUND)
                assert err.retry_after_ms == 0
        for method, body in (
            ("group.info", {"group_id": U64_MAX}),
            ("group.members", {"group_id": U63}),
            ("group.add", {"group_id": U63, "user_id": bob.user_id}),
            ("group.remove", {"group_id": U63, "user_id": bob.user_id}),
            ("group.leave", {"group_id": U64_MAX}),
            ("group.create", {"name": "g", "members": [U63]}),
            ("presence.query", {"user_ids": [bob.user_id, U64_MAX]}),
        ):
            rid += 1
            await _call_error(c, method, json.dumps(body).encode(), rid, ErrorCode.NOT_FOUND)

        # Seqs: three stored messages; from_seq and seq past 2**63 mean "beyond the newest".
        for i in range(3):
            c.send(send_frame(Kind.DIRECT, bob.user_id, b"m%d" % i, rid=100 + i))
            await c.expect(SendAck)
        c.send(History(Kind.DIRECT, bob.user_id, U64_MAX, 2, rid=200, flags=FLAG_BACKWARD))
        page = await c.expect(HistoryResult)
        assert [m.seq for m in page.messages] == [2, 3] and page.flags & FLAG_MORE  # ascending
        c.send(History(Kind.DIRECT, bob.user_id, 0, 2, rid=201, flags=FLAG_BACKWARD))
        page = await c.expect(HistoryResult)
        assert [m.seq for m in page.messages] == [2, 3], "from_seq 0 BACKWARD is the newest"
        c.send(History(Kind.DIRECT, bob.user_id, U63, 10, rid=202))
        page = await c.expect(HistoryResult)
        assert page.messages == [] and not page.flags & FLAG_MORE
        c.send(Read(Kind.DIRECT, bob.user_id, U64_MAX, rid=203))
        await c.expect(ReadOk, skip=(Event,))
        c.send(Sync([], rid=204))
        result = await c.expect(SyncResult, skip=(Event,))
        (entry,) = [e for e in result.entries if e.conv_id == bob.user_id]
        assert entry.last_seq == 3 and entry.read_seq == 3, "READ past the newest reads up to it"
        c.close()
        await assert_healthy(shared_server)

    run(scenario())


def test_duplicate_ack_names_the_original_conversation(shared_server: GochatProcess) -> None:
    """A retry of an acknowledged client_msg_id gets the ORIGINAL SEND_ACK (kind, conv_id, seq,
    msg_id, ts_ms) with DUPLICATE, even when the retry names another conversation; nobody gets a
    second DELIVER."""

    async def scenario() -> None:
        alice = await create_user(shared_server.http_url, "dup-a")
        bob = await create_user(shared_server.http_url, "dup-b")
        carol = await create_user(shared_server.http_url, "dup-c")
        ca, cb, cc = [await online(shared_server, u) for u in (alice, bob, carol)]
        group = (await _call(ca, "group.create", {"name": "dups", "members": [carol.user_id]}, 2)).payload
        group_id = orjson.loads(group)["group_id"]
        await cc.expect(Event)  # MEMBER_ADDED

        cmid = new_cmid()
        ca.send(send_frame(Kind.DIRECT, bob.user_id, b"once", rid=10, cmid=cmid))
        first = await ca.expect(SendAck, skip=(Event,))
        assert not first.flags & FLAG_DUPLICATE
        assert (await cb.expect(Deliver)).message.body == b"once"
        for rid, kind, conv in (
            (11, Kind.DIRECT, bob.user_id),
            (12, Kind.DIRECT, carol.user_id),
            (13, Kind.GROUP, group_id),
        ):
            ca.send(send_frame(kind, conv, b"retry", rid=rid, cmid=cmid))
            ack = await ca.expect(SendAck, skip=(Event,))
            assert ack.rid == rid and ack.flags & FLAG_DUPLICATE
            assert (ack.kind, ack.conv_id, ack.seq, ack.msg_id, ack.ts_ms) == (
                Kind.DIRECT, bob.user_id, first.seq, first.msg_id, first.ts_ms
            ), f"retry naming {kind}/{conv}: {ack!r}"
        # and a group original, retried as a direct message
        gcmid = new_cmid()
        ca.send(send_frame(Kind.GROUP, group_id, b"to group", rid=20, cmid=gcmid))
        gfirst = await ca.expect(SendAck, skip=(Event,))
        assert (await cc.expect(Deliver)).message.body == b"to group"
        ca.send(send_frame(Kind.DIRECT, bob.user_id, b"retry", rid=21, cmid=gcmid))
        ack = await ca.expect(SendAck, skip=(Event,))
        assert (ack.kind, ack.conv_id, ack.seq, ack.msg_id) == (Kind.GROUP, group_id, gfirst.seq, gfirst.msg_id)
        await cb.no_frame()
        await cc.no_frame()
        for c in (ca, cb, cc):
            c.close()

    run(scenario())


def test_rate_limit_counts_frames_one_by_one_inside_a_message(shared_server: GochatProcess) -> None:
    """401 PINGs in ONE WebSocket message with a burst of 400 tokens: the first 400 are answered
    PONG, the 401st RATE_LIMITED, as if they had come in separate messages."""

    async def scenario() -> None:
        user = await create_user(shared_server.http_url, "ratebatch")
        c = await online(shared_server, user)
        c.send(*(Ping(rid=i + 1) for i in range(401)))
        replies = [await c.recv() for _ in range(401)]
        pongs = [f.rid for f in replies if isinstance(f, Pong)]
        limited = [f for f in replies if not isinstance(f, Pong)]
        assert pongs == list(range(1, 401))
        assert len(limited) == 1 and limited[0].code == ErrorCode.RATE_LIMITED and limited[0].rid == 401
        assert limited[0].retry_after_ms > 0
        c.close()

    run(scenario())


def test_http_errors_carry_the_documented_codes(shared_server: GochatProcess) -> None:
    async def scenario() -> None:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{shared_server.http_url}/v1/users", data=b"{" + b" " * 70_000 + b"}") as r:
                assert r.status == 413
                assert (await r.json())["error"]["code"] == ErrorCode.BODY_TOO_LARGE
            async with http.get(f"{shared_server.http_url}/v1/nothing-here") as r:
                assert r.status == 404
                assert (await r.json())["error"]["code"] == ErrorCode.NOT_FOUND
            async with http.post(f"{shared_server.http_url}/v1/users", data=b"[]") as r:
                assert r.status == 400
                assert (await r.json())["error"]["code"] == ErrorCode.BAD_JSON

    run(scenario())


def test_group_add_of_a_member_is_idempotent(shared_server: GochatProcess) -> None:
    async def scenario() -> None:
        owner = await create_user(shared_server.http_url, "idem-o")
        member = await create_user(shared_server.http_url, "idem-m")
        c = await online(shared_server, owner)
        created = orjson.loads((await _call(c, "group.create", {"name": "g", "members": []}, 2)).payload)
        gid = created["group_id"]
        added = orjson.loads((await _call(c, "group.add", {"group_id": gid, "user_id": member.user_id}, 3)).payload)
        again = orjson.loads((await _call(c, "group.add", {"group_id": gid, "user_id": member.user_id}, 4)).payload)
        assert added == {"added": True} and again == {"added": False}
        c.close()

    run(scenario())


def test_drain_goaway_then_close_4502(gochat_server: GochatProcess) -> None:
    async def scenario() -> None:
        alice = await create_user(gochat_server.http_url, "drained")
        c = await online(gochat_server, alice)
        code_future = asyncio.get_running_loop().run_in_executor(None, gochat_server.terminate)
        g = await c.expect(GoAway, timeout=10)
        assert g.code == ErrorCode.SHUTTING_DOWN and g.retry_after_ms > 0
        assert await c.wait_closed(10) == close_code_for(ErrorCode.SHUTTING_DOWN) == 4502
        assert await code_future == 0

    run(scenario())


def test_user_get_names_a_user_by_id(shared_server: GochatProcess) -> None:
    """CALL user.get (docs/protocol.md §7): id -> username, the reverse of user.lookup; a bad
    id is 300 BAD_REQUEST, an unknown one (or one above 2**63-1) 301 NOT_FOUND."""

    async def scenario() -> None:
        alice = await create_user(shared_server.http_url, "uget-a")
        bob = await create_user(shared_server.http_url, "uget-b")
        c = await online(shared_server, alice)
        got = orjson.loads((await _call(c, "user.get", {"user_id": bob.user_id}, 2)).payload)
        assert got == {"user_id": bob.user_id, "username": bob.username}
        me = orjson.loads((await _call(c, "user.get", {"user_id": alice.user_id}, 3)).payload)
        assert me == {"user_id": alice.user_id, "username": alice.username}
        looked_up = orjson.loads((await _call(c, "user.lookup", {"username": bob.username}, 4)).payload)
        assert looked_up == got
        rid = 10
        for payload in (b"{}", b'{"user_id": 0}', b'{"user_id": -1}', b'{"user_id": "2"}',
                        b'{"user_id": 1.0}', b'{"user_id": true}', b'{"user_id": null}'):
            rid += 1
            await _call_error(c, "user.get", payload, rid, ErrorCode.BAD_REQUEST)
        for uid in (U63 - 1, U63, U64_MAX):
            rid += 1
            await _call_error(c, "user.get", json.dumps({"user_id": uid}).encode(), rid, ErrorCode.NOT_FOUND)
        rid += 1
        await _call_error(c, "user.get", b"[1]", rid, ErrorCode.BAD_JSON)
        c.close()
        await assert_healthy(shared_server)

    run(scenario())
