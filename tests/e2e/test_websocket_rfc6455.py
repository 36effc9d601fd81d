"""WebSocket-level conformance (RFC 6455) and outbound limits of a real ``gochat serve``.

Frames are hand-built on a raw TCP socket (:mod:`tests.e2e.wsraw`), so what is checked is what
any client library sees: protocol violations fail the connection with 1002 (1007 for a close
reason that is not UTF-8), a client that does not read is cut off at once, and no WebSocket
message the server sends is larger than the message limit it enforces itself (4 x max_frame).
A few unit-level checks drive the native Connection directly over picows sockets.
"""

from __future__ import annotations

import asyncio
import re
import struct
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect, ws_create_server

from gochat._native.connection import Connection, FanoutWriter
from gochat.protocol import Kind, decode, encode
from gochat.protocol.frames import AuthOk, Deliver, Ping, Pong, SendAck
from tests.conftest import GochatProcess, create_user, run
from tests.e2e.rawclient import connect, send_frame
from tests.e2e.wsraw import BINARY, CLOSE, CONT, PING, PONG, TEXT, RawWS, close_payload
from tests.test_native_connection import _Handler

pytestmark = pytest.mark.e2e

PING_FRAME = encode(Ping(b"conformance", rid=9))


def _expect_fail(ws: RawWS, code: int = 1002) -> None:
    """The server answers with CLOSE ``code`` and ends the TCP connection."""
    try:
        assert ws.close_code() == code
        ws.wait_eof()
    finally:
        ws.close()


def _still_serving(server: GochatProcess) -> None:
    ws = RawWS(server.ws_url)
    try:
        ws.send(BINARY, PING_FRAME)
        op, payload = ws.recv_message()
        assert op == BINARY
        [pong] = decode(payload, 1 << 20)
        assert isinstance(pong, Pong) and pong.payload == b"conformance" and pong.rid == 9
    finally:
        ws.close()


# ---- RFC 6455 violations -------------------------------------------------------------------------


@pytest.mark.parametrize("rsv", [0x40, 0x20, 0x10], ids=["rsv1", "rsv2", "rsv3"])
def test_reserved_bit_fails_the_connection(shared_server: GochatProcess, rsv: int) -> None:
    ws = RawWS(shared_server.ws_url)
    ws.send(BINARY, PING_FRAME, rsv=rsv)
    _expect_fail(ws)
    _still_serving(shared_server)


@pytest.mark.parametrize("second", [BINARY, TEXT], ids=["binary", "text"])
def test_new_data_frame_inside_fragmented_message_fails(shared_server: GochatProcess, second: int) -> None:
    ws = RawWS(shared_server.ws_url)
    ws.send(BINARY, PING_FRAME[:5], fin=False)
    ws.send(second, PING_FRAME[5:])
    _expect_fail(ws)


@pytest.mark.parametrize("fin", [True, False], ids=["final", "not-final"])
def test_orphan_continuation_fails_with_1002_not_gochat_107(shared_server: GochatProcess, fin: bool) -> None:
    ws = RawWS(shared_server.ws_url)
    ws.send(CONT, PING_FRAME, fin=fin)
    _expect_fail(ws)


@pytest.mark.parametrize(
    "payload",
    [
        close_payload(0),
        close_payload(999),
        close_payload(1004),
        close_payload(1005),
        close_payload(1006),
        close_payload(1015),
        close_payload(1016),
        close_payload(2999),
        close_payload(5000),
        close_payload(65535),
        b"\x03",
    ],
    ids=["0", "999", "1004", "1005", "1006", "1015", "1016", "2999", "5000", "65535", "1-byte"],
)
def test_invalid_close_fails_with_1002(shared_server: GochatProcess, payload: bytes) -> None:
    ws = RawWS(shared_server.ws_url)
    ws.send(CLOSE, payload)
    _expect_fail(ws)


def test_close_reason_not_utf8_fails_with_1007(shared_server: GochatProcess) -> None:
    ws = RawWS(shared_server.ws_url)
    ws.send(CLOSE, close_payload(1000, b"\xff\xfe bad"))
    _expect_fail(ws, 1007)


@pytest.mark.parametrize("code", [1000, 1001, 1003, 1008, 1011, 3000, 4000, 4999])
def test_valid_close_is_echoed(shared_server: GochatProcess, code: int) -> None:
    ws = RawWS(shared_server.ws_url)
    ws.send(CLOSE, close_payload(code, b"bye"))
    _expect_fail(ws, code)


