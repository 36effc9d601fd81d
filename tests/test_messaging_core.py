"""The messaging core driven directly, in one process, on the in-process cluster backends.

Three nodes are composed here as ``gochat/server.py`` composes one (routing table, writer,
ClusterLink over ``memory_backends`` sharing one MemoryHub, MessagingCore, Gateway), over one
shared SQLite store (as cluster nodes share PostgreSQL), with no HTTP API and no server process.
Clients are real WebSocket connections; the tests call the core's parts directly (the send path
with plain values, CALL methods, sessions) and check what the clients receive — on the node
where the change was made and on the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect, ws_create_server

from gochat._native.connection import Connection, FanoutWriter
from gochat._native.routing import RoutingTable
from gochat.auth.keys import KeyRing
from gochat.auth.service import AuthService
from gochat.cluster.backends import memory_backends
from gochat.cluster.base import NodeInfo
from gochat.cluster.envelope import CascadeEnvelope
from gochat.cluster.link import ClusterLink
from gochat.cluster.memory import MemoryHub
from gochat.config import Settings
from gochat.errors import ErrorCode
from gochat.gateway.gateway import Gateway
from gochat.ids import IdGenerator
from gochat.messaging.core import MessagingCore
from gochat.messaging.delivery import LocalDelivery
from gochat.messaging.replies import ErrorReplies
from gochat.observability.metrics import Metrics
from gochat.protocol import EventType, Kind, decode, encode
from gochat.protocol.frames import Auth, AuthOk, Deliver, Error, Event, GoAway, SendAck
from gochat.store.sqlite import SQLiteStore
from tests.conftest import run


class _Client(WSListener):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.frames: asyncio.Queue[Any] = asyncio.Queue()
        self.close_code: int | None = None

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.BINARY:
            for f in decode(frame.get_payload_as_bytes(), 1 << 24):
                self.frames.put_nowait(f)
        elif frame.msg_type == WSMsgType.CLOSE:
            self.close_code = int(frame.get_close_code())
            transport.disconnect()

    async def next(self, cls: type, skip: tuple[type, ...] = (), timeout: float = 5.0) -> Any:
        while True:
            f = await asyncio.wait_for(self.frames.get(), timeout)
            if not isinstance(f, skip):
                assert isinstance(f, cls), f
                return f

    def drain(self) -> list[Any]:
        """The frames received and not read yet."""
        out = []
        while not self.frames.empty():
            out.append(self.frames.get_nowait())
        return out


@dataclass
class Node:
    name: str
    core: MessagingCore
    gateway: Gateway
    link: ClusterLink
    writer: FanoutWriter
    url: str
    metrics: Metrics = field(default_factory=Metrics)

    def session_of(self, user_id: int) -> Connection:
        (conn,) = [c for c in self.writer.connections() if c.authenticated and c.user_id == user_id]
        return conn


class _Events:
    def __init__(self, node: Node, auth: AuthService) -> None:
        self.node, self.auth = node, auth

    def presence_changed(self, user_id: int, online: bool) -> None:
        self.node.core.presence_changed(user_id, online)

    def revoked(self, user_id: int, expires_ms: int, revoked_id: str) -> None:
        self.auth.apply_revocation(revoked_id, expires_ms)
        self.node.gateway.kick_user(user_id, ErrorCode.TOKEN_REVOKED, "logged out", revoked_id)

    def kicked(self, user_id: int, code: int, reason: str) -> None:
        self.node.gateway.kick_user(user_id, ErrorCode(code), reason)

    def local_sessions(self) -> list[tuple[int, int]]:
        return self.node.core.sessions.local()

    def cascade(self, env: CascadeEnvelope) -> None:
        self.node.core.cascade(env)

    def resync(self, user_ids: tuple[int, ...] | None) -> None:
        self.node.core.resync(user_ids, "test")


@asynccontextmanager
async def cluster(
    tmp_path: Path, n: int = 3, **settings: Any
) -> AsyncIterator[tuple[list[Node], AuthService, SQLiteStore]]:
    """``n`` nodes of one in-process cluster (a MemoryHub) sharing one SQLite store, each with its
    WebSocket listener; ``settings``: Settings fields for every node."""
    loop = asyncio.get_running_loop()
    ids = IdGenerator(1)
    store = SQLiteStore(tmp_path / "gochat.db", node_id=1, ids=ids)
    await store.open()
    auth = AuthService(store, KeyRing.generate())
    await auth.start()
    hub = MemoryHub()
    s = Settings(data_dir=str(tmp_path), heartbeat_ms=0, **settings)
    nodes: list[Node] = []
    servers = []
    try:
        for i in range(n):
            routing, writer = RoutingTable(), FanoutWriter(loop)
            local = LocalDelivery(routing)
            link = ClusterLink(f"node-{i}", memory_backends(hub), local, shard_size=s.fanout_shard_size)
            replies = ErrorReplies({})
            metrics = Metrics()
            core = MessagingCore(s, store, routing, writer, link, IdGenerator(10 + i), metrics, replies)
            metrics.attach_cluster(link, local.latency, core.delivery)
            gateway = Gateway(s, auth, core, writer, replies)
            server = await ws_create_server(gateway.listener_factory, "127.0.0.1", 0, enable_auto_pong=True)
            servers.append(server)
            url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/ws"
            node = Node(f"node-{i}", core, gateway, link, writer, url, metrics)
            info = NodeInfo(node.name, url, "", "test")
            await link.start(info, lambda info=info: info, _Events(node, auth))  # type: ignore[misc]
            nodes.append(node)
        for node in nodes:
            while len(node.link.nodes) < n:
                await asyncio.sleep(0.01)
        yield nodes, auth, store
    finally:
        for server in servers:
            server.close()
        for node in nodes:
            await node.core.close()
            await node.link.close()
        await store.close()


async def user(auth: AuthService, name: str) -> tuple[int, str]:
    uid = await auth.register(name, "password-1")
    pair = await auth.login(name, "password-1")
    return uid, pair.access_token


async def connect(node: Node, token: str) -> tuple[WSTransport, _Client]:
    transport, client = await ws_connect(_Client, node.url)
    transport.send(WSMsgType.BINARY, encode(Auth(token, rid=1)))
    await client.next(AuthOk)
    return transport, client


def test_send_path_driven_directly_delivers_across_nodes(tmp_path: Path) -> None:
    """core.sends.send on node 0 with plain values: the sender's session gets SEND_ACK, the
    peer's session on node 1 gets DELIVER (through the memory broker), and the sender's second
    device on node 2 gets the sender's view of the conversation."""

    async def body() -> None:
        async with cluster(tmp_path) as (nodes, auth, _):
            (alice, a_tok), (bob, b_tok) = await user(auth, "alice"), await user(auth, "bob")
            _, a0 = await connect(nodes[0], a_tok)
            _, b1 = await connect(nodes[1], b_tok)
            _, a2 = await connect(nodes[2], a_tok)
            conn = nodes[0].session_of(alice)
            loop = asyncio.get_running_loop()
            nodes[0].core.sends.send(conn, 5, Kind.DIRECT, 1, bob, b"c" * 16, b"hello", loop.time())
            ack = await a0.next(SendAck, skip=(Event,))
            assert (ack.rid, ack.kind, ack.conv_id, ack.seq) == (5, Kind.DIRECT, bob, 1)
            d = await b1.next(Deliver, skip=(Event,))
            assert (d.message.conv_id, d.message.sender_id, d.message.body) == (alice, alice, b"hello")
            mine = await a2.next(Deliver, skip=(Event,))
            assert mine.message.conv_id == bob and mine.message.msg_id == ack.msg_id
            # a refusal found at once is written to the connection, not raised
            nodes[0].core.sends.send(conn, 6, Kind.DIRECT, 1, bob, b"d" * 16, b"", loop.time())
            err = await a0.next(Error, skip=(Event,))
            assert (err.rid, err.code) == (6, ErrorCode.EMPTY_BODY)

    run(body())


