"""Fan-out tiers (docs/cluster.md, "Fan-out tiers"), in process.

- ``Delivery.users`` picks inline / batched / sharded / cascaded at each boundary, for DELIVER
  and EVENT frames, with the router priority and envelope tier of each, and counts by tier
  (``gochat_fanout_messages_total{tier}``);
- the router's per-priority queues (``ClusterLink._take``): direct before small groups before
  large groups before rooms, FIFO within a class, a minimum share for every waiting class;
- ``LocalJobs``: chunked (one chunk per event-loop turn, other work runs in between), FIFO,
  bounded (shed and counted), one ``part_done`` per job with its delivered count;
- an in-process three-node cluster (MemoryHub, as tests/test_messaging_core.py): a sharded and
  a cascaded group message reach every online member on every node exactly once, and the job's
  progress record completes;
- ``group.create`` above ``fanout_inline_max``: each added member gets only its own MEMBER_ADDED.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections import Counter
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from gochat._native.connection import FanoutWriter
from gochat._native.routing import RoutingTable
from gochat.auth.service import AuthService
from gochat.cluster.backends import memory_backends
from gochat.cluster.fanout import FanoutJob, MemoryFanoutProgress, Priority, Tier
from gochat.cluster.link import ClusterLink
from gochat.cluster.memory import MemoryHub
from gochat.messaging.delivery import Delivery, LocalDelivery
from gochat.messaging.dispatch import LocalJobs
from gochat.observability.metrics import Metrics
from gochat.protocol import EventType, Kind, decode, encode, encode_event
from gochat.protocol.frames import CallResult, Deliver, Event, Message, SendAck
from gochat.store.sqlite import SQLiteStore
from tests.conftest import run
from tests.test_messaging_core import Node, _Client
from tests.test_messaging_core import cluster as messaging_cluster
from tests.test_messaging_core import connect as messaging_connect

# ---------------------------------------------------------------------------------------------
# tier choice at each boundary


def deliver_frame(conv: int, seq: int = 1, kind: int = Kind.GROUP, msg_id: int = 4242) -> bytes:
    msg = Message(kind, 1, conv, seq, msg_id, 7, 1_700_000_000_000, b"m" * 16, b"body")
    return encode(Deliver(msg))


def event_frame(conv: int, kind: int = Kind.GROUP) -> bytes:
    return encode_event(EventType.MEMBER_ADDED, kind, conv, 7, 8)


class FakeLocal:
    """This node's sessions: records what each call queued."""

    def __init__(self, per_recipient: int = 1) -> None:
        self.per_recipient = per_recipient
        self.calls: list[tuple[str, int, int]] = []  # (what, recipients, tier)
        self.log: list[str] = []  # in call order: "chunk" / "users" / "observe:<frame tag>"

    def users(
        self, user_ids: Sequence[int], frame: bytes, droppable: bool, skip: Any = None, tier: int = 0
    ) -> int:
        self.calls.append(("users", len(user_ids), tier))
        self.log.append("users")
        return len(user_ids) * self.per_recipient

    def unordered(self, user_ids: Sequence[int], frame: bytes, droppable: bool, skip: Any = None) -> int:
        self.calls.append(("chunk", len(user_ids), -1))
        self.log.append("chunk")
        return len(user_ids) * self.per_recipient

    def observe(self, tier: int, frame: bytes) -> None:
        self.log.append(f"observe:{frame!r}:{tier}")

    def room(self, room_id: int, frame: bytes) -> int:
        return 0


@dataclass
class FakeLink:
    """The cluster link as Delivery sees it: other nodes listed, every call recorded."""

    local: FakeLocal = field(default_factory=FakeLocal)
    peers: bool = True
    node_id: str = "n0"
    routed: list[tuple[int, int, int]] = field(default_factory=list)  # (recipients, priority, tier)
    started: list[tuple[int, int, int]] = field(default_factory=list)  # (tier, recipients, conv)

    def route_users(
        self, user_ids: Sequence[int], frame: bytes, droppable: bool = False, trace: Any = None,
        priority: int = Priority.SMALL_GROUP, tier: int = 0,
    ) -> None:
        self.routed.append((len(user_ids), int(priority), int(tier)))

    @property
    def fanout(self) -> FakeLink:  # the link's FanoutJobs: this fake records its starts too
        return self

    def start(
        self, tier: int, user_ids: Sequence[int], frame: bytes, droppable: bool, conv: int, version: int
    ) -> str:
        self.started.append((int(tier), len(user_ids), conv))
        return f"job{len(self.started)}"