def test_empty_close_is_answered_1000(shared_server: GochatProcess) -> None:
    ws = RawWS(shared_server.ws_url)
    ws.send(CLOSE)
    _expect_fail(ws, 1000)


def test_fragmented_binary_message_with_interleaved_ping_still_works(shared_server: GochatProcess) -> None:
    ws = RawWS(shared_server.ws_url)
    try:
        # two gochat frames in one message, cut in three fragments; a PING between fragments
        # is allowed (RFC 6455 §5.4) and answered
        data = PING_FRAME + encode(Ping(b"second", rid=10))
        ws.send(BINARY, data[:7], fin=False)
        ws.send(PING, b"hb")
        ws.send(CONT, data[7:30], fin=False)
        ws.send(CONT, data[30:])
        fin, rsv, op, payload = ws.recv_frame()
        assert (fin, rsv, op, payload) == (True, 0, PONG, b"hb")
        op, payload = ws.recv_message()
        assert op == BINARY
        pongs = decode(payload, 1 << 20)
        assert [(p.payload, p.rid) for p in pongs] == [(b"conformance", 9), (b"second", 10)]
        # and the connection keeps working
        ws.send(BINARY, PING_FRAME)
        assert decode(ws.recv_message()[1], 1 << 20)[0].rid == 9
    finally:
        ws.close()


def test_client_protocol_errors_do_not_flood_the_log(shared_server: GochatProcess) -> None:
    """Each bad frame used to be one ERROR line (picows' parser and gochat's listener): now
    DEBUG lines and at most a WARNING or two (rate-limited summary)."""
    start = len(shared_server.log_text())
    for i in range(30):
        ws = RawWS(shared_server.ws_url)
        if i % 3 == 0:
            ws.send_raw(b"\x82\x05hello")  # unmasked: picows' parser
        elif i % 3 == 1:
            ws.send(0x3, b"")  # reserved opcode: picows' parser
        else:
            ws.send(BINARY, PING_FRAME, rsv=0x40)  # gochat's listener
        _expect_fail(ws)
    _still_serving(shared_server)
    time.sleep(0.2)
    log = shared_server.log_text()[start:]
    assert " ERROR " not in log, log
    assert log.count(" WARNING ") <= 2, log


