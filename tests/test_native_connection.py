"""The native routing table and coalescing writer, checked against a plain Python reference and
over real picows sockets."""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect, ws_create_server

from gochat._native.connection import Connection, FanoutWriter
from gochat._native.routing import RoutingTable
from tests.conftest import run


class _Handler:
    """The gateway side of a Connection, reduced to bookkeeping."""

    def __init__(self) -> None:
        self.connected: list[Connection] = []
        self.messages: list[bytes] = []

    def on_connected(self, conn: Connection) -> None:
        self.connected.append(conn)

    def on_message(self, conn: Connection, data: bytes) -> None:
        self.messages.append(data)

    def on_disconnected(self, conn: Connection) -> None:
        pass

    def on_text(self, conn: Connection) -> None:
        conn.close_with(4107)

    def on_oversize(self, conn: Connection) -> None:
        conn.close_with(4102)


class _Sink(WSListener):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[bytes] = []
        self.close_code: int | None = None
        self.got = asyncio.Event()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.BINARY:
            self.messages.append(frame.get_payload_as_bytes())
            self.got.set()
        elif frame.msg_type == WSMsgType.CLOSE:
            self.close_code = int(frame.get_close_code())
            transport.disconnect()


def _make_conn(handler: Any, writer: FanoutWriter, soft: int = 1 << 20, hard: int = 4 << 20) -> Connection:
    return Connection(handler, writer, soft, hard, 100.0, 10.0, 1 << 20)


async def _pair(n: int, **limits: int) -> tuple[Any, FanoutWriter, _Handler, list[_Sink]]:
    loop = asyncio.get_running_loop()
    writer = FanoutWriter(loop)
    handler = _Handler()
    server = await ws_create_server(lambda req: _make_conn(handler, writer, **limits), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sinks = []
    for _ in range(n):
        _, sink = await ws_connect(_Sink, f"ws://127.0.0.1:{port}/")
        sinks.append(sink)
    while len(handler.connected) < n:
        await asyncio.sleep(0.01)
    return server, writer, handler, sinks


def test_frames_queued_in_one_tick_leave_in_one_write() -> None:
    async def scenario() -> None:
        server, writer, handler, sinks = await _pair(3)
        conns = handler.connected
        for i in range(10):
            writer.fanout(conns, b"frame-%d;" % i)
        await asyncio.wait_for(asyncio.gather(*(s.got.wait() for s in sinks)), 5)
        await asyncio.sleep(0.05)
        for s in sinks:
            assert s.messages == [b"".join(b"frame-%d;" % i for i in range(10))]
        assert writer.writes == 3 and writer.frames_out == 30
        # skip excludes the sender
        writer.fanout(conns, b"x", conns[0])
        await asyncio.sleep(0.1)
        assert [len(s.messages) for s in sinks] == [1, 2, 2]
        server.close()

    run(scenario())


def test_paused_reader_drops_droppable_then_disconnects() -> None:
    async def scenario() -> None:
        server, writer, handler, sinks = await _pair(1, soft=64 * 1024, hard=256 * 1024)
        conn = handler.connected[0]
        conn.pause_writing()  # as picows does when the transport is over its high-water mark
        chunk = b"y" * 4096
        for _ in range(40):
            conn.push(chunk, True)  # droppable: kept up to the soft limit, then dropped
        assert conn.queued_bytes <= 64 * 1024
        assert conn.dropped > 0
        for _ in range(100):
            conn.push(chunk, False)  # not droppable: up to the hard limit, then 4401
            if conn.closing:
                break
        assert conn.closing and writer.slow_disconnects == 1
        await asyncio.sleep(0.1)
        assert sinks[0].close_code == 4401
        server.close()

    run(scenario())


# ---- routing table against a reference model ------------------------------------------------------

_ops = st.lists(
    st.tuples(st.sampled_from(["add", "remove", "sub", "unsub"]), st.integers(0, 7), st.integers(0, 3)),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(_ops, st.lists(st.integers(0, 9), max_size=6), st.integers(0, 3))
def test_routing_matches_reference(ops: list[tuple[str, int, int]], targets: list[int], room: int) -> None:
    loop = asyncio.new_event_loop()
    try:
        writer = FanoutWriter(loop)
        table = RoutingTable()
        conns = []
        for i in range(8):
            c = _make_conn(None, writer)
            c.user_id = i % 4  # two devices per user
            conns.append(c)
        online: set[int] = set()
        rooms: dict[int, set[int]] = {}
        for op, ci, r in ops:
            c = conns[ci]
            if op == "add" and ci not in online:
                table.add_user_connection(c)
                online.add(ci)
            elif op == "remove" and ci in online:
                table.remove_connection(c)
                online.discard(ci)
            elif op == "sub":
                assert table.subscribe(r, c) == (ci not in rooms.setdefault(r, set()))
                rooms[r].add(ci)
            elif op == "unsub":
                assert table.unsubscribe(r, c) == (ci in rooms.get(r, set()))
                rooms.get(r, set()).discard(ci)
        # users: every online connection of every target user, each once per listed occurrence
        expected_users = sum(1 for t in targets for ci in online if conns[ci].user_id == t)
        # fanout_users queues into unconnected Connections (no transport): counts are what we check
        assert table.fanout_users(targets, b"m") == expected_users
        assert table.fanout_room(room, b"r") == len(rooms.get(room, set()))
        assert table.room_size(room) == len(rooms.get(room, set()))
        assert table.connections == len(online)
        for u in range(4):
            assert table.is_online(u) == any(conns[ci].user_id == u for ci in online)
        for ci, c in enumerate(conns):
            others = any(conns[o].user_id == c.user_id for o in online if o != ci)
            assert table.has_other_connection(c.user_id, c) == others
    finally:
        loop.close()
