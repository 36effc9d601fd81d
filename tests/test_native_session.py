"""The native session state machine (``gochat._native.session.Session``) against the reference
gateway in Python (``Gateway.on_message`` on a plain ``Connection``): the same WebSocket
messages in, the same bytes back to the client, the same close code, and the same calls into the
messaging core and sessions.

Both run the real :class:`~gochat.gateway.gateway.Gateway` and :class:`ErrorReplies` over real
picows sockets; only the messaging core, the sessions and the token check are recording fakes,
so what is compared is exactly the data plane's decisions: validation (a bad frame rejects its
whole message), the rate limit (one token per frame), the auth gate, the op switch, PING, and
how a SEND reaches the send path (plain values, no frame object on the native side).
"""

from __future__ import annotations

import asyncio
import json
import random
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect, ws_create_server

from gochat._native.connection import Connection, FanoutWriter
from gochat._native.session import Session
from gochat.auth.tokens import Claims
from gochat.config import Settings
from gochat.errors import AuthError, ErrorCode
from gochat.gateway.gateway import Gateway
from gochat.messaging.replies import ErrorReplies
from gochat.protocol import Op
from tests.conftest import run

VECTORS = json.loads((Path(__file__).parent / "vectors" / "protocol_v1.json").read_text())
MAX_FRAME = 4096
BURST = 5
SENTINEL_RID = 0xFFFFFFFF


# ---- recording fakes of the gateway's collaborators ---------------------------------------------


class _Auth:
    def verify_access(self, token: str) -> Claims:
        if token.startswith("good:"):
            return Claims(int(token[5:]), "jti", "sid", 0, 2**40, "kid")
        raise AuthError("bad token", code=ErrorCode.UNAUTHORIZED)


async def _no_reply() -> None:
    return None


@dataclass
class _Sessions:
    calls: list[Any]
    routing: Any = None

    def opened(self, conn: Connection, claims: Claims | None) -> None:
        conn.state = object()

    def connected(self, conn: Connection, timeout_s: float, on_timeout: Any) -> None:
        pass

    def closed(self, conn: Connection) -> None:
        pass

    def authenticate(self, conn: Connection, claims: Claims, rid: int) -> None:
        conn.authenticated = True
        conn.user_id = claims.user_id
        self.calls.append(("authenticate", rid, claims.user_id))


@dataclass
class _Sends:
    calls: list[Any]

    def send(self, conn: Connection, rid: int, kind: int, ct: int, conv: int, cmid: bytes, body: bytes, started: float) -> None:
        assert type(cmid) is bytes and type(body) is bytes and isinstance(started, float)
        self.calls.append(("send", rid, kind, ct, conv, cmid, body))


@dataclass
class _Core:
    calls: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sessions = _Sessions(self.calls)
        self.sends = _Sends(self.calls)

    def send_soon(self, conn: Connection, req: Any, started: float) -> None:
        self.sends.send(conn, req.rid, req.kind, req.content_type, req.conv_id, req.client_msg_id, req.body, started)

    def _record(self, name: str, req: Any) -> Any:
        self.calls.append((name, repr(req)))
        return _no_reply()

    def sync(self, conn: Connection, req: Any) -> Any:
        return self._record("sync", req)

    def history(self, conn: Connection, req: Any) -> Any:
        return self._record("history", req)

    def read(self, conn: Connection, req: Any) -> Any:
        return self._record("read", req)

    def typing(self, conn: Connection, req: Any) -> Any:
        return self._record("typing", req)

    def call(self, conn: Connection, method: str, payload: bytes, rid: int) -> Any:
        self.calls.append(("call", method, payload, rid))
        return _no_reply()

    def subscribe(self, conn: Connection, req: Any) -> bytes:
        self.calls.append(("subscribe", repr(req)))
        return b""

    def unsubscribe(self, conn: Connection, req: Any) -> bytes:
        self.calls.append(("unsubscribe", repr(req)))
        return b""


# ---- one run: messages in, everything observable out --------------------------------------------


