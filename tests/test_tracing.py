"""Tracing with OpenTelemetry (docs/observability.md, "Tracing"), on the SDK's in-memory exporter.

Three nodes composed in one process as ``gochat/server.py`` composes one (the pattern of
tests/test_messaging_core.py: ClusterLinks over one MemoryHub, one shared SQLite store), each
with its own TracerProvider and in-memory exporter; clients are real WebSocket connections
through the gateway (the native session, or the reference one where both are checked).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from picows import WSMsgType, ws_create_server

from gochat._native.connection import FanoutWriter
from gochat._native.routing import RoutingTable
from gochat.auth.keys import KeyRing
from gochat.auth.service import AuthService
from gochat.client import Client
from gochat.cluster.backends import memory_backends
from gochat.cluster.base import NodeInfo
from gochat.cluster.envelope import (
    RoomEnvelope,
    TracedEnvelope,
    UsersEnvelope,
    decode_envelope,
    encode_room,
    encode_traced,
    encode_users,
)
from gochat.cluster.link import ClusterLink
from gochat.cluster.memory import MemoryHub
from gochat.config import Settings
from gochat.errors import ErrorCode, GochatError
from gochat.gateway.gateway import Gateway
from gochat.ids import IdGenerator
from gochat.messaging.core import MessagingCore
from gochat.messaging.delivery import LocalDelivery
from gochat.messaging.replies import ErrorReplies
from gochat.observability.metrics import Metrics
from gochat.observability.tracing import Tracing, setup_tracing
from gochat.protocol import FLAG_TRACED, Kind, encode
from gochat.protocol.frames import AuthOk, Deliver, Error, Event, Send, SendAck
from gochat.protocol.traceparent import format_traceparent, parse_traceparent
from gochat.store.sqlite import SQLiteStore
from tests.conftest import run
from tests.test_messaging_core import Node, _Events, connect, user

CLIENT_TRACE = 0x4BF92F3577B34DA6A3CE929D0E0E4736
CLIENT_SPAN = 0x00F067AA0BA902B7


# ---- traceparent and the envelope field ----------------------------------------------------------


def test_traceparent_parse_and_format() -> None:
    tp = format_traceparent(CLIENT_TRACE, CLIENT_SPAN)
    assert tp == b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    parsed = parse_traceparent(tp)
    assert parsed is not None and parsed == (CLIENT_TRACE, CLIENT_SPAN, 1) and parsed.sampled
    unsampled = parse_traceparent(format_traceparent(1, 2, 0))
    assert unsampled is not None and not unsampled.sampled
    for bad in (
        tp.upper(),  # hex must be lowercase
        b"01" + tp[2:],  # only version 00
        tp[:-1],  # 54 bytes
        tp + b"-",  # 56 bytes
        tp.replace(b"-", b"_", 1),
        b"00-" + b"0" * 32 + tp[35:],  # all-zero trace id
        tp[:36] + b"0" * 16 + tp[52:],  # all-zero parent id
        b"00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
    ):
        assert parse_traceparent(bad) is None, bad
    with pytest.raises(ValueError):
        format_traceparent(0, 1)


def test_envelope_trace_field_round_trips_and_degrades() -> None:
    inner = encode_users([1, 2], b"frame", True)
    env = decode_envelope(encode_traced(CLIENT_TRACE, CLIENT_SPAN, 1, inner))
    assert env == TracedEnvelope(CLIENT_TRACE, CLIENT_SPAN, 1, UsersEnvelope((1, 2), b"frame", True))
    room = decode_envelope(encode_traced(2**128 - 1, 2**64 - 1, 0xFF, encode_room(5, 0, b"x")))
    assert room == TracedEnvelope(2**128 - 1, 2**64 - 1, 0xFF, RoomEnvelope(5, 0, b"x"))
    # a context version this node does not know (here 2, and longer): skipped, the envelope stays
    future = bytes([7, 30, 2]) + bytes(29) + inner
    assert decode_envelope(future) == UsersEnvelope((1, 2), b"frame", True)
    # nothing to wrap, a nested TRACE, a truncated context: typed errors
    for bad in (bytes([7, 26]) + bytes(26), encode_traced(1, 1, 1, encode_traced(1, 1, 1, inner)), bytes([7, 26, 1])):
        with pytest.raises(GochatError):
            decode_envelope(bad)


# ---- an in-process cluster with tracing --------------------------------------------------------------


class _Traced:
    """One node's provider and in-memory exporter."""

    def __init__(self, node: str) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.node = node

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())


