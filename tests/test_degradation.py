"""Degradation switches and the node's resilience wiring (gochat/resilience/degradation.py,
node.py), the recent-messages cache, and what a degraded node answers, driven on one node
composed in-process (as tests/test_messaging_core.py composes three) with real WebSocket
clients and a real SQLite store that can be made to fail."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from picows import WSMsgType, ws_create_server

from gochat._native.connection import FanoutWriter
from gochat._native.routing import RoutingTable
from gochat.auth.keys import KeyRing
from gochat.auth.service import AuthService
from gochat.cluster.backends import memory_backends
from gochat.cluster.base import NodeInfo
from gochat.cluster.link import ClusterLink
from gochat.config import Settings
from gochat.errors import ErrorCode, UnavailableError
from gochat.gateway.gateway import Gateway
from gochat.ids import IdGenerator
from gochat.messaging.core import MessagingCore
from gochat.messaging.delivery import LocalDelivery
from gochat.messaging.recent import RecentMessages
from gochat.messaging.replies import ErrorReplies
from gochat.observability.metrics import Metrics
from gochat.protocol import FLAG_BACKWARD, FLAG_MORE, FLAG_PARTIAL, EventType, Kind, encode, encode_deliver
from gochat.protocol.frames import (
    Call,
    Deliver,
    Error,
    Event,
    History,
    HistoryResult,
    Read,
    ReadOk,
    Send,
    SendAck,
    Sync,
    SyncResult,
    Typing,
)
from gochat.resilience import BreakerState
from gochat.resilience.degradation import Degradation, Switch
from gochat.resilience.node import NodeResilience
from gochat.store.sqlite import SQLiteStore
from tests.conftest import run
from tests.test_messaging_core import Node, _Events, connect, user

# ---- the switches --------------------------------------------------------------------------------


def test_a_manual_setting_wins_over_causes_and_null_hands_the_switch_back() -> None:
    d = Degradation()
    seen: list[tuple[Switch, Switch]] = []
    d.on_change(lambda active, previous, _reason: seen.append((active, previous)))
    d.set_cause(Switch.READ_ONLY, "postgres breaker open", True)
    assert d.read_only and d.active == Switch.READ_ONLY
    d.set_manual(Switch.READ_ONLY, False)  # forced off despite the cause
    assert not d.read_only
    d.set_manual(Switch.NON_CORE_OFF, True)
    assert d.non_core_off and not d.cache_only
    d.set_manual(Switch.READ_ONLY, None)  # automatic again: the cause still holds
    assert d.read_only
    d.set_cause(Switch.READ_ONLY, "postgres breaker open", False)
    assert d.active == Switch.NON_CORE_OFF
    assert seen[0] == (Switch.READ_ONLY, Switch(0)) and len(seen) == 5
    snap = d.snapshot()
    assert snap["active"] == ["non_core_off"] and snap["manual"]["non_core_off"] is True
    assert Degradation(read_only=True).read_only  # from the configuration


def test_a_breaker_not_closed_turns_its_switches_on_and_its_probe_closes_it() -> None:
    async def body() -> None:
        settings = Settings(breaker_open_s=0.1, breaker_half_open_calls=2, breaker_min_calls=2)
        res = NodeResilience(settings)
        probes: list[float] = []
        healthy = {"up": False}

        async def probe() -> None:
            probes.append(asyncio.get_running_loop().time())
            async with breaker.guard():
                if not healthy["up"]:
                    raise UnavailableError("still down")

        breaker = res.breaker("postgres")
        res.watch(breaker, Switch.READ_ONLY | Switch.CACHE_ONLY, probe)
        heard: list[tuple[Switch, Switch]] = []
        res.degradation.on_change(lambda active, previous, _reason: heard.append((active, previous)))
        for _ in range(2):
            with pytest.raises(UnavailableError):
                async with breaker.guard():
                    raise UnavailableError("down")
        assert breaker.state == BreakerState.OPEN
        assert res.degradation.active == Switch.READ_ONLY | Switch.CACHE_ONLY
        # one change with both switches (clients get one EVENT DEGRADED, not a passing state)
        assert heard == [(Switch.READ_ONLY | Switch.CACHE_ONLY, Switch(0))]
        await asyncio.sleep(0.3)
        assert probes and res.degradation.read_only  # probing, still failing: stays degraded
        healthy["up"] = True
        for _ in range(50):
            if breaker.state == BreakerState.CLOSED:
                break
            await asyncio.sleep(0.05)
        assert breaker.state == BreakerState.CLOSED
        assert res.degradation.active == Switch(0)  # recovered by itself
        assert heard[-1] == (Switch(0), Switch.READ_ONLY | Switch.CACHE_ONLY)
        assert all(active in (Switch(0), Switch.READ_ONLY | Switch.CACHE_ONLY) for active, _ in heard)
        breaker.force_open("test")
        assert res.degradation.read_only
        breaker.reset("test")
        assert not res.degradation.read_only
        await res.close()

    run(body())


# ---- the recent-messages cache -------------------------------------------------------------------


def _deliver(conv: int, seq: int, body: bytes = b"x") -> bytes:
    return encode_deliver(Kind.GROUP, 1, conv, seq, 1000 + seq, 7, 1, b"c" * 16, body)


def test_recent_messages_page_like_history_and_stay_bounded() -> None:
    recent = RecentMessages(per_conv=5, max_bytes=10_000)
    for seq in range(1, 9):
        recent.add(42, _deliver(42, seq))
    assert recent.last_seq(42) == 8 and recent.last_seq(43) == 0
    page, more = recent.history(42, 1 << 62, 3, backward=True)
    assert [m.seq for m in page] == [6, 7, 8] and more
    page, more = recent.history(42, 5, 10, backward=False)
    assert [m.seq for m in page] == [5, 6, 7, 8] and not more  # 1-3 went (5 a conversation)
    for conv in range(100, 200):
        recent.add(conv, _deliver(conv, 1, b"y" * 200))
    assert recent.bytes <= 10_000 and len(recent) < 101
    assert recent.last_seq(42) == 0  # seen longest ago: evicted first


# ---- a degraded node, from its clients ---------------------------------------------------------


class FlakyStore(SQLiteStore):
    """A real SQLite store whose reads can be made to fail as an unreachable database does."""

    down = False

    async def history(self, *args: Any, **kwargs: Any) -> Any:
        if self.down:
            raise UnavailableError("database unreachable (test)")
        return await super().history(*args, **kwargs)

    async def conversations(self, *args: Any, **kwargs: Any) -> Any:
        if self.down:
            raise UnavailableError("database unreachable (test)")
        return await super().conversations(*args, **kwargs)


@asynccontextmanager
async def one_node(tmp_path: Path) -> AsyncIterator[tuple[Node, AuthService, FlakyStore, Degradation]]:
    loop = asyncio.get_running_loop()
    store = FlakyStore(tmp_path / "gochat.db", node_id=1, ids=IdGenerator(1))
    await store.open()
    auth = AuthService(store, KeyRing.generate())
    await auth.start()
    settings = Settings(data_dir=str(tmp_path), heartbeat_ms=0)
    routing, writer = RoutingTable(), FanoutWriter(loop)
    local = LocalDelivery(routing)
    link = ClusterLink("node-0", memory_backends(), local)
    replies = ErrorReplies({})
    degradation = Degradation()
    core = MessagingCore(
        settings, store, routing, writer, link, IdGenerator(10), Metrics(), replies, degradation, local.recent
    )
    gateway = Gateway(settings, auth, core, writer, replies)
    server = await ws_create_server(gateway.listener_factory, "127.0.0.1", 0, enable_auto_pong=True)
    url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/ws"
    node = Node("node-0", core, gateway, link, writer, url)
    info = NodeInfo(node.name, url, "", "test")
    await link.start(info, lambda: info, _Events(node, auth))
    try:
        yield node, auth, store, degradation
    finally:
        server.close()
        await link.close()
        await store.close()


def test_read_only_refuses_sends_with_a_retryable_error_and_reads_keep_working(tmp_path: Path) -> None:
    async def body() -> None:
        async with one_node(tmp_path) as (node, auth, _store, degradation):
            (_, a_tok), (bob, _) = await user(auth, "alice"), await user(auth, "bob")
            t, a = await connect(node, a_tok)
            t.send(WSMsgType.BINARY, encode(Send(Kind.DIRECT, 1, bob, b"a" * 16, b"before", rid=2)))
            assert (await a.next(SendAck, skip=(Event,))).seq == 1
            degradation.set_manual(Switch.READ_ONLY, True)
            ev = await a.next(Event)
            assert (ev.type, ev.value) == (EventType.DEGRADED, int(Switch.READ_ONLY))
            assert orjson.loads(ev.extra)["switches"] == ["read_only"]
            t.send(WSMsgType.BINARY, encode(Send(Kind.DIRECT, 1, bob, b"b" * 16, b"during", rid=3)))
            err = await a.next(Error, skip=(Event,))
            assert (err.rid, err.code) == (3, ErrorCode.READ_ONLY) and err.retry_after_ms > 0
            t.send(WSMsgType.BINARY, encode(History(Kind.DIRECT, bob, 0, 10, rid=4, flags=FLAG_BACKWARD)))
            page = await a.next(HistoryResult, skip=(Event,))
            assert [m.body for m in page.messages] == [b"before"] and not page.flags & FLAG_PARTIAL
            degradation.set_manual(Switch.READ_ONLY, None)
            t.send(WSMsgType.BINARY, encode(Send(Kind.DIRECT, 1, bob, b"b" * 16, b"during", rid=5)))
            assert (await a.next(SendAck, skip=(Event,))).seq == 2

    run(body())


def test_degraded_event_reaches_open_and_new_sessions_and_says_which_switches(tmp_path: Path) -> None:
    async def body() -> None:
        async with one_node(tmp_path) as (node, auth, _store, degradation):
            _, a_tok = await user(auth, "alice")
            _, a = await connect(node, a_tok)
            degradation.set_manual(Switch.NON_CORE_OFF, True)
            ev = await a.next(Event)
            assert (ev.type, ev.value) == (EventType.DEGRADED, int(Switch.NON_CORE_OFF))
            _, later = await connect(node, a_tok)  # a session that starts while degraded
            ev = await later.next(Event)
            assert (ev.type, ev.value) == (EventType.DEGRADED, int(Switch.NON_CORE_OFF))
            degradation.set_manual(Switch.NON_CORE_OFF, None)
            for client in (a, later):
                ev = await client.next(Event)
                assert (ev.type, ev.value) == (EventType.DEGRADED, 0)

    run(body())


def test_non_core_off_drops_typing_and_read_receipts_and_refuses_presence(tmp_path: Path) -> None:
    async def body() -> None:
        async with one_node(tmp_path) as (node, auth, _store, degradation):
            (alice, a_tok), (bob, b_tok) = await user(auth, "alice"), await user(auth, "bob")
            ta, a = await connect(node, a_tok)
            tb, b = await connect(node, b_tok)
            ta.send(WSMsgType.BINARY, encode(Send(Kind.DIRECT, 1, bob, b"a" * 16, b"hi", rid=2)))
            await a.next(SendAck)
            await b.next(Deliver)
            degradation.set_manual(Switch.NON_CORE_OFF, True)
            for client in (a, b):
                assert (await client.next(Event)).type == EventType.DEGRADED
            ta.send(WSMsgType.BINARY, encode(Typing(Kind.DIRECT, bob)))
            tb.send(WSMsgType.BINARY, encode(Read(Kind.DIRECT, alice, 1, rid=3)))
            await b.next(ReadOk)  # the read position is stored ...
            tb.send(WSMsgType.BINARY, encode(Call("presence.query", orjson.dumps({"user_ids": [alice]}), rid=4)))
            err = await b.next(Error)
            assert (err.rid, err.code) == (4, ErrorCode.UNAVAILABLE)
            # ... and nothing non-core reached alice: the next thing she gets is this DELIVER
            tb.send(WSMsgType.BINARY, encode(Send(Kind.DIRECT, 1, alice, b"b" * 16, b"back", rid=5)))
            await b.next(SendAck)
            assert isinstance(await a.next(Deliver), Deliver)

    run(body())


def test_cache_only_answers_history_and_sync_from_what_the_node_delivered_marked_partial(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        async with one_node(tmp_path) as (node, auth, store, degradation):
            (alice, a_tok), (bob, b_tok) = await user(auth, "alice"), await user(auth, "bob")
            ta, a = await connect(node, a_tok)
            _, b = await connect(node, b_tok)
            for i in range(5):
                ta.send(WSMsgType.BINARY, encode(Send(Kind.DIRECT, 1, bob, bytes([i]) * 16, b"m%d" % i, rid=10 + i)))
                await a.next(SendAck)
                await b.next(Deliver)
            ta.send(WSMsgType.BINARY, encode(Sync([], rid=2)))
            assert not (await a.next(SyncResult)).flags  # remembered for cache-only SYNCs
            store.down = True
            ta.send(WSMsgType.BINARY, encode(History(Kind.DIRECT, bob, 0, 3, rid=3, flags=FLAG_BACKWARD)))
            err = await a.next(Error)
            assert (err.rid, err.code) == (3, ErrorCode.UNAVAILABLE)  # not cache-only yet
            degradation.set_manual(Switch.CACHE_ONLY, True)
            await a.next(Event)  # EVENT DEGRADED
            await b.next(Event)
            ta.send(WSMsgType.BINARY, encode(History(Kind.DIRECT, bob, 0, 3, rid=4, flags=FLAG_BACKWARD)))
            page = await a.next(HistoryResult, skip=(Event,))
            # alice's own sends reached no session of hers but the sending one: her view of the
            # conversation was not delivered here, so her cached page is empty, and partial
            assert page.flags & FLAG_PARTIAL and page.messages == []
            tb, bb = await connect(node, b_tok)  # bob's view: the conversation "with alice"
            await bb.next(Event)  # EVENT DEGRADED after AUTH_OK
            tb.send(WSMsgType.BINARY, encode(History(Kind.DIRECT, alice, 0, 3, rid=5, flags=FLAG_BACKWARD)))
            page = await bb.next(HistoryResult, skip=(Event,))
            assert page.flags & FLAG_PARTIAL and page.flags & FLAG_MORE
            assert [m.body for m in page.messages] == [b"m2", b"m3", b"m4"]
            assert all(m.conv_id == alice for m in page.messages)
            tb.send(WSMsgType.BINARY, encode(Sync([], rid=6)))
            synced = await bb.next(SyncResult, skip=(Event,))
            assert synced.flags & FLAG_PARTIAL and synced.entries == []  # bob never synced here
            ta.send(WSMsgType.BINARY, encode(Sync([], rid=7)))
            synced = await a.next(SyncResult, skip=(Event,))
            assert synced.flags & FLAG_PARTIAL and [(e.conv_id, e.last_seq) for e in synced.entries] == [(bob, 5)]
            store.down = False
            ta.send(WSMsgType.BINARY, encode(History(Kind.DIRECT, bob, 0, 3, rid=8, flags=FLAG_BACKWARD)))
            page = await a.next(HistoryResult, skip=(Event,))
            assert not page.flags & FLAG_PARTIAL and len(page.messages) == 3

    run(body())