def test_group_change_on_one_node_is_seen_on_another(tmp_path: Path) -> None:
    """A member added through the CALL method on node 0 is told on node 1 at once, and the
    group's messages from node 2 reach it."""

    async def body() -> None:
        async with cluster(tmp_path) as (nodes, auth, _):
            (owner, o_tok), (carol, c_tok) = await user(auth, "owner"), await user(auth, "carol")
            _, o0 = await connect(nodes[0], o_tok)
            _, c1 = await connect(nodes[1], c_tok)
            _, o2 = await connect(nodes[2], o_tok)
            o_conn0 = nodes[0].session_of(owner)
            reply = await nodes[0].core.calls.call(o_conn0, "group.create", b'{"name":"g"}', 2)
            (result,) = decode(reply)  # the CALL_RESULT frame the gateway would push
            gid = orjson.loads(result.payload)["group_id"]
            added = await nodes[0].core.calls.group_add(o_conn0, {"group_id": gid, "user_id": carol})
            assert added == {"added": True}
            ev = await c1.next(Event)
            assert (ev.type, ev.conv_id, ev.value) == (EventType.MEMBER_ADDED, gid, carol)
            loop = asyncio.get_running_loop()
            nodes[2].core.sends.send(nodes[2].session_of(owner), 9, Kind.GROUP, 1, gid, b"e" * 16, b"hi", loop.time())
            await o2.next(SendAck, skip=(Event,))
            d = await c1.next(Deliver, skip=(Event,))
            assert (d.message.conv_id, d.message.body) == (gid, b"hi")
            del o0

    run(body())


