"""Fan-out tiers end to end (docs/cluster.md, "Fan-out tiers"): real ``gochat serve`` processes.

One three-node cluster (Redis, PostgreSQL) is shared by the module's cluster tests: 20,000 users
are bulk-inserted into its schema (with a real password hash, so any of them can log in), a
sample of them spread over the id range is online, spread over the nodes, and four groups of
50, 300, 3,000 and 20,000 members are created once. Each test connects its own sessions.
The tests that kill a node run last; a killed node is started again before the next test
that needs three nodes.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sqlite3
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis

from gochat.auth.passwords import hash_password
from gochat.client import Client, Kind
from gochat.client.types import Message
from gochat.protocol.frames import AuthOk, Call, CallResult, Deliver, Event, SendAck
from tests.conftest import GochatProcess, create_user, run
from tests.e2e.rawclient import RawClient, connect, send_frame
from tests.e2e.test_cluster_e2e import REDIS_URL, Cluster, wait_until

pytestmark = pytest.mark.e2e

ADMIN_TOKEN = "fanout-operator-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
PASSWORD = "correct horse battery"
BULK = 20_000
ONLINE = 12
SIZES = {"inline": 50, "batched": 300, "sharded": 3_000, "cascaded": 20_000}
ENV = {
    "GOCHAT_MAX_FRAME": str(1 << 20),
    "GOCHAT_MAX_GROUP_MEMBERS": "60000",
    "GOCHAT_ADMIN_TOKEN": ADMIN_TOKEN,
    # a stream job taken by a dead node is re-claimed after 1 s (default 5 s)
    "GOCHAT_FANOUT_CLAIM_IDLE_MS": "1000",
}


@dataclass
class Online:
    user_id: int
    token: str
    node: int  # index of the node its sessions connect to


@dataclass
class Fixture:
    cluster: Cluster
    ids: list[int]  # every bulk user, ascending
    online: list[Online]
    groups: dict[str, int] = field(default_factory=dict)  # tier -> group id

    def node(self, i: int) -> GochatProcess:
        return self.cluster.nodes[i]


async def _bulk_users(c: Cluster, n: int, prefix: str) -> list[int]:
    pw = hash_password(PASSWORD)
    pg = await asyncpg.connect(c.pg_dsn)
    try:
        rows = await pg.fetch(
            f'INSERT INTO "{c.schema}".users (username, password_hash, created_ms) '
            f"SELECT $1 || g, $2, 0 FROM generate_series(1, $3) g RETURNING user_id",
            prefix, pw, n,
        )
    finally:
        await pg.close()
    return sorted(int(r[0]) for r in rows)


async def _login(http_url: str, username: str) -> str:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{http_url}/v1/auth/login", json={"username": username, "password": PASSWORD}) as r:
            assert r.status == 200, await r.text()
            return str((await r.json())["access_token"])


async def _create_group(ws_url: str, token: str, members: list[int]) -> int:
    c = await online_client(ws_url, token)
    try:
        c.send(Call("group.create", orjson.dumps({"name": f"g{len(members)}", "members": members}), rid=1))
        res = await c.expect(CallResult, skip=(Event,), timeout=60)
        return int(orjson.loads(res.payload)["group_id"])
    finally:
        c.close()


async def online_client(ws_url: str, token: str) -> RawClient:
    c = await connect(ws_url, token)
    await c.expect(AuthOk)
    return c


def _members(fx: Fixture, size: int) -> list[int]:
    """``size`` members (the owner, fx.online[0], included) spread over the id range, every
    online user among them: the sharded tier's shards (of sorted ids) each hold some."""
    online = {o.user_id for o in fx.online}
    rest = [u for u in fx.ids if u not in online]
    need = size - len(online)
    step = max(1, len(rest) // need)
    others = sorted(online - {fx.online[0].user_id}) + rest[::step][:need]
    assert len(others) == size - 1
    return others


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fixture]:
    c = Cluster(tmp_path_factory.mktemp("fanout"), REDIS_URL, env=ENV)
    try:
        c.start()

        async def setup() -> Fixture:
            ids = await _bulk_users(c, BULK, "fb")
            # online: every (BULK // ONLINE)-th bulk user, on node k % 3
            picks = [i * (BULK // ONLINE) + 7 for i in range(ONLINE)]
            tokens = await asyncio.gather(*(_login(c.nodes[0].http_url, f"fb{p}") for p in picks))
            online = [Online(ids[p - 1], t, k % 3) for k, (p, t) in enumerate(zip(picks, tokens, strict=True))]
            fx = Fixture(c, ids, online)
            owner = online[0]
            for tier, size in SIZES.items():
                fx.groups[tier] = await _create_group(c.nodes[owner.node].ws_url, owner.token, _members(fx, size))
            return fx

        yield run(setup())
    finally:
        c.stop()


# ---- helpers ----------------------------------------------------------------------------------


async def admin_get(http: aiohttp.ClientSession, url: str, **kw: Any) -> Any:
    async with http.get(url, headers=ADMIN, **kw) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def metric(http: aiohttp.ClientSession, base: str, name: str, labels: str) -> float:
    async with http.get(base + "/metrics") as r:
        text = await r.text()
    sel = re.escape(name) + (re.escape("{" + labels + "}") if labels else "")
    m = re.search(rf"^{sel} (\S+)$", text, re.M)
    assert m is not None, f"{name}{{{labels}}} not exported"
    return float(m.group(1))


async def fanouts(http: aiohttp.ClientSession, base: str) -> dict[str, int]:
    return dict((await admin_get(http, base + "/v1/admin/fanout"))["node"]["fanouts"])


async def connect_all(fx: Fixture, skip_nodes: tuple[int, ...] = ()) -> list[tuple[Online, RawClient]]:
    out = []
    for o in fx.online:
        if o.node not in skip_nodes:
            out.append((o, await online_client(fx.node(o.node).ws_url, o.token)))
    await asyncio.sleep(0.5)  # presence recorded in Redis
    return out


def close_all(clients: list[tuple[Online, RawClient]]) -> None:
    for _, c in clients:
        c.close()


async def receive(c: RawClient, msg_ids: set[int], timeout: float = 30.0) -> Counter[int]:
    """Deliver frames until every one of ``msg_ids`` arrived; counts per msg_id."""
    got: Counter[int] = Counter()
    while not msg_ids <= set(got):
        d = await c.expect(Deliver, skip=(Event, SendAck), timeout=timeout)
        got[d.message.msg_id] += 1
    return got


def leftover_delivers(c: RawClient) -> list[int]:
    out = []
    while not c.frames.empty():
        f = c.frames.get_nowait()
        if isinstance(f, Deliver):
            out.append(f.message.msg_id)
    return out


async def job_complete(http: aiohttp.ClientSession, base: str, job_id: int) -> dict[str, Any]:
    result: dict[str, Any] = {}

    async def done() -> bool:
        async with http.get(f"{base}/v1/admin/fanout/{job_id}", headers=ADMIN) as r:
            if r.status != 200:
                return False
            result.update(await r.json())
        return bool(result["parts_done"] == result["parts_total"] and result["percent"] == 100.0)

    await wait_until(done, timeout=30)
    return result


def ensure_up(fx: Fixture) -> None:
    for node in fx.cluster.nodes:
        if node.proc is None or node.proc.poll() is not None:
            node.start()

    async def three() -> bool:
        async with aiohttp.ClientSession() as http, http.get(f"{fx.node(0).http_url}/v1/gateways") as r:
            return len((await r.json())["gateways"]) == 3

    run(wait_until(three, timeout=20))


# ---- the tests --------------------------------------------------------------------------------


def test_each_tier_reaches_every_online_member_once(fx: Fixture) -> None:
    async def scenario() -> None:
        clients = await connect_all(fx)
        sender_o, sender = clients[1]
        receivers = [c for o, c in clients if o is not sender_o]
        base = fx.node(sender_o.node).http_url
        sent: dict[str, int] = {}
        async with aiohttp.ClientSession() as http:
            for rid, (tier, gid) in enumerate(fx.groups.items(), start=10):
                before = await fanouts(http, base)
                m_before = await metric(http, base, "gochat_fanout_messages_total", f'tier="{tier}"')
                sender.send(send_frame(Kind.GROUP, gid, tier.encode(), rid=rid))
                ack = await sender.expect(SendAck, skip=(Event,), timeout=30)
                sent[tier] = ack.msg_id
                for c in receivers:
                    got = await receive(c, {ack.msg_id})
                    assert got == {ack.msg_id: 1}
                after = await fanouts(http, base)
                # the message's tier moved on the sender's node, and no larger tier did
                moved = {t: after[t] - before[t] for t in after}
                assert moved[tier] == 1, (tier, moved)
                assert all(moved[t] == 0 for t in list(SIZES)[list(SIZES).index(tier) + 1 :]), (tier, moved)
                m_after = await metric(http, base, "gochat_fanout_messages_total", f'tier="{tier}"')
                assert m_after - m_before >= 1
            # the job tiers: a record, complete on every node's view of the admin API
            for tier in ("sharded", "cascaded"):
                for node in fx.cluster.nodes:
                    job = await job_complete(http, node.http_url, sent[tier])
                    assert (job["tier"], job["conv_id"], job["members"]) == (tier, fx.groups[tier], SIZES[tier])
                    assert job["finished_ms"] > 0 and job["delivered"] >= ONLINE - 1
                listed = (await admin_get(http, fx.node(2).http_url + "/v1/admin/fanout", params={"limit": "10"}))["jobs"]
                assert str(sent[tier]) in [j["job_id"] for j in listed]
            for tier in ("inline", "batched"):  # no job record
                async with http.get(f"{base}/v1/admin/fanout/{sent[tier]}", headers=ADMIN) as r:
                    assert r.status == 404
        await asyncio.sleep(0.5)
        for o, c in clients:
            assert leftover_delivers(c) == [], o  # exactly once
        close_all(clients)

    run(scenario())


def test_admin_fanout_needs_the_admin_token(fx: Fixture) -> None:
    async def scenario() -> None:
        url = fx.node(0).http_url + "/v1/admin/fanout"
        async with aiohttp.ClientSession() as http:
            async with http.get(url) as r:
                assert r.status == 401
            async with http.get(url, headers={"Authorization": f"Bearer {fx.online[0].token}"}) as r:
                assert r.status == 403
            async with http.get(url + "/12345", headers={"Authorization": f"Bearer {fx.online[0].token}"}) as r:
                assert r.status == 403
            async with http.get(url + "/no-such-job", headers=ADMIN) as r:
                assert r.status == 404
            body = await admin_get(http, url)
            assert set(body["node"]["fanouts"]) == {"inline", "batched", "sharded", "cascaded"}

    run(scenario())


def test_a_hot_reload_changes_the_tier_on_every_node(fx: Fixture) -> None:
    """fanout_inline_max 100 -> 10: the 50-member group's next message is batched, whichever
    node sends it; then back."""

    async def scenario() -> None:
        clients = await connect_all(fx)
        gid = fx.groups["inline"]
        senders = {o.node: (o, c) for o, c in clients}  # one sender per node
        async with aiohttp.ClientSession() as http:
            try:
                async with http.put(fx.node(0).http_url + "/v1/admin/config", json={"fanout_inline_max": 10}, headers=ADMIN) as r:
                    assert r.status == 200, await r.text()

                async def everywhere(value: int) -> bool:
                    for node in fx.cluster.nodes:
                        body = await admin_get(http, node.http_url + "/v1/admin/fanout")
                        if body["node"]["tiers"]["inline_max"] != value:
                            return False
                    return True

                await wait_until(lambda: everywhere(10))
                for rid, (i, (_o, c)) in enumerate(sorted(senders.items()), start=30):
                    base = fx.node(i).http_url
                    before = await fanouts(http, base)
                    c.send(send_frame(Kind.GROUP, gid, b"after reload", rid=rid))
                    ack = await c.expect(SendAck, skip=(Event, Deliver), timeout=30)
                    after = await fanouts(http, base)
                    assert after["batched"] - before["batched"] == 1, (i, before, after)
                    assert after["inline"] == before["inline"], (i, before, after)
                    assert ack.msg_id
            finally:
                async with http.put(fx.node(0).http_url + "/v1/admin/config", json={"fanout_inline_max": 100}, headers=ADMIN) as r:
                    assert r.status == 200, await r.text()
                await wait_until(lambda: everywhere(100))
        close_all(clients)

    run(scenario())


def test_a_node_killed_in_the_middle_of_a_sharded_job(fx: Fixture) -> None:
    """Node B stops (SIGSTOP) with stream jobs of a sharded message assigned to it (its
    blocked XREADGROUP is served by Redis), then dies (SIGKILL): its pending jobs are claimed by
    A or C, and every online member on A and C gets the message, once, through the SDK."""
    ensure_up(fx)
    a, b, c = fx.cluster.nodes
    gid = fx.groups["sharded"]

    async def scenario() -> None:
        raw = await connect_all(fx, skip_nodes=(1,))
        sender_o, sender = raw[0]
        sdk = [
            (o, await Client.connect(fx.node(o.node).ws_url, o.token))
            for o in fx.online if o.node != 1 and o is not sender_o
        ]
        r = aioredis.Redis.from_url(REDIS_URL)
        stream = f"{fx.cluster.prefix}jobs:fanout"
        async with aiohttp.ClientSession() as http:
            b_id = (await admin_get(http, b.http_url + "/v1/admin/fanout"))["node"]["node_id"]
        msg_ids: set[int] = set()
        assert b.proc is not None
        try:
            for attempt in range(5):
                b.proc.send_signal(signal.SIGSTOP)
                sender.send(send_frame(Kind.GROUP, gid, b"sharded %d" % attempt, rid=50 + attempt))
                ack = await sender.expect(SendAck, skip=(Event, Deliver), timeout=30)
                msg_ids.add(ack.msg_id)

                async def b_holds_jobs() -> bool:
                    info: Any = await r.xpending(stream, "fanout")
                    return any(x["name"].decode() == b_id and int(x["pending"]) > 0 for x in info["consumers"])

                try:
                    await wait_until(b_holds_jobs, timeout=3)
                    break
                except AssertionError:
                    # B's read was not blocked in Redis when the jobs came: let it run, try again
                    b.proc.send_signal(signal.SIGCONT)
                    await asyncio.sleep(1.0)
            else:
                raise AssertionError("node B never held a stream job")
            b.kill()  # SIGKILL while stopped, its jobs still pending
            for o, rc in raw:
                if o is not sender_o:
                    got = await receive(rc, msg_ids)
                    assert set(got) == msg_ids, o
            for o, client in sdk:
                seen: Counter[int] = Counter()
                while not msg_ids <= set(seen):
                    item = await client.next_event(30)
                    if isinstance(item, Message) and item.conv_id == gid:
                        seen[item.msg_id] += 1
                assert all(seen[m] == 1 for m in msg_ids), (o, seen)
            async with aiohttp.ClientSession() as http:
                for m in msg_ids:
                    job = await job_complete(http, a.http_url, m)  # B's shards were claimed and done
                    assert job["tier"] == "sharded"
            await asyncio.sleep(0.5)
            for o, client in sdk:
                while client.pending_events():
                    item = await client.next_event(1)
                    assert not (isinstance(item, Message) and item.msg_id in msg_ids), (o, item)
            for o, rc in raw:
                assert [m for m in leftover_delivers(rc) if m in msg_ids] == [], o
        finally:
            if b.proc is not None and b.proc.poll() is None:
                b.proc.send_signal(signal.SIGCONT)
            for _, s in sdk:
                await s.close()
            close_all(raw)
            await r.aclose()

    run(scenario())
    assert c.proc is not None and c.proc.poll() is None


def test_a_node_killed_during_a_cascaded_job(fx: Fixture) -> None:
    """Node C stops before a cascaded message is sent and is killed while the job runs: the
    members on A and B still get it, once."""
    ensure_up(fx)
    c_node = fx.node(2)
    gid = fx.groups["cascaded"]

    async def scenario() -> None:
        raw = await connect_all(fx)
        sender_o, sender = raw[0]
        survivors = [(o, x) for o, x in raw if o.node != 2 and o is not sender_o]
        assert c_node.proc is not None
        c_node.proc.send_signal(signal.SIGSTOP)
        try:
            sender.send(send_frame(Kind.GROUP, gid, b"cascade", rid=70))
            ack = await sender.expect(SendAck, skip=(Event, Deliver), timeout=30)
            for _o, x in survivors[:1]:
                await receive(x, {ack.msg_id})  # the job is under way
            c_node.kill()
            for o, x in survivors[1:]:
                got = await receive(x, {ack.msg_id})
                assert got == {ack.msg_id: 1}, o
            async with aiohttp.ClientSession() as http:
                job = await admin_get(http, f"{fx.node(0).http_url}/v1/admin/fanout/{ack.msg_id}")
                assert job["tier"] == "cascaded" and job["parts_total"] == 3
            await asyncio.sleep(0.5)
            for o, x in survivors:
                assert leftover_delivers(x) == [], o
        finally:
            close_all(raw)

    run(scenario())


# ---- one embedded node ------------------------------------------------------------------------


def test_a_50k_group_on_one_embedded_node_while_direct_traffic_runs(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    node = GochatProcess(data, ENV, name="embedded")
    node.start()

    async def scenario() -> None:
        users = [await create_user(node.http_url, f"e{i}") for i in range(6)]
        db = sqlite3.connect(data / "gochat.db")
        try:
            db.executemany(
                "INSERT INTO users (username, password_hash, created_ms) VALUES (?, 'x', 0)",
                [(f"eb{os.getpid()}x{i}",) for i in range(50_000)],
            )
            db.commit()
            bulk = [r[0] for r in db.execute("SELECT user_id FROM users WHERE username LIKE 'eb%'")]
        finally:
            db.close()
        assert len(bulk) == 50_000
        conns = [await online_client(node.ws_url, u.access_token) for u in users]
        conns[0].send(Call("group.create", orjson.dumps({"name": "huge", "members": bulk + [u.user_id for u in users[1:]]}), rid=1))
        gid = orjson.loads((await conns[0].expect(CallResult, skip=(Event,), timeout=60)).payload)["group_id"]
        # direct traffic: users[4] -> users[5], before, during and after the group message
        talker, listener = conns[4], conns[5]
        n_direct = 300
        for i in range(n_direct // 2):
            talker.send(send_frame(Kind.DIRECT, users[5].user_id, b"d%d" % i, rid=100 + i))
        conns[1].send(send_frame(Kind.GROUP, gid, b"to fifty thousand", rid=5))
        for i in range(n_direct // 2, n_direct):
            talker.send(send_frame(Kind.DIRECT, users[5].user_id, b"d%d" % i, rid=100 + i))
        ack = await conns[1].expect(SendAck, skip=(Event,), timeout=30)
        # every direct message delivered, in order, and the group message too
        bodies: list[bytes] = []
        group_seen = 0
        while len(bodies) < n_direct or not group_seen:
            d = await listener.expect(Deliver, skip=(Event,), timeout=30)
            if d.message.conv_id == gid:
                group_seen += 1
            else:
                bodies.append(d.message.body)
        assert bodies == [b"d%d" % i for i in range(n_direct)]
        for c in (conns[0], conns[2], conns[3], talker):
            got = await receive(c, {ack.msg_id})
            assert got == {ack.msg_id: 1}
        async with aiohttp.ClientSession() as http:
            job = await job_complete(http, node.http_url, ack.msg_id)
            assert (job["tier"], job["members"], job["parts_total"]) == ("cascaded", 50_006, 1)
            st = (await admin_get(http, node.http_url + "/v1/admin/fanout"))["node"]
            assert st["fanouts"]["cascaded"] == 1 and st["local_jobs"]["shed"] == 0
            chunks = await metric(http, node.http_url, "gochat_fanout_local_chunks_total", "")
            assert chunks >= 50  # 50,006 recipients, fanout_chunk 1000 per turn
        await asyncio.sleep(0.3)
        for c in conns:
            assert ack.msg_id not in leftover_delivers(c)
        for c in conns:
            c.close()

    try:
        run(scenario())
    finally:
        node.stop()