@asynccontextmanager
async def traced_cluster(
    tmp_path: Path, rate: float, n: int = 3, native: bool = True
) -> AsyncIterator[tuple[list[Node], list[_Traced], AuthService]]:
    loop = asyncio.get_running_loop()
    ids = IdGenerator(1)
    store = SQLiteStore(tmp_path / "gochat.db", node_id=1, ids=ids)
    await store.open()
    auth = AuthService(store, KeyRing.generate())
    await auth.start()
    hub = MemoryHub()
    settings = Settings(data_dir=str(tmp_path), heartbeat_ms=0, trace_sample_rate=rate, native_session=native)
    nodes: list[Node] = []
    traced: list[_Traced] = []
    servers = []
    try:
        for i in range(n):
            name = f"node-{i}"
            t = _Traced(name)
            tracing = setup_tracing(settings, name, t.provider)
            assert isinstance(tracing, Tracing)
            routing, writer = RoutingTable(), FanoutWriter(loop)
            link = ClusterLink(name, memory_backends(hub), LocalDelivery(routing), tracing=tracing)
            replies = ErrorReplies({})
            core = MessagingCore(
                settings, store, routing, writer, link, IdGenerator(10 + i), Metrics(), replies, tracing=tracing
            )
            gateway = Gateway(settings, auth, core, writer, replies)
            server = await ws_create_server(gateway.listener_factory, "127.0.0.1", 0, enable_auto_pong=True)
            servers.append(server)
            url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/ws"
            node = Node(name, core, gateway, link, writer, url)
            info = NodeInfo(name, url, "", "test")
            await link.start(info, lambda info=info: info, _Events(node, auth))  # type: ignore[misc]
            nodes.append(node)
            traced.append(t)
        for node in nodes:
            while len(node.link.nodes) < n:
                await asyncio.sleep(0.01)
        yield nodes, traced, auth
    finally:
        for server in servers:
            server.close()
        for node in nodes:
            await node.link.close()
        await store.close()


def _send(rid: int, kind: int, conv: int, body: bytes, traceparent: bytes = b"") -> bytes:
    if traceparent:
        return encode(Send(kind, 1, conv, rid.to_bytes(16, "little"), traceparent + body, rid=rid, flags=FLAG_TRACED))
    return encode(Send(kind, 1, conv, rid.to_bytes(16, "little"), body, rid=rid))


