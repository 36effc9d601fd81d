"""Failed pushes are recovered explicitly (docs/cluster.md, "Failed pushes"): a node that lost
pushes to another node tells it with a RESYNC envelope once it can be reached, the node sends its
sessions EVENT RESYNC, and the SDK answers with SYNC, which fetches what the push would have
brought."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from gochat.client import Client, Event, Kind, Message
from gochat.cluster.backends import memory_backends
from gochat.cluster.base import NodeInfo
from gochat.cluster.link import ClusterLink
from gochat.cluster.memory import MemoryHub
from gochat.cluster.node_events import NoEvents
from gochat.config import load_settings
from gochat.protocol import EventType, encode_deliver
from gochat.store import AppendRequest
from tests.conftest import create_user, run


class _Local:
    def __init__(self) -> None:
        self.frames: list[tuple[tuple[int, ...], bytes]] = []

    def users(self, user_ids, frame, droppable, skip=None, tier=0):  # type: ignore[no-untyped-def]
        self.frames.append((tuple(user_ids), frame))
        return len(user_ids)

    def room(self, room_id: int, frame: bytes) -> int:
        return 0


class _Events(NoEvents):
    def __init__(self) -> None:
        self.resyncs: list[tuple[int, ...] | None] = []

    def resync(self, user_ids: tuple[int, ...] | None) -> None:
        self.resyncs.append(user_ids)


async def _wait(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("not in time")


def test_pushes_lost_in_an_outage_are_announced_with_resync_when_it_ends() -> None:
    async def scenario() -> None:
        hub = MemoryHub()
        nodes = []
        for name in ("a", "b"):
            link = ClusterLink(name, memory_backends(hub), _Local())  # type: ignore[arg-type]
            events = _Events()
            await link.start(NodeInfo(name, f"ws://{name}", f"http://{name}", "1"), lambda n=name: NodeInfo(n, "", "", "1"), events)  # type: ignore[misc]
            nodes.append((link, events))
        (a, _), (b, b_events) = nodes
        await _wait(lambda: a.peers and b.peers)
        await b.session_up(7, 1)
        frame = encode_deliver(Kind.DIRECT, 1, 9, 1, 100, 9, 0, b"k" * 16, b"x")
        # the backends go away: presence cannot be asked, the push to b is lost
        hub.available = False
        a.route_users((7,), frame)
        await _wait(lambda: a.route_failures >= 1)
        assert b_events.resyncs == []
        hub.available = True
        await _wait(lambda: b_events.resyncs == [(7,)])
        assert a.lost.sent == 1
        # a push that works afterwards announces nothing more
        a.route_users((7,), frame)
        await asyncio.sleep(0.2)
        assert b_events.resyncs == [(7,)]
        for link, _ in nodes:
            await link.close()

    run(scenario())


def test_sessions_recorded_again_after_presence_lost_them_are_told_to_sync() -> None:
    """Presence lost this node's sessions (a Redis restart without persistence): nothing was
    routed to them until the node recorded them again, so it then tells every one to SYNC."""

    class _Sessions(_Events):
        def local_sessions(self) -> list[tuple[int, int]]:
            return [(7, 1)]

    async def scenario() -> None:
        hub = MemoryHub()
        link = ClusterLink("a", memory_backends(hub), _Local(), presence_guard_s=0.05)  # type: ignore[arg-type]
        events = _Sessions()
        await link.start(NodeInfo("a", "ws://a", "http://a", "1"), lambda: NodeInfo("a", "", "", "1"), events)
        await link.session_up(7, 1)
        await asyncio.sleep(0.15)
        assert events.resyncs == []  # nothing lost, nothing said
        hub.lose_data()
        await _wait(lambda: events.resyncs == [None])
        assert await link.online([7]) == {7: True}
        await link.close()

    run(scenario())


def test_the_sdk_answers_event_resync_with_sync_and_gets_the_lost_message(tmp_path: Path) -> None:
    """A message stored but never pushed (as if its push was lost between nodes) reaches the
    client once the server sends EVENT RESYNC: the SDK SYNCs and fetches the gap."""
    from gochat.server import Server

    s = load_settings(env={"GOCHAT_DATA_DIR": str(tmp_path), "GOCHAT_WS_PORT": "0", "GOCHAT_HTTP_PORT": "0"})

    async def scenario() -> None:
        server = Server(s)
        await server.start()
        try:
            alice = await create_user(server.http_url, "rs_alice")
            bob = await create_user(server.http_url, "rs_bob")
            a = await Client.connect(server.ws_url, alice.access_token)
            b = await Client.connect(server.ws_url, bob.access_token)
            try:
                await a.send(Kind.DIRECT, bob.user_id, "pushed")
                items = aiter(b)
                first = await asyncio.wait_for(anext(items), 5)
                assert isinstance(first, Message) and first.body == b"pushed"
                conv = await server.core.addressing.direct(alice.user_id, bob.user_id)
                # stored, not pushed: bob's client does not know it exists
                await server.store.append(AppendRequest(conv, Kind.DIRECT, alice.user_id, os.urandom(16), 1, b"lost"))
                assert server.core.resync((bob.user_id,), "test") is None
                got = [await asyncio.wait_for(anext(items), 5) for _ in range(2)]
                events = [i for i in got if isinstance(i, Event)]
                messages = [i for i in got if isinstance(i, Message)]
                assert [e.type for e in events] == [EventType.RESYNC]
                assert [(m.body, m.seq) for m in messages] == [(b"lost", 2)]
                # a local fan-out job shed on this node: its recipients are told the same way
                await server.store.append(AppendRequest(conv, Kind.DIRECT, alice.user_id, os.urandom(16), 1, b"shed"))
                jobs = server.core.delivery.jobs
                assert jobs.on_shed is not None
                jobs.on_shed((bob.user_id,))
                got = [await asyncio.wait_for(anext(items), 5) for _ in range(2)]
                assert [type(i).__name__ for i in got] == ["Event", "Message"]
                assert isinstance(got[1], Message) and (got[1].body, got[1].seq) == (b"shed", 3)
            finally:
                await a.close()
                await b.close()
        finally:
            await server.stop()

    run(scenario())