# ---- slow consumer ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_limit_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GochatProcess]:
    server = GochatProcess(
        tmp_path_factory.mktemp("slow") / "data",
        {
            "GOCHAT_OUTBOUND_SOFT_LIMIT": str(64 * 1024),
            "GOCHAT_OUTBOUND_HARD_LIMIT": str(256 * 1024),
            # the heartbeat must not be what ends the connection
            "GOCHAT_HEARTBEAT_MS": "600000",
            "GOCHAT_RATE_LIMIT_BURST": "5000",
            "GOCHAT_RATE_LIMIT_PER_S": "5000",
        },
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def _metric(server: GochatProcess, name: str) -> float:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{server.http_url}/metrics") as r:
            text = await r.text()
    m = re.search(rf"^{name}(?:_total)? (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


async def _direct_exchange_works(server: GochatProcess) -> None:
    a, b = await create_user(server.http_url, "fa"), await create_user(server.http_url, "fb")
    ca, cb = await connect(server.ws_url, a.access_token), await connect(server.ws_url, b.access_token)
    await ca.expect(AuthOk)
    await cb.expect(AuthOk)
    ca.send(send_frame(Kind.DIRECT, b.user_id, b"still here", rid=3))
    await ca.expect(SendAck)
    assert (await cb.expect(Deliver)).message.body == b"still here"
    ca.close()
    cb.close()


def test_slow_consumer_is_cut_off_at_once(small_limit_server: GochatProcess) -> None:
    """A client that never reads while messages pile up for it: past the hard limit the server
    drops the TCP connection itself (RST when its buffers are full; ERROR 401 + close 4401 only
    when they can still be written), instead of waiting for the heartbeat."""
    server = small_limit_server

    async def scenario() -> None:
        pub = await create_user(server.http_url, "pub")
        slow = await create_user(server.http_url, "slow")
        before = await _metric(server, "gochat_slow_consumer_disconnects")
        ws = RawWS(server.ws_url, token=slow.access_token, rcvbuf=8192)  # reads nothing from now on
        try:
            p = await connect(server.ws_url, pub.access_token)
            await p.expect(AuthOk)
            body = b"s" * 30000
            total = 120  # ~3.6 MB of non-droppable DELIVERs towards a client that does not read
            for i in range(total):
                p.send(send_frame(Kind.DIRECT, slow.user_id, body, rid=i + 2))
            acks = 0
            while acks < total:
                acks += isinstance(await p.recv(20), SendAck)
            # the server ended the connection without the client reading a byte; the bound is
            # far below the heartbeat's (10 min here) and only there so a failure does not hang
            deadline = time.monotonic() + 30
            while ws.tcp_established() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert not ws.tcp_established(), "the slow consumer's connection is still established"
            assert ws.wait_eof() in ("eof", "reset")
            assert await _metric(server, "gochat_slow_consumer_disconnects") >= before + 1
            # the publisher and everyone else are still served
            p.send(Ping(b"p", rid=999))
            while not isinstance(f := await p.recv(), Pong):
                pass
            assert f.rid == 999
            p.close()
            await _direct_exchange_works(server)
        finally:
            ws.close()

    run(scenario())


# ---- outbound message size -------------------------------------------------------------------------


MAX_FRAME_SMALL = 16384
MESSAGE_LIMIT = 4 * MAX_FRAME_SMALL


@pytest.fixture(scope="module")
def small_frame_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GochatProcess]:
    server = GochatProcess(
        tmp_path_factory.mktemp("split") / "data",
        {
            "GOCHAT_MAX_FRAME": str(MAX_FRAME_SMALL),
            "GOCHAT_MAX_BODY": "15000",
            "GOCHAT_OUTBOUND_SOFT_LIMIT": str(16 << 20),
            "GOCHAT_OUTBOUND_HARD_LIMIT": str(32 << 20),
            "GOCHAT_HEARTBEAT_MS": "600000",
            "GOCHAT_RATE_LIMIT_BURST": "5000",
            "GOCHAT_RATE_LIMIT_PER_S": "5000",
        },
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_coalesced_output_is_split_into_messages_within_the_limit(small_frame_server: GochatProcess) -> None:
    """Frames pile up for a client that pauses reading; when it reads again, everything the
    server coalesced arrives intact and in order, in WebSocket messages of at most 4 x max_frame
    bytes (a client with the same limit as the server would refuse a larger one)."""
    server = small_frame_server

    async def scenario() -> None:
        pub = await create_user(server.http_url, "spub")
        rcv = await create_user(server.http_url, "srcv")
        ws = RawWS(server.ws_url, token=rcv.access_token, rcvbuf=8192)
        try:
            op, payload = ws.recv_message()
            assert isinstance(decode(payload, 1 << 20)[0], AuthOk)
            # the receiver now reads nothing until every message is acknowledged
            p = await connect(server.ws_url, pub.access_token)
            await p.expect(AuthOk)
            total = 320  # ~4.5 MB: more than the kernel buffers hold, so the server queues
            for i in range(total):
                p.send(send_frame(Kind.DIRECT, rcv.user_id, struct.pack("<I", i) + b"m" * 13996, rid=i + 2))
            acks = 0
            while acks < total:
                acks += isinstance(await p.recv(30), SendAck)
            p.close()
            sizes: list[int] = []
            got: list[int] = []
            while len(got) < total:
                op, payload = ws.recv_message()
                assert op == BINARY
                sizes.append(len(payload))
                for f in decode(payload, 1 << 24):  # decode checks every frame is whole
                    assert isinstance(f, Deliver)
                    got.append(struct.unpack("<I", f.message.body[:4])[0])
            assert got == list(range(total))
            assert max(sizes) <= MESSAGE_LIMIT, f"a {max(sizes)}-byte message above {MESSAGE_LIMIT}"
            assert len(sizes) < total, "frames were coalesced"
        finally:
            ws.close()

    run(scenario())


# ---- unit level: the native Connection over picows sockets -------------------------------------


class _Sink(WSListener):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[bytes] = []
        self.close_code: int | None = None
        self.closed = asyncio.Event()
        self.transport: WSTransport | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.BINARY:
            self.messages.append(frame.get_payload_as_bytes())
        elif frame.msg_type == WSMsgType.CLOSE:
            self.close_code = int(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closed.set()


async def _pair(
    max_message: int, soft: int = 1 << 20, hard: int = 4 << 20
) -> tuple[Any, FanoutWriter, Connection, _Sink]:
    writer = FanoutWriter(asyncio.get_running_loop())
    handler = _Handler()
    server = await ws_create_server(
        lambda req: Connection(handler, writer, soft, hard, 100.0, 10.0, max_message), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    _, sink = await ws_connect(_Sink, f"ws://127.0.0.1:{port}/")
    while not handler.connected:
        await asyncio.sleep(0.01)
    return server, writer, handler.connected[0], sink


def _gframe(i: int, size: int) -> bytes:
    """A gochat-shaped frame: u32 LE total length, then filler carrying ``i``."""
    return struct.pack("<II", size, i) + bytes([i & 0xFF]) * (size - 8)


def _split_frames(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack_from("<I", data, pos)
        out.append(data[pos : pos + n])
        pos += n
    assert pos == len(data), "a message ends inside a frame"
    return out


@pytest.mark.parametrize("shared", [False, True], ids=["own-block", "shared-buffer"])
def test_flush_splits_at_frame_boundaries(shared: bool) -> None:
    async def scenario() -> None:
        server, writer, conn, sink = await _pair(max_message=1000)
        frames = [_gframe(i, s) for i, s in enumerate([300, 300, 300, 2500, 100, 999, 1000, 12, 400, 700])]
        if shared:
            # one big buffer queued alone: the connection sends from the shared (framed) bytes
            writer.fanout([conn], b"".join(frames))
        else:
            for f in frames:
                conn.push(f)
        await asyncio.sleep(0.2)
        assert b"".join(sink.messages) == b"".join(frames)
        for m in sink.messages:
            parts = _split_frames(m)
            assert len(m) <= 1000 or len(parts) == 1, "only a frame above the limit goes alone"
        assert [len(m) for m in sink.messages] == [900, 2500, 100, 999, 1000, 12 + 400, 700]
        # the common case is one message per flush
        conn.push(_gframe(1, 200))
        conn.push(_gframe(2, 200))
        await asyncio.sleep(0.1)
        assert sink.messages[-1] == _gframe(1, 200) + _gframe(2, 200)
        server.close()

    run(scenario())


def test_slow_consumer_frees_its_buffer_and_drops_the_connection_at_once() -> None:
    async def scenario() -> None:
        server, writer, conn, sink = await _pair(max_message=1 << 20, soft=64 * 1024, hard=256 * 1024)
        assert sink.transport is not None
        sink.transport.underlying_transport.pause_reading()  # the client stops reading
        chunk = b"q" * 8192
        for _ in range(5000):
            conn.push(chunk)
            await asyncio.sleep(0)  # let the flushes run: kernel and uvloop buffers fill, then pause
            if conn.closing:
                break
        assert conn.closing and writer.slow_disconnects == 1
        assert conn.queued_bytes == 0, "the queued bytes are freed at once"
        # the server dropped the connection (RST: its buffers were full), the client sees it end
        sink.transport.underlying_transport.resume_reading()
        await asyncio.wait_for(sink.closed.wait(), 10)
        assert sink.close_code is None
        server.close()

    run(scenario())


# ---- the kernel send buffer (socket_sndbuf) -----------------------------------------------------


def _server_side_sndbuf(server: GochatProcess, client_port: int) -> int:
    """The send buffer the kernel gives the server's end of the connection from ``client_port``
    (``ss -tm``: ``tb``, which is twice the SO_SNDBUF asked for)."""
    import subprocess

    out = subprocess.run(
        ["ss", "-tmnH", "state", "established", f"( dport = :{client_port} )"],
        capture_output=True, text=True, check=True,
    ).stdout
    m = re.search(r"\btb(\d+)\b", out)
    assert m, out
    return int(m.group(1))


@pytest.mark.parametrize("setting", [None, 65536])
def test_socket_sndbuf_bounds_the_kernel_send_buffer(tmp_path: Any, setting: int | None) -> None:
    """Every accepted WebSocket gets SO_SNDBUF = socket_sndbuf (128 KiB by default), which the
    kernel accounts twice: the bound docs/protocol.md gives for a client that does not read."""
    env = {} if setting is None else {"GOCHAT_SOCKET_SNDBUF": str(setting)}
    server = GochatProcess(tmp_path / "data", env)
    server.start()
    try:

        async def scenario() -> None:
            user = await create_user(server.http_url, "sndbuf")
            c = await connect(server.ws_url, user.access_token)
            await c.expect(AuthOk)
            assert c.transport is not None
            port = c.transport.underlying_transport.get_extra_info("sockname")[1]
            assert _server_side_sndbuf(server, port) == 2 * (setting or 128 * 1024)
            c.close()

        run(scenario())
    finally:
        server.stop()