class SpyProgress(MemoryFanoutProgress):
    def __init__(self) -> None:
        super().__init__()
        self.reports: list[tuple[str, str, int]] = []

    async def part_done(self, job_id: str, part: str, delivered: int) -> int:
        self.reports.append((job_id, part, delivered))
        return await super().part_done(job_id, part, delivered)


INLINE_MAX, THRESHOLD, CASCADE_MIN = 10, 40, 200


def make_delivery(link: FakeLink, progress: SpyProgress | None = None) -> Delivery:
    jobs = LocalJobs(link.local, progress or SpyProgress(), link.node_id, chunk=16)
    return Delivery(
        None,  # type: ignore[arg-type]  # routing: not used by users()
        None,  # type: ignore[arg-type]
        link,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        THRESHOLD,
        inline_max=INLINE_MAX,
        cascade_min=CASCADE_MIN,
        jobs=jobs,
    )


def _tier_of_one(frame: bytes, n: int) -> tuple[FakeLink, Delivery]:
    link = FakeLink()
    d = make_delivery(link)
    d.users(list(range(1, n + 1)), frame, None)
    return link, d


def _check_boundaries(frame: bytes, conv: int) -> None:
    async def body() -> None:
        # inline: local now (gated), other nodes at the small-group priority, tier 0
        for n in (1, INLINE_MAX):
            link, d = _tier_of_one(frame, n)
            assert link.local.calls == [("users", n, Tier.INLINE)]
            assert link.routed == [(n, Priority.SMALL_GROUP, Tier.INLINE)] and link.started == []
            assert d.by_tier == [1, 0, 0, 0]
        # batched: local now with tier 1, other nodes at the large-group priority, tier 1
        for n in (INLINE_MAX + 1, THRESHOLD):
            link, d = _tier_of_one(frame, n)
            assert link.local.calls == [("users", n, Tier.BATCHED)]
            assert link.routed == [(n, Priority.LARGE_GROUP, Tier.BATCHED)] and link.started == []
            assert d.by_tier == [0, 1, 0, 0]
        # sharded and cascaded: a job (started on the link), the local part chunked
        for n, tier in ((THRESHOLD + 1, Tier.SHARDED), (CASCADE_MIN, Tier.SHARDED), (CASCADE_MIN + 1, Tier.CASCADED)):
            link, d = _tier_of_one(frame, n)
            assert link.routed == [] and link.local.calls == []  # nothing in the send path
            assert link.started == [(tier, n, conv)]
            assert d.jobs.waiting == 1
            await d.jobs.idle()
            assert [c for c in link.local.calls if c[0] == "users"] == []
            assert sum(c[1] for c in link.local.calls) == n
            assert d.by_tier == [0, 0, int(tier == Tier.SHARDED), int(tier == Tier.CASCADED)]
            await d.jobs.close()

    run(body())


def test_tier_boundaries_for_a_group_deliver() -> None:
    _check_boundaries(deliver_frame(conv=900), 900)


def test_tier_boundaries_for_a_group_event() -> None:
    _check_boundaries(event_frame(conv=901), 901)


def test_a_huge_fanout_that_is_not_a_group_message_is_sharded_not_cascaded() -> None:
    """Cascading needs a group whose members every node can resolve: a non-group frame of
    more recipients than fanout_cascade_min stays sharded."""

    async def body() -> None:
        for frame in (event_frame(conv=0, kind=0), deliver_frame(conv=55, kind=Kind.DIRECT)):
            link, d = _tier_of_one(frame, CASCADE_MIN + 5)
            assert link.started == [(Tier.SHARDED, CASCADE_MIN + 5, 0)]
            assert d.by_tier == [0, 0, 1, 0]
            await d.jobs.close()

    run(body())


def test_direct_messages_go_at_the_direct_priority() -> None:
    async def body() -> None:
        link = FakeLink()
        d = make_delivery(link)
        d.routing = RoutingTable()
        d.direct(None, 5, 6, lambda conv: deliver_frame(conv, kind=Kind.DIRECT))  # type: ignore[arg-type]
        # both views (the sender's other devices, the peer) at the direct priority, inline
        assert link.routed == [(1, Priority.DIRECT, 0), (1, Priority.DIRECT, 0)]
        assert Priority.CONTROL < Priority.DIRECT < Priority.SMALL_GROUP < Priority.LARGE_GROUP < Priority.ROOM

    run(body())


