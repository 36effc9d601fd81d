"""The writer's shared heartbeat (PING when idle, close without PONG) and the buffers a
Connection gives back to picows' allocator, over real picows sockets."""

from __future__ import annotations

import asyncio
from typing import Any

from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect, ws_create_server

from gochat._native.connection import Connection, FanoutWriter
from tests.conftest import run

IDLE = 0.15
REPLY = 0.1


class _Handler:
    def __init__(self, authenticate: bool = True) -> None:
        self.connected: list[Connection] = []
        self.disconnected: list[Connection] = []
        self.messages: list[bytes] = []
        self.authenticate = authenticate

    def on_connected(self, conn: Connection) -> None:
        self.connected.append(conn)
        if self.authenticate:
            conn.authenticated = True
            conn.push(b"auth-ok")

    def on_message(self, conn: Connection, data: bytes) -> None:
        self.messages.append(data)

    def on_disconnected(self, conn: Connection) -> None:
        self.disconnected.append(conn)

    def on_text(self, conn: Connection) -> None:
        conn.close_with(4107)

    def on_oversize(self, conn: Connection) -> None:
        conn.close_with(4102)


class _Client(WSListener):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.pings = 0
        self.pongs: list[bytes] = []
        self.close_code: int | None = None
        self.close_reason = ""
        self.binary: list[bytes] = []

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.PING:
            self.pings += 1  # seen only with auto-pong off (picows answers and consumes it)
        elif frame.msg_type == WSMsgType.PONG:
            self.pongs.append(frame.get_payload_as_bytes())
        elif frame.msg_type == WSMsgType.BINARY:
            self.binary.append(frame.get_payload_as_bytes())
        elif frame.msg_type == WSMsgType.CLOSE:
            self.close_code = int(frame.get_close_code())
            self.close_reason = frame.get_close_reason()
            transport.disconnect()


async def _server(handler: _Handler) -> tuple[Any, FanoutWriter, int]:
    writer = FanoutWriter(asyncio.get_running_loop())
    writer.start_heartbeat(IDLE, REPLY)
    server = await ws_create_server(
        lambda req: Connection(handler, writer, 1 << 20, 4 << 20, 100.0, 10.0, 1 << 20),
        "127.0.0.1",
        0,
        enable_auto_ping=False,
        enable_auto_pong=False,
        use_aiofastnet=False,
    )
    return server, writer, server.sockets[0].getsockname()[1]


async def _client(port: int, *, auto_pong: bool = False) -> tuple[Any, _Client]:
    """A picows client; auto-pong off by default, so the tests see (and answer) PINGs."""
    tr, client = await ws_connect(
        _Client, f"ws://127.0.0.1:{port}/", enable_auto_pong=auto_pong, use_aiofastnet=False
    )
    return tr, client


