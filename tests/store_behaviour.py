"""Backend-independent behaviour tests for :class:`gochat.store.base.Store`.

A backend binds the suite by subclassing :class:`StoreBehaviour` in a ``test_*.py`` module and
providing the ``store_factory`` fixture: a zero-argument callable that returns a new, *unopened*
store over the same (initially empty) database each time it is called. Every test runs in its own
event loop via the ``run`` fixture, which opens a store, runs the test body and closes it.

Optional: a store with a ``stats`` attribute exposing ``transactions`` and ``appended`` counters
(group commit) gets the batching test; others skip it.

Also the helpers the backends' own tests share: :func:`run_store` (one store, one event loop)
and :func:`acks_until_sigkill` / :func:`check_acked` (acknowledged appends survive SIGKILL).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from gochat.cluster.memory import MemoryHub
from gochat.cluster.memory_locks import MemoryLocks
from gochat.errors import ErrorCode, GochatError, RequestError
from gochat.store.base import AppendRequest, AppendResult, RefreshStatus, StaleFenceError, Store

T = TypeVar("T")
S = TypeVar("S", bound=Store)
StoreFactory = Callable[[], Store]
Runner = Callable[[Callable[[Store], Awaitable[T]]], T]

DIRECT = 1
GROUP = 2
REPO_ROOT = Path(__file__).resolve().parent.parent


def cmid() -> bytes:
    return os.urandom(16)


def req(
    conv: int, sender: int, *, kind: int = DIRECT, client_msg_id: bytes | None = None, body: bytes = b"hi"
) -> AppendRequest:
    return AppendRequest(
        conv=conv,
        kind=kind,
        sender_id=sender,
        client_msg_id=client_msg_id if client_msg_id is not None else cmid(),
        content_type=1,
        body=body,
    )


async def users(store: Store, *names: str) -> list[int]:
    return [await store.create_user(name, "scrypt$x") for name in names]


async def fill(store: Store, conv: int, sender: int, n: int, *, kind: int = DIRECT) -> list[AppendResult]:
    return list(
        await asyncio.gather(*(store.append(req(conv, sender, kind=kind, body=b"m%d" % i)) for i in range(n)))
    )


def run_store(make: Callable[[], S], body: Callable[[S], Awaitable[T]]) -> T:
    """In a new event loop: ``make()`` a store, open it, run ``body(store)``, close it."""

    async def main() -> T:
        store = make()
        await store.open()
        try:
            return await body(store)
        finally:
            await store.close()

    return asyncio.run(main())


def acks_until_sigkill(child: str, args: list[str], n: int) -> list[str]:
    """Run the Python script ``child`` (it appends in a loop and prints one line per
    acknowledged message: ``conv seq msg_id client_msg_id.hex() body.hex()``), SIGKILL it
    right after its ``n``-th ack while it keeps appending; return every ack it printed."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-c", child, *args], stdout=subprocess.PIPE, env=env, text=True, bufsize=1
    )
    acks: list[str] = []
    deadline = time.monotonic() + 30
    try:
        assert proc.stdout is not None
        while len(acks) < n:
            line = proc.stdout.readline()
            assert line, "child exited before acknowledging"
            acks.append(line)
            assert time.monotonic() < deadline
        proc.send_signal(signal.SIGKILL)  # right after an ack, while it keeps appending
        # acks printed before death count too; a last line cut off by the kill was never a
        # complete report of an ack, so only whole lines are kept
        acks.extend(line for line in proc.stdout.read().splitlines(keepends=True) if line.endswith("\n"))
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return acks


async def check_acked(store: Store, acks: list[str]) -> None:
    """Every acknowledged message (lines from :func:`acks_until_sigkill`) is stored as acked,
    and the first conversation's seqs are gap-free."""
    for line in acks:
        conv, seq, msg_id, client_msg_id, body = line.split()
        msgs, _ = await store.history(int(conv), int(seq), 1, False)
        assert msgs, f"acknowledged message seq {seq} lost"
        m = msgs[0]
        assert (m.seq, m.msg_id, m.client_msg_id.hex(), m.body.hex()) == (
            int(seq),
            int(msg_id),
            client_msg_id,
            body,
        )
    # seqs are gap-free after recovery
    first_conv = int(acks[0].split()[0])
    hist, _ = await store.history(first_conv, 0, 100_000, True)
    assert [m.seq for m in hist] == list(range(1, len(hist) + 1))
    assert len(hist) >= len(acks)