def test_fanout_metrics_count_by_tier() -> None:
    """gochat_fanout_messages_total{tier} on a real (embedded, single-node) link and delivery."""

    async def body() -> None:
        routing = RoutingTable()
        local = LocalDelivery(routing)
        link = ClusterLink("solo", memory_backends(MemoryHub()), local)
        d = Delivery(
            routing, FanoutWriter(asyncio.get_running_loop()), link, None,  # type: ignore[arg-type]
            THRESHOLD, inline_max=INLINE_MAX, cascade_min=CASCADE_MIN,
        )
        metrics = Metrics()
        metrics.attach_cluster(link, local.latency, d)

        def count(tier: str) -> float:
            v = metrics.registry.get_sample_value("gochat_fanout_messages_total", {"tier": tier})
            assert v is not None
            return v

        assert [count(t.label) for t in Tier] == [0, 0, 0, 0]
        sizes = {Tier.INLINE: (3, INLINE_MAX), Tier.BATCHED: (INLINE_MAX + 1,), Tier.SHARDED: (THRESHOLD + 1, CASCADE_MIN),
                 Tier.CASCADED: (CASCADE_MIN + 1, 5 * CASCADE_MIN, CASCADE_MIN + 2)}
        seq = 0
        for sizes_of in sizes.values():
            for n in sizes_of:
                seq += 1
                d.users(list(range(1, n + 1)), deliver_frame(conv=77, seq=seq, msg_id=1000 + seq), None)
        await d.jobs.idle()
        assert {t.label: count(t.label) for t in Tier} == {"inline": 2, "batched": 1, "sharded": 2, "cascaded": 3}
        # embedded: each job has one part, this node's, and its record completes
        for job in await link.progress.recent():
            assert (job.parts_total, job.parts_done, job.percent) == (1, 1, 100.0)
        assert len(await link.progress.recent()) == 5
        await d.jobs.close()
        await link.backends.close()

    run(body())


# ---------------------------------------------------------------------------------------------
# the router's priority classes


def _link() -> ClusterLink:
    return ClusterLink("r0", memory_backends(MemoryHub()), FakeLocal())  # type: ignore[arg-type]


def _queue_every_class(link: ClusterLink, n: int, big: int = 0) -> None:
    """``n`` items of each class, interleaved (``big`` more direct ones first)."""
    for i in range(big):
        link.route_users([1], b"D%d" % (n + i), priority=Priority.DIRECT)
    for i in range(n):
        link.route_room(100 + i, b"R%d" % i)
        link.route_users([1], b"L%d" % i, priority=Priority.LARGE_GROUP, tier=Tier.BATCHED)
        link.route_users([1], b"S%d" % i, priority=Priority.SMALL_GROUP)
        link.route_users([1], b"D%d" % i, priority=Priority.DIRECT)


def test_router_takes_direct_then_small_then_large_then_rooms_fifo_within_a_class() -> None:
    async def body() -> None:
        link = _link()
        _queue_every_class(link, 5)
        assert link.queue_depths() == {"direct": 5, "small_group": 5, "large_group": 5, "room": 5}
        assert link.queue_depth == 20
        batch = link._take()
        frames = [item[1] for item in batch]
        assert frames == [b"%s%d" % (c, i) for c in (b"D", b"S", b"L", b"R") for i in range(5)]
        # a room's item carries the room id and tier -1; a batched one its tier
        assert batch[15][0] == 100 and batch[15][4] == -1
        assert batch[10][4] == Tier.BATCHED
        assert link.queue_depth == 0 and link._take() == []

    run(body())


