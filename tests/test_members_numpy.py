"""The large-group tier's numpy arithmetic (gochat/cluster/members.py) against its pure-Python
reference: the same sorted ids, shards, online members and per-node batches for any member list
(duplicates, empty lists, ids near 2**63 and 2**64), and the same envelope bytes."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gochat.cluster import members as m
from gochat.cluster.envelope import UsersEnvelope, decode_envelope, encode_users

# ids from everywhere in u64, with a bias to a small range (duplicates) and to 2**63
ID = st.one_of(
    st.integers(0, 50),
    st.integers(2**63 - 4, 2**63 + 4),
    st.integers(2**64 - 3, 2**64 - 1),
    st.integers(0, 2**64 - 1),
)
NODES = st.lists(st.sampled_from(["n0", "n1", "n2", "n3"]), max_size=4)


@settings(max_examples=300, deadline=None)
@given(ids=st.lists(ID, max_size=300), shard_size=st.integers(1, 40))
def test_sorted_ids_and_shards_match_python(ids: list[int], shard_size: int) -> None:
    arr = m.as_sorted_ids(ids)
    ref = m.py_sorted_ids(ids)
    assert arr.dtype == np.uint64
    assert arr.tolist() == ref
    assert [s.tolist() for s in m.shards(arr, shard_size)] == m.py_shards(ref, shard_size)


@settings(max_examples=300, deadline=None)
@given(ids=st.lists(ID, max_size=300), online=st.lists(ID, max_size=300))
def test_intersect_online_matches_python(ids: list[int], online: list[int]) -> None:
    got = m.intersect_online(m.as_sorted_ids(ids), m.as_sorted_ids(online))
    assert got.tolist() == m.py_intersect_online(m.py_sorted_ids(ids), set(online))


@settings(max_examples=300, deadline=None)
@given(ids=st.lists(ID, max_size=200), where=st.dictionaries(ID, NODES, max_size=200), extra=st.lists(ID, max_size=50))
def test_split_by_node_matches_python(ids: list[int], where: dict[int, list[str]], extra: list[int]) -> None:
    ref_ids = m.py_sorted_ids(ids)
    # users online but not in the group, and members online on several nodes
    user_nodes = {**{u: ["n1"] for u in extra}, **where}
    ref = m.py_split_by_node(ref_ids, user_nodes)
    arr = m.as_sorted_ids(ids)
    for got in (m.split_by_node(arr, user_nodes), m.split_by_node(arr, m.node_pairs(user_nodes))):
        assert {node: batch.tolist() for node, batch in got.items()} == ref
        assert all(batch.dtype == np.uint64 for batch in got.values())


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(ID, max_size=100), droppable=st.booleans(), unordered=st.booleans(), frame=st.binary(max_size=32))
def test_envelopes_are_byte_identical(ids: list[int], droppable: bool, unordered: bool, frame: bytes) -> None:
    arr = m.as_sorted_ids(ids)
    data = m.encode_users(arr, frame, droppable, unordered)
    assert data == encode_users(arr.tolist(), frame, droppable, unordered)
    env = decode_envelope(data)
    assert env == UsersEnvelope(tuple(arr.tolist()), frame, droppable, unordered, 2 if unordered else 0)
    # a view (a shard) encodes the same as a copy
    for shard in m.shards(arr, 7):
        assert m.encode_users(shard, frame) == encode_users(shard.tolist(), frame)


def test_seeded_random_large_groups() -> None:
    """Group sizes of the tier itself (hypothesis keeps lists short)."""
    rng = random.Random(15)
    for size in (0, 1, 999, 1000, 1001, 20_000):
        ids = [rng.randrange(2**63 - 10_000, 2**63 + 10_000) for _ in range(size)]
        ids += ids[: size // 10]  # duplicates
        ref = m.py_sorted_ids(ids)
        arr = m.as_sorted_ids(iter(ids))
        assert arr.tolist() == ref
        assert [s.tolist() for s in m.shards(arr, 1000)] == m.py_shards(ref, 1000)
        online = set(rng.sample(ref, len(ref) // 2))
        on = m.intersect_online(arr, m.as_sorted_ids(online))
        assert on.tolist() == m.py_intersect_online(ref, online)
        where = {u: rng.sample(["a", "b", "c"], rng.randint(1, 2)) for u in online}
        got = m.split_by_node(on, where)
        assert {k: v.tolist() for k, v in got.items()} == m.py_split_by_node(on.tolist(), where)


def test_inputs_outside_u64_are_refused() -> None:
    for bad in ([-1], [2**64]):
        with pytest.raises((OverflowError, ValueError)):
            m.as_sorted_ids(bad)
    with pytest.raises(ValueError):
        m.shards(m.as_sorted_ids([1]), 0)
    assert m.shards(m.as_sorted_ids([]), 10) == []
    assert m.split_by_node(m.as_sorted_ids([]), {1: ["a"]}) == {}
    assert m.as_sorted_ids(np.array([3, 1, 3], dtype=np.int64)).tolist() == [1, 3]


def test_sharded_job_enqueues_the_same_shards_and_bytes() -> None:
    """The sharded tier (FanoutJobs._sharded): one job per shard of the sorted, de-duplicated
    members, each payload the origin plus the envelope the Python path writes."""
    from gochat.cluster.fanout import FanoutJob, MemoryFanoutProgress
    from gochat.cluster.link import FANOUT_STREAM, ClusterLink

    class Jobs:
        def __init__(self) -> None:
            self.jobs: list[tuple[str, str, bytes]] = []

        async def enqueue(self, stream: str, job_id: str, payload: bytes) -> None:
            self.jobs.append((stream, job_id, payload))

    class Backends:
        jobs = Jobs()
        progress = MemoryFanoutProgress()
        broker = presence = registry = bus = None

    async def scenario() -> None:
        link = ClusterLink("node-a", Backends(), local=None, shard_size=3)  # type: ignore[arg-type]
        members_ = [7, 2**63, 5, 7, 1, 2**64 - 1, 5, 9]
        job = FanoutJob("j1", "sharded", 1, 1, 1, "node-a", len(members_), 4, 0)
        await link.fanout._sharded(job, members_, b"frame", True)
        ref = m.py_shards(m.py_sorted_ids(members_), 3)
        jobs = Backends.jobs.jobs
        assert [(s, j.rpartition(":")[2]) for s, j, _ in jobs] == [(FANOUT_STREAM, str(3 * i)) for i in range(len(ref))]
        for (_, _, payload), shard in zip(jobs, ref, strict=True):
            assert payload == bytes([6]) + b"node-a" + encode_users(shard, b"frame", True, unordered=True)
        assert (await Backends.progress.get("j1")) == job

    asyncio.run(scenario())


def test_numpy_is_imported_only_once_a_peer_is_listed() -> None:
    """An embedded node (no peers) never imports the large-group arithmetic (numpy, ~55 ms); a
    cluster node imports it when its registry first lists another node (docs/dependencies.md,
    "numpy")."""
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    script = textwrap.dedent(
        """
        import sys
        import gochat.server
        from gochat.cluster.base import NodeInfo
        from gochat.cluster.link import ClusterLink

        class Backends:
            jobs = broker = presence = registry = bus = progress = None

        link = ClusterLink("a", Backends(), local=None)
        assert "gochat.cluster.members" not in sys.modules, "imported at start-up"
        link.nodes = [NodeInfo("a", "ws://a", "http://a", "1")]
        assert "gochat.cluster.members" not in sys.modules, "imported without a peer"
        link.nodes = [NodeInfo("a", "ws://a", "http://a", "1"), NodeInfo("b", "ws://b", "http://b", "1")]
        assert "numpy" in sys.modules and "gochat.cluster.members" in sys.modules
        print("OK")
        """
    )
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr
