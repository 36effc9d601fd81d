"""Cluster throughput: direct messages that cross nodes, durable in PostgreSQL, routed by Redis.

Starts N real ``gochat serve`` nodes in cluster mode (own PostgreSQL schema and Redis prefix,
dropped afterwards), K sender/receiver pairs where every receiver sits on a different node than
its sender, each sender keeping ``--window`` SENDs in flight for ``--seconds``. Reports
acknowledged messages/s, cross-node deliveries/s, ACK latency percentiles, and the CPU time the
nodes used per message (from /proc), which is the figure capacity planning starts from.

    python bench/cluster_bench.py --nodes 3 --pairs 30 --seconds 10

Needs PostgreSQL and Redis (``scripts/services.sh``). The load generator is one process on the
same 2-core machine as the nodes, so absolute numbers are a floor for what a node does alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect  # noqa: E402

from gochat.protocol import Kind, decode, encode, encode_many  # noqa: E402
from gochat.protocol.frames import Auth, AuthOk, Deliver, Send, SendAck  # noqa: E402

PG = os.environ.get("GOCHAT_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS = os.environ.get("GOCHAT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Peer(WSListener):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.acks = 0
        self.delivered = 0
        self.ready = asyncio.Event()
        self.sent_at: dict[int, float] = {}
        self.latencies: list[float] = []
        self.window_free = asyncio.Event()
        self.transport: WSTransport | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type != WSMsgType.BINARY:
            return
        now = time.perf_counter()
        for f in decode(frame.get_payload_as_bytes(), 1 << 24):
            if isinstance(f, SendAck):
                self.acks += 1
                self.latencies.append(now - self.sent_at.pop(f.rid, now))
                self.window_free.set()
            elif isinstance(f, Deliver):
                self.delivered += 1
            elif isinstance(f, AuthOk):
                self.ready.set()


def start_node(data: Path, env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    out = open(log, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gochat.cli", "serve", "--data-dir", str(data), "--ws-port", "0", "--http-port", "0"],
        stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env}, cwd=ROOT,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = re.search(r"ws=(\S+) http=(\S+)", log.read_text(errors="replace"))
        if m:
            return proc, m.group(1), m.group(2)
        time.sleep(0.05)
    raise RuntimeError(log.read_text())


def user(http: str, name: str) -> tuple[int, str]:
    def post(path: str, body: dict[str, str]) -> dict[str, object]:
        req = urllib.request.Request(http + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        return dict(json.load(urllib.request.urlopen(req)))

    uid = int(post("/v1/users", {"username": name, "password": "bench-password"})["user_id"])  # type: ignore[call-overload]
    tok = str(post("/v1/auth/login", {"username": name, "password": "bench-password"})["access_token"])
    return uid, tok


async def run(args: argparse.Namespace) -> dict[str, object]:
    tmp = Path(tempfile.mkdtemp(prefix="gochat-cluster-bench-"))
    schema, prefix = f"bench_{uuid.uuid4().hex[:8]}", f"gbench:{uuid.uuid4().hex[:8]}:"
    env = {
        "GOCHAT_REDIS_URL": REDIS, "GOCHAT_POSTGRES_DSN": PG, "GOCHAT_POSTGRES_SCHEMA": schema,
        "GOCHAT_REDIS_PREFIX": prefix, "GOCHAT_RATE_LIMIT_PER_S": "100000", "GOCHAT_RATE_LIMIT_BURST": "100000",
    }
    nodes = [start_node(tmp / "data", env, tmp / f"node{i}.log") for i in range(args.nodes)]
    try:
        body = os.urandom(args.size)
        pairs = []
        for i in range(args.pairs):
            a = user(nodes[i % args.nodes][2], f"s{i}{uuid.uuid4().hex[:6]}")
            b = user(nodes[i % args.nodes][2], f"r{i}{uuid.uuid4().hex[:6]}")
            pairs.append((i, a, b))
        peers: list[tuple[Peer, Peer, int]] = []
        for i, (_, tok_a), (uid_b, tok_b) in pairs:
            _, pa = await ws_connect(Peer, nodes[i % args.nodes][1])
            _, pb = await ws_connect(Peer, nodes[(i + 1) % args.nodes][1])
            for p, tok in ((pa, tok_a), (pb, tok_b)):
                p.transport.send(WSMsgType.BINARY, encode(Auth(tok, rid=0)))
                await p.ready.wait()
            peers.append((pa, pb, uid_b))
        await asyncio.sleep(0.5)
        cpu0 = [cpu_seconds(p.pid) for p, _, _ in nodes]
        stop = time.perf_counter() + args.seconds

        async def drive(pa: Peer, uid_b: int) -> None:
            rid = 0
            while time.perf_counter() < stop:
                burst = []
                while len(pa.sent_at) < args.window:
                    rid += 1
                    pa.sent_at[rid] = time.perf_counter()
                    burst.append(Send(Kind.DIRECT, 0, uid_b, uuid.uuid4().bytes, body, rid=rid))
                if burst:
                    pa.transport.send(WSMsgType.BINARY, encode_many(burst))
                pa.window_free.clear()
                await pa.window_free.wait()

        started = time.perf_counter()
        await asyncio.gather(*(drive(pa, uid_b) for pa, _, uid_b in peers))
        elapsed = time.perf_counter() - started
        await asyncio.sleep(1.0)
        cpu = sum(cpu_seconds(p.pid) for p, _, _ in nodes) - sum(cpu0)
        acks = sum(pa.acks for pa, _, _ in peers)
        delivered = sum(pb.delivered for _, pb, _ in peers)
        lat = np.array([x for pa, _, _ in peers for x in pa.latencies]) * 1000
        return {
            "command": " ".join(sys.argv),
            "nodes": args.nodes, "pairs": args.pairs, "window": args.window, "body_bytes": args.size,
            "seconds": round(elapsed, 2),
            "acked_per_s": round(acks / elapsed),
            "cross_node_deliveries_per_s": round(delivered / elapsed),
            "delivered_ratio": round(delivered / max(acks, 1), 4),
            "ack_ms_p50": round(float(np.percentile(lat, 50)), 2),
            "ack_ms_p99": round(float(np.percentile(lat, 99)), 2),
            "node_cpu_us_per_message": round(cpu / max(acks, 1) * 1e6, 1),
        }
    finally:
        for p, _, _ in nodes:
            p.terminate()
        for p, _, _ in nodes:
            p.wait(30)
        import asyncpg

        conn = await asyncpg.connect(PG)
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()
        import redis.asyncio as aioredis

        r = aioredis.Redis.from_url(REDIS)
        keys = [k async for k in r.scan_iter(match=f"{prefix}*")]
        if keys:
            await r.delete(*keys)
        await r.aclose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=30)
    ap.add_argument("--window", type=int, default=32, help="SENDs in flight per sender")
    ap.add_argument("--size", type=int, default=64, help="body bytes")
    ap.add_argument("--seconds", type=float, default=10.0)
    result = asyncio.run(run(ap.parse_args()))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