def test_presence_and_revocation_reach_every_node(tmp_path: Path) -> None:
    """A watcher on node 0 learns that a user came online on node 1 and went offline; a
    logout handled on node 2 closes that user's session on node 1 (GOAWAY 202, close 4202)."""

    async def body() -> None:
        async with cluster(tmp_path) as (nodes, auth, _):
            (watcher, w_tok), (dave, d_tok) = await user(auth, "watcher"), await user(auth, "dave")
            _, w0 = await connect(nodes[0], w_tok)
            online = await nodes[0].core.calls.presence_query(nodes[0].session_of(watcher), {"user_ids": [dave]})
            assert online == {"online": {str(dave): False}}
            d_transport, d1 = await connect(nodes[1], d_tok)
            ev = await w0.next(Event)
            assert (ev.type, ev.actor_id, ev.value) == (EventType.PRESENCE, dave, 1)
            # logout on node 2 (the auth service is shared, as the store is): the revocation is
            # published on the event path every node listens to
            nodes[2].link.publish_revocation(dave, 2**42, auth.verify_access(d_tok).jti)
            g = await d1.next(GoAway)
            assert g.code == ErrorCode.TOKEN_REVOKED
            for _ in range(500):
                if d1.close_code is not None:
                    break
                await asyncio.sleep(0.01)
            assert d1.close_code == 4202
            ev = await w0.next(Event)
            assert (ev.type, ev.actor_id, ev.value) == (EventType.PRESENCE, dave, 0)
            del d_transport

    run(body())


def test_sessions_are_one_owner_of_session_state(tmp_path: Path) -> None:
    """Sessions creates the state at connect, fills it at AUTH and clears routing, rooms and
    cluster presence at disconnect."""

    async def body() -> None:
        async with cluster(tmp_path, n=1) as (nodes, auth, _):
            node = nodes[0]
            eve, e_tok = await user(auth, "eve")
            transport, _ = await connect(node, e_tok)
            conn = node.session_of(eve)
            state = conn.state
            assert state.jti == auth.verify_access(e_tok).jti
            node.core.sessions.subscribe(conn, 77, 3)
            assert node.core.sessions.routing.room_size(77) == 1
            assert (await node.link.online([eve])) == {eve: True}
            transport.disconnect()
            for _ in range(500):
                if not (await node.link.online([eve]))[eve]:
                    break
                await asyncio.sleep(0.01)
            assert (await node.link.online([eve])) == {eve: False}
            assert node.core.sessions.routing.room_size(77) == 0 and state.rooms == ()

    run(body())


def test_a_rebuild_closes_the_sessions_its_reloaded_deny_list_names(tmp_path: Path) -> None:
    """After a rebuild (the node's event cursor fell behind, or Redis lost it) the deny-list is
    reloaded from the store, and the local sessions it now names are closed (GOAWAY 202, 4202);
    the others stay."""
    from gochat.messaging.events import NodeEventHandler

    async def body() -> None:
        async with cluster(tmp_path, n=1) as (nodes, auth, _):
            node = nodes[0]
            (_, f_tok), (_, g_tok) = await user(auth, "frank"), await user(auth, "grace")
            _, f = await connect(node, f_tok)
            _, g = await connect(node, g_tok)
            # revoked elsewhere: stored, but this node never heard of it
            await auth.store.revoke_jti(auth.verify_access(f_tok).jti, 2**42)
            handler = NodeEventHandler(
                node.core.addressing,
                lambda uid, exp, rid: None,
                auth.reload_revocations,
                lambda: node.core.sessions.close_revoked(auth.is_denied),
            )
            await handler.rebuild()
            ga = await f.next(GoAway, skip=(Event,))
            assert ga.code == ErrorCode.TOKEN_REVOKED
            for _ in range(500):
                if f.close_code is not None:
                    break
                await asyncio.sleep(0.01)
            assert f.close_code == 4202 and g.close_code is None

    run(body())