def test_router_gives_every_waiting_class_its_minimum_share() -> None:
    """A direct-message backlog larger than a whole batch does not starve the classes below."""
    from gochat.cluster import link as link_mod

    async def body() -> None:
        link = _link()
        batch_max, share = link_mod._MAX_BATCH, link_mod._MIN_SHARE
        assert 0 < share < batch_max // 4
        others = share + 50  # more than the share waits in every lower class
        _queue_every_class(link, others, big=2 * batch_max)
        batch = link._take()
        assert len(batch) == batch_max
        by_class = Counter(item[1][:1] for item in batch)
        assert by_class[b"S"] == by_class[b"L"] == by_class[b"R"] == share
        assert by_class[b"D"] == batch_max - 3 * share
        # priority order across classes, FIFO within each
        tags = [item[1][:1] for item in batch]
        assert tags == sorted(tags, key=b"DSLR".index)
        for c in (b"D", b"S", b"L", b"R"):
            nums = [int(item[1][1:]) for item in batch if item[1][:1] == c]
            assert nums == sorted(nums)
        s_nums = [int(item[1][1:]) for item in batch if item[1][:1] == b"S"]
        assert s_nums == list(range(share))
        # the next turn continues where each class stopped
        nxt = link._take()
        assert [int(i[1][1:]) for i in nxt if i[1][:1] == b"S"][:1] == [share]
        assert Counter(i[1][:1] for i in nxt)[b"R"] == others - share

    run(body())


def test_router_fills_the_batch_by_priority_after_the_shares() -> None:
    """Below a full batch every class gets everything; above, the spare room goes to the higher
    class first (small groups before large ones)."""
    from gochat.cluster import link as link_mod

    async def body() -> None:
        link = _link()
        batch_max, share = link_mod._MAX_BATCH, link_mod._MIN_SHARE
        for i in range(batch_max):
            link.route_users([1], b"L%d" % i, priority=Priority.LARGE_GROUP)
        for i in range(batch_max):
            link.route_users([1], b"S%d" % i, priority=Priority.SMALL_GROUP)
        batch = link._take()
        c = Counter(item[1][:1] for item in batch)
        assert c == {b"S": batch_max - share, b"L": share}

    run(body())


# ---------------------------------------------------------------------------------------------
# LocalJobs


def test_a_50k_job_runs_in_chunks_with_other_work_in_between() -> None:
    async def body() -> None:
        local = FakeLocal(per_recipient=2)
        progress = SpyProgress()
        jobs = LocalJobs(local, progress, "n0", chunk=1000)
        link = FakeLink(local=local)
        d = make_delivery(link)
        d.jobs = jobs
        loop = asyncio.get_running_loop()
        n = 50_000
        seen_at: dict[str, int] = {}

        def soon() -> None:
            seen_at["call_soon"] = jobs.chunks

        def direct() -> None:
            # a direct message sent while the job runs: delivered inline at once
            d.direct(None, 1, 2, lambda conv: deliver_frame(conv, kind=Kind.DIRECT))  # type: ignore[arg-type]
            seen_at["direct"] = jobs.chunks

        d.routing = RoutingTable()
        assert jobs.add(range(1, n + 1), b"F-big", False, None, Tier.CASCADED, "big")
        loop.call_soon(soon)
        loop.call_later(0, direct)
        await jobs.idle()
        chunks = math.ceil(n / 1000)
        assert jobs.chunks == chunks and jobs.recipients == n
        assert [c[1] for c in local.calls if c[0] == "chunk"] == [1000] * chunks
        assert 0 < seen_at["call_soon"] < chunks
        assert 0 < seen_at["direct"] < chunks
        # the direct message's local delivery sits between the job's chunks
        first_users = local.log.index("users")
        assert 0 < first_users < len(local.log) - 1
        assert "chunk" in local.log[first_users + 1 :]
        assert (jobs.started, jobs.finished, jobs.shed, jobs.waiting) == (1, 1, 0, 0)
        assert progress.reports == [("big", "n0", 2 * n)]
        await jobs.close()

    run(body())


def test_the_chunk_size_is_reloadable_and_odd_sizes_round_up() -> None:
    async def body() -> None:
        local = FakeLocal()
        jobs = LocalJobs(local, SpyProgress(), "n0", chunk=7)
        jobs.add(range(20), b"F", False, None, Tier.SHARDED, "")
        await jobs.idle()
        assert [c[1] for c in local.calls] == [7, 7, 6]
        jobs.chunk = 9
        jobs.add(range(20), b"G", False, None, Tier.SHARDED, "")
        await jobs.idle()
        assert [c[1] for c in local.calls][3:] == [9, 9, 2]
        assert jobs.chunks == 6 and jobs.recipients == 40
        await jobs.close()

    run(body())


