"""group.add/remove/leave pass the lock's fence to the store: a node that stalls past the
lock's TTL while it holds ``group:{id}`` cannot write after the node that took the lock next
(docs/consistency.md § Distributed locks). Three nodes in one process (the harness of
tests/test_event_consistency.py: memory locks, one SQLite store)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest

import gochat.messaging.calls as calls_module
from gochat.errors import ErrorCode, GochatError
from gochat.protocol import decode
from gochat.store.base import StaleFenceError, Store
from tests.conftest import run
from tests.test_event_consistency import cluster
from tests.test_messaging_core import connect, user


class _StallingStore:
    """Node 0's view of the store: its next membership write first stalls (its locks stop
    being renewed, as in a long GC pause or a frozen VM) until the test resumes it."""

    def __init__(self, store: Store, on_stall: Any) -> None:
        self._store = store
        self._on_stall = on_stall
        self.stalled = asyncio.Event()
        self.resume = asyncio.Event()
        self.fences: list[int | None] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def _stall(self, fence: int | None) -> None:
        self.fences.append(fence)
        if not self.stalled.is_set():
            self._on_stall()
            self.stalled.set()
            await self.resume.wait()

    async def add_member(self, conv: int, user_id: int, fence: int | None = None) -> bool:
        await self._stall(fence)
        return await self._store.add_member(conv, user_id, fence=fence)

    async def remove_member(self, conv: int, user_id: int, fence: int | None = None) -> bool:
        await self._stall(fence)
        return await self._store.remove_member(conv, user_id, fence=fence)


@pytest.mark.parametrize("method", ["group.add", "group.remove", "group.leave"])
def test_a_stalled_holder_is_refused_and_answers_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """Room for one more member. Node 0 checks the limit under the lock, then stalls past the
    lock's TTL; node 1 takes the lock (a higher fence) and adds the last member. Node 0's
    late write is refused by the store: the CALL answers UNAVAILABLE (retryable), nothing
    changed, and the group is not overfilled. A retry takes the lock afresh."""
    monkeypatch.setattr(calls_module, "GROUP_LOCK_TTL_S", 0.3)

    async def body() -> None:
        async with cluster(tmp_path) as (nodes, store):
            auth = nodes[0].auth
            (owner, o_tok), (carol, c_tok), (dave, _), (erin, _) = [
                await user(auth, u) for u in ("owner", "carol", "dave", "erin")
            ]
            await connect(nodes[0], o_tok)
            await connect(nodes[1], o_tok)
            await connect(nodes[0], c_tok)
            o0, o1, c0 = nodes[0].session_of(owner), nodes[1].session_of(owner), nodes[0].session_of(carol)
            (res,) = decode(await nodes[0].core.calls.call(o0, "group.create", b'{"name":"g","members":[%d]}' % carol, 2))
            gid = orjson.loads(res.payload)["group_id"]
            for node in nodes:
                node.core.calls.max_group_members = 3

            calls0 = nodes[0].core.calls
            stalling = _StallingStore(store, nodes[0].link.backends.locks.abandon)  # type: ignore[attr-defined]
            calls0.store = stalling  # type: ignore[assignment]
            if method == "group.add":
                late = asyncio.ensure_future(calls0.group_add(o0, {"group_id": gid, "user_id": dave}))
            elif method == "group.remove":
                late = asyncio.ensure_future(calls0.group_remove(o0, {"group_id": gid, "user_id": carol}))
            else:
                late = asyncio.ensure_future(calls0.group_leave(c0, {"group_id": gid}))
            await asyncio.wait_for(stalling.stalled.wait(), 5)
            first_fence = stalling.fences[0]
            assert first_fence is not None and first_fence >= 1

            # node 1 gets the lock once node 0's has expired, and fills the group
            assert await nodes[1].core.calls.group_add(o1, {"group_id": gid, "user_id": erin}) == {"added": True}
            assert await store.members_versioned(gid) == (2, tuple(sorted((owner, carol, erin))))

            stalling.resume.set()
            with pytest.raises(GochatError) as ei:
                await late
            err = ei.value
            assert not isinstance(err, StaleFenceError)  # answered as a lock loss, not a store detail
            assert err.code == ErrorCode.UNAVAILABLE and err.spec.retryable and not err.fatal
            # nothing changed: no fifth member, carol still in, the version counts erin only
            assert await store.members_versioned(gid) == (2, tuple(sorted((owner, carol, erin))))

            # the retry takes the lock afresh, with a higher fence, and is served as usual
            if method == "group.add":
                with pytest.raises(GochatError) as full:
                    await calls0.group_add(o0, {"group_id": gid, "user_id": dave})
                assert full.value.code == ErrorCode.BAD_REQUEST  # "group is full", as it should be
                expected = (2, tuple(sorted((owner, carol, erin))))
            elif method == "group.remove":
                assert await calls0.group_remove(o0, {"group_id": gid, "user_id": carol}) == {"removed": True}
                expected = (3, tuple(sorted((owner, erin))))
            else:
                assert await calls0.group_leave(c0, {"group_id": gid}) == {"left": True}
                expected = (3, tuple(sorted((owner, erin))))
            assert await store.members_versioned(gid) == expected
            retried = stalling.fences[1:]  # group.add refused the retry before writing
            assert len(retried) == (0 if method == "group.add" else 1)
            assert all(f is not None and f > first_fence for f in retried)

    run(body())
