"""Cluster throughput: direct messages that cross nodes, durable in PostgreSQL, routed by Redis.

Starts N real ``gochat serve`` nodes in cluster mode (own PostgreSQL schema and Redis prefix,
dropped afterwards), K sender/receiver pairs where every receiver sits on a different node than
its sender, each sender keeping ``--window`` SENDs in flight for ``--seconds``. Reports
acknowledged messages/s, cross-node deliveries/s, ACK latency percentiles, and the CPU time the
nodes used per message (from /proc), which is the figure capacity planning starts from.

    python bench/cluster_bench.py --nodes 3 --pairs 30 --seconds 10

``--rates 4000,8000,...`` runs open loop instead, as ``python -m bench direct`` does for the
embedded node: each step sends the total rate spread evenly over the senders for ``--seconds``,
with the send time in the body, and reports per step the delivered rate, publish→receive and
ACK latency percentiles, OVERLOADED answers and node CPU per message, stopping past the knee.

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
from typing import Any, cast

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect  # noqa: E402

from gochat.protocol import Kind, decode, encode, encode_many  # noqa: E402
from gochat.protocol.frames import Auth, AuthOk, Deliver, Error, Send, SendAck  # noqa: E402

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
        self.refused = 0  # ERROR answers to SENDs (OVERLOADED when the cluster sheds load)
        self.ready = asyncio.Event()
        self.sent_at: dict[int, float] = {}
        self.latencies: list[float] = []
        #: open loop: publish → receive, from the send time (monotonic ns) in the body
        self.deliver_ns: list[int] = []
        self.window_free = asyncio.Event()
        self.transport: WSTransport | None = None

    def reset(self) -> None:
        self.acks = self.delivered = self.refused = 0
        self.latencies.clear()
        self.deliver_ns.clear()

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
                if len(f.message.body) >= 8:
                    self.deliver_ns.append(time.monotonic_ns() - int.from_bytes(f.message.body[:8], "little"))
            elif isinstance(f, Error):
                self.refused += 1
                self.sent_at.pop(f.rid, None)
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
            ta, pa = await ws_connect(Peer, nodes[i % args.nodes][1])
            tb, pb = await ws_connect(Peer, nodes[(i + 1) % args.nodes][1])
            for transport, peer, tok in ((ta, pa, tok_a), (tb, pb, tok_b)):
                transport.send(WSMsgType.BINARY, encode(Auth(tok, rid=0)))
                await cast(Peer, peer).ready.wait()
            peers.append((cast(Peer, pa), cast(Peer, pb), uid_b))
        await asyncio.sleep(0.5)
        if args.rates:
            steps = []
            for rate in (float(r) for r in args.rates.split(",")):
                row = await _rate_step(nodes, peers, rate, args)
                steps.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
                if row["loss_pct"] > 1.0 or row["delivered_per_s"] < 0.9 * rate or row["deliver_ms_p99"] > 1000:
                    break
            return {"command": " ".join(sys.argv), "nodes": args.nodes, "pairs": args.pairs,
                    "body_bytes": args.size, "seconds_per_step": args.seconds, "steps": steps}
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
                if burst and pa.transport is not None:
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
        for proc, _, _ in nodes:
            proc.terminate()
        for proc, _, _ in nodes:
            proc.wait(30)
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


async def _rate_step(
    nodes: list[tuple[subprocess.Popen[bytes], str, str]], peers: list[tuple[Peer, Peer, int]], rate: float,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One open-loop step: ``rate`` SENDs/s in total for ``args.seconds``, then drain."""
    for pa, pb, _ in peers:
        pa.reset()
        pb.reset()
    pad = os.urandom(max(0, args.size - 8))
    cpu0 = sum(cpu_seconds(p.pid) for p, _, _ in nodes)
    total = int(rate * args.seconds)
    n = len(peers)
    rids = [0] * n
    start = time.monotonic_ns()
    sent = 0
    while sent < total:
        due = min(total, int((time.monotonic_ns() - start) * rate / 1e9) + 1)
        batches: dict[int, list[Send]] = {}
        while sent < due:
            j = sent % n
            pa, _, uid_b = peers[j]
            rids[j] += 1
            now = time.monotonic_ns()
            pa.sent_at[rids[j]] = time.perf_counter()
            body = now.to_bytes(8, "little") + pad
            batches.setdefault(j, []).append(Send(Kind.DIRECT, 0, uid_b, uuid.uuid4().bytes, body, rid=rids[j]))
            sent += 1
        for j, frames in batches.items():
            transport = peers[j][0].transport
            assert transport is not None
            transport.send(WSMsgType.BINARY, encode_many(frames))
        await asyncio.sleep(0.001)
    end = time.monotonic_ns()
    # drain: until every SEND is answered and the deliveries stop growing (at most 20 s)
    deadline = time.monotonic() + 20
    last = -1
    while time.monotonic() < deadline:
        answered = sum(pa.acks + pa.refused for pa, _, _ in peers)
        delivered = sum(pb.delivered for _, pb, _ in peers)
        if answered >= total and delivered == last:
            break
        last = delivered
        await asyncio.sleep(0.25)
    cpu = sum(cpu_seconds(p.pid) for p, _, _ in nodes) - cpu0
    acks = sum(pa.acks for pa, _, _ in peers)
    refused = sum(pa.refused for pa, _, _ in peers)
    delivered = sum(pb.delivered for _, pb, _ in peers)
    lat = np.array([x for _, pb, _ in peers for x in pb.deliver_ns] or [0]) / 1e6
    ack = np.array([x for pa, _, _ in peers for x in pa.latencies] or [0]) * 1000
    span = (end - start) / 1e9
    return {
        "offered_per_s": rate,
        "sent": total,
        "acked": acks,
        "refused": refused,
        "delivered_per_s": round(delivered / span, 1),
        "loss_pct": round(100 * (total - delivered) / total, 3),
        "deliver_ms_p50": round(float(np.percentile(lat, 50)), 2),
        "deliver_ms_p99": round(float(np.percentile(lat, 99)), 2),
        "ack_ms_p50": round(float(np.percentile(ack, 50)), 2),
        "ack_ms_p99": round(float(np.percentile(ack, 99)), 2),
        "node_cpu_us_per_message": round(cpu / max(acks, 1) * 1e6, 1),
        "node_cpu_pct_of_one_core": round(100 * cpu / span, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=30)
    ap.add_argument("--window", type=int, default=32, help="SENDs in flight per sender")
    ap.add_argument("--size", type=int, default=64, help="body bytes")
    ap.add_argument("--seconds", type=float, default=10.0, help="per step with --rates")
    ap.add_argument("--rates", default="", help="open loop: total SENDs/s per step, comma list")
    result = asyncio.run(run(ap.parse_args()))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
