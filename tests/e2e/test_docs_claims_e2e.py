"""Claims of docs/protocol.md §1 and §5 that a client relies on, checked on a real server.

- a message with a bad frame is rejected whole: the valid frames before the bad one are not
  processed either (the gateway decodes the whole message before it dispatches a frame);
- a token in the upgrade's ``Authorization`` header: an unprompted AUTH_OK with rid 0, and HTTP
  401 with the error message as the body for a bad or expired token;
- an open connection is not closed when its token expires;
- a retried room SEND is delivered again, with a new msg_id (rooms do not deduplicate);
- HISTORY BACKWARD pages are in ascending seq order; from_seq 0 and values above last_seq mean
  "the newest".
"""

from __future__ import annotations

import asyncio
import struct
import time

import aiohttp
import pytest

from gochat.errors import ErrorCode
from gochat.protocol import FLAG_BACKWARD, FLAG_MORE, Kind, encode
from gochat.protocol.frames import (
    AuthOk,
    Deliver,
    History,
    HistoryResult,
    Ping,
    Pong,
    SendAck,
    Subscribe,
    SubscribeOk,
)
from tests.conftest import GochatProcess, create_user, run
from tests.e2e.rawclient import connect, new_cmid, send_frame

pytestmark = pytest.mark.e2e


def test_a_message_with_a_bad_frame_is_rejected_whole(shared_server: GochatProcess) -> None:
    async def scenario() -> None:
        a = await create_user(shared_server.http_url, "wa")
        b = await create_user(shared_server.http_url, "wb")
        ca = await connect(shared_server.ws_url, a.access_token)
        cb = await connect(shared_server.ws_url, b.access_token)
        await ca.expect(AuthOk)
        await cb.expect(AuthOk)
        good = encode(send_frame(Kind.DIRECT, b.user_id, b"must not be stored", rid=2))
        ping = encode(Ping(b"p", rid=3))
        bad = struct.pack("<IBBHI", 12, 9, 0x02, 0, 4)  # version 9: 103 UNSUPPORTED_VERSION
        ca.send_raw(good + ping + bad)
        err = await ca.expect_error(ErrorCode.UNSUPPORTED_VERSION)
        assert err.rid == 0
        assert await ca.wait_closed() == 4103
        await cb.no_frame(0.5)  # no DELIVER: the SEND before the bad frame was not processed
        c2 = await connect(shared_server.ws_url, a.access_token)
        await c2.expect(AuthOk)
        c2.send(History(Kind.DIRECT, b.user_id, 0, 10, rid=9, flags=FLAG_BACKWARD))
        page = await c2.expect(HistoryResult)
        assert page.messages == []  # nothing stored
        c2.close()
        cb.close()

    run(scenario())


def test_header_token_gets_auth_ok_rid_0_and_bad_tokens_http_401(shared_server: GochatProcess) -> None:
    async def scenario() -> None:
        u = await create_user(shared_server.http_url, "hdr")
        c = await connect(shared_server.ws_url, header_token=u.access_token)
        ok = await c.expect(AuthOk)
        assert ok.rid == 0 and ok.user_id == u.user_id and ok.max_frame == 65536
        c.close()
        http_url = shared_server.ws_url.replace("ws://", "http://")
        headers = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                   "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
        async with aiohttp.ClientSession() as http:
            for value in ("Bearer not-a-token", "Basic abc"):
                async with http.get(http_url, headers={**headers, "Authorization": value}) as r:
                    assert r.status == 401
                    assert (await r.text()).strip(), "the body is the error message"

    run(scenario())


def test_expired_header_token_is_http_401_token_expired(tmp_path) -> None:  # type: ignore[no-untyped-def]
    server = GochatProcess(tmp_path / "data", {"GOCHAT_ACCESS_TTL_S": "3"})
    server.start()
    try:
        async def scenario() -> None:
            u = await create_user(server.http_url, "exp")
            c = await connect(server.ws_url, u.access_token)  # authenticated while valid
            await c.expect(AuthOk)
            await asyncio.sleep(4.2)
            # the open connection outlives its token
            c.send(Ping(b"still", rid=4))
            assert (await c.expect(Pong)).payload == b"still"
            # a new connection with it is refused: HTTP 401 (header), 201 + 4201 (AUTH frame)
            headers = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                       "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                       "Authorization": f"Bearer {u.access_token}"}
            async with aiohttp.ClientSession() as http:
                async with http.get(server.ws_url.replace("ws://", "http://"), headers=headers) as r:
                    assert r.status == 401
                    assert "expired" in await r.text()
            c2 = await connect(server.ws_url, u.access_token)
            await c2.expect_error(ErrorCode.TOKEN_EXPIRED)
            assert await c2.wait_closed() == 4201
            c.close()

        run(scenario())
    finally:
        server.stop()


