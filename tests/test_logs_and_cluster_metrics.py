"""Structured JSON logs (gochat/observability/logs.py) and the cluster / delivery-latency metrics,
from a formatter in process and from a real embedded server's log file and /metrics."""

from __future__ import annotations

import logging
from pathlib import Path

import aiohttp
import orjson
import pytest
from opentelemetry.sdk.trace import TracerProvider

from gochat.observability.logs import JsonFormatter
from gochat.protocol import Kind
from gochat.protocol.frames import AuthOk, Deliver, SendAck
from tests.conftest import GochatProcess, create_user, run
from tests.e2e.rawclient import connect, send_frame


def _record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("gochat.test", logging.WARNING, __file__, 1, msg, args, None)
    for k, v in extra.items():
        setattr(record, k, v)
    return record


def test_json_lines_carry_level_logger_message_node_and_trace_ids() -> None:
    fmt = JsonFormatter("node-a")
    line = orjson.loads(fmt.format(_record("commit lag %d ms", 12)))
    assert line["level"] == "WARNING" and line["logger"] == "gochat.test" and line["node"] == "node-a"
    assert line["message"] == "commit lag 12 ms" and line["ts"].endswith("Z")
    assert "trace_id" not in line
    given = orjson.loads(fmt.format(_record("x", trace_id=0xABC, span_id=0x12)))
    assert given["trace_id"] == f"{0xABC:032x}" and given["span_id"] == f"{0x12:016x}"
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("gochat.receive") as span:
        inside = orjson.loads(fmt.format(_record("inside a span")))
    ctx = span.get_span_context()
    assert inside["trace_id"] == f"{ctx.trace_id:032x}" and inside["span_id"] == f"{ctx.span_id:016x}"
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        rec = logging.LogRecord("gochat.test", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert "ValueError: boom" in orjson.loads(fmt.format(rec))["exc"]


@pytest.mark.e2e
def test_a_json_logging_node_writes_one_object_a_line_and_exports_delivery_latency(tmp_path: Path) -> None:
    server = GochatProcess(tmp_path / "data", {"GOCHAT_LOG_FORMAT": "json"})
    server.start()
    try:

        async def scenario() -> None:
            alice, bob = await create_user(server.http_url, "jl_alice"), await create_user(server.http_url, "jl_bob")
            a = await connect(server.ws_url, alice.access_token)
            b = await connect(server.ws_url, bob.access_token)
            await a.expect(AuthOk)
            await b.expect(AuthOk)
            for i in range(3):
                a.send(send_frame(Kind.DIRECT, bob.user_id, b"m%d" % i, rid=1 + i))
                await a.expect(SendAck)
                await b.expect(Deliver)
            async with aiohttp.ClientSession() as http, http.get(server.http_url + "/metrics") as r:
                text = await r.text()
            samples = dict(
                line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#")
            )
            assert float(samples['gochat_delivery_latency_seconds_count{tier="inline"}']) >= 3
            for tier in ("batched", "sharded", "cascaded"):
                assert float(samples[f'gochat_delivery_latency_seconds_count{{tier="{tier}"}}']) == 0
            assert float(samples["gochat_cluster_nodes"]) == 1
            assert float(samples["gochat_cluster_shed_total"]) == 0
            assert 'gochat_cluster_resubscribes_total{reader="broker"}' in samples
            a.close()
            b.close()

        run(scenario())
    finally:
        server.stop()
    lines = [ln for ln in server.log_path.read_text().splitlines() if ln.startswith("{")]
    assert lines, "no JSON log line"
    parsed = [orjson.loads(ln) for ln in lines]
    assert all({"ts", "level", "logger", "message", "node"} <= set(p) for p in parsed)
    assert any(p["logger"] == "gochat.server" and "listening" in p["message"] for p in parsed)