class StoreBehaviour:
    """Inherit and provide ``store_factory``."""

    @pytest.fixture
    def store_factory(self) -> StoreFactory:  # pragma: no cover - overridden
        raise NotImplementedError

    @pytest.fixture
    def run(self, store_factory: StoreFactory) -> Runner[Any]:
        def _run(body: Callable[[Store], Awaitable[T]]) -> T:
            return run_store(store_factory, body)

        return _run

    # ---- users ----------------------------------------------------------------------------------

    def test_users(self, run: Runner[None]) -> None:
        async def body(store: Store) -> None:
            uid = await store.create_user("alice", "hash-a")
            assert uid > 0
            rec = await store.get_user(uid)
            assert rec is not None and rec.username == "alice" and rec.password_hash == "hash-a"
            assert rec.created_ms > 0
            by_name = await store.get_user_by_name("alice")
            assert by_name == rec
            assert await store.get_user(uid + 1000) is None
            assert await store.get_user_by_name("nobody") is None
            with pytest.raises(RequestError) as ei:
                await store.create_user("alice", "other")
            assert ei.value.code == ErrorCode.CONFLICT
            bob = await store.create_user("bob", "hash-b")
            assert bob != uid

        run(body)

    # ---- sequencing -----------------------------------------------------------------------------

    def test_seq_exactly_plus_one_under_concurrency(self, run: Runner[None]) -> None:
        async def body(store: Store) -> None:
            a, b = await users(store, "alice", "bob")
            conv = await store.direct_conversation(a, b)
            results = await fill(store, conv, a, 200)
            seqs = sorted(r.message.seq for r in results)
            assert seqs == list(range(1, 201))
            assert not any(r.duplicate for r in results)
            assert len({r.message.msg_id for r in results}) == 200
            # msg_id order agrees with seq order
            by_seq = sorted(results, key=lambda r: r.message.seq)
            ids = [r.message.msg_id for r in by_seq]
            assert ids == sorted(ids)
            ts = [r.message.ts_ms for r in by_seq]
            assert ts == sorted(ts)
            more = await fill(store, conv, b, 3)
            assert sorted(r.message.seq for r in more) == [201, 202, 203]
            state = {c.conv: c for c in await store.conversations(a)}
            assert state[conv].last_seq == 203

        run(body)

    def test_seq_independent_across_conversations(self, run: Runner[None]) -> None:
        async def body(store: Store) -> None:
            a, b, c, d = await users(store, "alice", "bob", "carol", "dave")
            convs = [
                await store.direct_conversation(a, b),
                await store.direct_conversation(a, c),
                (await store.create_group(a, "g", [b, c, d])).conv,
            ]
            kinds = {convs[0]: DIRECT, convs[1]: DIRECT, convs[2]: GROUP}
            reqs = [req(convs[i % 3], a, kind=kinds[convs[i % 3]]) for i in range(150)]
            results = await asyncio.gather(*(store.append(r) for r in reqs))
            for conv in convs:
                seqs = sorted(r.message.seq for r in results if r.message.conv == conv)
                assert seqs == list(range(1, 51))
            assert len({r.message.msg_id for r in results}) == 150
            for r in results:
                assert r.message.kind == kinds[r.message.conv]

        run(body)

    def test_group_commit_batches(self, run: Runner[None]) -> None:
        async def body(store: Store) -> None:
            stats = getattr(store, "stats", None)
            if stats is None or not hasattr(stats, "transactions"):
                pytest.skip("store exposes no group-commit counters")
            a, b = await users(store, "alice", "bob")
            conv = await store.direct_conversation(a, b)
            before = store.stats.transactions  # type: ignore[attr-defined]
            await fill(store, conv, a, 300)
            after = store.stats  # type: ignore[attr-defined]
            transactions = after.transactions - before
            assert after.appended >= 300
            assert transactions < 300 / 4, f"{transactions} transactions for 300 concurrent appends"

        run(body)

    def test_append_returns_full_message(self, run: Runner[None]) -> None:
        async def body(store: Store) -> None:
            a, b = await users(store, "alice", "bob")
            conv = await store.direct_conversation(a, b)
            key = cmid()
            body_bytes = bytes(range(256)) * 4  # opaque, not UTF-8
            r = await store.append(
                AppendRequest(
                    conv=conv, kind=DIRECT, sender_id=a, client_msg_id=key, content_type=7, body=body_bytes
                )
            )
            m = r.message
            assert (m.conv, m.kind, m.seq, m.sender_id, m.client_msg_id, m.content_type, m.body) == (
                conv,
                DIRECT,
                1,
                a,
                key,
                7,
                body_bytes,
            )
            assert m.msg_id > 0 and m.ts_ms > 0 and r.duplicate is False
            hist, _ = await store.history(conv, 1, 10, False)
            assert hist == [m]

        run(body)

    def test_append_errors(self, run: Runner[None]) -> None:
        async def body(store: Store) -> None:
            a, b = await users(store, "alice", "bob")
            conv = await store.direct_conversation(a, b)
            with pytest.raises(RequestError) as ei:
                await store.append(req(conv + 999, a))
            assert ei.value.code == ErrorCode.NOT_FOUND
            with pytest.raises(RequestError) as ei:
                await store.append(req(conv, a, client_msg_id=b"short"))
            assert ei.value.code == ErrorCode.BAD_REQUEST
            with pytest.raises(RequestError):
                await store.append(req(conv, a, kind=3))  # rooms are never stored
            # a failing request does not disturb the others in its batch
            results = await asyncio.gather(
                store.append(req(conv, a)),
                store.append(req(conv + 999, a)),
                store.append(req(conv, b)),
                return_exceptions=True,
            )
            assert isinstance(results[1], RequestError)
            ok = [r for r in results if isinstance(r, AppendResult)]
            assert sorted(r.message.seq for r in ok) == [1, 2]

        run(body)

    # ---- dedup ---------------------------------------------------------------------------------

    def test_dedup_returns_original(self, run: Runner[None]) -> None:
        async def body(store: Store) -> None:
            a, b = await users(store, "alice", "bob")
            conv = await store.direct_conversation(a, b)
            key = cmid()
            first = await store.append(req(conv, a, client_msg_id=key, body=b"one"))
            await store.append(req(conv, a))
            again = await store.append(req(conv, a, client_msg_id=key, body=b"different body"))
            assert first.duplicate is False
            assert again.duplicate is True
            assert again.message == first.message
            # the same client id from another sender is another message
            other = await store.append(req(conv, b, client_msg_id=key))
            assert other.duplicate is False and other.message.seq == 3
            hist, _ = await store.history(conv, 1, 100, False)
            assert [m.seq for m in hist] == [1, 2, 3]

        run(body)

    def test_dedup_inside_one_batch(self, run: Runner[None]) -> None:
        async def body(store: Store) -> None:
            a, b = await users(store, "alice", "bob")
            conv = await store.direct_conversation(a, b)
            key = cmid()
            results = await asyncio.gather(
                *(store.append(req(conv, a, client_msg_id=key)) for _ in range(20))
            )
            originals = [r for r in results if not r.duplicate]
            assert len(originals) == 1
            assert all(r.message == originals[0].message for r in results)
            # mixed: 50 distinct keys each sent twice concurrently
            keys = [cmid() for _ in range(50)]
            mixed = await asyncio.gather(*(store.append(req(conv, a, client_msg_id=k)) for k in keys + keys))
            assert sum(not r.duplicate for r in mixed) == 50
            for k in keys:
                found = {r.message.msg_id for r in mixed if r.message.client_msg_id == k}
                assert len(found) == 1
            hist, more = await store.history(conv, 0, 1000, True)
            assert [m.seq for m in hist] == list(range(1, 52)) and not more

        run(body)

    # ---- append_soon (the SEND fast path) ----------------------------------------------------------

    def test_append_soon_answers_in_call_order(self, run: Runner[None]) -> None:
        """Callbacks run after the commit, in call order; seq follows call order; a duplicate and
        a bad request inside the same batch get their own answers and leave no gap in seq."""

        async def body(store: Store) -> None:
            a, b = await users(store, "alice", "bob")
            conv = await store.direct_conversation(a, b)
            first = await store.append(req(conv, a))
            answers: list[tuple[int, AppendResult | None, BaseException | None]] = []
            done = asyncio.get_running_loop().create_future()
            requests = [req(conv, a if i % 2 else b) for i in range(60)]
            requests[10] = req(conv, a, client_msg_id=first.message.client_msg_id)  # stored before
            requests[20] = req(conv + 999, a)  # no such conversation
            requests[31] = req(conv, b, client_msg_id=requests[30].client_msg_id)  # same key as [30]

            def answer(i: int, result: AppendResult | None, error: BaseException | None) -> None:
                answers.append((i, result, error))
                if len(answers) == len(requests):
                    done.set_result(None)

            for i, r in enumerate(requests):
                store.append_soon(r, lambda res, err, i=i: answer(i, res, err))
            await asyncio.wait_for(done, 10)
            assert [i for i, _, _ in answers] == list(range(len(requests)))
            assert answers[10][1] is not None and answers[10][1].duplicate
            assert answers[10][1].message == first.message
            assert isinstance(answers[20][2], RequestError) and answers[20][2].code == ErrorCode.NOT_FOUND
            assert answers[31][1] is not None and answers[31][1].duplicate
            assert answers[31][1].message == answers[30][1].message  # type: ignore[union-attr]
            fresh = [res for i, res, _ in answers if i not in (10, 20, 31)]
            assert [r.message.seq for r in fresh if r is not None] == list(range(2, 59))
            hist, _ = await store.history(conv, 0, 100, True)
            assert [m.seq for m in hist] == list(range(1, 59))
            state = {c.conv: c for c in await store.conversations(a)}
            assert state[conv].last_seq == 58

        run(body)

    def test_append_soon_large_burst_over_several_conversations(self, run: Runner[None]) -> None:
        """A burst bigger than any one multi-row statement (SQLite: 1,024 rows), queued in one
        loop tick over three conversations: every append answered once, in call order, with
        exact per-conversation seqs, and every row readable afterwards."""

        async def body(store: Store) -> None:
            a, b, c, d = await users(store, "alice", "bob", "carol", "dave")
            convs = [await store.direct_conversation(a, x) for x in (b, c, d)]
            n = 2_500
            answers: list[tuple[int, AppendResult | None, BaseException | None]] = []
            done = asyncio.get_running_loop().create_future()

            def answer(i: int, result: AppendResult | None, error: BaseException | None) -> None:
                answers.append((i, result, error))
                if len(answers) == n:
                    done.set_result(None)

            for i in range(n):
                store.append_soon(
                    req(convs[i % 3], a, body=b"b%d" % i), lambda res, err, i=i: answer(i, res, err)
                )
            await asyncio.wait_for(done, 60)
            assert [i for i, _, _ in answers] == list(range(n))
            assert all(err is None for _, _, err in answers)
            for k, conv in enumerate(convs):
                mine = [res.message for i, res, _ in answers if i % 3 == k and res is not None]
                assert [m.seq for m in mine] == list(range(1, len(mine) + 1))
                assert [m.body for m in mine] == [b"b%d" % i for i in range(k, n, 3)]
                hist, more = await store.history(conv, 1, n, False)
                assert hist == mine and not more
            ids = [res.message.msg_id for _, res, _ in answers if res is not None]
            assert ids == sorted(ids) and len(set(ids)) == n

        run(body)

    def test_append_soon_rejects_before_queueing(self, run: Runner[None]) -> None:
        async def body(store: Store) -> None:
            a, b = await users(store, "alice", "bob")
            conv = await store.direct_conversation(a, b)
            called: list[object] = []
            with pytest.raises(RequestError) as ei:
                store.append_soon(req(conv, a, client_msg_id=b"short"), lambda r, e: called.append(r))
            assert ei.value.code == ErrorCode.BAD_REQUEST
            r = await store.append(req(conv, a))
            assert r.message.seq == 1 and not called

        run(body)

    def test_seq_continues_across_writes_of_other_kinds(self, run: Runner[None]) -> None:
        """Appends interleaved with other writes (groups, members, read positions) in the same
        batches keep exact seqs: cached conversation state never goes stale."""

        async def body(store: Store) -> None:
            a, b, c = await users(store, "alice", "bob", "carol")
            group = await store.create_group(a, "g", [b])
            results: list[AppendResult] = []
            for round_ in range(5):
                batch = [store.append(req(group.conv, a, kind=GROUP)) for _ in range(10)]
                others = [
                    store.add_member(group.conv, c) if round_ % 2 == 0 else store.remove_member(group.conv, c),
                    store.set_read(group.conv, b, round_ * 10),
                ]
                out = await asyncio.gather(*batch, *others)
                results += [r for r in out if isinstance(r, AppendResult)]
            assert sorted(r.message.seq for r in results) == list(range(1, 51))
            info = await store.group_info(group.conv)
            assert info is not None and info.last_seq == 50

        run(body)

    # ---- history ---------------------------------------------------------------------------------

    def test_history(self, run: Runner[None]) -> None:
        async def body(store: Store) -> None:
            a, b = await users(store, "alice", "bob")
            conv = await store.direct_conversation(a, b)
            for i in range(10):  # sequential: seq i+1 has body b"m<i>"
                await store.append(req(conv, a, body=b"m%d" % i))

            async def seqs(from_seq: int, limit: int, backward: bool) -> tuple[list[int], bool]:
                msgs, more = await store.history(conv, from_seq, limit, backward)
                return [m.seq for m in msgs], more

            assert await seqs(1, 3, False) == ([1, 2, 3], True)
            assert await seqs(0, 3, False) == ([1, 2, 3], True)
            assert await seqs(8, 3, False) == ([8, 9, 10], False)
            assert await seqs(9, 5, False) == ([9, 10], False)
            assert await seqs(11, 5, False) == ([], False)
            assert await seqs(1, 10, False) == (list(range(1, 11)), False)
            assert await seqs(0, 3, True) == ([8, 9, 10], True)
            assert await seqs(5, 3, True) == ([3, 4, 5], True)
            assert await seqs(3, 3, True) == ([1, 2, 3], False)
            assert await seqs(2, 5, True) == ([1, 2], False)
            assert await seqs(100, 2, True) == ([9, 10], True)
            assert await seqs(0, 10, True) == (list(range(1, 11)), False)
            msgs, _ = await store.history(conv, 4, 1, False)
            assert msgs[0].body == b"m3"
            assert await store.history(conv + 999, 0, 10, True) == ([], False)
            with pytest.raises(RequestError):
                await store.history(conv, 0, 0, True)

        run(body)

    # ---- read positions --------------------------------------------------------------------------

    def test_set_read_monotonic_and_capped(self, run: Runner[None]) -> None:
        async def body(store: Store) -> None:
            a, b, c = await users(store, "alice", "bob", "carol")
            conv = await store.direct_conversation(a, b)
            await fill(store, conv, a, 5)
            assert await store.set_read(conv, b, 3) == 3
            assert await store.set_read(conv, b, 2) == 3  # never back
            assert await store.set_read(conv, b, 99) == 5  # capped at last_seq
            assert await store.set_read(conv, b, 4) == 5
            assert await store.set_read(conv, a, 1) == 1  # per user
            states = {s.conv: s for s in await store.conversations(b)}
            assert states[conv].read_seq == 5 and states[conv].last_seq == 5
            with pytest.raises(RequestError) as ei:
                await store.set_read(conv, c, 1)
            assert ei.value.code == ErrorCode.NOT_MEMBER
            with pytest.raises(RequestError) as ei:
                await store.set_read(conv + 999, a, 1)
            assert ei.value.code == ErrorCode.NOT_FOUND

        run(body)

    # ---- conversations -------------------------------------------------------------------------

    def test_direct_conversation_symmetric_idempotent(self, run: Runner[None]) -> None:
        async def body(store: Store) -> None:
            a, b, c = await users(store, "alice", "bob", "carol")
            ab = await store.direct_conversation(a, b)
            assert await store.direct_conversation(b, a) == ab
            assert await store.direct_conversation(a, b) == ab
            ac = await store.direct_conversation(a, c)
            assert ac != ab
            # concurrent first use creates exactly one conversation
            bc = await asyncio.gather(
                *(store.direct_conversation(*(b, c) if i % 2 else (c, b)) for i in range(10))
            )
            assert len(set(bc)) == 1
            assert await store.conversation_kind(ab) == DIRECT
            assert await store.members(ab) == tuple(sorted((a, b)))
            with pytest.raises(RequestError) as ei:
                await store.direct_conversation(a, 10_000)
            assert ei.value.code == ErrorCode.NOT_FOUND
            assert await store.group_info(ab) is None
            # note to self
            aa = await store.direct_conversation(a, a)
            assert aa not in (ab, ac) and await store.members(aa) == (a,)
            assert [s.peer_id for s in await store.conversations(a) if s.conv == aa] == [a]

        run(body)

    def test_concurrent_first_direct_lookup_keeps_call_order(self, run: Runner[None]) -> None:
        """200 SENDs to a new direct conversation: lookups that start in order must let the
        appends reach the store in the same order (per-sender order = seq order)."""

        async def body(store: Store) -> None:
            a, b = await users(store, "alice", "bob")

            async def send(i: int) -> AppendResult:
                conv = await store.direct_conversation(a, b)
                return await store.append(req(conv, a, body=b"%03d" % i))

            results = await asyncio.gather(*(send(i) for i in range(200)))
            assert [r.message.seq for r in results] == list(range(1, 201))

        run(body)

    def test_groups(self, run: Runner[None]) -> None:
        async def body(store: Store) -> None:
            a, b, c, d = await users(store, "alice", "bob", "carol", "dave")
            g = await store.create_group(a, "friends", [b, c, b])
            assert g.name == "friends" and g.owner_id == a and g.last_seq == 0 and g.created_ms > 0
            assert g.members == tuple(sorted((a, b, c)))
            assert await store.conversation_kind(g.conv) == GROUP
            assert await store.group_info(g.conv) == g
            assert await store.add_member(g.conv, d) is True
            assert await store.add_member(g.conv, d) is False
            assert await store.members(g.conv) == tuple(sorted((a, b, c, d)))
            assert await store.remove_member(g.conv, c) is True
            assert await store.remove_member(g.conv, c) is False
            info = await store.group_info(g.conv)
            assert info is not None and info.members == tuple(sorted((a, b, d)))
            await fill(store, g.conv, a, 3, kind=GROUP)
            info = await store.group_info(g.conv)
            assert info is not None and info.last_seq == 3
            with pytest.raises(RequestError) as ei:
                await store.create_group(a, "x", [b, 10_000])
            assert ei.value.code == ErrorCode.NOT_FOUND
            with pytest.raises(RequestError) as ei:
                await store.add_member(g.conv, 10_000)
            assert ei.value.code == ErrorCode.NOT_FOUND
            with pytest.raises(RequestError) as ei:
                await store.add_member(g.conv + 999, b)
            assert ei.value.code == ErrorCode.NOT_FOUND
            assert await store.group_info(g.conv + 999) is None
            assert await store.members(g.conv + 999) == ()
            assert await store.conversation_kind(g.conv + 999) is None

        run(body)

    def test_conversations_list(self, run: Runner[None]) -> None:
        async def body(store: Store) -> None:
            a, b, c = await users(store, "alice", "bob", "carol")
            ab = await store.direct_conversation(a, b)
            g = await store.create_group(b, "team", [a, c])
            await fill(store, ab, a, 4)
            await fill(store, g.conv, c, 2, kind=GROUP)
            await store.set_read(ab, a, 4)
            await store.set_read(g.conv, a, 1)
            states = {s.conv: s for s in await store.conversations(a)}
            assert set(states) == {ab, g.conv}
            d = states[ab]
            assert (d.kind, d.peer_id, d.last_seq, d.read_seq) == (DIRECT, b, 4, 4)
            gs = states[g.conv]
            assert (gs.kind, gs.peer_id, gs.last_seq, gs.read_seq, gs.name) == (GROUP, 0, 2, 1, "team")
            b_states = {s.conv: s for s in await store.conversations(b)}
            assert b_states[ab].peer_id == a and b_states[ab].read_seq == 0
            assert [s.conv for s in await store.conversations(c)] == [g.conv]
            await store.remove_member(g.conv, c)
            assert await store.conversations(c) == []

        run(body)

    # ---- tokens --------------------------------------------------------------------------------

    def test_refresh_tokens(self, run: Runner[None]) -> None:
        async def body(store: Store) -> None:
            (a,) = await users(store, "alice")
            now = 1_000_000
            await store.add_refresh_token("t1", "fam1", a, now + 10_000)
            assert await store.use_refresh_token("t1", now) == (RefreshStatus.OK, "fam1", a)
            assert await store.use_refresh_token("t1", now) == (RefreshStatus.REUSED, "fam1", a)
            await store.add_refresh_token("t2", "fam1", a, now + 10_000)
            await store.revoke_family("fam1")
            assert await store.use_refresh_token("t2", now) == (RefreshStatus.REVOKED, "fam1", a)
            # a token added to an already revoked family is born revoked (refresh racing reuse)
            await store.add_refresh_token("t3", "fam1", a, now + 10_000)
            assert (await store.use_refresh_token("t3", now))[0] == RefreshStatus.REVOKED
            assert await store.use_refresh_token("nope", now) == (RefreshStatus.UNKNOWN, "", 0)
            await store.add_refresh_token("t4", "fam2", a, now + 10)
            assert (await store.use_refresh_token("t4", now + 10))[0] == RefreshStatus.UNKNOWN  # expired
            await store.add_refresh_token("t5", "fam3", a, now + 10_000)
            await store.add_refresh_token("t6", "fam4", a, now + 10_000)
            await store.revoke_user_tokens(a)
            assert (await store.use_refresh_token("t5", now))[0] == RefreshStatus.REVOKED
            assert (await store.use_refresh_token("t6", now))[0] == RefreshStatus.REVOKED

        run(body)

    def test_refresh_token_spent_once_under_concurrency(self, run: Runner[None]) -> None:
        async def body(store: Store) -> None:
            (a,) = await users(store, "alice")
            await store.add_refresh_token("t", "f", a, 2**62)
            results = await asyncio.gather(*(store.use_refresh_token("t", 0) for _ in range(10)))
            assert sorted(r[0] for r in results).count(RefreshStatus.OK) == 1
            assert sum(r[0] == RefreshStatus.REUSED for r in results) == 9

        run(body)

    def test_revoked_jtis(self, run: Runner[None]) -> None:
        async def body(store: Store) -> None:
            await store.revoke_jti("j1", 5_000)
            await store.revoke_jti("j2", 9_000)
            await store.revoke_jti("j1", 4_000)  # never shortens
            assert await store.revoked_jtis(1_000) == {"j1": 5_000, "j2": 9_000}
            assert await store.revoked_jtis(5_000) == {"j2": 9_000}
            assert await store.revoked_jtis(9_000) == {}

        run(body)

    # ---- lifecycle --------------------------------------------------------------------------

    def test_close_flushes_pending_appends(self, store_factory: StoreFactory) -> None:
        async def main() -> None:
            store = store_factory()
            await store.open()
            a, b = await users(store, "alice", "bob")
            conv = await store.direct_conversation(a, b)
            tasks = [asyncio.ensure_future(store.append(req(conv, a))) for _ in range(100)]
            await asyncio.sleep(0)  # let every task enqueue
            await store.close()
            results = await asyncio.gather(*tasks)
            assert sorted(r.message.seq for r in results) == list(range(1, 101))
            with pytest.raises(GochatError) as ei:
                await store.append(req(conv, a))
            assert ei.value.code in (ErrorCode.UNAVAILABLE, ErrorCode.SHUTTING_DOWN)

            reopened = store_factory()
            await reopened.open()
            try:
                hist, more = await reopened.history(conv, 0, 1000, True)
                assert len(hist) == 100 and not more
                nxt = await reopened.append(req(conv, b))
                assert nxt.message.seq == 101
                assert nxt.message.msg_id > max(r.message.msg_id for r in results)
                await reopened.ping()
            finally:
                await reopened.close()

        asyncio.run(main())

    # ---- fencing (membership writes made under the lock group:{id}) --------------------------

    def test_member_writes_refuse_a_stale_fence(self, run: Runner[None]) -> None:
        async def body(store: Store) -> None:
            a, b, c, d = await users(store, "alice", "bob", "carol", "dave")
            g = await store.create_group(a, "g", [b])
            conv = g.conv

            async def state() -> tuple[int, tuple[int, ...]]:
                return await store.members_versioned(conv)

            async def refused(write: Awaitable[bool], fence: int, stored: int) -> None:
                before = await state()
                with pytest.raises(StaleFenceError) as ei:
                    await write
                err = ei.value
                assert isinstance(err, GochatError)
                assert err.code == ErrorCode.UNAVAILABLE and err.spec.retryable
                assert (err.conv, err.fence, err.stored) == (conv, fence, stored)
                assert await state() == before  # changed nothing

            assert await store.add_member(conv, c, fence=5) is True
            assert await state() == (2, tuple(sorted((a, b, c))))
            # a lower fence: refused, whatever the write (a change or a no-op)
            await refused(store.add_member(conv, d, fence=4), 4, 5)
            await refused(store.remove_member(conv, b, fence=4), 4, 5)
            await refused(store.add_member(conv, c, fence=4), 4, 5)
            await refused(store.remove_member(conv, d, fence=1), 1, 5)
            await refused(store.remove_member(conv, a, fence=0), 0, 5)
            # an equal fence passes, a higher one passes and becomes the group's fence
            assert await store.add_member(conv, d, fence=5) is True
            assert await state() == (3, tuple(sorted((a, b, c, d))))
            assert await store.remove_member(conv, b, fence=7) is True
            assert await state() == (4, tuple(sorted((a, c, d))))
            await refused(store.add_member(conv, b, fence=6), 6, 7)
            # no fence: today's behaviour (unchecked, and the stored fence stays)
            assert await store.add_member(conv, b) is True
            assert await store.add_member(conv, b) is False
            assert await store.remove_member(conv, b) is True
            assert await store.remove_member(conv, b) is False
            assert await state() == (6, tuple(sorted((a, c, d))))
            await refused(store.remove_member(conv, d, fence=6), 6, 7)
            # the version counts only real changes; a no-op write still raises the fence
            assert await store.add_member(conv, d, fence=9) is False
            assert await store.remove_member(conv, b, fence=9) is False
            assert await state() == (6, tuple(sorted((a, c, d))))
            await refused(store.remove_member(conv, d, fence=8), 8, 9)
            assert await store.remove_member(conv, c, fence=9) is True
            assert await state() == (7, tuple(sorted((a, d))))
            # fences are per group; another group's writes are not affected
            h = await store.create_group(b, "h", [])
            assert await store.add_member(h.conv, c, fence=1) is True
            assert await store.members_versioned(h.conv) == (2, tuple(sorted((b, c))))
            # unknown group or user: NOT_FOUND as without a fence
            for write in (
                lambda: store.add_member(h.conv + 999, c, fence=1),
                lambda: store.remove_member(h.conv + 999, c, fence=1),
                lambda: store.add_member(conv, 10_000, fence=9),
            ):
                with pytest.raises(RequestError) as nf:
                    await write()
                assert nf.value.code == ErrorCode.NOT_FOUND
            assert await state() == (7, tuple(sorted((a, d))))

        run(body)

    def test_a_stalled_lock_holder_cannot_write_after_the_next_one(self, run: Runner[None]) -> None:
        """Holder 1 takes ``group:{id}`` with a short TTL and stalls past it (no renewal);
        holder 2 (another node: another MemoryLocks on the same hub) gets the lock with a
        higher fence and writes; holder 1's late writes carry its old fence and are refused,
        so the two holdings never both change the group."""

        async def body(store: Store) -> None:
            a, b, c = await users(store, "alice", "bob", "carol")
            g = await store.create_group(a, "g", [])
            hub = MemoryHub()
            one, two = MemoryLocks(hub), MemoryLocks(hub)
            name = f"group:{g.conv}"
            try:
                first = await one.acquire(name, ttl_s=0.3)
                assert await store.add_member(g.conv, b, fence=first.fence) is True  # in time
                one.abandon()  # holder 1 stalls: no renewal, no release
                second = await two.acquire(name, ttl_s=5, timeout_s=5)  # once the TTL has run out
                assert second.fence > first.fence
                assert await store.add_member(g.conv, c, fence=second.fence) is True
                assert await store.members_versioned(g.conv) == (3, tuple(sorted((a, b, c))))
                # holder 1 wakes up and goes on with what it read before it stalled
                with pytest.raises(StaleFenceError):
                    await store.remove_member(g.conv, b, fence=first.fence)
                with pytest.raises(StaleFenceError):
                    await store.add_member(g.conv, a, fence=first.fence)  # a no-op too
                assert await store.members_versioned(g.conv) == (3, tuple(sorted((a, b, c))))
                # holder 2 goes on writing
                assert await store.remove_member(g.conv, b, fence=second.fence) is True
                await two.release(second)
                # the next holding, from either node, has a higher fence still
                async with one.lock(name, ttl_s=5) as third:
                    assert third.fence > second.fence
                    assert await store.add_member(g.conv, b, fence=third.fence) is True
                assert await store.members_versioned(g.conv) == (5, tuple(sorted((a, b, c))))
            finally:
                await one.close()
                await two.close()

        run(body)

    def test_concurrent_fenced_writes_keep_the_highest_fence(self, run: Runner[None]) -> None:
        """Writes with fences 1..12 at once, in shuffled order: each is applied or refused as a
        whole, the highest fence always wins, the version counts exactly the applied ones."""

        async def body(store: Store) -> None:
            owner, *others = await users(store, *(f"u{i}" for i in range(13)))
            g = await store.create_group(owner, "g", [])
            fences = list(range(1, 13))
            random.Random(7).shuffle(fences)
            results = await asyncio.gather(
                *(store.add_member(g.conv, uid, fence=f) for uid, f in zip(others, fences, strict=True)),
                return_exceptions=True,
            )
            applied = {uid for uid, r in zip(others, results, strict=True) if r is True}
            refused = [r for r in results if r is not True]
            assert all(isinstance(r, StaleFenceError) for r in refused), refused
            assert others[fences.index(12)] in applied
            assert await store.members_versioned(g.conv) == (1 + len(applied), tuple(sorted({owner, *applied})))
            with pytest.raises(StaleFenceError):
                await store.remove_member(g.conv, owner, fence=11)

        run(body)

    def test_recent_groups_by_their_newest_message(self, run: Runner[None]) -> None:
        """Groups ordered by their newest message (direct conversations and groups without a
        message never listed), at most ``limit``, judged by the newest ``scan`` messages."""

        async def body(store: Store) -> None:
            a, b = await users(store, "alice", "bob")
            g1, g2, g3, quiet = [(await store.create_group(a, f"g{i}", [b])).conv for i in range(4)]
            direct = await store.direct_conversation(a, b)
            assert await store.recent_groups(10) == []
            for conv, kind in ((g1, GROUP), (direct, DIRECT), (g2, GROUP), (g3, GROUP), (g1, GROUP), (direct, DIRECT)):
                await store.append(req(conv, a, kind=kind))
            assert await store.recent_groups(10) == [g1, g3, g2]
            assert quiet not in await store.recent_groups(10)
            assert await store.recent_groups(2) == [g1, g3]
            assert await store.recent_groups(10, scan=2) == [g1]  # the direct message, then g1's
            assert await store.recent_groups(10, scan=3) == [g1, g3]
            assert await store.recent_groups(0) == []
            await fill(store, g2, b, 3, kind=GROUP)
            assert await store.recent_groups(3) == [g2, g1, g3]

        run(body)
