"""The shared (L2) cache on three nodes in one process (the harness of
tests/test_event_consistency.py: MessagingCore, Gateway, ClusterLink and event consumer per node,
``memory_backends`` over one MemoryHub, one SQLite store): a change made through the CALL
methods on node A reaches node B's lookup through the bus's invalidation and L2, without a
store read; ``user.get`` is served from L2 on a node that never read the user."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson

from gochat.protocol import Kind, decode
from gochat.protocol.frames import Event, SendAck
from tests.conftest import run
from tests.test_addressing_l2 import count_calls
from tests.test_event_consistency import cluster, until
from tests.test_messaging_core import connect, user


def test_a_change_on_node_a_reaches_node_b_through_l2_without_a_store_read(tmp_path: Path) -> None:
    async def body() -> None:
        async with cluster(tmp_path) as (nodes, store):
            a, b, c = nodes
            auth = a.auth
            (owner, o_tok), (carol, c_tok), (dave, d_tok) = [await user(auth, u) for u in ("owner", "carol", "dave")]
            await connect(a, o_tok)
            _, carol_b = await connect(b, c_tok)
            _, dave_b = await connect(b, d_tok)
            o_conn = a.session_of(owner)
            (res,) = decode(await a.core.calls.call(o_conn, "group.create", b'{"name":"g","members":[%d]}' % carol, 2))
            gid = orjson.loads(res.payload)["group_id"]
            loop = asyncio.get_running_loop()

            # node B reads the group once (its first read after its start-up rebuild: the store)
            b.core.sends.send(b.session_of(carol), 3, Kind.GROUP, 1, gid, b"a" * 16, b"hi", loop.time())
            await carol_b.next(SendAck, skip=(Event,))
            assert b.core.addressing.version(gid) == 1

            calls = count_calls(store)
            assert await a.core.calls.group_add(o_conn, {"group_id": gid, "user_id": dave}) == {"added": True}
            await until(lambda: b.core.addressing.version(gid) == 2 and gid not in b.core.addressing.members_cache)
            hits = b.core.addressing.l2.members_stats.hits
            calls.clear()  # what node A read under the lock is not node B's
            b.core.sends.send(b.session_of(dave), 4, Kind.GROUP, 1, gid, b"b" * 16, b"hi", loop.time())
            ack = await dave_b.next(SendAck, skip=(Event,))
            assert ack.rid == 4
            assert calls["members_versioned"] == 0 and calls["conversation_kind"] == 0
            assert b.core.addressing.l2.members_stats.hits == hits + 1
            assert b.core.addressing.cached_members(gid) == tuple(sorted((owner, carol, dave)))

            # user.get on node C: node B's lookup put the username in L2
            assert (await b.core.calls.user_get(b.session_of(carol), {"user_id": dave}))["username"] == "dave"
            calls.clear()
            got = await c.core.calls.user_get(a.session_of(owner), {"user_id": dave})
            assert got == {"user_id": dave, "username": "dave"}
            assert calls["get_user"] == 0 and c.core.addressing.l2.users_stats.hits == 1

    run(body())