async def _until(cond: Any, timeout: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "condition not reached in time"
        await asyncio.sleep(0.005)


def test_idle_connection_is_pinged_and_stays_when_it_answers() -> None:
    async def scenario() -> None:
        handler = _Handler()
        server, writer, port = await _server(handler)
        tr, client = await _client(port, auto_pong=True)
        await _until(lambda: len(handler.connected) == 1)
        assert writer.tracked == 1
        await asyncio.sleep(IDLE * 2 + REPLY * 3)
        # pinged every IDLE seconds of silence, answered by picows' auto-pong: still connected
        assert writer.pings >= 2
        assert not handler.disconnected and client.close_code is None
        tr.disconnect()
        await _until(lambda: len(handler.disconnected) == 1)
        assert writer.tracked == 0
        server.close()

    run(scenario())


def test_silent_peer_is_closed_after_the_reply_timeout() -> None:
    async def scenario() -> None:
        handler = _Handler()
        server, writer, port = await _server(handler)
        loop = asyncio.get_running_loop()
        _tr, client = await _client(port)
        await _until(lambda: len(handler.connected) == 1)
        start = loop.time()
        await _until(lambda: len(handler.disconnected) == 1)
        took = loop.time() - start
        assert client.pings == 1
        assert client.close_code == 1001 and "ping/heartbeat" in client.close_reason
        assert IDLE + REPLY - 0.02 <= took <= IDLE + REPLY + 0.5
        assert writer.tracked == 0
        server.close()

    run(scenario())


def test_incoming_frames_keep_a_connection_from_being_pinged() -> None:
    async def scenario() -> None:
        handler = _Handler()
        server, _writer, port = await _server(handler)
        tr, client = await _client(port)
        await _until(lambda: len(handler.connected) == 1)
        for _ in range(8):  # 0.4 s of traffic, more than IDLE + REPLY
            tr.send(WSMsgType.BINARY, b"x")
            await asyncio.sleep(IDLE / 3)
        assert client.pings == 0 and not handler.disconnected
        assert len(handler.messages) == 8
        # a client PING is answered (the server runs with picows' auto-pong off) and counts too
        tr.send_ping(b"hello")
        await _until(lambda: client.pongs == [b"hello"])
        tr.disconnect()
        await _until(lambda: len(handler.disconnected) == 1)
        server.close()

    run(scenario())


def test_pong_after_ping_resets_the_idle_clock() -> None:
    async def scenario() -> None:
        handler = _Handler()
        server, _writer, port = await _server(handler)
        tr, client = await _client(port)
        await _until(lambda: len(handler.connected) == 1)
        await _until(lambda: client.pings == 1)
        tr.send_pong()  # answer by hand, late but within REPLY
        await asyncio.sleep(REPLY * 1.5)
        assert not handler.disconnected
        await _until(lambda: client.pings == 2)  # idle again: another PING
        tr.disconnect()
        await _until(lambda: len(handler.disconnected) == 1)
        server.close()

    run(scenario())


def test_stop_heartbeat_stops_pinging_and_keeps_the_registry() -> None:
    async def scenario() -> None:
        handler = _Handler()
        server, writer, port = await _server(handler)
        assert writer.heartbeat == (IDLE, REPLY)
        clients = [
            await _client(port)
            for _ in range(3)
        ]
        await _until(lambda: len(handler.connected) == 3)
        assert writer.tracked == 3 and set(writer.connections()) == set(handler.connected)
        await _until(lambda: writer.pings == 3)  # all three pinged, none answers
        writer.stop_heartbeat()
        assert writer.heartbeat is None and writer.tracked == 3
        await asyncio.sleep(IDLE + REPLY * 2)
        assert not handler.disconnected and all(c.pings == 1 for _, c in clients)
        clients[1][0].disconnect()
        await _until(lambda: len(handler.disconnected) == 1)
        assert writer.tracked == 2 and handler.disconnected[0] not in writer.connections()
        # on again: the silent two are pinged, then closed
        writer.start_heartbeat(IDLE, REPLY)
        await _until(lambda: len(handler.disconnected) == 3)
        assert writer.tracked == 0 and writer.connections() == []
        assert clients[0][1].close_code == 1001 and clients[2][1].close_code == 1001
        server.close()

    run(scenario())


def test_buffers_shrink_after_authentication_and_data_still_flows() -> None:
    async def scenario() -> None:
        handler = _Handler()
        server, writer, port = await _server(handler)
        tr, client = await _client(port, auto_pong=True)
        await _until(lambda: client.binary == [b"auth-ok"])
        conn = handler.connected[0]
        read_cap, write_cap = conn.picows_buffer_capacity()
        assert write_cap == 0
        assert 0 < read_cap < 2048
        # messages of every size still arrive intact; picows grows the buffer again on demand
        sizes = [1, 100, 300, 700, 5000, 70000, 3]
        for n in sizes:
            tr.send(WSMsgType.BINARY, bytes([n % 251]) * n)
        await _until(lambda: len(handler.messages) == len(sizes))
        assert [len(m) for m in handler.messages] == sizes
        assert all(m == bytes([n % 251]) * n for m, n in zip(handler.messages, sizes, strict=True))
        assert conn.picows_buffer_capacity()[0] > 2048
        # idle: the heartbeat PING trims it back
        await _until(lambda: writer.pings >= 1)
        assert conn.picows_buffer_capacity()[0] == read_cap
        conn.push(b"still-there")
        await _until(lambda: client.binary[-1:] == [b"still-there"])
        tr.disconnect()
        await _until(lambda: len(handler.disconnected) == 1)
        server.close()

    run(scenario())


def test_unauthenticated_connection_keeps_its_read_buffer() -> None:
    async def scenario() -> None:
        handler = _Handler(authenticate=False)
        server, _writer, port = await _server(handler)
        tr, client = await _client(port, auto_pong=True)
        await _until(lambda: len(handler.connected) == 1)
        conn = handler.connected[0]
        conn.push(b"hello")
        await _until(lambda: client.binary == [b"hello"])
        read_cap, write_cap = conn.picows_buffer_capacity()
        assert read_cap >= 2048 and write_cap == 0
        tr.disconnect()
        await _until(lambda: len(handler.disconnected) == 1)
        server.close()

    run(scenario())


def _masked_frame(payload: bytes, mask: bytes = b"\x11\x22\x33\x44") -> bytes:
    n = len(payload)
    if n < 126:
        head = bytes((0x82, 0x80 | n))
    else:
        head = bytes((0x82, 0x80 | 126)) + n.to_bytes(2, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def test_trim_keeps_a_partial_frame_that_arrived_with_the_handshake() -> None:
    """The upgrade request and the start of a frame arrive in one read; the buffer is trimmed
    right after AUTH_OK goes out, with those bytes still unparsed."""

    async def scenario() -> None:
        handler = _Handler()
        server, _writer, port = await _server(handler)
        for head_len in (40, 200):  # fits the trimmed buffer / does not (left as it is)
            handler.messages.clear()
            payload = bytes(range(256)) * 3
            frame = _masked_frame(payload)
            reader, w = await asyncio.open_connection("127.0.0.1", port)
            upgrade = (
                b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            w.write(upgrade + frame[:head_len])
            await reader.readuntil(b"\r\n\r\n")
            await _until(lambda: len(handler.connected) > 0 and handler.connected[-1].transport is not None)
            await asyncio.sleep(0.05)  # AUTH_OK flushed, buffers trimmed
            conn = handler.connected[-1]
            read_cap = conn.picows_buffer_capacity()[0]
            assert (read_cap < 2048) == (head_len == 40)
            w.write(frame[head_len:] + _masked_frame(b"tail"))
            await _until(lambda: len(handler.messages) == 2)
            assert handler.messages == [payload, b"tail"]
            w.close()
            await _until(lambda c=conn: c in handler.disconnected)
        server.close()

    run(scenario())