def test_jobs_complete_fifo_and_each_reports_once() -> None:
    async def body() -> None:
        local = FakeLocal()
        progress = SpyProgress()
        jobs = LocalJobs(local, progress, "nX", chunk=100)
        jobs.add(range(5000), b"A", False, None, Tier.CASCADED, "ja")  # big, first
        jobs.add(range(10), b"B", False, None, Tier.SHARDED, "jb")  # small, behind it
        jobs.add(range(250), b"C", False, None, Tier.SHARDED, "")  # no record: no report
        jobs.add(range(30), b"D", False, None, Tier.CASCADED, "jd")
        assert jobs.waiting == 4 and jobs.pending_recipients == 5290
        await jobs.idle()
        observed = [e for e in local.log if e.startswith("observe:")]
        assert observed == [
            f"observe:{b'A'!r}:{int(Tier.CASCADED)}", f"observe:{b'B'!r}:{int(Tier.SHARDED)}",
            f"observe:{b'C'!r}:{int(Tier.SHARDED)}", f"observe:{b'D'!r}:{int(Tier.CASCADED)}",
        ]
        assert progress.reports == [("ja", "nX", 5000), ("jb", "nX", 10), ("jd", "nX", 30)]
        assert (jobs.started, jobs.finished, jobs.shed) == (4, 4, 0)
        await jobs.close()

    run(body())


def test_jobs_beyond_max_jobs_are_shed_and_counted() -> None:
    async def body() -> None:
        local = FakeLocal()
        progress = SpyProgress()
        jobs = LocalJobs(local, progress, "n0", chunk=10, max_jobs=2)
        told: list[Sequence[int]] = []  # the shed job's recipients are told to SYNC
        jobs.on_shed = told.append
        assert jobs.add(range(100), b"A", False, None, Tier.SHARDED, "ja")
        assert jobs.add(range(100), b"B", False, None, Tier.SHARDED, "jb")
        assert not jobs.add(range(200, 300), b"C", False, None, Tier.SHARDED, "jc")
        assert (jobs.started, jobs.shed, jobs.waiting) == (2, 1, 2)
        assert [list(t) for t in told] == [list(range(200, 300))]
        await jobs.idle()
        assert sum(c[1] for c in local.calls) == 200  # the shed job queued nothing
        assert [r[0] for r in progress.reports] == ["ja", "jb"]
        # room again once the queue drained; a raised bound applies at once
        jobs.max_jobs = 3
        for tag in (b"E", b"F", b"G"):
            assert jobs.add(range(5), tag, False, None, Tier.SHARDED, "")
        assert not jobs.add(range(5), b"H", False, None, Tier.SHARDED, "")
        assert jobs.shed == 2
        await jobs.idle()
        await jobs.close()
        # a closed queue sheds (the node is stopping: its sessions go, nobody is told)
        assert not jobs.add(range(5), b"I", False, None, Tier.SHARDED, "")
        assert jobs.shed == 3 and len(told) == 2

    run(body())


def test_a_failing_chunk_does_not_stop_the_worker() -> None:
    class Boom(FakeLocal):
        def unordered(self, user_ids: Sequence[int], frame: bytes, droppable: bool, skip: Any = None) -> int:
            if frame == b"bad":
                raise RuntimeError("boom")
            return super().unordered(user_ids, frame, droppable, skip)

    async def body() -> None:
        local = Boom()
        progress = SpyProgress()
        jobs = LocalJobs(local, progress, "n0", chunk=10)
        jobs.add(range(50), b"bad", False, None, Tier.SHARDED, "jbad")
        jobs.add(range(50), b"good", False, None, Tier.SHARDED, "jgood")
        await jobs.idle()
        assert jobs.finished == 2
        assert ("jgood", "n0", 50) in progress.reports
        await jobs.close()

    run(body())


# ---------------------------------------------------------------------------------------------
# an in-process three-node cluster


#: tiers of the in-process cluster: inline <= 4 < batched <= 8 < sharded <= 20 < cascaded
SMALL = dict(fanout_inline_max=4, large_group_threshold=8, large_group_threshold_min=8,
             large_group_threshold_max=8, fanout_cascade_min=20, fanout_shard_size=3, fanout_chunk=2)


