"""The two bugs the event bus fixes, on three nodes in one process (the harness of
tests/test_messaging_core.py, plus each node's own AuthService and its event consumer, as
``gochat/server.py`` composes them).

- Stale membership: each node caches group members; a change made on one node reaches the
  others' caches only through the bus (MemberAdded/MemberRemoved with the membership version).
- Missed revocations: a node that was not reading when a token was revoked replays the
  TokenRevoked event from its cursor, denies the token and closes the session.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import orjson
import pytest
from picows import ws_create_server

from gochat._native.connection import FanoutWriter
from gochat._native.routing import RoutingTable
from gochat.auth.keys import KeyRing
from gochat.auth.service import AuthService
from gochat.cluster.backends import memory_backends
from gochat.cluster.base import NodeInfo
from gochat.cluster.bus import TokenRevoked
from gochat.cluster.link import ClusterLink
from gochat.cluster.memory import MemoryHub
from gochat.config import Settings
from gochat.errors import AuthError, ErrorCode, RequestError
from gochat.gateway.gateway import Gateway
from gochat.ids import IdGenerator
from gochat.messaging.core import MessagingCore
from gochat.messaging.delivery import LocalDelivery
from gochat.messaging.events import NodeEventHandler
from gochat.messaging.replies import ErrorReplies
from gochat.observability.metrics import Metrics
from gochat.protocol import Kind, decode
from gochat.protocol.frames import Error, Event, GoAway, SendAck
from gochat.store.sqlite import SQLiteStore
from tests.conftest import run
from tests.test_messaging_core import Node, _Events, connect, user


class BusNode(Node):
    auth: AuthService
    handler: NodeEventHandler


@asynccontextmanager
async def cluster(tmp_path: Path, n: int = 3) -> AsyncIterator[tuple[list[BusNode], SQLiteStore]]:
    loop = asyncio.get_running_loop()
    store = SQLiteStore(tmp_path / "gochat.db", node_id=1, ids=IdGenerator(1))
    await store.open()
    keys = KeyRing.generate()
    hub = MemoryHub()
    settings = Settings(data_dir=str(tmp_path), heartbeat_ms=0)
    nodes: list[BusNode] = []
    servers = []
    try:
        for i in range(n):
            auth = AuthService(store, keys)  # one per node: its own deny-list
            await auth.start()
            routing, writer = RoutingTable(), FanoutWriter(loop)
            link = ClusterLink(f"node-{i}", memory_backends(hub), LocalDelivery(routing))
            replies = ErrorReplies({})
            core = MessagingCore(settings, store, routing, writer, link, IdGenerator(10 + i), Metrics(), replies)
            gateway = Gateway(settings, auth, core, writer, replies)
            server = await ws_create_server(gateway.listener_factory, "127.0.0.1", 0, enable_auto_pong=True)
            servers.append(server)
            url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/ws"
            node = BusNode(f"node-{i}", core, gateway, link, writer, url)
            node.auth = auth
            events = _Events(node, auth)
            info = NodeInfo(node.name, url, "", "test")
            await link.start(info, lambda info=info: info, events)  # type: ignore[misc]
            node.handler = NodeEventHandler(core.addressing, events.revoked, auth.reload_revocations)
            await link.start_events(node.name, node.handler.apply, node.handler.rebuild)
            nodes.append(node)
        for node in nodes:
            while len(node.link.nodes) < n:
                await asyncio.sleep(0.01)
        yield nodes, store
    finally:
        for server in servers:
            server.close()
        for node in nodes:
            await node.link.close()
        await store.close()


async def until(pred: object, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():  # type: ignore[operator]
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_membership_change_on_one_node_reaches_every_node_cache(tmp_path: Path) -> None:
    """Removed on node 0: node 1 (which cached the old members) answers SEND with NOT_MEMBER
    and refuses HISTORY; added on node 0: node 2 (which cached the group without the new
    member and refused it) accepts its SEND."""

    async def body() -> None:
        async with cluster(tmp_path) as (nodes, _):
            auth = nodes[0].auth
            (owner, o_tok), (carol, c_tok), (dave, d_tok) = [await user(auth, u) for u in ("owner", "carol", "dave")]
            await connect(nodes[0], o_tok)
            _, c1 = await connect(nodes[1], c_tok)
            _, d2 = await connect(nodes[2], d_tok)
            o_conn = nodes[0].session_of(owner)
            (res,) = decode(await nodes[0].core.calls.call(o_conn, "group.create", b'{"name":"g","members":[%d]}' % carol, 2))
            gid = orjson.loads(res.payload)["group_id"]
            loop = asyncio.get_running_loop()

            # node 1 caches the members (carol sends fine); node 2 caches them without dave
            nodes[1].core.sends.send(nodes[1].session_of(carol), 3, Kind.GROUP, 1, gid, b"a" * 16, b"hi", loop.time())
            await c1.next(SendAck, skip=(Event,))
            nodes[2].core.sends.send(nodes[2].session_of(dave), 4, Kind.GROUP, 1, gid, b"b" * 16, b"hi", loop.time())
            err = await d2.next(Error, skip=(Event,))
            assert err.code == ErrorCode.NOT_MEMBER

            assert await nodes[0].core.calls.group_remove(o_conn, {"group_id": gid, "user_id": carol}) == {"removed": True}
            assert await nodes[0].core.calls.group_add(o_conn, {"group_id": gid, "user_id": dave}) == {"added": True}
            version = nodes[0].core.addressing.version(gid)
            assert version == 3  # created at 1, one removal, one addition
            await until(lambda: all(n.core.addressing.version(gid) >= version for n in nodes))

            nodes[1].core.sends.send(nodes[1].session_of(carol), 5, Kind.GROUP, 1, gid, b"c" * 16, b"x", loop.time())
            err = await c1.next(Error, skip=(Event,))
            assert (err.rid, err.code) == (5, ErrorCode.NOT_MEMBER)
            with pytest.raises(RequestError) as info:
                await nodes[1].core.addressing.resolve(carol, Kind.GROUP, gid)  # HISTORY, READ
            assert info.value.code == ErrorCode.NOT_MEMBER

            nodes[2].core.sends.send(nodes[2].session_of(dave), 6, Kind.GROUP, 1, gid, b"d" * 16, b"y", loop.time())
            ack = await d2.next(SendAck, skip=(Event,))
            assert ack.rid == 6

            # an old event replayed or redelivered changes nothing (versions only grow)
            assert not nodes[1].core.addressing.members_changed(gid, 2)

    run(body())


def test_revocation_reaches_a_node_that_was_not_reading(tmp_path: Path) -> None:
    """Node 1's consumer is down while node 2 revokes a token (the pub/sub broadcast is not
    sent: the node missed it). When node 1 reads again it replays the TokenRevoked event from
    its cursor: the token is denied there and the session on node 1 is closed."""

    async def body() -> None:
        async with cluster(tmp_path) as (nodes, store):
            erin, e_tok = await user(nodes[0].auth, "erin")
            _, e1 = await connect(nodes[1], e_tok)
            jti = nodes[1].auth.verify_access(e_tok).jti
            consumer = nodes[1].link.consumer
            assert consumer is not None
            await consumer.close()  # node 1 stops reading (a disconnect)

            expires_ms = 2**42
            await store.revoke_jti(jti, expires_ms)
            await nodes[2].link.bus.publish(TokenRevoked(user_id=erin, revoked_id=jti, expires_ms=expires_ms))
            await asyncio.sleep(0.2)
            nodes[1].auth.verify_access(e_tok)  # still accepted on node 1: it has not heard

            h = nodes[1].handler
            await nodes[1].link.start_events(nodes[1].name, h.apply, h.rebuild)  # back: replay
            g = await e1.next(GoAway, skip=(Event,))
            assert g.code == ErrorCode.TOKEN_REVOKED
            with pytest.raises(AuthError):
                nodes[1].auth.verify_access(e_tok)
            assert nodes[1].link.consumer is not None
            assert nodes[1].link.consumer.stats.rebuilds == 0  # replayed, not rebuilt

    run(body())
