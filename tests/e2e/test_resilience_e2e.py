"""Fault injection end to end (issue #16): real ``gochat serve`` nodes in cluster mode with
PostgreSQL and Redis each behind a fault-injecting proxy (``tests/tcpproxy.py``), one node and
three nodes (one module-scoped cluster per topology, own PostgreSQL schema and Redis prefix).

Faults, each on PostgreSQL and on Redis, each on one node and on three: 2 s added latency,
dropped connections, a dead backend (connections reset, new ones refused), a blackhole
(connections accepted, nothing ever answered), flapping (down and up every 2 s). In every case,
while users on every node send continuously to a direct peer and to a group (retrying each
retryable error with the same client_msg_id, as clients do) and read (HISTORY, CALL):

- the dependency's breaker opens within its window (``GET /v1/admin/breakers``) when the fault
  makes it unusable (every fault but a one-off drop), and the sessions get EVENT DEGRADED with
  its switches (PostgreSQL: read_only|cache_only; Redis: non_core_off);
- every request is answered within ``ANSWER_BOUND_S`` (15 s: the store's 10 s command timeout
  plus a margin) with a result or a retryable error carrying ``retry_after_ms``: never a hang;
  while the postgres breaker is open SEND is refused with 504 READ_ONLY and HISTORY is answered
  from the node's cache (PARTIAL; what it returned is what was stored); no node process dies
  and each answers /healthz and /readiness (with its breakers and switches);
- once the fault clears, service returns by itself: a SEND is acknowledged again within
  ``open_s`` + ``RECOVERY_MARGIN_S``, the breakers close and DEGRADED 0 reaches every session;
- nothing acknowledged is lost or duplicated: after recovery every acknowledged msg_id is in
  HISTORY exactly once, no client_msg_id is stored twice, seqs are 1..n, no connection got the
  same DELIVER twice.

The breakers run with short settings (window 3 s, 5 calls, open 1 s, slow call 1 s) so that a
case takes seconds. The operator side (admin API: forced breakers and switches) is checked
once, on three nodes. Measured times are printed (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bench.chaos import (
    ADMIN_TOKEN,
    ANSWER_BOUND_S,
    FAST_BREAKERS,
    READ_ONLY,
    Answers,
    Msg,
    Peer,
    Traffic,
    account,
    backend_address,
    conv_key,
    proxied_url,
    read_conversation,
    send_reliably,
)
from gochat.errors import ErrorCode
from gochat.protocol import FLAG_BACKWARD, FLAG_PARTIAL, Kind
from gochat.protocol.frames import Error, History, HistoryResult, Send, SendAck
from tests.conftest import UserCtx, create_user, run
from tests.e2e.test_cluster_e2e import PG_DSN, REDIS_URL, Cluster
from tests.tcpproxy import ProxyHandle, ProxyThread

pytestmark = pytest.mark.e2e

OPEN_S = float(FAST_BREAKERS["GOCHAT_BREAKER_OPEN_S"])
#: service returns within open_s plus this once a fault clears
RECOVERY_MARGIN_S = 10.0
#: the switches each backend's breaker turns on (EVENT DEGRADED bits)
SWITCHES = {"postgres": 1 | 2, "redis": 4}
#: retryable answers a client may get while a backend is faulty
RETRYABLE = {int(ErrorCode.UNAVAILABLE), int(ErrorCode.OVERLOADED), READ_ONLY}
#: added latency: every chunk held this long each way, so a round trip takes 2 s longer
LATENCY_ONE_WAY_S = 1.0
FLAP_PERIOD_S = 4.0
#: a fault's time to open its breaker, at most (from the fault's start): a blackhole is only
#: noticed by timeouts (PostgreSQL's command timeout 10 s, Redis' operation timeout 11 s)
OPEN_BOUND_S = {"latency": 20.0, "drop": 0.0, "dead": 8.0, "blackhole": 25.0, "flap": 12.0}
#: how long a fault is held after its breaker opened (a one-off drop: repeated for this long)
HOLD_S = 2.0


@dataclass
class Topology:
    n: int
    cluster: Cluster
    pg: ProxyHandle
    redis: ProxyHandle

    def proxy(self, backend: str) -> ProxyHandle:
        return self.pg if backend == "postgres" else self.redis


class Topologies:
    """One topology at a time for the module: asking for another stops the current one (two
    idle clusters would only compete for this machine's two cores)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.current: Topology | None = None
        self._proxies: ProxyThread | None = None
        self._cluster: Cluster | None = None

    def get(self, n: int) -> Topology:
        if self.current is not None and self.current.n == n:
            return self.current
        self.close()
        self._proxies = proxies = ProxyThread()
        pg = proxies.add(*backend_address(PG_DSN, 5432))
        rd = proxies.add(*backend_address(REDIS_URL, 6379))
        env = {**FAST_BREAKERS, "GOCHAT_ADMIN_TOKEN": ADMIN_TOKEN, "GOCHAT_RATE_LIMIT_PER_S": "10000",
               "GOCHAT_RATE_LIMIT_BURST": "10000"}
        self._cluster = Cluster(self.root / f"nodes{n}", proxied_url(REDIS_URL, rd.port), n=n,
                                pg_dsn=proxied_url(PG_DSN, pg.port), env=env)
        self._cluster.start()
        self.current = Topology(n, self._cluster, pg, rd)
        return self.current

    def close(self) -> None:
        if self.current is not None:
            self.current.pg.restore()
            self.current.redis.restore()
        if self._cluster is not None:
            self._cluster.stop()
        if self._proxies is not None:
            self._proxies.close()
        self.current = self._cluster = self._proxies = None


@pytest.fixture(scope="module")
def topologies(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topologies]:
    t = Topologies(Path(tmp_path_factory.mktemp("resilience")))
    try:
        yield t
    finally:
        t.close()


def report(what: str, seconds: float | None) -> None:
    shown = "never" if seconds is None else f"{seconds:.2f} s"
    print(f"\n[resilience e2e] {what}: {shown}")


# ---- the nodes as an operator sees them -------------------------------------------------------------
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def breakers(http: aiohttp.ClientSession, http_url: str) -> dict[str, dict[str, Any]]:
    async with http.get(f"{http_url}/v1/admin/breakers", headers=ADMIN, timeout=aiohttp.ClientTimeout(total=5)) as r:
        assert r.status == 200, await r.text()
        return {b["name"]: b for b in (await r.json())["breakers"]}


async def wait_for(
    check: Callable[[], Awaitable[bool]], bound_s: float, what: str | Callable[[], str], interval: float = 0.1
) -> float:
    """Seconds until ``await check()`` is true; fails past ``bound_s``."""
    start = time.monotonic()
    while True:
        if await check():
            return time.monotonic() - start
        if time.monotonic() - start >= bound_s:
            raise AssertionError(f"{what if isinstance(what, str) else what()}: not within {bound_s:g} s")
        await asyncio.sleep(interval)


def holds(predicate: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return predicate()

    return check


def send_frame(kind: int, conv_id: int, body: bytes) -> Send:
    """A SEND not accounted for (the admin test's)."""
    return Send(kind, 1, conv_id, os.urandom(16), body)


async def all_closed(http: aiohttp.ClientSession, topo: Topology) -> bool:
    for node in topo.cluster.nodes:
        if any(b["state"] != "closed" for b in (await breakers(http, node.http_url)).values()):
            return False
    return True


async def healthy_nodes(http: aiohttp.ClientSession, topo: Topology) -> None:
    """Every node process runs and answers /healthz, and /readiness with its breakers and
    degradation switches."""
    for node in topo.cluster.nodes:
        assert node.proc is not None and node.proc.poll() is None, f"{node.log_path.name}: the node died"
        async with http.get(f"{node.http_url}/healthz", timeout=aiohttp.ClientTimeout(total=5)) as r:
            assert r.status == 200
        async with http.get(f"{node.http_url}/readiness", timeout=aiohttp.ClientTimeout(total=10)) as r:
            checks = (await r.json())["checks"]
        assert "breaker:postgres" in checks and "breaker:redis" in checks and "degraded" in checks, checks


async def calm(http: aiohttp.ClientSession, topo: Topology) -> None:
    """The proxies carry bytes again and every breaker is closed (a case starts from here)."""
    topo.pg.restore()
    topo.redis.restore()
    await wait_for(lambda: all_closed(http, topo), 20, "every breaker closed before the case")


# ---- users, connections, conversations -----------------------------------------------------------------
@dataclass
class Scene:
    users: list[UserCtx]
    peers: list[Peer]
    gid: int
    #: (kind, conv_id) each peer sends to: a direct peer and the group
    targets: list[list[tuple[int, int]]]
    members: dict[tuple[int, int, int], set[int]]

    def close(self) -> None:
        for p in self.peers:
            p.close()


async def scene(topo: Topology, tag: str) -> Scene:
    """Three users, user i connected to node i mod n; one group of the three."""
    nodes = topo.cluster.nodes
    users = [await create_user(nodes[0].http_url, f"{tag}{i}") for i in range(3)]
    peers = [Peer(f"{tag}{i}", u.user_id, u.access_token, nodes[i % topo.n].ws_url) for i, u in enumerate(users)]
    for p in peers:
        await p.connect()
    res = await peers[0].call("group.create", {"name": tag, "members": [u.user_id for u in users[1:]]})
    assert isinstance(res, dict), res
    gid = int(res["group_id"])
    members = {conv_key(Kind.GROUP, 0, gid): {u.user_id for u in users}}
    targets = []
    for i, u in enumerate(users):
        other = users[(i + 1) % 3].user_id
        targets.append([(Kind.DIRECT, other), (Kind.GROUP, gid)])
        members[conv_key(Kind.DIRECT, u.user_id, other)] = {u.user_id, other}
    await asyncio.sleep(0.3)  # presence recorded in Redis
    return Scene(users, peers, gid, targets, members)


async def histories(sc: Scene) -> dict[tuple[int, int, int], list[Any]]:
    out = {}
    for key in sc.members:
        kind, a, b = key
        if kind == Kind.GROUP:
            out[key] = await read_conversation(sc.peers[0], kind, a)
        else:
            reader = next(p for p in sc.peers if p.user_id == a)
            out[key] = await read_conversation(reader, kind, b)
    return out


def check_accounting(traffic: Traffic, sc: Scene, hist: dict[tuple[int, int, int], list[Any]]) -> dict[str, Any]:
    acc = account(traffic.msgs, hist, sc.members, sc.peers)
    assert acc["unacknowledged"] == 0, "a message was never acknowledged after recovery"
    assert acc["lost"] == 0, acc["details"]["lost"]
    assert acc["duplicated_stored"] == 0, acc["details"]["duplicated_stored"]
    assert acc["duplicated_delivered"] == 0, acc["details"]["duplicated_delivered"]
    assert acc["seq_gaps"] == 0, acc["details"]["seq_gaps"]
    assert acc["stored_foreign"] == 0
    assert acc["deliver_out_of_order"] == 0
    return acc


def degraded_seen(sc: Scene, since: float) -> str:
    return "; ".join(f"{p.name}: {[(round(t - since, 2), v) for t, v in p.degraded]}" for p in sc.peers)


def check_answers(answers: Answers) -> None:
    assert not answers.unanswered, f"requests not answered within {ANSWER_BOUND_S:g} s: {answers.unanswered[:5]}"
    assert answers.slowest_s <= ANSWER_BOUND_S
    assert not answers.bad, answers.bad[:5]
    codes = {code for _, code in answers.errors}
    assert codes <= RETRYABLE, f"unexpected error codes {codes - RETRYABLE}"


# ---- the cases ---------------------------------------------------------------------------------------
FAULTS = ("latency", "drop", "dead", "blackhole", "flap")


def apply(proxy: ProxyHandle, fault: str) -> None:
    if fault == "latency":
        proxy.delay(LATENCY_ONE_WAY_S)
    elif fault == "drop":
        proxy.drop()
    elif fault == "dead":
        proxy.cut(reset=True)
    elif fault == "blackhole":
        proxy.cut()
    elif fault == "flap":
        proxy.flap(FLAP_PERIOD_S)


#: (nodes, backend, fault): every fault on each backend, on one node and on three (the breakers
#: are per node; three nodes add cross-node delivery through Redis and the event bus)
CASES = [
    (nodes, backend, fault)
    for nodes in (1, 3)
    for backend in ("postgres", "redis")
    for fault in ("latency", "drop", "dead", "blackhole", "flap")
]


@pytest.mark.timeout(150)
@pytest.mark.parametrize("nodes, backend, fault", CASES, ids=[f"{n}node-{b}-{f}" for n, b, f in CASES])
def test_fault(topologies: Topologies, nodes: int, backend: str, fault: str) -> None:
    topo = topologies.get(nodes)
    proxy = topo.proxy(backend)
    name = f"{topo.n} node(s), {backend} {fault}"

    async def scenario() -> None:
        async with aiohttp.ClientSession() as http:
            await calm(http, topo)
            sc = await scene(topo, f"{backend[:2]}{fault[:3]}")
            traffic = Traffic()
            try:
                await body(http, sc, traffic)
            finally:
                traffic.give_up = traffic.stop_sending = True
                await asyncio.gather(*traffic.tasks, return_exceptions=True)
                sc.close()
                proxy.restore()

    async def body(http: aiohttp.ClientSession, sc: Scene, traffic: Traffic) -> None:
        partial_pages: list[HistoryResult] = []
        before = {n.http_url: (await breakers(http, n.http_url))[backend]["state_changes"] for n in topo.cluster.nodes}
        for p, targets in zip(sc.peers, sc.targets, strict=True):
            traffic.start_sender(p, targets, window=4, interval=0.1)
        for p in sc.peers:  # reads from many clients: each one's own request, not one after the other
            traffic.start_reader(p, Kind.GROUP, sc.gid, every_s=0.3, concurrent=True,
                                 presence_of=[u.user_id for u in sc.users])
        healthy = await traffic.first_ack_after(time.monotonic(), 10)
        assert healthy is not None, "no SEND acknowledged before the fault"
        await asyncio.sleep(0.5)

        # ---- the fault
        started = time.monotonic()
        apply(proxy, fault)
        if fault == "drop":
            # a one-off: every connection aborted, again every 0.3 s for HOLD_S; nothing is
            # unusable for long, so the breaker need not open; the answers are checked below
            while time.monotonic() - started < HOLD_S:
                await asyncio.sleep(0.3)
                proxy.drop()
        else:

            async def opened_everywhere() -> bool:
                for n in topo.cluster.nodes:
                    b = (await breakers(http, n.http_url))[backend]
                    if b["state"] == "closed" and b["state_changes"] == before[n.http_url]:
                        return False
                return True

            took = await wait_for(opened_everywhere, OPEN_BOUND_S[fault], f"{backend} breaker opens on every node")
            report(f"{name}: {backend} breaker open on every node after", took)
            bits = SWITCHES[backend]

            degraded_everywhere = holds(lambda: all(any(v & bits == bits for _, v in p.degraded) for p in sc.peers))
            await wait_for(degraded_everywhere, 5,
                           lambda: f"EVENT DEGRADED with the switches on every session ({degraded_seen(sc, started)})")
            if backend == "postgres" and fault != "flap":
                # read-only while the breaker is not closed: a SEND is refused at once with 504
                # (and sent again with the same client_msg_id once the fault cleared)
                refused = Msg(sc.peers[0], *sc.targets[0][0], b"while read-only")
                traffic.msgs.append(refused)
                reply = await sc.peers[0].request(Send(refused.kind, 1, refused.conv_id, refused.cmid, refused.body), 5)
                assert isinstance(reply, Error) and reply.code == READ_ONLY and reply.retry_after_ms > 0, reply
                traffic.start_retry(refused)
                # cache-only: HISTORY of the group is answered from what the node delivered, PARTIAL
                page = await sc.peers[1].request(History(Kind.GROUP, sc.gid, 0, 50, flags=FLAG_BACKWARD), 5)
                assert isinstance(page, HistoryResult) and page.flags & FLAG_PARTIAL, page
                partial_pages.append(page)
            await asyncio.sleep(HOLD_S)
            await healthy_nodes(http, topo)  # alive and answering during the fault

        # ---- the fault clears
        proxy.restore()
        cleared = time.monotonic()
        back = await traffic.first_ack_after(cleared, OPEN_S + RECOVERY_MARGIN_S)
        report(f"{name}: a SEND acknowledged again after the fault cleared", back)
        assert back is not None, f"no SEND acknowledged within {OPEN_S + RECOVERY_MARGIN_S:g} s of the fault clearing"
        await wait_for(lambda: all_closed(http, topo), OPEN_S + RECOVERY_MARGIN_S, "every breaker closes")
        report(f"{name}: every breaker closed after", time.monotonic() - cleared)
        if fault != "drop":
            await wait_for(holds(lambda: all(p.degraded_now == 0 for p in sc.peers)), 5,
                           lambda: f"EVENT DEGRADED 0 on every session ({degraded_seen(sc, started)})")
        # a message from each user is acknowledged, and delivered to the others (across nodes)
        await asyncio.sleep(1.0)
        settle = await traffic.finish(30)
        report(f"{name}: every message acknowledged {settle:.2f} s after the load stopped", settle)
        await cross_delivery(sc, traffic)
        await healthy_nodes(http, topo)
        hist = await histories(sc)
        acc = check_accounting(traffic, sc, hist)
        stored = {(m.seq, m.msg_id) for m in hist[conv_key(Kind.GROUP, 0, sc.gid)]}
        for page in partial_pages:  # what the cache answered is what was stored
            assert {(m.seq, m.msg_id) for m in page.messages} <= stored, page
        check_answers(traffic.answers)
        codes = traffic.answers.codes_since(started)
        print(f"[resilience e2e] {name}: {acc['acknowledged']} acknowledged ({acc['duplicate_acks']} as DUPLICATE), "
              f"{acc['stored']} stored, pushed {acc['pushed_unique']}/{acc['pushes_due']}; errors {dict(codes)}")
        if backend == "postgres" and fault in ("dead", "blackhole", "latency"):
            assert codes[READ_ONLY] > 0, "no SEND was answered 504 READ_ONLY while the breaker was open"

    run(scenario())


async def cross_delivery(sc: Scene, traffic: Traffic) -> None:
    """Each user's new message reaches the other members' connections (on other nodes in a
    cluster of three: through Redis), once presence knows every member again (after an outage
    long enough for the registry to lapse, the nodes drop each other's sessions and record their
    own again within a second or two; pushes routed meanwhile are recovered with SYNC after the
    EVENT RESYNC each node then sends: docs/cluster.md, "Failed pushes")."""
    users = {"user_ids": [u.user_id for u in sc.users]}

    async def all_online() -> bool:
        r = await sc.peers[0].call("presence.query", users)
        return not isinstance(r, dict) or all(r["online"].values())  # refused (non-core off): no wait

    await wait_for(all_online, 10, "every member online in presence")
    marks = {p.name: sum(sum(c.values()) for c in p.delivers.values()) for p in sc.peers}
    for p, targets in zip(sc.peers, sc.targets, strict=True):
        msg = Msg(p, *targets[1], b"after recovery")
        traffic.msgs.append(msg)
        assert await asyncio.wait_for(send_reliably(msg, traffic.answers), 30)

    def got() -> dict[str, int]:
        return {p.name: sum(sum(c.values()) for c in p.delivers.values()) - marks[p.name] for p in sc.peers}

    try:
        await wait_for(holds(lambda: min(got().values()) >= 2), 10, lambda: f"group DELIVERs after recovery: {got()}")
    except AssertionError as exc:
        online = await sc.peers[0].call("presence.query", users)
        raise AssertionError(f"{exc}; presence.query says {online}") from None


# ---- the operator's side ------------------------------------------------------------------------------
def test_admin_forces_breakers_and_switches(topologies: Topologies) -> None:
    """The admin API needs the operator credential (a user's token: 403); a forced-open
    postgres breaker makes its node read-only (504 with retry_after_ms, DEGRADED to its
    sessions) until reset; read_only forced through one node's API applies on every node, and
    null hands it back (SENDs acknowledged again)."""
    topo = topologies.get(3)
    nodes = topo.cluster.nodes

    async def scenario() -> None:
        async with aiohttp.ClientSession() as http:
            await calm(http, topo)
            sc = await scene(topo, "admin")
            try:
                user = {"Authorization": f"Bearer {sc.users[0].access_token}"}
                async with http.get(f"{nodes[0].http_url}/v1/admin/breakers", headers=user) as r:
                    assert r.status == 403
                async with http.get(f"{nodes[0].http_url}/v1/admin/breakers") as r:
                    assert r.status == 401
                assert set(await breakers(http, nodes[0].http_url)) >= {"postgres", "redis"}

                async def send(i: int) -> Any:
                    return await sc.peers[i].request(send_frame(*sc.targets[i][0], b"admin"))

                url = f"{nodes[0].http_url}/v1/admin/breakers/postgres"
                async with http.post(url, headers=ADMIN, json={"action": "force_open"}) as r:
                    assert r.status == 200, await r.text()
                    assert (await r.json())["state"] == "forced_open"
                reply = await send(0)
                assert isinstance(reply, Error) and reply.code == READ_ONLY and reply.retry_after_ms > 0, reply
                assert isinstance(await send(1), SendAck)  # breakers are per node
                await wait_for(holds(lambda: sc.peers[0].degraded_now & 1 == 1), 5, "DEGRADED read_only on node 0")
                async with http.post(url, headers=ADMIN, json={"action": "reset"}) as r:
                    assert r.status == 200 and (await r.json())["state"] == "closed"
                assert isinstance(await send(0), SendAck)
                await wait_for(holds(lambda: sc.peers[0].degraded_now == 0), 5, "DEGRADED 0 on node 0")

                deg = f"{nodes[1].http_url}/v1/admin/degradation"
                async with http.put(deg, headers=ADMIN, json={"read_only": True}) as r:
                    assert r.status == 200, await r.text()

                async def read_only_everywhere() -> bool:
                    replies = [await send(i) for i in range(3)]
                    return all(isinstance(x, Error) and x.code == READ_ONLY for x in replies)

                took = await wait_for(read_only_everywhere, 5, "read_only on every node")
                report("admin: read_only set through node 1 applies on every node after", took)
                async with http.put(deg, headers=ADMIN, json={"read_only": None}) as r:
                    assert r.status == 200

                async def acked_everywhere() -> bool:
                    return all(isinstance(x, SendAck) for x in [await send(i) for i in range(3)])

                await wait_for(acked_everywhere, 5, "SENDs acknowledged on every node")
            finally:
                async with http.put(f"{nodes[0].http_url}/v1/admin/degradation", headers=ADMIN,
                                    json={"read_only": None}):
                    pass
                async with http.post(f"{nodes[0].http_url}/v1/admin/breakers/postgres", headers=ADMIN,
                                     json={"action": "reset"}):
                    pass
                sc.close()

    run(scenario())