def test_room_send_retry_is_delivered_again_with_a_new_msg_id(shared_server: GochatProcess) -> None:
    async def scenario() -> None:
        a = await create_user(shared_server.http_url, "ra")
        b = await create_user(shared_server.http_url, "rb")
        ca, cb = await connect(shared_server.ws_url, a.access_token), await connect(shared_server.ws_url, b.access_token)
        await ca.expect(AuthOk)
        await cb.expect(AuthOk)
        room = 1_000_000 + int(time.time() * 1000) % 1_000_000
        for c in (ca, cb):
            c.send(Subscribe(room, rid=2))
            await c.expect(SubscribeOk)
        cmid = new_cmid()
        acks, delivered = [], []
        for rid in (3, 4):
            ca.send(send_frame(Kind.ROOM, room, b"again", rid=rid, cmid=cmid))
            acks.append(await ca.expect(SendAck))
            delivered.append((await cb.expect(Deliver)).message)
        assert acks[0].msg_id != acks[1].msg_id and not acks[1].flags
        assert [m.msg_id for m in delivered] == [a.msg_id for a in acks]
        ca.close()
        cb.close()

    run(scenario())


def test_history_backward_pages_are_ascending_and_newest_from_0_or_above_last_seq(
    shared_server: GochatProcess,
) -> None:
    async def scenario() -> None:
        a = await create_user(shared_server.http_url, "ha")
        b = await create_user(shared_server.http_url, "hb")
        ca = await connect(shared_server.ws_url, a.access_token)
        await ca.expect(AuthOk)
        for i in range(5):
            ca.send(send_frame(Kind.DIRECT, b.user_id, b"m%d" % i, rid=10 + i))
            await ca.expect(SendAck)
        for from_seq in (0, 5, 6, (1 << 63) - 1, (1 << 64) - 1):
            ca.send(History(Kind.DIRECT, b.user_id, from_seq, 2, rid=30, flags=FLAG_BACKWARD))
            page = await ca.expect(HistoryResult)
            assert [m.seq for m in page.messages] == [4, 5] and page.flags & FLAG_MORE, from_seq
        ca.send(History(Kind.DIRECT, b.user_id, 3, 2, rid=31, flags=FLAG_BACKWARD))  # next page
        page = await ca.expect(HistoryResult)
        assert [m.seq for m in page.messages] == [2, 3] and page.flags & FLAG_MORE
        ca.send(History(Kind.DIRECT, b.user_id, 1, 2, rid=32, flags=FLAG_BACKWARD))
        page = await ca.expect(HistoryResult)
        assert [m.seq for m in page.messages] == [1] and not page.flags & FLAG_MORE
        ca.send(History(Kind.DIRECT, b.user_id, 4, 10, rid=33))  # forward: seq >= 4
        page = await ca.expect(HistoryResult)
        assert [m.seq for m in page.messages] == [4, 5] and not page.flags & FLAG_MORE
        ca.close()

    run(scenario())


def test_client_messages_above_4_max_frame_close_1009_or_4102(shared_server: GochatProcess) -> None:
    """One WebSocket frame above 4 × max_frame: close 1009; fragments above it: ERROR 102, 4102."""
    from picows import WSMsgType

    async def scenario() -> None:
        u = await create_user(shared_server.http_url, "sz")
        c = await connect(shared_server.ws_url, u.access_token)
        await c.expect(AuthOk)
        c.send_raw(b"\0" * (4 * 65536 + 1))
        assert await c.wait_closed() == 1009
        c = await connect(shared_server.ws_url, u.access_token)
        await c.expect(AuthOk)
        assert c.transport is not None
        c.transport.send(WSMsgType.BINARY, b"\0" * 200_000, fin=False)
        c.transport.send(WSMsgType.CONTINUATION, b"\0" * 100_000, fin=True)
        err = await c.expect_error(ErrorCode.FRAME_TOO_LARGE)
        assert err.rid == 0
        assert await c.wait_closed() == 4102

    run(scenario())
