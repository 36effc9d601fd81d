"""``python -m bench groups``: group fan-out latency per tier on a 3-node cluster.

    python -m bench groups [--sizes 50,300,3000,20000] [--online 60] [--repeats 20]
                           [--direct-rate 400] [--duration 10] [--group-rate 20]
                           [--set NAME=VALUE ...] [--out DIR]

Starts ``--nodes`` (3) real ``gochat serve`` nodes in cluster mode on their own PostgreSQL
schema and Redis key prefix (both dropped at the end, also on error), with
``GOCHAT_MAX_FRAME=1048576`` and ``GOCHAT_MAX_GROUP_MEMBERS=60000`` so that one
``group.create`` carries 20,000 member ids. ``--online`` real accounts (spread round-robin over
the nodes, one connection each) are the online sample; the rest of every group are users
bulk-inserted straight into the schema's ``users`` table (never connected). Every group has
``min(size, --online)`` online members. Measured, in one run, from this one process with
monotonic clocks (no server timestamps):

1. **send → last delivery per tier.** For every size in ``--sizes``: one warm-up message, then
   ``--repeats`` messages one at a time from one online member, each waiting until every other
   online member received it; latency = time the last online member received it − time the
   SEND was written. The tier is read from the server, not assumed: the difference of the
   nodes' ``node.fanouts`` counters (``GET /v1/admin/fanout``) across the group's sends, and
   for sharded / cascaded jobs the job records' ``tier`` and ``percent``.
2. **direct messages while the largest group fans out.** The online members other than the
   group sender, paired across nodes (member 2k+1 ↔ 2k+2, both directions), send direct
   messages at ``--direct-rate`` msgs/s in all for ``--duration`` s. Phase A: alone. Phase B:
   the same, while the group sender sends to the largest group, one message in flight, paced to
   at most ``--group-rate`` msgs/s (0: as fast as acks come back). Every direct message is
   tracked to its delivery; the lost ones are counted.
3. **the physical floor**: Redis PUBLISH → subscriber receive on loopback (``--floor-samples``),
   so the tier latencies are also given as multiples of it.

``--set NAME=VALUE`` (repeatable) passes a server setting to every node as ``GOCHAT_<NAME>``:
e.g. ``--set fanout_inline_max=10 --set large_group_threshold=30
--set large_group_threshold_min=30 --set large_group_threshold_max=30
--set fanout_cascade_min=100 --set fanout_shard_size=25`` makes groups of 8, 20, 60 and 150
members take the four tiers (the smoke test does that).

Results: ``results.json`` and ``results.md`` under ``--out`` (default
``bench/results/<UTC time>-groups/``), server logs under ``logs/`` (a log above 1 MiB is cut to
its last 256 KiB). Exit status 1 when a direct or group message was lost or a node died.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import shlex
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

# bench/chaos.py's cluster and client helpers, reused
from bench import report
from bench.chaos import (
    PG_DSN,
    REDIS_URL,
    ROOT,
    NodeProc,
    Peer,
    Unanswered,
    create_user,
    drop_namespace,
    read_conversation,
)
from bench.procs import machine_facts
from gochat.protocol import Kind
from gochat.protocol.frames import Deliver, Send, SendAck

ADMIN_TOKEN = "groups-bench-admin-token-0123456789"
#: a message not delivered to every online member within this is counted lost
DELIVERY_BOUND_S = 30.0
#: server logs above this are cut to their last LOG_KEEP bytes
LOG_MAX = 1 << 20
LOG_KEEP = 256 << 10


def log(msg: str) -> None:
    print(f"[groups {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(-(-p * len(s) // 100)) - 1))
    return s[k]


def stats_ms(values_s: list[float]) -> dict[str, Any]:
    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 3)

    return {"n": len(values_s), "p50_ms": ms(pct(values_s, 50)), "p95_ms": ms(pct(values_s, 95)),
            "p99_ms": ms(pct(values_s, 99)), "max_ms": ms(max(values_s) if values_s else None)}


# ---- tracking deliveries ------------------------------------------------------------------------
@dataclass
class Pending:
    sent: float
    waiting_for: set[int]
    receivers: frozenset[int] = frozenset()
    sender: int = 0
    last: float = 0.0
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Tracker:
    """Messages in flight by client_msg_id: who still has to receive each, when the last did."""

    def __init__(self) -> None:
        self.pending: dict[bytes, Pending] = {}
        #: DELIVERs of a tracked message to a user it was not for: (user, conv_id and seq as
        #: delivered, the users it was for)
        self.misdelivered: list[tuple[int, int, int, list[int]]] = []

    def expect(self, cmid: bytes, sent: float, receivers: set[int]) -> Pending:
        p = self.pending[cmid] = Pending(sent, set(receivers), frozenset(receivers))
        if not receivers:
            p.done.set()
        return p

    def delivered(self, user_id: int, cmid: bytes, at: float, conv_id: int = 0, seq: int = 0) -> None:
        p = self.pending.get(cmid)
        if p is None:
            return
        if user_id not in p.receivers and user_id != p.sender and len(self.misdelivered) < 1000:
            self.misdelivered.append((user_id, conv_id, seq, sorted(p.receivers)))
        if user_id not in p.waiting_for:
            return
        p.waiting_for.discard(user_id)
        p.last = max(p.last, at)
        if not p.waiting_for:
            p.done.set()


class Member(Peer):  # type: ignore[misc]
    """A :class:`~bench.chaos.Peer` that also stamps every DELIVER's arrival (monotonic) into a
    :class:`Tracker`."""

    def __init__(self, name: str, user_id: int, token: str, url: str, tracker: Tracker, node: int) -> None:
        super().__init__(name, user_id, token, url)
        self.tracker = tracker
        self.node = node

    def _on_frame(self, conn: Any, f: Any) -> None:
        if isinstance(f, Deliver):
            m = f.message
            self.tracker.delivered(self.user_id, m.client_msg_id, time.monotonic(), m.conv_id, m.seq)
        super()._on_frame(conn, f)


async def send_tracked(tracker: Tracker, sender: Member, kind: int, conv_id: int, receivers: set[int],
                       body: bytes) -> tuple[Pending, Any]:
    """Send one message; its Pending is registered before the SEND is written. ``Peer.request``
    writes the frame before its first await (the peer is connected), so ``sent`` is the write."""
    cmid = uuid.uuid4().bytes
    p = tracker.expect(cmid, time.monotonic(), receivers)
    p.sender = sender.user_id
    p.sent = time.monotonic()
    reply = await sender.request(Send(int(kind), 1, conv_id, cmid, body))
    return p, reply


# ---- the cluster --------------------------------------------------------------------------------
@dataclass
class Bench:
    args: argparse.Namespace
    http: aiohttp.ClientSession
    nodes: list[Any]
    schema: str
    tracker: Tracker = field(default_factory=Tracker)
    members: list[Member] = field(default_factory=list)
    bulk_ids: list[int] = field(default_factory=list)

    async def admin(self, node: int, path: str = "/v1/admin/fanout?limit=1000") -> dict[str, Any]:
        async with self.http.get(self.nodes[node].http_url + path,
                                 headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                                 timeout=aiohttp.ClientTimeout(total=10)) as r:
            assert r.status == 200, f"{path}: {r.status} {await r.text()}"
            return dict(await r.json())

    async def fanout_counters(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for i in range(len(self.nodes)):
            for tier, n in (await self.admin(i))["node"]["fanouts"].items():
                total[tier] = total.get(tier, 0) + int(n)
        return total

    async def setup_users(self, online: int, bulk: int) -> None:
        import asyncpg

        tag = uuid.uuid4().hex[:6]
        n = len(self.nodes)
        t = time.monotonic()
        for i in range(online):
            uid, tok = await create_user(self.http, self.nodes[i % n].http_url, f"grp{tag}u{i}")
            self.members.append(Member(f"u{i}", uid, tok, self.nodes[i % n].ws_url, self.tracker, i % n))
        log(f"{online} accounts created in {time.monotonic() - t:.1f} s")
        t = time.monotonic()
        if bulk > 0:
            pg = await asyncpg.connect(self.args.postgres)
            try:
                rows = await pg.fetch(
                    f'INSERT INTO "{self.schema}".users (username, password_hash, created_ms) '
                    f"SELECT 'bulk{tag}_' || g, 'x', 0 FROM generate_series(1, $1) g RETURNING user_id", bulk)
            finally:
                await pg.close()
            self.bulk_ids = [int(r[0]) for r in rows]
        log(f"{bulk} offline users bulk-inserted in {time.monotonic() - t:.1f} s")
        await asyncio.gather(*(m.connect() for m in self.members))

    async def create_group(self, size: int) -> tuple[int, list[Member], float]:
        online = self.members[:min(size, len(self.members))]
        ids = [m.user_id for m in online[1:]] + self.bulk_ids[:size - len(online)]
        t = time.monotonic()
        res = await online[0].call("group.create", {"name": f"bench{size}", "members": ids}, timeout=120)
        assert isinstance(res, dict), f"group.create of {size} members: {res!r}"
        return int(res["group_id"]), online, time.monotonic() - t

    async def jobs_of(self, gid: int) -> list[dict[str, Any]]:
        return [j for j in (await self.admin(0))["jobs"] if int(j["conv_id"]) == gid]


async def measure_group(b: Bench, size: int) -> dict[str, Any]:
    a = b.args
    gid, online, created_s = await b.create_group(size)
    await asyncio.sleep(1.0)  # membership reaches every node's cache
    sender = online[0]
    receivers = {m.user_id for m in online[1:]}
    before = await b.fanout_counters()
    lat: list[float] = []
    first_ms: float | None = None
    lost = 0
    errors: list[str] = []
    msg_ids: list[int] = []
    for i in range(a.repeats + 1):  # the first is a warm-up, not in the statistics
        p, reply = await send_tracked(b.tracker, sender, Kind.GROUP, gid, receivers, f"g{size}#{i}".encode())
        if not isinstance(reply, SendAck):
            errors.append(repr(reply))
            continue
        msg_ids.append(reply.msg_id)
        try:
            await asyncio.wait_for(p.done.wait(), DELIVERY_BOUND_S)
        except TimeoutError:
            lost += 1
            errors.append(f"message {reply.msg_id}: {len(p.waiting_for)} online members got nothing in "
                          f"{DELIVERY_BOUND_S:g} s")
            continue
        if i == 0:
            first_ms = round((p.last - p.sent) * 1000, 3)
        else:
            lat.append(p.last - p.sent)
    await asyncio.sleep(0.3)
    after = await b.fanout_counters()
    diff = {t: after.get(t, 0) - before.get(t, 0) for t in after}
    tiers = [t for t, n in diff.items() if n > 0]
    # the job records of this group's messages: tier and progress (parts are recorded a little
    # after their deliveries: wait a few seconds for 100 %)
    jobs: list[dict[str, Any]] = []
    deadline = time.monotonic() + 10
    while True:
        jobs = [j for j in await b.jobs_of(gid) if int(j["msg_id"]) in set(msg_ids)]
        if all(j["percent"] >= 100 for j in jobs) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.25)
    row: dict[str, Any] = {
        "size": size,
        "group_id": gid,
        "online": len(online),
        "offline": size - len(online),
        "create_s": round(created_s, 3),
        "tier": tiers[0] if len(tiers) == 1 else "+".join(sorted(tiers)) or None,
        "fanout_counter_diff": diff,
        "messages": a.repeats,
        "first_ms": first_ms,
        **stats_ms(lat),
        "lost": lost,
        "errors": errors[:20],
        "jobs": {
            "seen": len(jobs),
            "tiers": sorted({str(j["tier"]) for j in jobs}),
            "at_100_pct": sum(1 for j in jobs if j["percent"] >= 100),
            "min_percent": min((float(j["percent"]) for j in jobs), default=None),
            "parts_total": sorted({int(j["parts_total"]) for j in jobs}),
            "delivered": sorted({int(j["delivered"]) for j in jobs}),
        },
    }
    log(f"{size} members: tier {row['tier']} (counters {diff}), p50 {row['p50_ms']} ms p95 {row['p95_ms']} ms "
        f"max {row['max_ms']} ms, jobs {row['jobs']['at_100_pct']}/{row['jobs']['seen']} at 100 %, lost {lost}")
    return row


async def direct_phase(b: Bench, gid: int | None, online: list[Member], warmup: bool = False) -> dict[str, Any]:
    """Direct traffic at a fixed rate among ``online[1:]``; with ``gid``, ``online[0]`` sends to
    that group meanwhile. ``warmup``: one message per route (each direct conversation's first),
    at the same rate."""
    a = b.args
    peers = online[1:]
    pairs = [(peers[i], peers[i + 1]) for i in range(0, len(peers) - 1, 2)]
    routes = [(s, r) for x, y in pairs for s, r in ((x, y), (y, x))]
    assert routes, "direct phases need at least 3 online members"
    total = len(routes) if warmup else int(a.direct_rate * a.duration)
    results: list[tuple[Pending, Any]] = []
    tasks: list[asyncio.Task[None]] = []
    stop = asyncio.Event()
    group_sent: list[tuple[Pending, Any]] = []
    group_errors: list[str] = []

    routed: dict[int, tuple[Member, Member, int, float]] = {}

    async def one(s: Member, r: Member, k: int) -> None:
        route = (s, r, k, time.monotonic() - t0)
        res = await send_tracked(b.tracker, s, Kind.DIRECT, r.user_id, {r.user_id}, f"d{k}".encode())
        routed[len(results)] = route
        results.append(res)

    async def group_sender() -> None:
        assert gid is not None
        receivers = {m.user_id for m in online[1:]}
        gap = 1.0 / a.group_rate if a.group_rate > 0 else 0.0
        nxt = time.monotonic()
        k = 0
        while not stop.is_set():
            try:
                group_sent.append(
                    await send_tracked(b.tracker, online[0], Kind.GROUP, gid, receivers, f"b{k}".encode()))
            except (Unanswered, ConnectionError) as exc:
                group_errors.append(repr(exc))
            k += 1
            nxt += gap
            delay = nxt - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                nxt = time.monotonic()

    gtask = asyncio.get_running_loop().create_task(group_sender()) if gid is not None else None
    if gtask is not None:
        await asyncio.sleep(0.5)  # the group fan-out is under way before the measured traffic
    t0 = time.monotonic()
    for k in range(total):
        delay = t0 + k / a.direct_rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        s, r = routes[k % len(routes)]
        tasks.append(asyncio.get_running_loop().create_task(one(s, r, k)))
    sent_for = time.monotonic() - t0
    await asyncio.gather(*tasks, return_exceptions=True)
    stop.set()
    if gtask is not None:
        await gtask
    deadline = time.monotonic() + DELIVERY_BOUND_S
    for p, _ in results + group_sent:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(p.done.wait(), max(0.01, deadline - time.monotonic()))
    acked = [(p, r) for p, r in results if isinstance(r, SendAck)]
    lat = [p.last - p.sent for p, _ in acked if p.done.is_set()]
    out: dict[str, Any] = {
        "offered_rate": a.direct_rate,
        "achieved_send_rate": round(total / sent_for, 1) if sent_for > 0 else None,
        "pairs": len(pairs),
        "senders": len(routes),
        "sent": total,
        "acknowledged": len(acked),
        "not_acknowledged": total - len(acked),  # an ERROR answer, or none (Unanswered, connection lost)
        "delivered": len(lat),
        "lost": sum(1 for p, _ in acked if not p.done.is_set()),
        **stats_ms(lat),
    }
    lost = [(i, p, r) for i, (p, r) in enumerate(results) if isinstance(r, SendAck) and not p.done.is_set()]
    if lost:
        out["lost_detail"] = [await lost_detail(routed[i], p, r) for i, p, r in lost[:20]]
    if gid is not None:
        g_acked = [p for p, r in group_sent if isinstance(r, SendAck)]
        g_lat = [p.last - p.sent for p in g_acked if p.done.is_set()]
        out["group"] = {
            "group_id": gid,
            "rate_cap": a.group_rate,
            "sent": len(group_sent),
            "acknowledged": len(g_acked),
            "unanswered": group_errors[:20],
            "lost": sum(1 for p in g_acked if not p.done.is_set()),
            "latency": stats_ms(g_lat),
        }
    return out


async def lost_detail(route: tuple[Member, Member, int, float], p: Pending, ack: SendAck) -> dict[str, Any]:
    """What is known of a direct message never delivered: who sent it where, when, and whether
    the receiver's HISTORY has it and whether the receiver got later messages of that conversation."""
    s, r, k, at = route
    seqs = [seq for conn in r.deliver_order.values() for kind, conv, seq in conn
            if kind == Kind.DIRECT and conv == s.user_id]
    detail: dict[str, Any] = {
        "k": k, "sent_at_s": round(at, 4), "sender": s.user_id, "sender_node": s.node, "receiver": r.user_id,
        "receiver_node": r.node, "msg_id": ack.msg_id, "ack_kind": ack.kind, "ack_conv_id": ack.conv_id,
        "seq": ack.seq, "ack_flags": ack.flags, "receiver_min_seq": min(seqs, default=None),
        "receiver_connections": r.connections, "receiver_lost_connections": r.lost_connections,
        "receiver_got_later_seqs": sum(1 for x in seqs if x > ack.seq),
        "receiver_got_seqs": len(seqs),
    }
    try:
        hist = await read_conversation(r, Kind.DIRECT, s.user_id, 20.0)
        detail["in_receiver_history"] = any(m.msg_id == ack.msg_id for m in hist)
    except Exception as exc:  # diagnostics only
        detail["in_receiver_history"] = f"unknown: {exc!r}"
    return detail


async def redis_floor(redis_url: str, prefix: str, samples: int) -> dict[str, Any]:
    import redis.asyncio as aioredis

    pub = aioredis.Redis.from_url(redis_url)
    sub = aioredis.Redis.from_url(redis_url)
    ps = sub.pubsub()
    channel = f"{prefix}bench-floor"
    rtt: list[float] = []
    try:
        await ps.subscribe(channel)
        while (await ps.get_message(timeout=1.0)) is None:
            pass  # the subscribe confirmation
        for i in range(samples + 20):
            data = str(i).encode()
            t = time.monotonic()
            await pub.publish(channel, data)
            while True:
                m = await ps.get_message(ignore_subscribe_messages=True, timeout=5.0)
                if m is None:
                    raise RuntimeError("redis floor: a PUBLISH did not come back within 5 s")
                if m["data"] == data:
                    break
            if i >= 20:  # the first ones warm the connections up
                rtt.append(time.monotonic() - t)
    finally:
        await ps.unsubscribe(channel)
        await ps.aclose()
        await pub.aclose()
        await sub.aclose()
    us = sorted(x * 1e6 for x in rtt)
    return {"what": "redis PUBLISH -> subscriber receive (redis-py asyncio, loopback, one process)",
            "samples": len(us), "p50_us": round(pct(us, 50) or 0, 1), "p99_us": round(pct(us, 99) or 0, 1),
            "min_us": round(us[0], 1)}


_GATE = re.compile(r"^gochat_deliveries_(held|stale)(?:_total)? (\S+)$", re.M)


async def order_gate(http: aiohttp.ClientSession, http_url: str) -> dict[str, int]:
    """The node's order-gate counters from /metrics: DELIVERs held for a missing seq, and DELIVERs
    dropped as at or below the last seq delivered (``gochat_deliveries_stale``)."""
    async with http.get(f"{http_url}/metrics", timeout=aiohttp.ClientTimeout(total=5)) as r:
        text = await r.text()
    return {k: int(float(v)) for k, v in _GATE.findall(text)}


def trim_logs(logs: Path) -> list[str]:
    cut = []
    for f in sorted(logs.glob("*.log")):
        size = f.stat().st_size
        if size > LOG_MAX:
            with open(f, "rb") as fh:
                fh.seek(size - LOG_KEEP)
                tail = fh.read()
            f.write_bytes(b"[... cut by bench groups: %d bytes before this ...]\n" % (size - LOG_KEEP) + tail)
            cut.append(f"{f.name}: {size} bytes, kept the last {LOG_KEEP}")
    return cut


async def run(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    work = out / "logs"
    work.mkdir(parents=True, exist_ok=True)
    schema, prefix = f"groups_{uuid.uuid4().hex[:10]}", f"ggroups:{uuid.uuid4().hex[:10]}:"
    env = {
        "GOCHAT_REDIS_URL": args.redis,
        "GOCHAT_POSTGRES_DSN": args.postgres,
        "GOCHAT_POSTGRES_SCHEMA": schema,
        "GOCHAT_REDIS_PREFIX": prefix,
        "GOCHAT_REGISTRY_TTL_S": "3",
        "GOCHAT_REGISTRY_RENEW_S": "1",
        "GOCHAT_DRAIN_TIMEOUT_S": "5",
        "GOCHAT_ADMIN_TOKEN": ADMIN_TOKEN,
        "GOCHAT_RATE_LIMIT_PER_S": "100000",
        "GOCHAT_RATE_LIMIT_BURST": "100000",
        "GOCHAT_MAX_FRAME": str(1 << 20),
        "GOCHAT_MAX_GROUP_MEMBERS": str(max(60000, max(args.sizes))),
        **{f"GOCHAT_{k.upper()}": v for k, v in args.set},
    }
    nodes = [NodeProc(f"node{i}", work / "data", env, work / f"node{i}.log") for i in range(args.nodes)]
    members: list[Member] = []
    doc: dict[str, Any] = {"schema": schema, "redis_prefix": prefix,
                           "server_env": {k: v for k, v in env.items() if k not in ("GOCHAT_ADMIN_TOKEN",)}}
    try:
        for node in nodes:
            node.start()
        log(f"{len(nodes)} nodes: {', '.join(n.ws_url for n in nodes)}")
        async with aiohttp.ClientSession() as http:
            b = Bench(args, http, nodes, schema)
            members = b.members
            await asyncio.sleep(2.0)  # every node lists the others in the registry
            await b.setup_users(args.online, max(0, max(args.sizes) - args.online))
            doc["tiers_at_start"] = {n.name: (await b.admin(i))["node"]["tiers"] for i, n in enumerate(nodes)}
            doc["floor"] = await redis_floor(args.redis, prefix, args.floor_samples)
            log(f"redis floor: p50 {doc['floor']['p50_us']} µs")
            rows = []
            for size in args.sizes:
                rows.append(await measure_group(b, size))
            floor_ms = doc["floor"]["p50_us"] / 1000
            for r in rows:
                for k in ("p50", "p95", "max"):
                    v = r[f"{k}_ms"]
                    r[f"{k}_x_floor"] = None if v is None or not floor_ms else round(v / floor_ms, 1)
            doc["tiers"] = rows
            biggest = max(rows, key=lambda r: r["size"])
            online = members[:biggest["online"]]
            # every direct conversation's first message, before the measured phases (its
            # creation is not what A and B compare); its deliveries are checked like theirs
            warm = await direct_phase(b, None, online, warmup=True)
            log(f"direct warm-up (first message of each direct conversation): {warm['delivered']}/{warm['sent']} "
                f"delivered, lost {warm['lost']}")
            await asyncio.sleep(1.0)
            log(f"direct phase A: {args.direct_rate:g} msgs/s for {args.duration:g} s")
            pa = await direct_phase(b, None, online)
            log(f"  p50 {pa['p50_ms']} ms p99 {pa['p99_ms']} ms max {pa['max_ms']} ms, lost {pa['lost']}")
            await asyncio.sleep(1.0)
            log(f"direct phase B: the same while the {biggest['size']}-member group fans out")
            pb = await direct_phase(b, biggest["group_id"], online)
            log(f"  p50 {pb['p50_ms']} ms p99 {pb['p99_ms']} ms max {pb['max_ms']} ms, lost {pb['lost']}, "
                f"group messages {pb['group']['sent']}")
            ratio = None if not pa["p99_ms"] or pb["p99_ms"] is None else round(pb["p99_ms"] / pa["p99_ms"], 2)
            doc["direct"] = {"group_size": biggest["size"], "warmup": warm, "A": pa, "B": pb, "p99_ratio_B_over_A": ratio}
            doc["order_gate"] = {n.name: await order_gate(http, n.http_url) for n in nodes}
            doc["fanout_status_at_end"] = {n.name: (await b.admin(i))["node"] for i, n in enumerate(nodes)}
            mis = b.tracker.misdelivered
            doc["misdelivered"] = {"count": len(mis), "first": [
                {"user": u, "conv_id": c, "seq": q, "meant_for": w[:5]} for u, c, q, w in mis[:20]]}
        doc["crashed_nodes"] = [n.name for n in nodes if not n.alive]
        return doc
    finally:
        for m in members:
            m.close()
        doc.setdefault("crashed_nodes", [n.name for n in nodes if n.proc is not None and not n.alive])
        for node in nodes:
            node.stop()
        await drop_namespace(args.postgres, schema, args.redis, prefix)
        doc["log_cuts"] = trim_logs(work)


def markdown(doc: dict[str, Any]) -> str:
    r = doc["results"]
    m = doc["machine"]
    fl = r["floor"]
    lines = [
        f"# gochat bench: groups — {'PASS' if doc['passed'] else 'FAIL'}",
        "",
        f"- command: `{doc['command']}`",
        f"- started: {doc['started']}, took {doc['elapsed_s']:.0f} s",
        f"- machine: {m['cpu_model']}, {m['cpus']} CPUs, Linux {m['kernel']}; gochat commit {m['git_commit']}",
        f"- {doc['args']['nodes']} nodes (one process each, on the same machine as this load generator), "
        f"{doc['args']['online']} online accounts round-robin over them; the rest of every group offline "
        f"(bulk-inserted users)",
        f"- tier bounds at start (node0): `{json.dumps(r['tiers_at_start'].get('node0'))}`",
        f"- floor: {fl['what']}: p50 **{fl['p50_us']} µs**, p99 {fl['p99_us']} µs, min {fl['min_us']} µs "
        f"({fl['samples']} samples)",
        "",
        "## Send → last online delivery, per group size",
        "",
        f"{doc['args']['repeats']} messages per group, one at a time (after one warm-up); latency = last online "
        "member's DELIVER − SEND written, monotonic clock of the load generator. Tier = the server's "
        "`node.fanouts` counters that moved.",
        "",
        "| members | online | tier (server) | p50 ms | p95 ms | max ms | p50 × floor | jobs at 100 % (incl. warm-up) | job tier | lost |",
        "|---:|---:|---|---:|---:|---:|---:|---|---|---:|",
    ]
    for t in r["tiers"]:
        j = t["jobs"]
        jobs = f"{j['at_100_pct']}/{j['seen']}" if j["seen"] else "— (no job)"
        lines.append(f"| {t['size']:,} | {t['online']} | {t['tier']} | {t['p50_ms']} | {t['p95_ms']} | "
                     f"{t['max_ms']} | {t['p50_x_floor']} | {jobs} | {', '.join(j['tiers']) or '—'} | {t['lost']} |")
    d = r["direct"]
    w, a, bb = d["warmup"], d["A"], d["B"]
    g = bb["group"]
    lines += [
        "",
        f"## Direct messages while the {d['group_size']:,}-member group fans out",
        "",
        f"{a['senders']} senders ({a['pairs']} pairs across nodes), {a['offered_rate']:g} msgs/s in all for "
        f"{doc['args']['duration']:g} s. Phase B: one member sends to the group meanwhile, one in flight, "
        f"at most {g['rate_cap']:g}/s.",
        "",
        "| phase | sent | delivered | lost | not acked | p50 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| warm-up: each conversation's first message | {w['sent']} | {w['delivered']} | {w['lost']} | "
        f"{w['not_acknowledged']} | {w['p50_ms']} | {w['p99_ms']} | {w['max_ms']} |",
        f"| A: direct alone | {a['sent']} | {a['delivered']} | {a['lost']} | {a['not_acknowledged']} | "
        f"{a['p50_ms']} | {a['p99_ms']} | {a['max_ms']} |",
        f"| B: with group fan-out | {bb['sent']} | {bb['delivered']} | {bb['lost']} | {bb['not_acknowledged']} | "
        f"{bb['p50_ms']} | {bb['p99_ms']} | {bb['max_ms']} |",
        "",
        f"- p99 ratio B / A: **{d['p99_ratio_B_over_A']}**",
        f"- group messages sent in B: **{g['sent']}** (acknowledged {g['acknowledged']}, lost {g['lost']}); their "
        f"send → last online delivery: p50 {g['latency']['p50_ms']} ms, p99 {g['latency']['p99_ms']} ms, "
        f"max {g['latency']['max_ms']} ms",
        f"- crashed nodes: {', '.join(r['crashed_nodes']) or 'none'}",
    ]
    gate = "; ".join(f"{n}: {v}" for n, v in r.get("order_gate", {}).items())
    lines.append(f"- order gate at the end (`gochat_deliveries_held` / `gochat_deliveries_stale`): {gate}")
    mis = r["misdelivered"]
    lines.append(f"- DELIVERs of a tracked message to a user it was not for: **{mis['count']}**")
    for x in mis["first"][:10]:
        lines.append(f"  - `{json.dumps(x)}`")
    for phase, x in (("warm-up", w), ("A", a), ("B", bb)):
        for ld in x.get("lost_detail", []):
            lines.append(f"- **lost** in phase {phase}: `{json.dumps(ld)}`")
    if r.get("log_cuts"):
        lines.append(f"- server logs cut: {'; '.join(r['log_cuts'])}")
    return "\n".join(lines) + "\n"


def _setting(s: str) -> tuple[str, str]:
    name, sep, value = s.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {s!r}")
    return name.removeprefix("GOCHAT_").lower(), value


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench groups", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",") if x], default=[50, 300, 3000, 20000],
                   help="group sizes (default 50,300,3000,20000); the largest is the one of the direct phases")
    p.add_argument("--online", type=int, default=60, help="online accounts, round-robin over the nodes (default 60)")
    p.add_argument("--repeats", type=int, default=20, help="measured messages per group (default 20)")
    p.add_argument("--direct-rate", type=float, default=400.0, help="direct msgs/s in all (default 400)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of each direct phase (default 10)")
    p.add_argument("--group-rate", type=float, default=20.0,
                   help="phase B: group msgs/s at most, one in flight (default 20; 0: as fast as acks come back)")
    p.add_argument("--floor-samples", type=int, default=300, help="redis PUBLISH round trips (default 300)")
    p.add_argument("--nodes", type=int, default=3, help="cluster nodes (default 3)")
    p.add_argument("--set", type=_setting, action="append", default=[], metavar="NAME=VALUE",
                   help="a server setting for every node (GOCHAT_<NAME>), e.g. fanout_cascade_min=100; repeatable")
    p.add_argument("--postgres", default=PG_DSN, help="PostgreSQL DSN (GOCHAT_TEST_POSTGRES_DSN)")
    p.add_argument("--redis", default=REDIS_URL, help="Redis URL (GOCHAT_TEST_REDIS_URL)")
    p.add_argument("--out", type=Path, help="result directory")
    a = p.parse_args(argv)
    if not a.sizes or min(a.sizes) < 2 or max(a.sizes) > 200_000:
        p.error("--sizes: group sizes in [2, 200000]")
    if a.online < 3 or a.online > 1000 or not 1 <= a.repeats <= 1000 or a.nodes < 2:
        p.error("--online in [3, 1000], --repeats in [1, 1000], --nodes >= 2")
    if not 0 < a.duration <= 120 or not 0 < a.direct_rate <= 20000 or a.group_rate < 0 or a.floor_samples < 1:
        p.error("--duration in (0, 120], --direct-rate in (0, 20000], --group-rate >= 0, --floor-samples >= 1")
    if min(max(a.sizes), a.online) < 3:
        p.error("the largest group needs at least 3 online members (--online, --sizes)")
    return a


def main(argv: list[str]) -> int:
    a = parse(argv)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = (a.out or ROOT / "bench" / "results" / f"{stamp}-groups").resolve()
    out.mkdir(parents=True, exist_ok=True)
    facts = machine_facts()
    t0 = time.monotonic()
    results = asyncio.run(run(a, out))
    d = results["direct"]
    lost = (sum(t["lost"] for t in results["tiers"]) + d["warmup"]["lost"] + d["warmup"]["not_acknowledged"]
            + d["A"]["lost"] + d["B"]["lost"] + d["B"]["group"]["lost"]
            + d["A"]["not_acknowledged"] + d["B"]["not_acknowledged"])
    passed = lost == 0 and not results["crashed_nodes"] and results["misdelivered"]["count"] == 0
    doc = {
        "scenario": "groups",
        "command": "python -m bench groups " + " ".join(shlex.quote(x) for x in argv),
        "started": stamp,
        "elapsed_s": time.monotonic() - t0,
        "machine": facts,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()
                 if k not in ("postgres", "redis")},
        "passed": passed,
        "results": results,
    }
    (out / "results.json").write_text(json.dumps(doc, indent=1, default=report._json_default))
    (out / "results.md").write_text(markdown(doc))
    log(f"{'PASS' if passed else 'FAIL'} in {doc['elapsed_s']:.0f} s: {out / 'results.md'}")
    print(out / "results.json")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
