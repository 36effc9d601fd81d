"""Tracing end to end: three real ``gochat serve`` processes (Redis + PostgreSQL) export their
spans over OTLP/HTTP to a receiver this test runs, and a group message sent on one node and
delivered on the two others is one connected trace (docs/observability.md, "Tracing")."""

from __future__ import annotations

import asyncio
import gzip
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from gochat.client import Kind
from gochat.protocol.frames import Call, CallResult, Deliver, Event, SendAck
from tests.conftest import create_user, run
from tests.e2e.rawclient import send_frame
from tests.e2e.test_cluster_e2e import REDIS_URL, Cluster, online

pytestmark = pytest.mark.e2e


@dataclass
class Span:
    node: str
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]


class OtlpReceiver:
    """A tiny OTLP/HTTP trace receiver (POST /v1/traces, protobuf) in a thread of its own."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.spans: list[Span] = []
        self.requests = 0
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _traces(self, request: web.Request) -> web.Response:
        data = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            data = gzip.decompress(data)
        req = ExportTraceServiceRequest.FromString(data)
        got = []
        for rs in req.resource_spans:
            res = {kv.key: kv.value for kv in rs.resource.attributes}
            node = res["service.instance.id"].string_value
            for ss in rs.scope_spans:
                for sp in ss.spans:
                    attrs = {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in sp.attributes}
                    got.append(
                        Span(node, sp.trace_id.hex(), sp.span_id.hex(), sp.parent_span_id.hex(), sp.name,
                             sp.start_time_unix_nano, sp.end_time_unix_nano, attrs)
                    )
        with self._lock:
            self.requests += 1
            self.spans.extend(got)
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(), content_type="application/x-protobuf"
        )

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())

    def start(self) -> None:
        self._thread.start()
        assert self._started.wait(10)

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def trace(self, trace_id: str) -> list[Span]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def all(self) -> list[Span]:
        with self._lock:
            return list(self.spans)


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver()
    r.start()
    try:
        yield r
    finally:
        r.stop()


def tree(spans: list[Span]) -> str:
    """The trace as an indented tree: name, node, start offset and duration in ms."""
    by_parent: dict[str, list[Span]] = {}
    for s in spans:
        by_parent.setdefault(s.parent_id, []).append(s)
    ids = {s.span_id for s in spans}
    roots = [s for s in spans if s.parent_id not in ids]
    t0 = min(s.start_ns for s in spans)
    lines: list[str] = []

    def walk(s: Span, depth: int) -> None:
        lines.append(
            f"{'  ' * depth}{s.name:<{24 - 2 * depth}} {s.node:<8} +{(s.start_ns - t0) / 1e6:7.3f} ms "
            f"{(s.end_ns - s.start_ns) / 1e6:7.3f} ms"
        )
        for c in sorted(by_parent.get(s.span_id, []), key=lambda c: (c.start_ns, c.name)):
            walk(c, depth + 1)

    for r in sorted(roots, key=lambda r: r.start_ns):
        walk(r, 0)
    return "\n".join(lines)


def test_a_traced_group_message_across_three_nodes_is_one_connected_trace(
    tmp_path: Path, receiver: OtlpReceiver
) -> None:
    env = {
        "GOCHAT_TRACE_SAMPLE_RATE": "1",
        "GOCHAT_OTLP_ENDPOINT": receiver.url,
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # export every 100 ms (the SDK's default: 5 s)
    }
    cluster = Cluster(tmp_path, REDIS_URL, env=env)
    try:
        cluster.start()
        a_node, b_node, c_node = cluster.nodes

        async def scenario() -> tuple[int, int, int]:
            alice = await create_user(a_node.http_url, "alice")
            bob = await create_user(b_node.http_url, "bob")
            carol = await create_user(c_node.http_url, "carol")
            ca, cb, cc = await online(a_node, alice), await online(b_node, bob), await online(c_node, carol)
            await asyncio.sleep(0.3)  # presence recorded in Redis
            ca.send(Call("group.create", orjson.dumps({"name": "t", "members": [bob.user_id, carol.user_id]}), rid=2))
            gid = orjson.loads((await ca.expect(CallResult, skip=(Event,))).payload)["group_id"]
            ca.send(send_frame(Kind.GROUP, gid, b"traced across the cluster", rid=3))
            ack = await ca.expect(SendAck, skip=(Event,))
            for c in (cb, cc):
                m = (await c.expect(Deliver, skip=(Event,))).message
                assert (m.conv_id, m.seq, m.msg_id) == (gid, ack.seq, ack.msg_id)
            return gid, ack.seq, ack.msg_id

        gid, seq, msg_id = run(scenario())

        def the_trace() -> list[Span]:
            roots = [
                s for s in receiver.all()
                if s.name == "gochat.receive" and s.attributes.get("gochat.msg_id") == msg_id
            ]
            return receiver.trace(roots[0].trace_id) if roots else []

        deadline = time.monotonic() + 15
        spans = the_trace()
        while time.monotonic() < deadline and len(spans) < 9:
            time.sleep(0.1)
            spans = the_trace()
        print("\n" + tree(spans))
        names = sorted(s.name for s in spans)
        assert names == sorted(
            ["gochat.receive", "validate", "commit", "route", "fanout.local",
             "cluster.publish", "cluster.publish", "gochat.deliver", "gochat.deliver"]
        ), names
        # one connected trace: every span's parent is in it, but the root's (no client context)
        ids = {s.span_id for s in spans}
        (root,) = [s for s in spans if s.parent_id not in ids]
        assert root.name == "gochat.receive" and root.parent_id == ""
        by_id = {s.span_id: s for s in spans}
        # from all three nodes: the origin's stages, each other node's delivery under a publish
        origin = root.node
        assert len({s.node for s in spans}) == 3
        assert {s.node for s in spans if s.name != "gochat.deliver"} == {origin}
        delivers = [s for s in spans if s.name == "gochat.deliver"]
        assert len({d.node for d in delivers} | {origin}) == 3
        for d in delivers:
            publish = by_id[d.parent_id]
            assert publish.name == "cluster.publish" and publish.node == origin
            assert d.node == publish.attributes["gochat.peer"]
            assert (d.attributes["gochat.seq"], d.attributes["gochat.msg_id"]) == (seq, msg_id)
            assert d.attributes["gochat.conv.id"] == gid
        assert root.attributes["gochat.conv.kind"] == "group" and root.attributes["gochat.recipients"] == 3
    finally:
        cluster.stop()
