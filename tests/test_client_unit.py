"""Client logic without a gochat server: the seq tracker (dedup, ordering, gaps), the backoff
schedule, the error-code mapping, the HTTP API error handling (against a tiny aiohttp app), and
the whole :class:`gochat.client.Client` against an in-process fake server speaking protocol v1
(reconnect, resend with the same client_msg_id, gap fill, GOAWAY, heartbeat, auth refresh)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
import pytest
from aiohttp import web
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_create_server

from gochat.client import (
    AuthError,
    Backoff,
    Client,
    ClientClosedError,
    ConnectionLostError,
    ErrorCode,
    Event,
    GochatError,
    HttpApi,
    Kind,
    Message,
    ProtocolError,
    RequestError,
    SeqTracker,
    UnavailableError,
    error_class_for,
    error_for,
)
from gochat.client.errors import is_auth_fatal
from gochat.protocol import decode, encode
from gochat.protocol import frames as F

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def msg(seq: int, kind: int = Kind.GROUP, conv: int = 5, sender: int = 2, body: bytes = b"x") -> Message:
    return Message(kind, conv, seq, 1000 + seq, sender, 1_700_000_000_000 + seq, uuid.uuid4().bytes, 1, body)


def seqs(ms: list[Message]) -> list[int]:
    return [m.seq for m in ms]


K = (int(Kind.GROUP), 5)


# ---------------------------------------------------------------------------------------------
# SeqTracker
# ---------------------------------------------------------------------------------------------


class TestSeqTracker:
    def test_in_order_and_duplicates(self) -> None:
        t = SeqTracker()
        assert seqs(t.on_message(msg(1))) == [1]
        assert seqs(t.on_message(msg(2))) == [2]
        assert t.on_message(msg(2)) == []
        assert t.on_message(msg(1)) == []
        assert t.position(K) == 2
        assert t.gap(K) is None

    def test_first_sight_defines_start_when_incomplete(self) -> None:
        t = SeqTracker()
        assert seqs(t.on_message(msg(41))) == [41]
        assert t.position(K) == 41
        assert t.gap(K) is None

    def test_unknown_conversation_starts_at_zero_when_complete(self) -> None:
        t = SeqTracker(complete=True)
        assert t.on_message(msg(3)) == []
        assert t.gap(K) == 1
        assert t.held(K) == 1
        assert seqs(t.on_message(msg(1))) == [1]
        assert seqs(t.on_message(msg(2))) == [2, 3]
        assert t.gap(K) is None

    def test_gap_holds_back_and_releases_in_order(self) -> None:
        t = SeqTracker([(K, 10)], complete=True)
        assert t.on_message(msg(13)) == []
        assert t.on_message(msg(12)) == []
        assert t.gap(K) == 11
        assert t.target(K) == 13
        assert t.held(K) == 2
        assert t.on_message(msg(13)) == []  # duplicate of a held one
        assert seqs(t.on_message(msg(11))) == [11, 12, 13]
        assert t.position(K) == 13
        assert t.held(K) == 0

    def test_own_sends_are_accounted_not_emitted(self) -> None:
        t = SeqTracker([(K, 4)], complete=True)
        assert t.on_own(K, 5) == []
        assert t.position(K) == 5
        # ack overtook the DELIVER of someone else's seq 6
        assert t.on_own(K, 7) == []
        assert t.gap(K) == 6
        assert seqs(t.on_message(msg(6))) == [6]
        assert t.position(K) == 7
        # history replays the own message: no duplicate
        assert t.on_message(msg(7)) == []

    def test_own_message_from_history_is_skipped(self) -> None:
        t = SeqTracker([(K, 1)], complete=True)
        assert t.on_message(msg(3)) == []
        assert seqs(t.on_message(msg(2), emit=False)) == [3]
        assert t.position(K) == 3

    def test_emit_false_for_held_seq_turns_into_skip(self) -> None:
        t = SeqTracker([(K, 1)], complete=True)
        assert t.on_message(msg(3)) == []
        assert t.on_own(K, 3) == []  # same seq seen as own: never release it
        assert seqs(t.on_message(msg(2))) == [2]
        assert t.position(K) == 3

    def test_rooms_pass_through(self) -> None:
        t = SeqTracker(complete=True)
        room = msg(0, kind=Kind.ROOM, conv=9)
        assert t.on_message(room) == [room]
        assert t.on_message(room) == [room]
        assert len(t) == 0
        assert t.on_own((3, 9), 0) == []

    def test_baseline_and_note_last_seq(self) -> None:
        t = SeqTracker()
        t.on_message(msg(7))  # observed before the baseline arrived
        t.set_baseline([(K, 9), ((1, 3), 4)])
        assert t.complete
        assert t.position(K) == 7 and t.gap(K) == 8  # raced messages are fetched, not lost
        assert t.position((1, 3)) == 4 and t.gap((1, 3)) is None
        t.note_last_seq((1, 3), 6)
        assert t.gap((1, 3)) == 5
        t.note_last_seq((2, 77), 2)  # new conversation since the baseline
        assert t.gap((2, 77)) == 1
        assert sorted(t.gaps()) == [(1, 3), (2, 5), (2, 77)]

    def test_note_last_seq_without_reference_point(self) -> None:
        t = SeqTracker()
        t.note_last_seq(K, 30)
        assert t.position(K) == 30 and t.gap(K) is None

    def test_mark_seen(self) -> None:
        t = SeqTracker([(K, 2)], complete=True)
        assert t.on_message(msg(4)) == []
        assert seqs(t.mark_seen(msg(3))) == [4]
        assert t.position(K) == 4
        # far ahead: ignored, no gap created
        assert t.mark_seen(msg(50)) == []
        assert t.gap(K) is None
        # unknown conversation: ignored
        assert t.mark_seen(msg(1, conv=99)) == []
        assert (2, 99) not in t

    def test_mark_seen_held_message_is_not_released(self) -> None:
        t = SeqTracker([(K, 2)], complete=True)
        t.on_message(msg(4))
        assert t.mark_seen(msg(4)) == []
        assert seqs(t.on_message(msg(3))) == [3]
        assert t.position(K) == 4

    def test_set_position_rewind_and_forward(self) -> None:
        t = SeqTracker([(K, 10)], complete=True)
        assert t.set_position(K, 4) == []
        assert t.position(K) == 4 and t.gap(K) == 5 and t.target(K) == 10
        for s in range(5, 11):
            assert seqs(t.on_message(msg(s))) == [s]
        t.on_message(msg(13))
        t.on_message(msg(12))
        assert seqs(t.set_position(K, 11)) == [12, 13]
        assert t.set_position((2, 8), 3) == []
        assert t.positions() == {K: 13, (2, 8): 3}

    def test_skip_gap(self) -> None:
        t = SeqTracker([(K, 1)], complete=True)
        t.on_message(msg(5))
        t.on_message(msg(6))
        t.on_message(msg(9))
        assert seqs(t.skip_gap(K)) == [5, 6]
        assert t.gap(K) == 7
        assert seqs(t.skip_gap(K)) == [9]
        assert t.gap(K) is None
        t.note_last_seq(K, 12)
        assert t.skip_gap(K) == []
        assert t.position(K) == 12
        assert t.skip_gap((9, 9)) == []

    def test_forget(self) -> None:
        t = SeqTracker([(K, 3)])
        t.forget(K)
        assert K not in t and t.position(K) is None

    def test_random_order_with_duplicates_is_exactly_once_in_order(self) -> None:
        rng = random.Random(7)
        for _ in range(200):
            n = rng.randint(1, 40)
            start = rng.randint(0, 5)
            t = SeqTracker([(K, start)], complete=True)
            pool = [msg(s) for s in range(start + 1, start + n + 1)]
            stream = pool + [rng.choice(pool) for _ in range(rng.randint(0, 10))]
            rng.shuffle(stream)
            own = set(rng.sample(range(start + 1, start + n + 1), k=rng.randint(0, n // 3)))
            out: list[Message] = []
            for m in stream:
                if m.seq in own:
                    out += t.on_own(K, m.seq)
                else:
                    out += t.on_message(m)
            assert seqs(out) == [s for s in range(start + 1, start + n + 1) if s not in own]
            assert t.position(K) == start + n
            assert t.gap(K) is None


# ---------------------------------------------------------------------------------------------
# Backoff
# ---------------------------------------------------------------------------------------------


class TestBackoff:
    def test_schedule_doubles_up_to_max_with_bounded_jitter(self) -> None:
        b = Backoff(0.2, 10.0, rng=random.Random(1))
        bases = [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0, 10.0]
        for base in bases:
            d = b.next()
            assert base / 2 <= d <= base
        assert b.attempts == len(bases)
        b.reset()
        assert b.attempts == 0
        assert 0.1 <= b.next() <= 0.2

    def test_no_jitter_is_exact(self) -> None:
        b = Backoff(1.0, 5.0, jitter=0.0)
        assert [b.next() for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]

    def test_jitter_spreads(self) -> None:
        b = Backoff(1.0, 1.0, rng=random.Random(3))
        delays = {round(b.next(), 6) for _ in range(50)}
        assert len(delays) > 40
        assert all(0.5 <= d <= 1.0 for d in delays)

    def test_server_delay_is_spread_never_shortened(self) -> None:
        b = Backoff(1.0, 1.0, rng=random.Random(5))
        delays = {round(b.spread(0.3), 6) for _ in range(50)}
        assert len(delays) > 40
        assert all(0.3 <= d <= 0.45 for d in delays)
        assert Backoff(1.0, 1.0, jitter=0.0).spread(0.3) == 0.3
        assert b.attempts == 0  # a server-given delay is not a reconnect attempt

    def test_many_attempts_do_not_overflow(self) -> None:
        b = Backoff(0.2, 10.0)
        for _ in range(5000):
            assert b.next() <= 10.0

    def test_invalid(self) -> None:
        with pytest.raises(ValueError):
            Backoff(0, 1)
        with pytest.raises(ValueError):
            Backoff(2, 1)
        with pytest.raises(ValueError):
            Backoff(1, 2, jitter=2)


# ---------------------------------------------------------------------------------------------
# error mapping
# ---------------------------------------------------------------------------------------------


class TestErrors:
    @pytest.mark.parametrize(
        ("code", "cls"),
        [
            (100, ProtocolError), (110, ProtocolError),
            (200, AuthError), (201, AuthError), (202, AuthError), (203, AuthError), (204, AuthError),
            (300, RequestError), (302, RequestError), (307, RequestError),
            (400, RequestError), (401, RequestError), (402, RequestError),
            (500, GochatError), (501, UnavailableError), (502, UnavailableError), (503, UnavailableError),
            (777, GochatError), (1234, GochatError),
        ],
    )
    def test_class_for_code(self, code: int, cls: type[GochatError]) -> None:
        assert error_class_for(code) is cls
        e = error_for(code, "boom", 250)
        assert type(e) is cls
        assert e.retry_after_ms == 250
        assert e.wire_code == code  # type: ignore[attr-defined]
        if code in ErrorCode._value2member_map_:
            assert e.code == code
            assert e.message == "boom"
        else:
            assert e.code == ErrorCode.INTERNAL
            assert str(code) in e.message

    def test_every_known_code_maps_to_its_range(self) -> None:
        for code in ErrorCode:
            if code == ErrorCode.OK:
                continue
            e = error_for(code)
            assert e.code == code
            assert e.message  # falls back to the table's description
            assert isinstance(e, GochatError)

    def test_client_errors(self) -> None:
        assert issubclass(ConnectionLostError, UnavailableError)
        assert ConnectionLostError().code == ErrorCode.UNAVAILABLE
        assert issubclass(ClientClosedError, GochatError)

    def test_auth_fatal(self) -> None:
        assert [c for c in range(0, 1000) if is_auth_fatal(c)] == [200, 201, 202]


# ---------------------------------------------------------------------------------------------
# value objects
# ---------------------------------------------------------------------------------------------


def test_message_and_event_helpers() -> None:
    m = Message(1, 9, 3, 44, 7, 0, b"\0" * 16, 2, b'{"a": 1}')
    assert m.key == (1, 9) and m.json() == {"a": 1} and m.text == '{"a": 1}'
    assert not m.is_room and not m.is_text
    e = Event(3, 2, 5, 7, 12)
    assert e.type_name == "READ" and e.json() == {} and e.key == (2, 5)
    assert Event(200, 0, 0, 0, 0, b'{"x":2}').type_name == "EVENT_200"
    assert Event(200, 0, 0, 0, 0, b'{"x":2}').json() == {"x": 2}


# ---------------------------------------------------------------------------------------------
# HttpApi against a tiny aiohttp app
# ---------------------------------------------------------------------------------------------


async def _with_app(app: web.Application, fn: Callable[[str], Coroutine[Any, Any, None]]) -> None:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        await fn(f"http://127.0.0.1:{port}")
    finally:
        await runner.cleanup()


def _http_app() -> tuple[web.Application, dict[str, Any]]:
    state: dict[str, Any] = {"users": {}, "refreshes": 0, "logouts": []}

    def err(status: int, code: ErrorCode, message: str) -> web.Response:
        body = {"error": {"code": int(code), "name": code.name, "message": message}}
        return web.json_response(body, status=status)

    async def register(req: web.Request) -> web.Response:
        d = await req.json()
        if d["username"] in state["users"]:
            return err(409, ErrorCode.CONFLICT, "name taken")
        uid = len(state["users"]) + 1
        state["users"][d["username"]] = (uid, d["password"])
        return web.json_response({"user_id": uid}, status=201)

    async def login(req: web.Request) -> web.Response:
        d = await req.json()
        u = state["users"].get(d["username"])
        if u is None or u[1] != d["password"]:
            return err(401, ErrorCode.UNAUTHORIZED, "bad credentials")
        return web.json_response({"access_token": f"a-{u[0]}-0", "refresh_token": f"r-{u[0]}",
                                  "expires_in": 900, "user_id": u[0]})

    async def refresh(req: web.Request) -> web.Response:
        d = await req.json()
        state["refreshes"] += 1
        if not d["refresh_token"].startswith("r-"):
            return err(401, ErrorCode.TOKEN_REVOKED, "revoked")
        uid = int(d["refresh_token"][2:])
        return web.json_response({"access_token": f"a-{uid}-{state['refreshes']}",
                                  "refresh_token": f"r-{uid}", "expires_in": 900, "user_id": uid})

    async def logout(req: web.Request) -> web.Response:
        state["logouts"].append((req.headers.get("Authorization"), await req.text()))
        return web.Response(status=204)

    async def by_name(req: web.Request) -> web.Response:
        u = state["users"].get(req.match_info["name"])
        if u is None:
            return err(404, ErrorCode.NOT_FOUND, "no such user")
        return web.json_response({"user_id": u[0], "username": req.match_info["name"]})

    async def broken(req: web.Request) -> web.Response:
        return web.Response(status=502, text="bad gateway")

    app = web.Application()
    app.router.add_post("/v1/users", register)
    app.router.add_post("/v1/auth/login", login)
    app.router.add_post("/v1/auth/refresh", refresh)
    app.router.add_post("/v1/auth/logout", logout)
    app.router.add_get("/v1/users/by-name/{name}", by_name)
    app.router.add_get("/v1/users/by-name/broken/x", broken)
    return app, state


def test_http_api() -> None:
    app, state = _http_app()

    async def body(base: str) -> None:
        async with HttpApi(base) as api:
            assert await api.register("alice", "pw") == 1
            with pytest.raises(RequestError) as ei:
                await api.register("alice", "pw")
            assert ei.value.code == ErrorCode.CONFLICT and ei.value.message == "name taken"
            assert ei.value.http_status == 409  # type: ignore[attr-defined]
            with pytest.raises(AuthError) as ea:
                await api.login("alice", "wrong")
            assert ea.value.code == ErrorCode.UNAUTHORIZED
            t = await api.login("alice", "pw")
            assert (t.user_id, t.access_token, t.refresh_token, t.expires_in) == (1, "a-1-0", "r-1", 900)
            t2 = await api.refresh(t.refresh_token)
            assert t2.access_token == "a-1-1"
            with pytest.raises(AuthError) as er:
                await api.refresh("nope")
            assert er.value.code == ErrorCode.TOKEN_REVOKED
            assert await api.lookup_user("alice") == 1
            with pytest.raises(RequestError) as en:
                await api.lookup_user("bob")
            assert en.value.code == ErrorCode.NOT_FOUND
            await api.logout("a-1-1", "r-1")
            assert state["logouts"][-1][0] == "Bearer a-1-1"
            assert orjson.loads(state["logouts"][-1][1]) == {"refresh_token": "r-1"}
            with pytest.raises(GochatError) as eb:
                await api._request("GET", "/v1/users/by-name/broken/x")
            assert eb.value.code == ErrorCode.INTERNAL and "502" in eb.value.message

            src = api.token_source("alice", "pw")
            assert await src() == "a-1-0"  # login
            assert await src() == "a-1-0"  # cached
            src.invalidate("a-1-0")
            assert (await src()).startswith("a-1-")  # refreshed
            assert src.tokens is not None and src.tokens.access_token != "a-1-0"

        async with HttpApi("http://127.0.0.1:9") as dead:
            with pytest.raises(UnavailableError):
                await dead.login("x", "y")

    run(_with_app(app, body))


# ---------------------------------------------------------------------------------------------
# The Client against an in-process fake server
# ---------------------------------------------------------------------------------------------


@dataclass
class _Stored:
    rec: F.Message
    sender_key: tuple[int, bytes]


@dataclass
class FakeServer:
    """A minimal protocol v1 server: enough of AUTH, PING, SEND, SYNC, HISTORY, READ,
    SUBSCRIBE, TYPING and CALL to exercise the client, plus knobs to misbehave."""

    tokens: dict[str, int] = field(default_factory=dict)  # token -> user id
    groups: dict[int, set[int]] = field(default_factory=dict)
    heartbeat_ms: int = 20000
    conns: list[FakeConn] = field(default_factory=list)
    #: (kind, conv_key) -> messages, conv_key = group id or frozenset of the two user ids
    logs: dict[tuple[int, Any], list[F.Message]] = field(default_factory=dict)
    acked: dict[tuple[int, bytes], F.SendAck] = field(default_factory=dict)
    rooms: dict[int, set[FakeConn]] = field(default_factory=dict)
    next_msg_id: int = 1
    sessions: int = 0
    # knobs
    drop_acks: int = 0  # swallow the next N SEND_ACKs (the message is stored)
    drop_delivers_to: set[int] = field(default_factory=set)  # user ids whose DELIVERs are dropped
    answer_pings: bool = True
    received: list[Any] = field(default_factory=list)
    server: asyncio.Server | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def start(self, port: int = 0) -> None:
        self.server = await ws_create_server(lambda req: FakeConn(self), "127.0.0.1", port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for c in list(self.conns):
                c.drop()
            await self.server.wait_closed()
            self.server = None

    def drop_all(self) -> None:
        for c in list(self.conns):
            c.drop()

    def conv_log(self, kind: int, a: int, conv_id: int) -> list[F.Message]:
        key: tuple[int, Any] = (kind, frozenset((a, conv_id))) if kind == Kind.DIRECT else (kind, conv_id)
        return self.logs.setdefault(key, [])

    def members(self, kind: int, sender: int, conv_id: int) -> set[int]:
        if kind == Kind.DIRECT:
            return {sender, conv_id}
        return self.groups.get(conv_id, set())

    def store(self, sender: int, s: F.Send) -> F.SendAck:
        key = (sender, s.client_msg_id)
        if key in self.acked:
            a = self.acked[key]
            return F.SendAck(a.kind, a.conv_id, a.seq, a.msg_id, a.ts_ms, flags=1)
        log = self.conv_log(s.kind, sender, s.conv_id)
        seq = len(log) + 1
        mid = self.next_msg_id
        self.next_msg_id += 1
        ts = int(time.time() * 1000)
        rec = F.Message(s.kind, s.content_type, s.conv_id, seq, mid, sender, ts, s.client_msg_id, s.body)
        log.append(rec)
        ack = F.SendAck(s.kind, s.conv_id, seq, mid, ts)
        self.acked[key] = ack
        return ack

    def view(self, rec: F.Message, viewer: int) -> F.Message:
        """The record as ``viewer`` sees it (direct conv_id is the peer)."""
        if rec.kind != Kind.DIRECT:
            return rec
        peer = rec.conv_id if rec.sender_id == viewer else rec.sender_id
        return F.Message(rec.kind, rec.content_type, peer, rec.seq, rec.msg_id, rec.sender_id,
                         rec.ts_ms, rec.client_msg_id, rec.body)

    def fanout(self, rec: F.Message, origin: FakeConn) -> None:
        for uid in self.members(rec.kind, rec.sender_id, rec.conv_id):
            if uid in self.drop_delivers_to:
                continue
            for c in self.conns:
                if c.user_id == uid and c is not origin:
                    c.send(F.Deliver(self.view(rec, uid)))

    def inject(self, sender: int, kind: int, conv_id: int, body: bytes, *, deliver: bool = True) -> F.Message:
        """Store a message as if another client sent it."""
        self.store(sender, F.Send(kind, 1, conv_id, uuid.uuid4().bytes, body))
        rec = self.conv_log(kind, sender, conv_id)[-1]
        if deliver:
            self.fanout(rec, origin=None)  # type: ignore[arg-type]
        return rec

    def conversations(self, uid: int) -> list[tuple[int, int, int]]:
        out = []
        for (kind, key), log in self.logs.items():
            if kind == Kind.DIRECT and uid in key:
                peer = next(iter(key - {uid}), uid)
                out.append((kind, peer, len(log)))
            elif kind == Kind.GROUP and uid in self.groups.get(key, set()):
                out.append((kind, key, len(log)))
        return out


class FakeConn(WSListener):  # type: ignore[misc]
    def __init__(self, srv: FakeServer) -> None:
        super().__init__()
        self.srv = srv
        self.user_id = 0
        self.transport: WSTransport | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.srv.conns.append(self)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self in self.srv.conns:
            self.srv.conns.remove(self)
        for subs in self.srv.rooms.values():
            subs.discard(self)

    def send(self, f: Any) -> None:
        if self.transport is not None:
            self.transport.send(WSMsgType.BINARY, encode(f))

    def drop(self) -> None:
        if self.transport is not None:
            self.transport.disconnect(graceful=False)

    def fatal(self, code: int, rid: int = 0) -> None:
        self.send(F.Error(code, 0, ErrorCode(code).name, rid=rid))
        assert self.transport is not None
        self.transport.send_close(WSCloseCode(4000 + code), b"")
        self.transport.disconnect()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            transport.disconnect()
            return
        if frame.msg_type != WSMsgType.BINARY:
            return
        for f in decode(frame.get_payload_as_bytes(), max_frame=65536):
            self.srv.received.append(f)
            self.handle(f)

    def handle(self, f: Any) -> None:
        srv = self.srv
        if isinstance(f, F.Auth):
            uid = srv.tokens.get(f.token)
            if uid is None:
                code = ErrorCode.TOKEN_EXPIRED if f.token.startswith("expired") else ErrorCode.UNAUTHORIZED
                self.fatal(code, f.rid)
                return
            self.user_id = uid
            srv.sessions += 1
            self.send(F.AuthOk(uid, srv.sessions, int(time.time() * 1000), srv.heartbeat_ms, 65536, rid=f.rid))
        elif isinstance(f, F.Ping):
            if srv.answer_pings:
                self.send(F.Pong(f.payload, rid=f.rid))
        elif not self.user_id:
            self.fatal(ErrorCode.NOT_AUTHENTICATED, f.rid)
        elif isinstance(f, F.Send):
            if f.kind == Kind.ROOM:
                if self not in srv.rooms.get(f.conv_id, set()):
                    self.send(F.Error(ErrorCode.NOT_MEMBER, 0, "subscribe first", rid=f.rid))
                    return
                mid = srv.next_msg_id
                srv.next_msg_id += 1
                rec = F.Message(f.kind, f.content_type, f.conv_id, 0, mid, self.user_id, 0, f.client_msg_id, f.body)
                for c in srv.rooms[f.conv_id]:
                    if c is not self:
                        c.send(F.Deliver(rec))
                self.send(F.SendAck(f.kind, f.conv_id, 0, mid, 0, rid=f.rid))
                return
            if self.user_id not in srv.members(f.kind, self.user_id, f.conv_id):
                self.send(F.Error(ErrorCode.NOT_MEMBER, 0, "not a member", rid=f.rid))
                return
            dup = (self.user_id, f.client_msg_id) in srv.acked
            ack = srv.store(self.user_id, f)
            ack.rid = f.rid
            if not dup:
                srv.fanout(srv.conv_log(f.kind, self.user_id, f.conv_id)[-1], self)
            if srv.drop_acks > 0:
                srv.drop_acks -= 1
                return
            self.send(ack)
        elif isinstance(f, F.Sync):
            known = {(e.kind, e.conv_id): e.seq for e in f.entries}
            entries = [F.SyncResultEntry(k, c, last, 0) for k, c, last in srv.conversations(self.user_id)
                       if last > known.get((k, c), 0)]
            self.send(F.SyncResult(entries, rid=f.rid))
        elif isinstance(f, F.History):
            log = srv.conv_log(f.kind, self.user_id, f.conv_id)
            if f.flags & 1:
                sel = [r for r in log if r.seq <= f.from_seq][-f.limit:]
                more = bool(sel) and sel[0].seq > 1
            else:
                sel = [r for r in log if r.seq >= f.from_seq][: f.limit]
                more = bool(sel) and sel[-1].seq < len(log)
            self.send(F.HistoryResult(f.kind, f.conv_id, [srv.view(r, self.user_id) for r in sel],
                                      rid=f.rid, flags=1 if more else 0))
        elif isinstance(f, F.Read):
            self.send(F.ReadOk(rid=f.rid))
        elif isinstance(f, F.Subscribe):
            srv.rooms.setdefault(f.room_id, set()).add(self)
            self.send(F.SubscribeOk(f.room_id, rid=f.rid))
        elif isinstance(f, F.Unsubscribe):
            srv.rooms.get(f.room_id, set()).discard(self)
            self.send(F.UnsubscribeOk(f.room_id, rid=f.rid))
        elif isinstance(f, F.Typing):
            pass
        elif isinstance(f, F.Call):
            payload = orjson.loads(f.payload) if f.payload else {}
            if f.method == "echo":
                self.send(F.CallResult(orjson.dumps({"echo": payload}), rid=f.rid))
            else:
                self.send(F.Error(ErrorCode.UNKNOWN_METHOD, 0, f.method, rid=f.rid))


async def _fake(**kw: Any) -> FakeServer:
    srv = FakeServer(**kw)
    srv.tokens.update({"t-alice": 1, "t-bob": 2, "t-carol": 3})
    srv.groups[50] = {1, 2, 3}
    await srv.start()
    return srv


async def _drain(c: Client, within: float = 0.3) -> list[Any]:
    out = []
    while True:
        try:
            out.append(await c.next_event(within))
        except TimeoutError:
            return out


async def _collect(c: Client, n: int, timeout: float = 5.0) -> list[Any]:
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        out.append(await c.next_event(max(deadline - time.monotonic(), 0.01)))
    return out


def _connect(srv: FakeServer, token: Any, **kw: Any) -> Coroutine[Any, Any, Client]:
    kw.setdefault("backoff_initial", 0.05)
    kw.setdefault("backoff_max", 0.2)
    kw.setdefault("request_timeout", 3.0)
    kw.setdefault("gap_fill_delay", 0.02)
    return Client.connect(srv.url, token, **kw)


def test_fake_basic_flow() -> None:
    async def body() -> None:
        srv = await _fake()
        try:
            a = await _connect(srv, "t-alice")
            b = await _connect(srv, "t-bob")
            b2 = await _connect(srv, "t-bob")
            assert (a.user_id, b.user_id) == (1, 2) and a.session_id
            ack = await a.send(Kind.DIRECT, 2, "hi bob")
            assert (ack.seq, ack.duplicate, ack.kind, ack.conv_id) == (1, False, 1, 2)
            for c in (b, b2):
                m = await c.next_event(2)
                assert isinstance(m, Message)
                assert (m.kind, m.conv_id, m.seq, m.sender_id, m.text, m.client_msg_id) == (
                    1, 1, 1, 1, "hi bob", ack.client_msg_id)
            # bob answers from device 2: alice and bob's device 1 get it
            await b2.send(Kind.DIRECT, 1, b"\x00\x01", content_type=200)
            m = await a.next_event(2)
            assert isinstance(m, Message) and m.conv_id == 2 and m.seq == 2 and m.body == b"\x00\x01"
            assert m.content_type == 200
            m = await b.next_event(2)
            assert isinstance(m, Message) and m.conv_id == 1 and m.seq == 2 and m.sender_id == 2
            assert await _drain(a, 0.1) == [] and await _drain(b2, 0.1) == []
            # history / fetch_all / call / read / ping / rooms
            h = await a.history(Kind.DIRECT, 2, 1, 10)
            assert [x.seq for x in h.messages] == [1, 2] and not h.more
            h = await a.history(Kind.DIRECT, 2, 2, 1, backward=True)
            assert [x.seq for x in h.messages] == [2] and h.more
            assert [x.seq for x in await a.fetch_all(Kind.DIRECT, 2, 0, page=1)] == [1, 2]
            assert await a.call("echo", {"x": 1}) == {"echo": {"x": 1}}
            with pytest.raises(RequestError) as e:
                await a.call("nope")
            assert e.value.code == ErrorCode.UNKNOWN_METHOD
            await a.read(Kind.DIRECT, 2, 2)
            assert await a.ping() >= 0
            await a.typing(Kind.DIRECT, 2)
            with pytest.raises(RequestError) as e2:
                await a.send(Kind.ROOM, 9, "x")
            assert e2.value.code == ErrorCode.NOT_MEMBER and a.unacknowledged == 0
            await a.subscribe(9)
            await b.subscribe(9)
            rack = await a.send(Kind.ROOM, 9, "to the room")
            assert rack.seq == 0 and rack.msg_id
            m = await b.next_event(2)
            assert isinstance(m, Message) and m.kind == Kind.ROOM and m.seq == 0 and m.text == "to the room"
            await b.unsubscribe(9)
            assert a.positions() == {(1, 2): 2}
            for c in (a, b, b2):
                await c.close()
            with pytest.raises(ClientClosedError):
                await a.send(Kind.DIRECT, 2, "late")
            with pytest.raises(ClientClosedError):
                await a.next_event(0.1)
            assert [x async for x in a] == []
        finally:
            await srv.stop()

    run(body())


def test_fake_reconnect_resends_unacked_with_same_client_msg_id() -> None:
    async def body() -> None:
        srv = await _fake()
        states: list[str] = []
        try:
            a = await _connect(srv, "t-alice", on_state=states.append)
            b = await _connect(srv, "t-bob")
            srv.drop_acks = 1
            cmid = uuid.uuid4().bytes
            task = asyncio.create_task(a.send(Kind.GROUP, 50, "stored but unacked", client_msg_id=cmid))
            m = await b.next_event(2)  # stored and delivered, but alice got no ack
            assert isinstance(m, Message) and m.seq == 1
            assert a.unacknowledged == 1
            first_session = a.session_id
            srv.drop_all()
            ack = await asyncio.wait_for(task, 5)
            assert ack.duplicate and ack.seq == 1 and ack.client_msg_id == cmid
            assert a.session_id != first_session
            assert "disconnected" in states and states.count("connected") >= 2
            sends = [f for f in srv.received if isinstance(f, F.Send) and f.client_msg_id == cmid]
            assert len(sends) == 2
            # nobody sees the message twice; alice never sees her own message in the stream
            assert await _drain(b, 0.2) == [] and await _drain(a, 0.2) == []
            assert len(srv.conv_log(Kind.GROUP, 1, 50)) == 1
            await a.close()
            await b.close()
        finally:
            await srv.stop()

    run(body())


def test_fake_sends_while_disconnected_are_sent_in_order_after_reconnect() -> None:
    async def body() -> None:
        srv = await _fake()
        port = 0
        try:
            a = await _connect(srv, "t-alice")
            port = srv.port
            await srv.stop()
            tasks = [asyncio.create_task(a.send(Kind.GROUP, 50, f"m{i}")) for i in range(5)]
            await asyncio.sleep(0.3)
            assert not a.connected and a.unacknowledged == 5
            await srv.start(port)
            acks = await asyncio.wait_for(asyncio.gather(*tasks), 5)
            assert [x.seq for x in acks] == [1, 2, 3, 4, 5]
            assert [r.body for r in srv.conv_log(Kind.GROUP, 1, 50)] == [f"m{i}".encode() for i in range(5)]
            await a.close()
        finally:
            await srv.stop()

    run(body())


def test_fake_missed_messages_recovered_after_reconnect_exactly_once() -> None:
    async def body() -> None:
        srv = await _fake()
        try:
            srv.inject(2, Kind.GROUP, 50, b"old")  # before alice connects: history, not stream
            a = await _connect(srv, "t-alice")
            srv.inject(2, Kind.GROUP, 50, b"live1")
            m = await a.next_event(2)
            assert isinstance(m, Message) and m.seq == 2
            srv.drop_all()
            await asyncio.sleep(0)
            # while alice is away (store without delivering): new messages in the group, in a
            # direct conversation that did not exist before, and one from alice's other device
            srv.inject(2, Kind.GROUP, 50, b"missed1", deliver=False)
            srv.inject(3, Kind.GROUP, 50, b"missed2", deliver=False)
            srv.inject(3, Kind.DIRECT, 1, b"new direct", deliver=False)
            srv.inject(1, Kind.DIRECT, 2, b"from my phone", deliver=False)
            got = await _collect(a, 4, 5)
            by_conv: dict[tuple[int, int], list[bytes]] = {}
            for x in got:
                assert isinstance(x, Message)
                by_conv.setdefault(x.key, []).append(x.body)
            assert by_conv == {(2, 50): [b"missed1", b"missed2"], (1, 3): [b"new direct"],
                               (1, 2): [b"from my phone"]}
            assert await _drain(a, 0.3) == []
            assert a.positions()[(2, 50)] == 4
            await a.close()
        finally:
            await srv.stop()

    run(body())


def test_fake_deliver_gap_is_filled_from_history() -> None:
    async def body() -> None:
        srv = await _fake()
        try:
            a = await _connect(srv, "t-alice")
            srv.drop_delivers_to = {1}
            srv.inject(2, Kind.GROUP, 50, b"g1")
            srv.inject(2, Kind.GROUP, 50, b"g2")
            srv.drop_delivers_to = set()
            srv.inject(3, Kind.GROUP, 50, b"g3")
            got = await _collect(a, 3, 3)
            assert [(x.seq, x.body) for x in got] == [(1, b"g1"), (2, b"g2"), (3, b"g3")]
            assert sum(isinstance(f, F.History) for f in srv.received) >= 1
            # own ack overtaking others' messages: a gap that closes by itself or by HISTORY
            srv.drop_delivers_to = {1}
            srv.inject(2, Kind.GROUP, 50, b"g4")
            srv.drop_delivers_to = set()
            ack = await a.send(Kind.GROUP, 50, "mine")
            assert ack.seq == 5
            got = await _collect(a, 1, 3)
            assert [(x.seq, x.body) for x in got] == [(4, b"g4")]
            assert await _drain(a, 0.2) == []
            await a.close()
        finally:
            await srv.stop()

    run(body())


def test_fake_sync_with_known_positions_and_resume() -> None:
    async def body() -> None:
        srv = await _fake()
        try:
            for i in range(5):
                srv.inject(2, Kind.GROUP, 50, f"h{i}".encode())
            a = await _connect(srv, "t-alice")
            assert await _drain(a, 0.1) == []
            states = await a.sync({(2, 50): 2})
            assert [(s.key, s.last_seq) for s in states] == [((2, 50), 5)]
            got = await _drain(a, 0.2)
            assert [x.seq for x in got] == [3, 4, 5]
            await a.close()
            # a later run resumes from saved positions; unknown conversations from seq 1
            srv.inject(3, Kind.DIRECT, 1, b"d1")
            r = await _connect(srv, "t-alice", resume={(2, 50): 4})
            got = await _collect(r, 2, 3)
            assert sorted((x.key, x.seq) for x in got) == [((1, 3), 1), ((2, 50), 5)]
            await r.close()
        finally:
            await srv.stop()

    run(body())


def test_fake_goaway_reconnects_to_hint() -> None:
    async def body() -> None:
        srv = await _fake()
        other = await _fake()
        try:
            a = await _connect(srv, "t-alice")
            conn = srv.conns[-1]
            conn.send(F.GoAway(ErrorCode.SHUTTING_DOWN, 50, other.url, "draining"))
            for _ in range(100):
                if a.connected and a.url == other.url:
                    break
                await asyncio.sleep(0.05)
            assert a.url == other.url
            assert (await a.send(Kind.GROUP, 50, "on the other node")).seq == 1
            await a.close()
        finally:
            await srv.stop()
            await other.stop()

    run(body())


def test_fake_url_failover_round_robin() -> None:
    async def body() -> None:
        srv = await _fake()
        try:
            a = await Client.connect(["ws://127.0.0.1:9/ws", srv.url], "t-alice", backoff_initial=0.02,
                                     backoff_max=0.05, request_timeout=2)
            assert a.url == srv.url
            await a.close()
            with pytest.raises(ConnectionLostError):
                await Client.connect("ws://127.0.0.1:9/ws", "t-alice", backoff_initial=0.02,
                                     backoff_max=0.05, connect_timeout=0.3)
            with pytest.raises(ConnectionLostError):
                await Client.connect("ws://127.0.0.1:9/ws", "t-alice", reconnect=False)
        finally:
            await srv.stop()

    run(body())


def test_fake_auth_failures_and_token_refresh() -> None:
    async def body() -> None:
        srv = await _fake()
        try:
            with pytest.raises(AuthError) as e:
                await _connect(srv, "bogus")
            assert e.value.code == ErrorCode.UNAUTHORIZED

            calls: list[str] = []
            tokens = iter(["expired-1", "t-alice"])

            async def source() -> str:
                tok = next(tokens, "t-alice")
                calls.append(tok)
                return tok

            a = await _connect(srv, source)
            assert a.user_id == 1 and calls == ["expired-1", "t-alice"]

            # the server revokes the session: static token -> the client gives up
            b = await _connect(srv, "t-bob")
            del srv.tokens["t-bob"]
            srv.conns[-1].fatal(ErrorCode.TOKEN_REVOKED)
            with pytest.raises(AuthError) as e3:
                await asyncio.wait_for(b.next_event(), 5)
            assert e3.value.code in (ErrorCode.TOKEN_REVOKED, ErrorCode.UNAUTHORIZED)
            assert b.closed
            with pytest.raises(AuthError):
                async for _ in b:
                    pass

            # a callable that keeps returning the same rejected token -> gives up too
            async def same() -> str:
                return "expired-2"

            with pytest.raises(AuthError) as e4:
                await _connect(srv, same)
            assert e4.value.code == ErrorCode.TOKEN_EXPIRED

            # a callable that cannot log in (bad password) is fatal at once, not retried
            async def bad_password() -> str:
                raise AuthError("bad credentials", code=ErrorCode.UNAUTHORIZED)

            t0 = time.monotonic()
            with pytest.raises(AuthError):
                await _connect(srv, bad_password, connect_timeout=5)
            assert time.monotonic() - t0 < 2

            # invalidate(token) is called on rejection before asking again
            class Source:
                def __init__(self) -> None:
                    self.current = "expired-3"
                    self.invalidated: list[str] = []

                async def __call__(self) -> str:
                    return self.current

                def invalidate(self, token: str) -> None:
                    self.invalidated.append(token)
                    self.current = "t-carol"

            src = Source()
            c = await _connect(srv, src)
            assert c.user_id == 3 and src.invalidated == ["expired-3"]
            await c.close()
            await a.close()
        finally:
            await srv.stop()

    run(body())


def test_fake_heartbeat_detects_dead_connection() -> None:
    async def body() -> None:
        srv = await _fake()
        try:
            a = await _connect(srv, "t-alice", heartbeat_interval=0.05)
            s1 = a.session_id
            srv.answer_pings = False
            for _ in range(100):
                if a.session_id != s1:
                    break
                await asyncio.sleep(0.02)
            assert a.session_id != s1  # reconnected after missing PONGs
            srv.answer_pings = True
            await a.close()
        finally:
            await srv.stop()

    run(body())


def test_fake_rooms_resubscribed_after_reconnect_and_no_reconnect_mode() -> None:
    async def body() -> None:
        srv = await _fake()
        try:
            a = await _connect(srv, "t-alice")
            b = await _connect(srv, "t-bob")
            await a.subscribe(7)
            await b.subscribe(7)
            sa, sb = a.session_id, b.session_id
            srv.drop_all()
            for _ in range(200):
                live = [c for c in srv.rooms.get(7, ()) if c in srv.conns]
                if a.session_id != sa and b.session_id != sb and len(live) == 2:
                    break
                await asyncio.sleep(0.02)
            assert a.session_id != sa and b.session_id != sb
            await a.send(Kind.ROOM, 7, "still here?")
            m = await b.next_event(2)
            assert isinstance(m, Message) and m.text == "still here?"
            await a.close()
            await b.close()

            c = await _connect(srv, "t-carol", reconnect=False)
            pending = asyncio.create_task(c.call("echo"))
            srv.drop_all()
            with contextlib.suppress(ConnectionLostError):
                await pending
            with pytest.raises(ConnectionLostError):
                await asyncio.wait_for(c.next_event(), 3)
            assert c.closed
        finally:
            await srv.stop()

    run(body())


def test_fake_send_timeout_and_validation() -> None:
    async def body() -> None:
        srv = await _fake()
        try:
            a = await _connect(srv, "t-alice")
            srv.drop_acks = 1
            with pytest.raises(TimeoutError):
                await a.send(Kind.GROUP, 50, "slow", timeout=0.2)
            assert a.unacknowledged == 0
            with pytest.raises(ValueError):
                await a.send(9, 50, "bad kind")
            with pytest.raises(ValueError):
                await a.send(Kind.GROUP, 50, "x", client_msg_id=b"short")
            with pytest.raises(RequestError) as e:
                await a.send(Kind.GROUP, 50, b"x" * 70000)
            assert e.value.code == ErrorCode.BODY_TOO_LARGE
            cmid = uuid.uuid4().bytes
            a1, a2 = await asyncio.gather(a.send(Kind.GROUP, 50, "same", client_msg_id=cmid),
                                          a.send(Kind.GROUP, 50, "same", client_msg_id=cmid))
            assert a1 == a2
            await a.close()
        finally:
            await srv.stop()

    run(body())


# ---------------------------------------------------------------------------------------------
# gochat chat formatting
# ---------------------------------------------------------------------------------------------


def test_chat_formatting() -> None:
    import argparse
    from types import SimpleNamespace

    from gochat.cli_chat import ChatSession, add_chat_arguments

    s = ChatSession(SimpleNamespace(user_id=7), None, "alice")  # type: ignore[arg-type]
    s.names[9] = "bob"
    s.groups[50] = "team"
    ts = int(time.mktime((2024, 5, 1, 13, 4, 5, 0, 0, -1)) * 1000)
    m = Message(Kind.DIRECT, 9, 1, 1, 9, ts, b"\0" * 16, 1, b"hi")
    assert s.format_message(m) == "[13:04:05] bob → you: hi"
    mine = Message(Kind.DIRECT, 9, 2, 2, 7, ts, b"\0" * 16, 1, b"yo")
    assert s.format_message(mine) == "[13:04:05] you → bob: yo"
    g = Message(Kind.GROUP, 50, 3, 3, 11, ts, b"\0" * 16, 0, b"\1\2")
    assert s.format_message(g) == "[13:04:05] user#11 → #team: <2 bytes, content type 0>"
    r = Message(Kind.ROOM, 4, 0, 4, 9, ts, b"\0" * 16, 1, b"x")
    assert s.format_message(r) == "[13:04:05] bob → room:4: x"
    assert s.format_event(Event(1, 0, 0, 9, 1)) == "* bob is online"
    assert s.format_event(Event(4, 2, 50, 7, 9)) == "* you added bob to #team"
    assert s.format_event(Event(5, 2, 50, 9, 9)) == "* bob left #team"
    assert s.format_event(Event(2, 1, 9, 9, 1)) is None

    p = argparse.ArgumentParser()
    add_chat_arguments(p)
    ns = p.parse_args(["--user", "alice", "--ws", "ws://a/ws", "--ws", "ws://b/ws", "--register"])
    assert ns.ws == ["ws://a/ws", "ws://b/ws"] and ns.register and ns.to is None


def test_client_msg_ids_are_time_ordered_uuid7() -> None:
    import time as _time
    import uuid as _uuid

    from gochat.client import new_client_msg_id

    first = new_client_msg_id()
    _time.sleep(0.002)
    second = new_client_msg_id()
    for raw in (first, second):
        u = _uuid.UUID(bytes=raw)
        assert len(raw) == 16 and u.version == 7 and u.variant == _uuid.RFC_4122
    # a later millisecond sorts later: the server's dedup index grows at its end
    assert first < second
    assert len({new_client_msg_id() for _ in range(1000)}) == 1000
