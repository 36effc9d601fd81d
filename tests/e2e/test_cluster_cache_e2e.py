"""The shared (L2) cache on one real three-node cluster (three ``gochat serve`` processes on real
Redis and PostgreSQL, started as in test_cluster_consistency_e2e.py with their own PostgreSQL
schema and Redis key prefix, both dropped afterwards), seen from outside: by clients over the
wire protocol, node B's ``/metrics`` and the keys in Redis.

- node B serves a member list node A wrote to L2: after A adds a member, B's next lookup of the
  group is an L2 hit (no L2 miss, no stale entry), and Redis holds the list at version 2;
- after every key of the cluster is deleted from Redis (what a FLUSH does to it), membership
  changes, SENDs and ``user.get`` go on working on every node (the store answers, L2 refills).
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from gochat.cluster.shared_cache import unpack_members
from gochat.errors import ErrorCode
from gochat.protocol import Kind
from gochat.protocol.frames import AuthOk, Call, CallResult, Error, Frame, SendAck
from tests.conftest import GochatProcess, UserCtx, create_user, drop_redis_keys, run
from tests.e2e.rawclient import RawClient, connect, send_frame
from tests.e2e.test_cluster_e2e import REDIS_URL, Cluster

pytestmark = pytest.mark.e2e

#: a convergence that takes longer fails the test (the target is well under a second)
BOUND_S = 10.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(Path(tmp_path_factory.mktemp("cache")), REDIS_URL)
    try:
        c.start()
        yield c
    finally:
        c.stop()


class Peer:
    """A connection whose replies are matched to requests by rid (pushed frames are dropped)."""

    def __init__(self, raw: RawClient) -> None:
        self.raw = raw
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._rids = itertools.count(100)
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        while True:
            f = await self.raw.frames.get()
            rid = getattr(f, "rid", 0)
            fut = self._waiting.pop(rid, None) if rid else None
            if fut is not None and not fut.done():
                fut.set_result(f)

    async def request(self, frame: Frame) -> Any:
        rid = next(self._rids)
        frame.rid = rid  # type: ignore[union-attr]
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        self.raw.send(frame)
        return await asyncio.wait_for(fut, 10)

    async def send(self, gid: int, body: bytes) -> Any:
        return await self.request(send_frame(Kind.GROUP, gid, body, rid=0))

    async def call(self, method: str, params: dict[str, Any]) -> Any:
        r = await self.request(Call(method, orjson.dumps(params)))
        return orjson.loads(r.payload) if isinstance(r, CallResult) else r

    async def close(self) -> None:
        self._reader.cancel()
        self.raw.close()


async def peer(node: GochatProcess, user: UserCtx) -> Peer:
    raw = await connect(node.ws_url, user.access_token)
    await raw.expect(AuthOk)
    return Peer(raw)


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> float:
    start = time.monotonic()
    while not await check():
        assert time.monotonic() - start < BOUND_S, f"{what}: not within {BOUND_S} s"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def shared_counters(node: GochatProcess, cache: str = "group_members") -> dict[str, float]:
    async with aiohttp.ClientSession() as http, http.get(f"{node.http_url}/metrics") as r:
        text = await r.text()
    pattern = rf'^gochat_shared_cache_(\w+)_total{{cache="{cache}"}} (\S+)$'
    return {m[1]: float(m[2]) for m in re.finditer(pattern, text, re.M)}


async def acked(p: Peer, gid: int, body: bytes) -> bool:
    r = await p.send(gid, body)
    assert isinstance(r, SendAck) or (isinstance(r, Error) and r.code == ErrorCode.NOT_MEMBER), r
    return isinstance(r, SendAck)


async def flush_cluster_keys(prefix: str) -> int:
    """Delete every key of the cluster from Redis: a FLUSH as far as the cluster can tell (the
    server is shared with other tests, so never FLUSHALL)."""
    return await drop_redis_keys(REDIS_URL, prefix)


async def l2_members(prefix: str, gid: int) -> tuple[int, tuple[int, ...]] | None:
    r = aioredis.Redis.from_url(REDIS_URL)
    try:
        raw = await r.hgetall(f"{prefix}cache:members:{gid}")
    finally:
        await r.aclose()
    return (int(raw[b"v"]), unpack_members(raw[b"d"])) if raw else None


def test_node_b_serves_a_member_list_node_a_wrote_to_l2(cluster: Cluster) -> None:
    a, b, _c = cluster.nodes

    async def scenario() -> None:
        owner_u, carol_u, dave_u = [await create_user(a.http_url, n) for n in ("owner", "carol", "dave")]
        owner, carol, dave = await peer(a, owner_u), await peer(b, carol_u), await peer(b, dave_u)
        res = await owner.call("group.create", {"name": "l2", "members": [carol_u.user_id]})
        gid = int(res["group_id"])
        assert await acked(carol, gid, b"first")  # node B reads the group (its first read: the store)
        assert not await acked(dave, gid, b"not yet")
        before = await shared_counters(b)

        assert await owner.call("group.add", {"group_id": gid, "user_id": dave_u.user_id}) == {"added": True}
        seen = await eventually(lambda: acked(dave, gid, b"in"), "dave's SEND on B")
        print(f"\n[cache e2e] member added on A, served on B from L2 after {seen * 1000:.0f} ms")
        after = await shared_counters(b)
        assert after["hits"] - before["hits"] == 1, (before, after)
        assert after["misses"] == before["misses"] and after["stale"] == before["stale"], (before, after)
        assert after["errors"] == 0
        members = tuple(sorted((owner_u.user_id, carol_u.user_id, dave_u.user_id)))
        assert await l2_members(cluster.prefix, gid) == (2, members)
        for p in (owner, carol, dave):
            await p.close()

    run(scenario())


def test_after_a_redis_flush_everything_still_works(cluster: Cluster) -> None:
    a, b, c = cluster.nodes

    async def scenario() -> None:
        owner_u, carol_u, erin_u = [await create_user(n.http_url, name) for n, name in ((a, "owner"), (b, "carol"), (c, "erin"))]
        owner, carol_b, erin_c = await peer(a, owner_u), await peer(b, carol_u), await peer(c, erin_u)
        res = await owner.call("group.create", {"name": "flush", "members": [carol_u.user_id]})
        gid = int(res["group_id"])
        assert await acked(carol_b, gid, b"before")
        assert (await carol_b.call("user.get", {"user_id": erin_u.user_id}))["username"] == erin_u.username
        assert await l2_members(cluster.prefix, gid) is not None

        assert await flush_cluster_keys(cluster.prefix) > 0
        assert await l2_members(cluster.prefix, gid) is None

        # a membership change after the flush: the lock, the store, the event bus (which the
        # nodes rebuild from) and L2 (empty: the store answers) all work again
        added = await owner.call("group.add", {"group_id": gid, "user_id": erin_u.user_id})
        assert added == {"added": True}, added
        took = await eventually(lambda: acked(erin_c, gid, b"erin after the flush"), "erin's SEND on C")
        print(f"\n[cache e2e] after the flush, a member added on A is accepted on C after {took * 1000:.0f} ms")
        assert await acked(carol_b, gid, b"carol after the flush")
        assert (await erin_c.call("user.get", {"user_id": carol_u.user_id}))["username"] == carol_u.username
        assert (await carol_b.call("user.get", {"user_id": owner_u.user_id}))["username"] == owner_u.username
        entry = await l2_members(cluster.prefix, gid)
        assert entry == (2, tuple(sorted((owner_u.user_id, carol_u.user_id, erin_u.user_id))))
        for node in (a, b, c):
            assert (await shared_counters(node)).get("errors", 0) == 0  # a flush is not an outage
        for p in (owner, carol_b, erin_c):
            await p.close()

    run(scenario())