class _Client(WSListener):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.data = bytearray()
        self.close_code: int | None = None
        self.closed = asyncio.Event()
        self.changed = asyncio.Event()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.BINARY:
            self.data += frame.get_payload_as_bytes()
            self.changed.set()
        elif frame.msg_type == WSMsgType.CLOSE:
            self.close_code = int(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closed.set()
        self.changed.set()


def _has_sentinel(data: bytes) -> bool:
    off = 0
    while off + 12 <= len(data):
        length, _, op, _, rid = struct.unpack_from("<IBBHI", data, off)
        if rid == SENTINEL_RID and op in (Op.PONG, Op.ERROR):
            return True
        off += length
    return False


@dataclass
class Outcome:
    received: bytes
    close_code: int | None
    calls: list[Any]


async def _exchange(native: bool, messages: list[bytes]) -> Outcome:
    loop = asyncio.get_running_loop()
    settings = Settings(max_frame=MAX_FRAME, rate_limit_burst=BURST, rate_limit_per_s=0.001, native_session=native)
    writer = FanoutWriter(loop)
    core = _Core()
    gateway = Gateway(settings, _Auth(), core, writer, ErrorReplies({}))  # type: ignore[arg-type]
    assert gateway._connection_class is (Session if native else Connection)
    server = await ws_create_server(gateway.listener_factory, "127.0.0.1", 0, max_frame_size=MAX_FRAME * 4)
    port = server.sockets[0].getsockname()[1]
    transport, client = await ws_connect(_Client, f"ws://127.0.0.1:{port}/ws")
    try:
        for message in [*messages, struct.pack("<IBBHI", 12, 1, Op.PING, 0, SENTINEL_RID)]:
            if client.closed.is_set():
                break
            transport.send(WSMsgType.BINARY, message)
        async with asyncio.timeout(5):
            while not client.closed.is_set() and not _has_sentinel(bytes(client.data)):
                client.changed.clear()
                await client.changed.wait()
        await asyncio.sleep(0)  # let spawned requests record their calls
        return Outcome(bytes(client.data), client.close_code, core.calls)
    finally:
        transport.disconnect()
        server.close()


def _both(messages: list[bytes]) -> tuple[Outcome, Outcome]:
    async def scenario() -> tuple[Outcome, Outcome]:
        return await _exchange(True, messages), await _exchange(False, messages)

    return run(scenario())


def _hex(v: dict[str, Any]) -> bytes:
    return bytes.fromhex(v["hex"].replace(" ", ""))


def _frame(op: int, rid: int, body: bytes = b"", flags: int = 0) -> bytes:
    return struct.pack("<IBBHI", 12 + len(body), 1, op, flags, rid) + body


AUTH_OK = _frame(Op.AUTH, 1, b"good:7")


def _send(rid: int, conv: int = 9, body: bytes = b"hi") -> bytes:
    return _frame(Op.SEND, rid, struct.pack("<BBQ", 1, 1, conv) + bytes(range(16)) + body)


# ---- the corpus ----------------------------------------------------------------------------------


def _vector_messages() -> list[tuple[str, bytes]]:
    out = []
    for v in VECTORS["valid"] + VECTORS["invalid"]:
        if v.get("max_frame", MAX_FRAME) <= MAX_FRAME or "max_frame" not in v:
            out.append((v["name"], _hex(v)))
    return out


@pytest.mark.parametrize(("name", "message"), _vector_messages(), ids=[n for n, _ in _vector_messages()])
@pytest.mark.parametrize("authenticated", [False, True], ids=["before-auth", "after-auth"])
def test_every_protocol_vector_is_answered_alike(name: str, message: bytes, authenticated: bool) -> None:
    messages = [AUTH_OK, message] if authenticated else [message]
    native, reference = _both(messages)
    assert native == reference


@pytest.mark.parametrize(
    ("name", "messages"),
    [
        ("empty message", [b""]),
        ("auth with a bad token", [_frame(Op.AUTH, 3, b"nope")]),
        ("auth twice", [AUTH_OK, _frame(Op.AUTH, 2, b"good:8")]),
        ("send before auth", [_send(4)]),
        ("server op", [AUTH_OK, _frame(Op.DELIVER, 5, b"")]),
        ("auth then send in one message", [AUTH_OK[:0] + AUTH_OK + _send(2) + _frame(Op.PING, 3, b"xy")]),
        ("six frames over a burst of five", [AUTH_OK, b"".join(_frame(Op.PING, i, b"%d" % i) for i in range(1, 7))]),
        ("typing over the budget is dropped", [AUTH_OK, b"".join(_frame(Op.TYPING, i, struct.pack("<BQ", 1, 9)) for i in range(1, 8))]),
        ("bad frame after good ones", [AUTH_OK, _send(2) + _frame(Op.PING, 3) + b"\x05\x00\x00\x00"]),
        ("control ops", [AUTH_OK, _frame(Op.SYNC, 2, struct.pack("<H", 0)) + _frame(Op.CALL, 3, b"\x04user{}")]),
    ],
)
def test_edge_cases_are_answered_alike(name: str, messages: list[bytes]) -> None:
    native, reference = _both(messages)
    assert native == reference


def test_random_multi_frame_messages_are_answered_alike() -> None:
    rng = random.Random(20261206)
    pool = [
        lambda r: _frame(Op.PING, r, bytes(r % 65)),
        lambda r: _send(r, conv=r % 5, body=b"b" * (r % 40)),
        lambda r: _frame(Op.TYPING, r, struct.pack("<BQ", 2, r), flags=r % 2),
        lambda r: _frame(Op.SUBSCRIBE, r, struct.pack("<Q", r)),
        lambda r: _frame(Op.HISTORY, r, struct.pack("<BQQH", 1, 9, 0, 1 + r % 50), flags=r % 2),
        lambda r: _frame(Op.AUTH, r, b"good:%d" % r if r % 3 else b"bad"),
        lambda r: _frame(Op.DELIVER, r),  # server-to-client: fatal
        lambda r: _frame(Op.READ, r, struct.pack("<BQQ", 3, 1, 1)),  # a room READ: refused by the core
    ]
    for _ in range(40):
        messages = []
        for _ in range(rng.randint(1, 4)):
            frames = [rng.choice(pool)(rng.randint(1, 1000)) for _ in range(rng.randint(1, 8))]
            messages.append(b"".join(frames))
        native, reference = _both(messages)
        assert native == reference, messages


def test_a_send_reaches_the_send_path_as_plain_values() -> None:
    native, _ = _both([AUTH_OK, _send(2, conv=2**64 - 1, body=b"payload")])
    assert native.calls == [
        ("authenticate", 1, 7),
        ("send", 2, 1, 1, 2**64 - 1, bytes(range(16)), b"payload"),
    ]