def cluster(tmp_path: Path, n: int = 3, **settings: Any) -> AbstractAsyncContextManager[tuple[list[Node], AuthService, SQLiteStore]]:
    """tests/test_messaging_core.py's in-process cluster, with the small tiers above."""
    return messaging_cluster(tmp_path, n, **{**SMALL, **settings})


_names = iter(range(1, 1_000_000))


async def online_user(auth: AuthService) -> tuple[int, str]:
    name = f"on{os.getpid()}x{next(_names)}"
    uid = await auth.register(name, "password-1")
    return uid, (await auth.login(name, "password-1")).access_token


async def offline_users(store: SQLiteStore, n: int) -> list[int]:
    return [await store.create_user(f"off{os.getpid()}x{next(_names)}", "x") for _ in range(n)]


async def connect(node: Node, token: str) -> _Client:
    return (await messaging_connect(node, token))[1]


async def create_group(node: Node, owner: int, members: list[int]) -> int:
    conn = node.session_of(owner)
    payload = orjson.dumps({"name": "g", "members": members})
    (result,) = decode(await node.core.calls.call(conn, "group.create", payload, 2))
    assert isinstance(result, CallResult), result
    return int(orjson.loads(result.payload)["group_id"])


async def eventually(pred: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await pred():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_sharded_and_cascaded_group_messages_reach_every_online_member_once(tmp_path: Path) -> None:
    async def body() -> None:
        async with cluster(tmp_path) as (nodes, auth, store):
            # 9 online members, three per node (the sender on node 0), plus offline ones
            online = [await online_user(auth) for _ in range(9)]
            clients = [await connect(nodes[i % 3], tok) for i, (_, tok) in enumerate(online)]
            owner = online[0][0]
            ids = [uid for uid, _ in online]
            sharded_members = ids + await offline_users(store, 6)  # 15: 8 < 15 <= 20
            cascaded_members = ids + await offline_users(store, 21)  # 30 > 20
            g_sharded = await create_group(nodes[0], owner, sharded_members[1:])
            g_cascaded = await create_group(nodes[0], owner, cascaded_members[1:])
            await asyncio.sleep(0.1)
            for c in clients:
                c.drain()  # MEMBER_ADDED events
            loop = asyncio.get_running_loop()
            sender = nodes[0].session_of(owner)
            for rid, gid, tier in ((11, g_sharded, "sharded"), (12, g_cascaded, "cascaded")):
                nodes[0].core.sends.send(sender, rid, Kind.GROUP, 1, gid, os.urandom(16), b"to %d" % gid, loop.time())
                ack = await clients[0].next(SendAck, skip=(Event,))
                job_id = str(ack.msg_id)
                for c in clients[1:]:
                    d = await c.next(Deliver, skip=(Event,))
                    assert (d.message.conv_id, d.message.msg_id) == (gid, ack.msg_id)

                async def complete(job_id: str = job_id) -> bool:
                    job = await nodes[1].link.progress.get(job_id)
                    return job is not None and job.parts_done == job.parts_total

                await eventually(complete)
                job = await nodes[2].link.progress.get(job_id)
                assert job is not None
                assert (job.tier, job.conv_id, job.origin, job.percent) == (tier, gid, "node-0", 100.0)
                assert job.finished_ms > 0
                members = len(sharded_members if tier == "sharded" else cascaded_members)
                assert job.members == members
                # sharded: the origin's part plus ceil(members / shard_size) stream jobs;
                # cascaded: one part per node
                assert job.parts_total == (1 + math.ceil(members / 3) if tier == "sharded" else 3)
                # 8 other online members' sessions: the sender's own session is skipped
                assert job.delivered == 8
            await asyncio.sleep(0.3)  # any duplicate would be queued by now
            for i, c in enumerate(clients):
                rest = [f for f in c.drain() if isinstance(f, Deliver)]
                assert rest == [], (i, rest)  # exactly once
            assert [f for f in clients[0].drain() if isinstance(f, Deliver)] == []
            by_tier = {
                t: nodes[0].metrics.registry.get_sample_value("gochat_fanout_messages_total", {"tier": t})
                for t in ("sharded", "cascaded")
            }
            assert by_tier == {"sharded": 1, "cascaded": 1}
            assert nodes[1].core.delivery.by_tier[Tier.CASCADED] == 0  # receivers do not count it
            for node in nodes:
                assert node.core.delivery.jobs.shed == 0

    run(body())


def test_every_tier_delivers_once_across_the_cluster(tmp_path: Path) -> None:
    """Inline, batched, sharded and cascaded messages to groups of one cluster: each online
    member gets every message once, and the tier counters of the sending node move."""

    async def body() -> None:
        async with cluster(tmp_path) as (nodes, auth, store):
            online = [await online_user(auth) for _ in range(3)]
            clients = [await connect(nodes[i], tok) for i, (_, tok) in enumerate(online)]
            owner, ids = online[0][0], [u for u, _ in online]
            sizes = {"inline": 4, "batched": 8, "sharded": 20, "cascaded": 21}
            groups = {}
            for tier, size in sizes.items():
                extra = await offline_users(store, size - 3)
                groups[tier] = await create_group(nodes[0], owner, ids[1:] + extra)
            await asyncio.sleep(0.1)
            for c in clients:
                c.drain()
            loop = asyncio.get_running_loop()
            sender = nodes[0].session_of(owner)
            before = list(nodes[0].core.delivery.by_tier)  # group.create's events count too
            for rid, (tier, gid) in enumerate(groups.items(), start=20):
                nodes[0].core.sends.send(sender, rid, Kind.GROUP, 1, gid, os.urandom(16), tier.encode(), loop.time())
                await clients[0].next(SendAck, skip=(Event,))
                for c in clients[1:]:
                    d = await c.next(Deliver, skip=(Event,))
                    assert (d.message.conv_id, d.message.body) == (gid, tier.encode())
            after = nodes[0].core.delivery.by_tier
            assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1, 1]
            await asyncio.sleep(0.3)
            for c in clients:
                assert [f for f in c.drain() if isinstance(f, Deliver)] == []

    run(body())