async def _wait_for(predicate: Any, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("not in time")


async def _group(node: Node, owner: int, members: list[int]) -> int:
    payload = orjson.dumps({"name": "g", "members": members})
    reply = await node.core.calls.call(node.session_of(owner), "group.create", payload, 2)
    from gochat.protocol import decode

    (result,) = decode(reply)
    return int(orjson.loads(result.payload)["group_id"])


def _by_name(spans: list[ReadableSpan]) -> dict[str, list[ReadableSpan]]:
    out: dict[str, list[ReadableSpan]] = {}
    for s in spans:
        out.setdefault(s.name, []).append(s)
    return out


def _parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def _sid(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


def _tid(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.trace_id


def test_a_sampled_group_send_is_one_connected_trace_across_three_nodes(tmp_path: Path) -> None:
    """A member on node 0 sends to a group with members on nodes 1 and 2 (sample rate 1):
    receive → validate, commit, route → fanout.local and one cluster.publish per node → a
    gochat.deliver on each of the other nodes, all one trace, every parent present."""

    async def body() -> None:
        async with traced_cluster(tmp_path, 1.0) as (nodes, traced, auth):
            (alice, a_tok), (bob, b_tok), (carol, c_tok) = [await user(auth, n) for n in ("alice", "bob", "carol")]
            a_tr, a0 = await connect(nodes[0], a_tok)
            _, b1 = await connect(nodes[1], b_tok)
            _, c2 = await connect(nodes[2], c_tok)
            gid = await _group(nodes[0], alice, [bob, carol])
            for t in traced:
                t.exporter.clear()
            a_tr.send(WSMsgType.BINARY, _send(7, Kind.GROUP, gid, b"hello"))
            ack = await a0.next(SendAck, skip=(Event,))
            for c in (b1, c2):
                d = await c.next(Deliver, skip=(Event,))
                assert (d.message.conv_id, d.message.seq, d.message.body) == (gid, ack.seq, b"hello")
            await _wait_for(lambda: len(_by_name(traced[0].spans()).get("cluster.publish", [])) == 2)
            await _wait_for(lambda: all(t.spans() for t in traced[1:]))

            origin = _by_name(traced[0].spans())
            assert sorted(origin) == ["cluster.publish", "commit", "fanout.local", "gochat.receive", "route", "validate"]
            (receive,) = origin["gochat.receive"]
            assert receive.parent is None  # no client context: a root span
            assert receive.attributes is not None
            assert dict(receive.attributes) == {
                "gochat.node": "node-0", "gochat.conv.kind": "group", "gochat.conv.id": gid, "gochat.body_bytes": 5,
                "gochat.recipients": 3, "gochat.seq": ack.seq, "gochat.msg_id": ack.msg_id, "gochat.duplicate": False,
            }
            for name in ("validate", "commit", "route"):
                (span,) = origin[name]
                assert _parent_of(span) == _sid(receive), name
            (route,) = origin["route"]
            (local,) = origin["fanout.local"]
            assert _parent_of(local) == _sid(route)
            assert local.attributes is not None and local.attributes["gochat.connections"] == 0  # alice's only session sent it
            publishes = origin["cluster.publish"]
            assert {_parent_of(p) for p in publishes} == {_sid(route)}
            assert sorted(str(p.attributes["gochat.peer"]) for p in publishes if p.attributes) == ["node-1", "node-2"]
            # stages in order, inside the SEND's span
            v, c, r = origin["validate"][0], origin["commit"][0], route
            assert receive.start_time is not None and receive.end_time is not None
            assert receive.start_time <= v.start_time <= v.end_time <= c.start_time  # type: ignore[operator]
            assert c.end_time <= r.start_time and r.end_time <= receive.end_time  # type: ignore[operator]

            by_peer = {str(p.attributes["gochat.peer"]): p for p in publishes if p.attributes}
            for i, t in ((1, traced[1]), (2, traced[2])):
                (deliver,) = t.spans()
                assert deliver.name == "gochat.deliver"
                assert _tid(deliver) == _tid(receive)
                assert _parent_of(deliver) == _sid(by_peer[f"node-{i}"])
                assert deliver.attributes is not None
                assert deliver.attributes["gochat.node"] == f"node-{i}"
                assert (deliver.attributes["gochat.seq"], deliver.attributes["gochat.msg_id"]) == (ack.seq, ack.msg_id)
                assert deliver.attributes["gochat.connections"] == 1

            # one connected trace: one trace id, and every parent is in it but the root's
            everything = [s for t in traced for s in t.spans()]
            assert {_tid(s) for s in everything} == {_tid(receive)}
            ids = {_sid(s) for s in everything}
            assert [s.name for s in everything if _parent_of(s) not in ids] == ["gochat.receive"]

    run(body())


def test_sampling_zero_creates_no_spans_and_keeps_the_untraced_send(tmp_path: Path) -> None:
    """Rate 0: the send path is the class's own ``send`` (no sampling wrapper, no check per
    SEND) and a group message makes no span anywhere; with tracing not configured at all there
    is no Tracing object."""
    assert setup_tracing(Settings(), "n") is None

    async def body() -> None:
        async with traced_cluster(tmp_path, 0.0) as (nodes, traced, auth):
            assert "send" not in vars(nodes[0].core.sends)
            assert nodes[0].gateway.on_send == nodes[0].core.sends.send
            (alice, a_tok), (bob, b_tok) = await user(auth, "alice"), await user(auth, "bob")
            a_tr, a0 = await connect(nodes[0], a_tok)
            _, b1 = await connect(nodes[1], b_tok)
            gid = await _group(nodes[0], alice, [bob])
            for i in range(20):
                a_tr.send(WSMsgType.BINARY, _send(10 + i, Kind.GROUP, gid, b"m%d" % i))
            for _ in range(20):
                await a0.next(SendAck, skip=(Event,))
                await b1.next(Deliver, skip=(Event,))
            await asyncio.sleep(0.05)
            assert [s for t in traced for s in t.spans()] == []

    run(body())


def test_a_rate_above_zero_samples_through_a_wrapper(tmp_path: Path) -> None:
    async def body() -> None:
        async with traced_cluster(tmp_path, 0.5, n=1) as (nodes, traced, auth):
            sends = nodes[0].core.sends
            assert vars(sends)["send"] == sends._send_sampling
            (_, a_tok), (bob, _) = await user(auth, "alice"), await user(auth, "bob")
            a_tr, a0 = await connect(nodes[0], a_tok)
            for i in range(60):
                a_tr.send(WSMsgType.BINARY, _send(10 + i, Kind.DIRECT, bob, b"m%d" % i))
            acks = [await a0.next(SendAck, skip=(Event,)) for _ in range(60)]
            assert [a.seq for a in acks] == list(range(1, 61))
            receives = _by_name(traced[0].spans()).get("gochat.receive", [])
            assert 5 < len(receives) < 55  # about half, each a complete trace
            assert all(r.attributes and r.attributes["gochat.seq"] for r in receives)

    run(body())


@pytest.mark.parametrize("native", [True, False], ids=["native-session", "reference-gateway"])
def test_a_client_traceparent_becomes_the_parent(tmp_path: Path, native: bool) -> None:
    """A TRACED SEND: the server strips the traceparent (the stored and delivered body is the
    message alone) and its spans join the client's trace, under the client's span. The node
    samples none of its own (rate 0); an unsampled traceparent is not traced."""

    async def body() -> None:
        async with traced_cluster(tmp_path, 0.0, n=2, native=native) as (nodes, traced, auth):
            (_, a_tok), (bob, b_tok) = await user(auth, "alice"), await user(auth, "bob")
            a_tr, a0 = await connect(nodes[0], a_tok)
            _, b1 = await connect(nodes[1], b_tok)
            # the first SEND to a new conversation waits for its lookup (the backlog): traced too
            a_tr.send(WSMsgType.BINARY, _send(3, Kind.DIRECT, bob, b"traced", format_traceparent(CLIENT_TRACE, CLIENT_SPAN)))
            ack = await a0.next(SendAck, skip=(Event,))
            d = await b1.next(Deliver, skip=(Event,))
            assert (d.message.body, d.message.msg_id) == (b"traced", ack.msg_id)
            await _wait_for(lambda: bool(traced[1].spans()))
            origin = _by_name(traced[0].spans())
            (receive,) = origin["gochat.receive"]
            assert _tid(receive) == CLIENT_TRACE and _parent_of(receive) == CLIENT_SPAN
            assert receive.parent is not None and receive.parent.is_remote
            assert {"validate", "commit", "route", "fanout.local", "cluster.publish"} <= set(origin)
            (deliver,) = traced[1].spans()
            assert _tid(deliver) == CLIENT_TRACE
            # sampled flag off: delivered, not traced
            for t in traced:
                t.exporter.clear()
            a_tr.send(WSMsgType.BINARY, _send(4, Kind.DIRECT, bob, b"quiet", format_traceparent(CLIENT_TRACE, 5, 0)))
            await a0.next(SendAck, skip=(Event,))
            assert (await b1.next(Deliver, skip=(Event,))).message.body == b"quiet"
            await asyncio.sleep(0.05)
            assert [s for t in traced for s in t.spans()] == []

    run(body())


@pytest.mark.parametrize("native", [True, False], ids=["native-session", "reference-gateway"])
def test_a_bad_traceparent_is_bad_body(tmp_path: Path, native: bool) -> None:
    """A TRACED SEND whose body does not start with a valid traceparent: ERROR 105 BAD_BODY and
    close 4105, as for any malformed body; nothing is stored."""

    async def body() -> None:
        async with traced_cluster(tmp_path, 1.0, n=1, native=native) as (nodes, _, auth):
            (_, a_tok), (bob, _) = await user(auth, "alice"), await user(auth, "bob")
            for bad in (b"00-xyz", format_traceparent(CLIENT_TRACE, CLIENT_SPAN).upper()):
                tr, c = await connect(nodes[0], a_tok)
                tr.send(WSMsgType.BINARY, _send(5, Kind.DIRECT, bob, b"hello", bad))
                err = await c.next(Error, skip=(Event,))
                assert (err.rid, err.code) == (5, ErrorCode.BAD_BODY)
                await _wait_for(lambda c=c: c.close_code is not None)  # type: ignore[misc]
                assert c.close_code == 4105
                del tr

    run(body())


def test_the_client_sdk_sends_a_traceparent(tmp_path: Path) -> None:
    async def body() -> None:
        async with traced_cluster(tmp_path, 0.0, n=1) as (nodes, traced, auth):
            (_, a_tok), (bob, _) = await user(auth, "alice"), await user(auth, "bob")
            client = await Client.connect(nodes[0].url, a_tok)
            try:
                tp = format_traceparent(CLIENT_TRACE, CLIENT_SPAN).decode()
                ack = await client.send(Kind.DIRECT, bob, "via the SDK", traceparent=tp, timeout=5)
                with pytest.raises(ValueError):
                    await client.send(Kind.DIRECT, bob, "x", traceparent="00-nope")
                page = await client.history(Kind.DIRECT, bob, timeout=5)
                assert [m.body for m in page.messages] == [b"via the SDK"]  # stored without the prefix
            finally:
                await client.close()
            (receive,) = _by_name(traced[0].spans())["gochat.receive"]
            assert (_tid(receive), _parent_of(receive)) == (CLIENT_TRACE, CLIENT_SPAN)
            assert receive.attributes is not None and receive.attributes["gochat.msg_id"] == ack.msg_id

    run(body())


def test_a_refused_sampled_send_ends_its_spans_in_error(tmp_path: Path) -> None:
    async def body() -> None:
        async with traced_cluster(tmp_path, 1.0, n=1) as (nodes, traced, auth):
            (_, a_tok), (bob, _) = await user(auth, "alice"), await user(auth, "bob")
            tr, c = await connect(nodes[0], a_tok)
            tr.send(WSMsgType.BINARY, _send(6, Kind.DIRECT, bob, b""))
            assert (await c.next(Error, skip=(Event,))).code == ErrorCode.EMPTY_BODY
            spans = _by_name(traced[0].spans())
            (receive,) = spans["gochat.receive"]
            (validate,) = spans["validate"]
            assert not receive.status.is_ok and not validate.status.is_ok
            assert receive.attributes is not None and receive.attributes["gochat.error.code"] == ErrorCode.EMPTY_BODY
            del tr

    run(body())


def test_a_server_node_wires_tracing_and_flushes_on_stop(tmp_path: Path) -> None:
    """``Server`` (embedded) with a provider given: SEND → spans, through the real listener;
    the node's name is on its spans."""
    from gochat.server import Server
    from tests.conftest import create_user
    from tests.e2e.rawclient import connect as raw_connect
    from tests.e2e.rawclient import send_frame

    t = _Traced("server")

    async def body() -> None:
        server = Server(
            Settings(data_dir=str(tmp_path / "data"), ws_port=0, http_port=0, trace_sample_rate=1.0),
            tracer_provider=t.provider,
        )
        await server.start()
        try:
            alice, bob = await create_user(server.http_url, "alice"), await create_user(server.http_url, "bob")
            c = await raw_connect(server.ws_url, alice.access_token)
            await c.expect(AuthOk)
            c.send(send_frame(Kind.DIRECT, bob.user_id, b"hi", rid=4))
            ack = await c.expect(SendAck, skip=(Event,))
            c.close()
        finally:
            await server.stop()
        (receive,) = _by_name(t.spans())["gochat.receive"]
        assert receive.attributes is not None
        assert receive.attributes["gochat.node"] == server.node_name
        assert receive.attributes["gochat.msg_id"] == ack.msg_id

    run(body())


def test_without_the_sdk_a_configured_node_logs_once_and_traces_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import sys

    import gochat.observability.tracing as tracing_module

    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # import → ImportError
    monkeypatch.setattr(tracing_module, "_warned_no_sdk", False)
    settings = Settings(trace_sample_rate=0.5, otlp_endpoint="http://127.0.0.1:1")
    with caplog.at_level("WARNING", logger="gochat.tracing"):
        assert setup_tracing(settings, "n") is None
        assert setup_tracing(settings, "n") is None
    warnings = [r for r in caplog.records if "not installed" in r.getMessage()]
    assert len(warnings) == 1


def test_settings_are_checked() -> None:
    from gochat.config import load_settings
    from gochat.errors import ConfigError

    for bad in ({"trace_sample_rate": 1.5}, {"trace_sample_rate": -0.1}, {"otlp_endpoint": "grpc://x:4317"}):
        with pytest.raises(ConfigError):
            load_settings(env={}, overrides=bad)
    s = load_settings(env={"GOCHAT_TRACE_SAMPLE_RATE": "0.25", "GOCHAT_OTLP_ENDPOINT": "http://c:4318"})
    assert (s.trace_sample_rate, s.otlp_endpoint) == (0.25, "http://c:4318")
