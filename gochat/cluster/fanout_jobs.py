"""The cluster side of the sharded and cascaded fan-out tiers (docs/cluster.md, "Fan-out tiers").

:class:`FanoutJobs` starts a job (records it in the progress seam, then enqueues its stream shards
or broadcasts its CASCADE envelope) and runs the stream shards this node's consumer takes. The
node's own part of a job is queued by the caller (``gochat.messaging.dispatch.LocalJobs``).
"""

from __future__ import annotations

import asyncio
import logging
import struct
import uuid
from collections.abc import Coroutine, Sequence
from typing import Any, Protocol

from gochat.clock import now_ms
from gochat.cluster.base import Broker, JobQueue, NodeInfo, Presence
from gochat.cluster.envelope import UsersEnvelope, decode_envelope, encode_cascade, encode_users
from gochat.cluster.fanout import FanoutJob, FanoutProgress, Tier
from gochat.cluster.lost import LostPushes
from gochat.cluster.node_events import LocalFanout
from gochat.errors import GochatError

__all__ = ["FANOUT_STREAM", "FanoutJobs"]

log = logging.getLogger("gochat.cluster")

FANOUT_STREAM = "fanout"
_OP_DELIVER = 0x40
#: a DELIVER's seq u64 and msg_id u64 (record at 12: seq @10, msg_id @18)
_SEQ_MSG = struct.Struct("<QQ")


class _Link(Protocol):
    """What fan-out jobs use of their node's ``gochat.cluster.link.ClusterLink``."""

    node_id: str
    peers: bool
    shard_size: int
    routed: int
    jobs: JobQueue
    progress: FanoutProgress
    broker: Broker
    presence: Presence
    local: LocalFanout
    lost: LostPushes

    @property
    def nodes(self) -> list[NodeInfo]: ...

    def other_nodes(self) -> list[NodeInfo]: ...

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None: ...


class FanoutJobs:
    """Fan-out jobs of one node's cluster link (``link.fanout``)."""

    def __init__(self, link: _Link) -> None:
        self.link = link

    def start(self, tier: int, user_ids: Sequence[int], frame: bytes, droppable: bool, conv: int, version: int) -> str:
        """Start a job of the sharded or cascaded tier: record it, then (with other nodes
        listed) enqueue its stream shards or broadcast its cascade envelope, in the background.
        Returns the job id (the message's msg_id for a DELIVER)."""
        link = self.link
        seq, msg_id = _seq_and_msg(frame)
        job_id = str(msg_id) if msg_id else uuid.uuid4().hex[:16]
        others = link.other_nodes() if link.peers else []
        if not others:
            parts = 1
        elif tier == Tier.CASCADED:
            parts = 1 + len(others)
        else:
            parts = 1 + -(-len(user_ids) // link.shard_size)
        job = FanoutJob(
            job_id=job_id,
            tier=Tier(tier).label,
            conv_id=conv,
            seq=seq,
            msg_id=msg_id,
            origin=link.node_id,
            members=len(user_ids),
            parts_total=parts,
            created_ms=now_ms(),
        )
        if not others:
            link.spawn(self._record(job))
        elif tier == Tier.CASCADED:
            envelope = encode_cascade(conv, version, len(user_ids), link.node_id, job_id, frame, droppable)
            link.spawn(self._cascade(job, envelope, user_ids))
        else:
            link.spawn(self._sharded(job, user_ids, frame, droppable))
        return job_id

    async def _record(self, job: FanoutJob) -> None:
        try:
            await self.link.progress.start(job)
        except GochatError as exc:  # progress is best effort: the fan-out goes on
            log.info("fan-out job %s not recorded: %s", job.job_id, exc.message)

    async def _sharded(self, job: FanoutJob, user_ids: Sequence[int], frame: bytes, droppable: bool) -> None:
        """The sharded tier: one durable stream job per ``shard_size`` members; every node's
        consumer takes some, looks up presence for its shard and delivers or publishes. Spreads
        the work over the cluster and survives the death of a node mid-fan-out (pending jobs
        are claimed by another consumer)."""
        await self._record(job)
        try:
            await self._enqueue_shards(job, user_ids, frame, droppable)
        except GochatError:
            self.link.lost.everywhere(user_ids)  # their recipients elsewhere: told to SYNC
            raise

    async def _enqueue_shards(self, job: FanoutJob, user_ids: Sequence[int], frame: bytes, droppable: bool) -> None:
        # numpy, imported when the first peer was listed (ClusterLink.nodes): the member list as
        # one sorted, de-duplicated u64 array, shards are views of it, each envelope's ids are
        # the view's bytes (the same envelope encode_users writes; docs/cluster.md)
        from gochat.cluster import members

        link = self.link
        ids = members.as_sorted_ids(user_ids)
        origin = link.node_id.encode()
        head = bytes([len(origin)]) + origin
        await asyncio.gather(
            *(
                link.jobs.enqueue(
                    FANOUT_STREAM,
                    f"{job.job_id}:{i * link.shard_size}",
                    head + members.encode_users(shard, frame, droppable, unordered=True),
                )
                for i, shard in enumerate(members.shards(ids, link.shard_size))
            )
        )

    async def _cascade(self, job: FanoutJob, envelope: bytes, user_ids: Sequence[int]) -> None:
        """The cascaded tier: one broadcast (O(1) here, whatever the group's size); every node
        delivers to its own members of the group (``ClusterEvents.cascade``)."""
        await self._record(job)
        try:
            await self.link.broker.broadcast(envelope)
        except GochatError:
            self.link.lost.everywhere(user_ids)
            raise

    async def run_shard(self, job_id: str, payload: bytes) -> None:
        """A stream job (one shard) this node's consumer took: presence for its users, this
        node's sessions at once, a USERS envelope to each other node holding some; then the
        shard is reported done. Raising leaves the job to be retried."""
        link = self.link
        origin = payload[1 : 1 + payload[0]].decode()
        env = decode_envelope(payload[1 + payload[0] :])
        assert isinstance(env, UsersEnvelope)
        where = await link.presence.nodes_for(env.user_ids, [n.node_id for n in link.nodes if n.node_id != origin])
        delivered = 0
        for node, uids in where.items():
            if node == origin:
                continue  # the origin delivered to its own connections already
            if node == link.node_id:
                delivered += link.local.users(uids, env.frame, env.droppable, tier=Tier.SHARDED)
            else:
                await link.broker.send_to_node(
                    node, encode_users(uids, env.frame, env.droppable, unordered=True, tier=Tier.SHARDED)
                )
                delivered += len(uids)
            link.routed += 1
        key, _, offset = job_id.rpartition(":")
        try:
            await link.progress.part_done(key, f"shard:{offset}", delivered)
        except GochatError as exc:
            log.info("fan-out progress of %s not recorded: %s", key, exc.message)


def _seq_and_msg(frame: bytes) -> tuple[int, int]:
    """A DELIVER's seq and msg_id; (0, 0) for any other frame."""
    if frame[5] == _OP_DELIVER:
        seq, msg_id = _SEQ_MSG.unpack_from(frame, 22)
        return seq, msg_id
    return 0, 0