def test_group_create_above_inline_max_sends_each_member_only_its_own_member_added(tmp_path: Path) -> None:
    async def body() -> None:
        async with cluster(tmp_path) as (nodes, auth, store):
            online = [await online_user(auth) for _ in range(6)]
            clients = [await connect(nodes[i % 3], tok) for i, (_, tok) in enumerate(online)]
            owner, ids = online[0][0], [u for u, _ in online]
            # 6 online + 4 offline + the owner: 11 members > fanout_inline_max (4)
            members = ids[1:] + await offline_users(store, 4)
            gid = await create_group(nodes[0], owner, members)
            # each online member: one MEMBER_ADDED, naming itself
            for i, c in enumerate(clients[1:], start=1):
                ev = await c.next(Event)
                assert (ev.type, ev.conv_id, ev.actor_id, ev.value) == (EventType.MEMBER_ADDED, gid, owner, ids[i])
            await asyncio.sleep(0.3)
            for i, c in enumerate(clients):
                extra = [f for f in c.drain() if isinstance(f, Event) and f.type == EventType.MEMBER_ADDED]
                assert extra == [], (i, extra)
            # n events in all (one per added member), all inline: n fan-outs of one recipient
            assert nodes[0].core.delivery.by_tier[Tier.INLINE] == len(members)
            assert nodes[0].core.delivery.by_tier[1:] == [0, 0, 0]

            # at or below the boundary every member hears of every other (the small-group rule)
            small = ids[1:3]  # owner + 2 = 3 members <= 4
            before = nodes[0].core.delivery.by_tier[Tier.INLINE]
            gid2 = await create_group(nodes[0], owner, small)
            for i in (1, 2):
                got = sorted([(await clients[i].next(Event)).value for _ in range(2)])
                assert got == sorted(small)
            assert nodes[0].core.delivery.by_tier[Tier.INLINE] - before == 2
            assert gid2 != gid

    run(body())


def test_the_job_record_counts_a_reclaimed_shard_once() -> None:
    """The same shard finished by two nodes (a re-claimed stream job) counts once in the record
    the admin API reads."""

    async def body() -> None:
        p = MemoryFanoutProgress()
        await p.start(FanoutJob("m1", "sharded", 5, 1, 9, "a", 1000, 3, 1))
        await p.part_done("m1", "a", 10)
        await p.part_done("m1", "shard:0", 20)
        await p.part_done("m1", "shard:0", 20)
        job = await p.get("m1")
        assert job is not None and (job.parts_done, job.delivered, job.finished_ms) == (2, 30, 0)

    run(body())
