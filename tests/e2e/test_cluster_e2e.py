"""Cluster mode end to end: three real ``gochat serve`` processes on real Redis and PostgreSQL.

Each test gets its own PostgreSQL schema and Redis key prefix (dropped afterwards). The nodes
share one data directory for the JWT key file, as nodes of one cluster share their key.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis

from gochat.client import Client, GatewayBalancer, Kind
from gochat.client.types import Message
from gochat.errors import ErrorCode
from gochat.protocol import EventType
from gochat.protocol.frames import AuthOk, Deliver, Event, GoAway, SendAck
from tests.conftest import GochatProcess, UserCtx, create_user, restartable_port, run
from tests.e2e.rawclient import RawClient, connect, send_frame

pytestmark = pytest.mark.e2e

PG_DSN = os.environ.get("GOCHAT_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("GOCHAT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


class Cluster:
    def __init__(
        self, root: Path, redis_url: str, n: int = 3, pg_dsn: str = PG_DSN, env: dict[str, str] | None = None
    ) -> None:
        self.root = root
        self.schema = f"t_{uuid.uuid4().hex[:12]}"
        self.prefix = f"gct:{uuid.uuid4().hex[:12]}:"
        self.redis_url = redis_url
        self.pg_dsn = pg_dsn
        data = root / "shared-data"
        data.mkdir(parents=True, exist_ok=True)
        self.env = {
            "GOCHAT_REDIS_URL": redis_url,
            "GOCHAT_POSTGRES_DSN": pg_dsn,
            "GOCHAT_POSTGRES_SCHEMA": self.schema,
            "GOCHAT_REDIS_PREFIX": self.prefix,
            "GOCHAT_REGISTRY_TTL_S": "3",
            "GOCHAT_REGISTRY_RENEW_S": "1",
            "GOCHAT_DRAIN_TIMEOUT_S": "5",
            **(env or {}),
        }
        self.nodes = [GochatProcess(data, self.env, name=f"node{i}") for i in range(n)]

    def migrate(self) -> None:
        r = subprocess.run(
            [sys.executable, "-m", "gochat.cli", "migrate", "--postgres", self.pg_dsn, "--schema", self.schema],
            capture_output=True, text=True, timeout=60,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert "version" in r.stdout

    def start(self) -> None:
        self.migrate()
        for node in self.nodes:
            node.start()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

        async def cleanup() -> None:
            conn = await asyncpg.connect(self.pg_dsn)
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
            finally:
                await conn.close()
            r = aioredis.Redis.from_url(self.redis_url)
            try:
                keys = [k async for k in r.scan_iter(match=f"{self.prefix}*", count=1000)]
                if keys:
                    await r.delete(*keys)
            finally:
                await r.aclose()

        try:
            run(cleanup())
        except (OSError, asyncpg.PostgresError, aioredis.RedisError):
            pass

    @property
    def http_urls(self) -> list[str]:
        return [n.http_url for n in self.nodes if n.proc is not None and n.proc.poll() is None]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, REDIS_URL)
    try:
        c.start()
        yield c
    finally:
        c.stop()


async def online(node: GochatProcess, user: UserCtx) -> RawClient:
    c = await connect(node.ws_url, user.access_token)
    await c.expect(AuthOk)
    return c


async def wait_until(predicate, timeout: float = 10.0, interval: float = 0.1) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(interval)
    raise AssertionError("condition not met in time")


async def gateways(http_url: str) -> list[dict[str, object]]:
    async with aiohttp.ClientSession() as http, http.get(f"{http_url}/v1/gateways") as r:
        return list((await r.json())["gateways"])


def test_direct_and_group_messages_cross_nodes(cluster: Cluster) -> None:
    a_node, b_node, c_node = cluster.nodes

    async def scenario() -> None:
        gws = await gateways(a_node.http_url)
        assert sorted(g["url"] for g in gws) == sorted(n.ws_url for n in cluster.nodes)  # type: ignore[type-var]
        alice = await create_user(a_node.http_url, "alice")
        bob = await create_user(b_node.http_url, "bob")
        carol = await create_user(c_node.http_url, "carol")
        ca, cb, cc = await online(a_node, alice), await online(b_node, bob), await online(c_node, carol)
        # a second device of alice on node C sees her own message too
        ca2 = await online(c_node, alice)
        await asyncio.sleep(0.3)  # presence recorded in Redis
        ca.send(send_frame(Kind.DIRECT, bob.user_id, b"hello across nodes", rid=1))
        ack = await ca.expect(SendAck)
        m = (await cb.expect(Deliver)).message
        assert (m.conv_id, m.seq, m.msg_id, m.body) == (alice.user_id, 1, ack.msg_id, b"hello across nodes")
        mine = (await ca2.expect(Deliver)).message
        assert (mine.conv_id, mine.msg_id) == (bob.user_id, ack.msg_id)
        # group across three nodes
        import orjson

        from gochat.protocol.frames import Call, CallResult

        ca.send(Call("group.create", orjson.dumps({"name": "x", "members": [bob.user_id, carol.user_id]}), rid=2))
        gid = orjson.loads((await ca.expect(CallResult, skip=(Event,))).payload)["group_id"]
        for i in range(5):
            cb.send(send_frame(Kind.GROUP, gid, b"g%d" % i, rid=10 + i))
        for c in (ca, cc, ca2):
            got = [(await c.expect(Deliver, skip=(Event,))).message for _ in range(5)]
            assert [x.seq for x in got] == [1, 2, 3, 4, 5]
            assert [x.body for x in got] == [b"g%d" % i for i in range(5)]

    run(scenario())


def test_logout_is_enforced_on_every_node_within_a_second(cluster: Cluster) -> None:
    a_node, b_node, _ = cluster.nodes

    async def scenario() -> None:
        alice = await create_user(a_node.http_url, "alice")
        c = await online(b_node, alice)
        await asyncio.sleep(0.2)
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{a_node.http_url}/v1/auth/logout", headers={"Authorization": f"Bearer {alice.access_token}"}
            ) as r:
                assert r.status == 204
        # The issue asks for "within a second"; tests assert no timings, so this only bounds
        # the wait (the broadcast takes milliseconds here).
        g = await c.expect(GoAway, timeout=5)
        assert g.code == ErrorCode.TOKEN_REVOKED
        # the token is refused on the third node too
        c3 = await connect(cluster.nodes[2].ws_url, alice.access_token)
        await c3.expect_error(ErrorCode.TOKEN_REVOKED)

    run(scenario())


def test_offline_recovery_across_nodes(cluster: Cluster) -> None:
    a_node, b_node, _ = cluster.nodes

    async def scenario() -> None:
        alice = await create_user(a_node.http_url, "alice")
        bob = await create_user(a_node.http_url, "bob")
        ca = await online(a_node, alice)
        for i in range(20):
            ca.send(send_frame(Kind.DIRECT, bob.user_id, b"m%d" % i, rid=i + 1))
        for _ in range(20):
            await ca.expect(SendAck)
        client = await Client.connect(b_node.ws_url, bob.access_token, resume={})
        got: list[Message] = []
        while len(got) < 20:
            item = await client.next_event(10)
            if isinstance(item, Message):
                got.append(item)
        assert [m.seq for m in got] == list(range(1, 21))
        await client.close()

    run(scenario())


def _collect(client: Client, sink: list[Message], stop: asyncio.Event) -> asyncio.Task[None]:
    async def loop() -> None:
        while not stop.is_set():
            try:
                item = await client.next_event(0.5)
            except TimeoutError:
                continue
            if isinstance(item, Message):
                sink.append(item)

    return asyncio.get_running_loop().create_task(loop())


def test_kill_9_of_a_node_during_continuous_sending_loses_nothing(cluster: Cluster) -> None:
    async def scenario() -> None:
        alice = await create_user(cluster.nodes[0].http_url, "alice")
        bob = await create_user(cluster.nodes[0].http_url, "bob")
        sender = await Client.connect(
            GatewayBalancer(cluster.http_urls, "round_robin", refresh_s=0.5), alice.access_token
        )
        receiver = await Client.connect(
            GatewayBalancer(cluster.http_urls, "least_connections", refresh_s=0.5), bob.access_token, resume={}
        )
        victim = next(n for n in cluster.nodes if n.ws_url == receiver.url)
        got: list[Message] = []
        stop = asyncio.Event()
        collector = _collect(receiver, got, stop)
        acks = []
        for i in range(150):
            acks.append(await sender.send(Kind.DIRECT, bob.user_id, b"n%03d" % i, timeout=30))
            if i == 50:
                victim.kill()
        deadline = time.monotonic() + 30
        while len(got) < 150 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        stop.set()
        await collector
        assert [m.seq for m in got] == list(range(1, 151)), "exactly once, in order"
        assert [m.body for m in got] == [b"n%03d" % i for i in range(150)]
        assert sorted(a.seq for a in acks) == list(range(1, 151))
        assert receiver.url != victim.ws_url
        await sender.close()
        await receiver.close()

    run(scenario())


def test_sigterm_drains_and_clients_move_without_loss(cluster: Cluster) -> None:
    async def scenario() -> None:
        alice = await create_user(cluster.nodes[0].http_url, "alice")
        bob = await create_user(cluster.nodes[0].http_url, "bob")
        receiver = await Client.connect(
            GatewayBalancer(cluster.http_urls, "round_robin", refresh_s=0.5), bob.access_token, resume={}
        )
        victim = next(n for n in cluster.nodes if n.ws_url == receiver.url)
        other = next(n for n in cluster.nodes if n is not victim)
        sender = await Client.connect(other.ws_url, alice.access_token)
        got: list[Message] = []
        stop = asyncio.Event()
        collector = _collect(receiver, got, stop)
        loop = asyncio.get_running_loop()
        drained = None
        for i in range(60):
            await sender.send(Kind.DIRECT, bob.user_id, b"d%02d" % i, timeout=30)
            if i == 20:
                drained = loop.run_in_executor(None, victim.terminate)
        assert drained is not None and await drained == 0
        deadline = time.monotonic() + 20
        while len(got) < 60 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        stop.set()
        await collector
        assert [m.seq for m in got] == list(range(1, 61))
        assert receiver.last_goaway is not None and receiver.last_goaway.code == ErrorCode.SHUTTING_DOWN
        gws = await gateways(other.http_url)
        assert victim.ws_url not in {g["url"] for g in gws}
        await sender.close()
        await receiver.close()

    run(scenario())


def test_dead_node_leaves_the_directory(cluster: Cluster) -> None:
    async def scenario() -> None:
        victim = cluster.nodes[2]
        victim.kill()

        async def gone() -> bool:
            return victim.ws_url not in {g["url"] for g in await gateways(cluster.nodes[0].http_url)}

        await wait_until(gone, timeout=10)

    run(scenario())


# ---- outages ------------------------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """A redis-server of our own, so a test can restart it without touching the shared one."""

    def __init__(self) -> None:
        self.port = restartable_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        import socket

        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("private redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def test_redis_restart_nodes_recover_by_themselves(tmp_path: Path) -> None:
    redis_server = PrivateRedis()
    redis_server.start()
    cluster = Cluster(tmp_path, redis_server.url, n=2)
    try:
        cluster.start()
        a_node, b_node = cluster.nodes

        async def before_and_after() -> None:
            alice = await create_user(a_node.http_url, "alice")
            bob = await create_user(a_node.http_url, "bob")
            ca, cb = await online(a_node, alice), await online(b_node, bob)
            await asyncio.sleep(0.3)
            ca.send(send_frame(Kind.DIRECT, bob.user_id, b"before", rid=1))
            await ca.expect(SendAck)
            assert (await cb.expect(Deliver)).message.body == b"before"
            # restart Redis: it comes back empty (no persistence)
            redis_server.stop()
            await asyncio.sleep(0.5)
            redis_server.start()

            async def both_registered() -> bool:
                try:
                    return len(await gateways(a_node.http_url)) == 2
                except (aiohttp.ClientError, KeyError):
                    return False

            await wait_until(both_registered, timeout=15)

            resyncs: list[Event] = []

            async def delivered() -> bool:
                ca.send(send_frame(Kind.DIRECT, bob.user_id, b"after", rid=2))
                await ca.expect(SendAck, skip=(Event,))
                while True:  # EVENT RESYNC (pushes may have been lost meanwhile) may come first
                    try:
                        f = await cb.recv(1)
                    except TimeoutError:
                        return False
                    if isinstance(f, Event) and f.type == EventType.RESYNC:
                        resyncs.append(f)
                    elif isinstance(f, Deliver):
                        return bool(f.message.body == b"after")

            await wait_until(delivered, timeout=20, interval=0.5)
            # each node's subscription was cut and restored: its sessions were told to SYNC
            # (docs/cluster.md, "Failed pushes")
            while not resyncs:
                f = await cb.recv(5)
                if isinstance(f, Event) and f.type == EventType.RESYNC:
                    resyncs.append(f)

        run(before_and_after())
    finally:
        cluster.stop()
        redis_server.stop()


class ThreadedProxy:
    """tests.tcpproxy.TcpProxy on its own event loop in a thread, so it outlives the test's
    short-lived loops and serves the node subprocesses all along."""

    def __init__(self, host: str, port: int) -> None:
        import threading

        from tests.tcpproxy import TcpProxy

        self.loop = asyncio.new_event_loop()
        self.proxy = TcpProxy(host, port)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.proxy.start(), self.loop).result(5)

    def call(self, fn, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        done = asyncio.run_coroutine_threadsafe(self._call(fn, *args, **kwargs), self.loop)
        done.result(5)

    async def _call(self, fn, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        fn(*args, **kwargs)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.proxy.close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def test_postgres_outage_gives_retryable_errors_and_recovers(tmp_path: Path) -> None:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(PG_DSN)
    proxy = ThreadedProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    netloc = f"{parts.username + '@' if parts.username else ''}127.0.0.1:{proxy.proxy.port}"
    proxied = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    cluster = Cluster(tmp_path, REDIS_URL, n=2, pg_dsn=proxied)
    try:
        cluster.start()
        a_node, b_node = cluster.nodes

        async def scenario() -> None:
            alice = await create_user(a_node.http_url, "alice")
            bob = await create_user(a_node.http_url, "bob")
            ca, cb = await online(a_node, alice), await online(b_node, bob)
            await asyncio.sleep(0.3)
            ca.send(send_frame(Kind.DIRECT, bob.user_id, b"before", rid=1))
            assert (await ca.expect(SendAck)).seq == 1
            await cb.expect(Deliver)
            proxy.call(proxy.proxy.cut, reset=True)
            ca.send(send_frame(Kind.DIRECT, bob.user_id, b"during", rid=2))
            err = await ca.expect_error(ErrorCode.UNAVAILABLE, timeout=30)  # answered, never hangs
            assert err.rid == 2 and err.retry_after_ms > 0
            async with aiohttp.ClientSession() as http, http.get(f"{a_node.http_url}/readiness") as r:
                assert r.status == 503
            await cb.no_frame(0.5)  # nothing delivered that was not stored
            proxy.call(proxy.proxy.restore)

            async def sends_again() -> bool:
                ca.send(send_frame(Kind.DIRECT, bob.user_id, b"after", rid=3))
                f = await ca.recv(15)
                return isinstance(f, SendAck)

            await wait_until(sends_again, timeout=30, interval=1.0)
            from gochat.protocol.frames import History, HistoryResult

            cb.send(History(Kind.DIRECT, alice.user_id, 1, 100, rid=9))
            page = await cb.expect(HistoryResult, skip=(Deliver,))
            bodies = [m.body for m in page.messages]
            assert bodies[0] == b"before" and b"during" not in bodies and b"after" in bodies
            assert [m.seq for m in page.messages] == list(range(1, len(bodies) + 1))

        run(scenario())
    finally:
        cluster.stop()
        proxy.close()


def test_grpc_health_check_and_watch(tmp_path: Path) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port = _free_port()
    node = GochatProcess(tmp_path / "data", {"GOCHAT_GRPC_HEALTH_PORT": str(port)})
    node.start()
    try:

        async def scenario() -> None:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                for service in ("", "gochat"):
                    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
                    assert reply.status == health_pb2.HealthCheckResponse.SERVING
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Check(health_pb2.HealthCheckRequest(service="nope"))
                assert info.value.code() == grpc.StatusCode.NOT_FOUND
                watch = stub.Watch(health_pb2.HealthCheckRequest(service=""))
                first = await watch.read()
                assert first.status == health_pb2.HealthCheckResponse.SERVING
                loop = asyncio.get_running_loop()
                stopping = loop.run_in_executor(None, node.terminate)
                second = await asyncio.wait_for(watch.read(), 10)
                assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
                assert await stopping == 0

        run(scenario())
    finally:
        node.stop()


def test_workers_share_the_ports_as_cluster_nodes(tmp_path: Path) -> None:
    c = Cluster(tmp_path, REDIS_URL, n=0)
    c.migrate()
    ws_port, http_port = _free_port(), _free_port()
    env = dict(os.environ, **c.env, GOCHAT_LOG_LEVEL="INFO")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gochat.cli", "serve", "--data-dir", str(tmp_path / "shared-data"),
         "--ws-port", str(ws_port), "--http-port", str(http_port), "--workers", "2"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:

        async def scenario() -> None:
            http_url = f"http://127.0.0.1:{http_port}"

            async def two_nodes() -> bool:
                try:
                    return len(await gateways(http_url)) == 2
                except (aiohttp.ClientError, KeyError):
                    return False

            await wait_until(two_nodes, timeout=30)
            nodes = await gateways(http_url)
            assert {g["url"] for g in nodes} == {f"ws://127.0.0.1:{ws_port}/ws"}
            assert len({g["node_id"] for g in nodes}) == 2
            alice = await create_user(http_url, "alice")
            bob = await create_user(http_url, "bob")
            # several connections land on both workers; messages cross between them
            conns = [await connect(f"ws://127.0.0.1:{ws_port}/ws", bob.access_token) for _ in range(4)]
            for c2 in conns:
                await c2.expect(AuthOk)
            ca = await online_url(f"ws://127.0.0.1:{ws_port}/ws", alice)
            await asyncio.sleep(0.3)
            ca.send(send_frame(Kind.DIRECT, bob.user_id, b"to every device", rid=1))
            await ca.expect(SendAck)
            for c2 in conns:
                assert (await c2.expect(Deliver)).message.body == b"to every device"

        run(scenario())
        proc.terminate()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        c.stop()


async def online_url(url: str, user: UserCtx) -> RawClient:
    c = await connect(url, user.access_token)
    await c.expect(AuthOk)
    return c


def test_large_group_fans_out_through_stream_jobs(tmp_path: Path) -> None:
    """With the large-group tier at 2 members, a 6-member group's messages go through Redis
    Streams jobs consumed by all nodes; every member on every node still gets each message."""
    env = {
        "GOCHAT_LARGE_GROUP_THRESHOLD": "2",
        # a static threshold (the dynamic one off: min == max) below its default bounds
        "GOCHAT_LARGE_GROUP_THRESHOLD_MIN": "2",
        "GOCHAT_LARGE_GROUP_THRESHOLD_MAX": "2",
        "GOCHAT_FANOUT_SHARD_SIZE": "2",
        "GOCHAT_FANOUT_INLINE_MAX": "1",
    }
    c = Cluster(tmp_path, REDIS_URL, env=env)
    try:
        c.start()

        async def scenario() -> None:
            import orjson

            from gochat.protocol.frames import Call, CallResult

            users = [await create_user(c.nodes[0].http_url, f"lg{i}") for i in range(6)]
            conns = [await online(c.nodes[i % 3], u) for i, u in enumerate(users)]
            await asyncio.sleep(0.3)
            conns[0].send(Call("group.create", orjson.dumps({"name": "big", "members": [u.user_id for u in users[1:]]}), rid=1))
            gid = orjson.loads((await conns[0].expect(CallResult, skip=(Event,))).payload)["group_id"]
            for i in range(3):
                conns[1].send(send_frame(Kind.GROUP, gid, b"big %d" % i, rid=10 + i))
            for conn in conns[:1] + conns[2:]:
                got = sorted([(await conn.expect(Deliver, skip=(Event,), timeout=10)).message.seq for _ in range(3)])
                assert got == [1, 2, 3]
            r = aioredis.Redis.from_url(c.redis_url)
            try:
                assert await r.xlen(f"{c.prefix}jobs:fanout") >= 3
            finally:
                await r.aclose()

        run(scenario())
    finally:
        c.stop()
