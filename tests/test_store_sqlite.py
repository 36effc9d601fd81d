"""SQLiteStore: the shared behaviour suite plus SQLite-specific durability, migration, failure
mapping and msg_id generator tests. Real database files in tmp_path; no mocks."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import textwrap
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from gochat.errors import ErrorCode, RequestError, UnavailableError
from gochat.ids import EPOCH_MS, MAX_SEQUENCE, IdGenerator, id_parts, id_unix_ms
from gochat.store.base import AppendRequest, AppendResult, Store
from gochat.store.sqlite import SCHEMA_VERSION, SQLiteStore

try:
    from tests.store_behaviour import (
        StoreBehaviour,
        StoreFactory,
        acks_until_sigkill,
        check_acked,
        req,
        run_store,
        users,
    )
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from store_behaviour import (  # type: ignore[no-redef,import-not-found]
        StoreBehaviour,
        StoreFactory,
        acks_until_sigkill,
        check_acked,
        req,
        run_store,
        users,
    )

T = TypeVar("T")


class TestSQLiteStore(StoreBehaviour):
    @pytest.fixture
    def store_factory(self, tmp_path: Path) -> StoreFactory:
        path = tmp_path / "gochat.db"
        return lambda: SQLiteStore(path)


def _run(coro_fn: Callable[[SQLiteStore], Awaitable[T]], path: Path, **kwargs: Any) -> T:
    return run_store(lambda: SQLiteStore(path, **kwargs), coro_fn)


def test_store_satisfies_protocol(tmp_path: Path) -> None:
    assert isinstance(SQLiteStore(tmp_path / "x.db"), Store)


def test_wal_and_synchronous_full(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"

    async def body(store: SQLiteStore) -> tuple[str, int, int]:
        mode = await store._write(lambda c: c.execute("PRAGMA journal_mode").fetchone()[0])
        sync = await store._write(lambda c: c.execute("PRAGMA synchronous").fetchone()[0])
        fks = await store._write(lambda c: c.execute("PRAGMA foreign_keys").fetchone()[0])
        return mode, sync, fks

    mode, sync, fks = _run(body, path)
    assert mode == "wal"
    assert sync == 2  # FULL
    assert fks == 1


def test_schema_versioned_migrations(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"

    async def noop(store: SQLiteStore) -> None:
        await store.create_user("alice", "h")

    _run(noop, path)
    _run(lambda s: s.ping(), path)  # reopen: migrations are not re-applied
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT version FROM schema_version ORDER BY version").fetchall()
        assert [r[0] for r in rows] == list(range(1, SCHEMA_VERSION + 1))
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"users", "refresh_tokens", "revoked_jtis", "conversations", "members", "messages"} <= tables
        assert conn.execute("SELECT COUNT(*) FROM users").fetchone()[0] == 1
        # a database from a newer gochat is refused, not silently used
        conn.execute("INSERT INTO schema_version VALUES (?, 0)", (SCHEMA_VERSION + 1,))
    with pytest.raises(UnavailableError, match="newer"):
        _run(lambda s: s.ping(), path)


def test_version_1_database_upgrades_with_its_messages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Schema 2 rebuilds the messages table (keyed by msg_id, dedup index by client_msg_id
    first): a database written by schema 1 keeps every message, its dedup keys and its seqs."""
    import gochat.store.sqlite.schema as sqlite_module  # where migrate() reads MIGRATIONS

    path = tmp_path / "db.sqlite"
    keys = [os.urandom(16) for _ in range(5)]

    async def write_v1(store: SQLiteStore) -> tuple[int, int, list[AppendResult]]:
        a, b = await users(store, "alice", "bob")
        conv = await store.direct_conversation(a, b)
        return a, conv, [await store.append(req(conv, a, client_msg_id=k, body=b"old%d" % i)) for i, k in enumerate(keys)]

    with monkeypatch.context() as m:
        m.setattr(sqlite_module, "MIGRATIONS", sqlite_module.MIGRATIONS[:1])
        m.setattr(sqlite_module, "SCHEMA_VERSION", 1)
        alice, conv, old = _run(write_v1, path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] == 1

    async def after(store: SQLiteStore) -> None:
        hist, more = await store.history(conv, 1, 100, False)
        assert [m for m in hist] == [r.message for r in old] and not more
        again = await store.append(req(conv, alice, client_msg_id=keys[2], body=b"retry"))
        assert again.duplicate and again.message == old[2].message
        new = await store.append(req(conv, alice, body=b"new"))
        assert new.message.seq == 6 and new.message.msg_id > old[-1].message.msg_id
        assert new.message.ts_ms >= old[-1].message.ts_ms

    _run(after, path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] == SCHEMA_VERSION
        columns = [r[1] for r in conn.execute("PRAGMA table_info(messages)")]
        assert columns[0] == "msg_id"
        assert conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 6
        assert "messages_v2" not in {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        unique = [
            [c[2] for c in conn.execute(f"PRAGMA index_info('{name}')")]
            for _, name, is_unique, *_ in conn.execute("PRAGMA index_list(messages)")
            if is_unique
        ]
        assert sorted(unique) == [["client_msg_id", "sender_id"], ["conv", "seq"]]


def test_a_burst_above_max_batch_commits_in_bounded_transactions(tmp_path: Path) -> None:
    """1,000 appends handed over in one loop tick with max_batch=100: no transaction takes more
    than 100 of them (one giant transaction would delay every answer in it), and all are
    answered once, in call order, with exact seqs."""

    async def body(store: SQLiteStore) -> tuple[int, int, list[int]]:
        a, b = await users(store, "alice", "bob")
        conv = await store.direct_conversation(a, b)
        tx0 = store.stats.transactions
        seqs: list[int] = []
        done = asyncio.get_running_loop().create_future()

        def answer(result: AppendResult | None, error: BaseException | None) -> None:
            assert result is not None and error is None
            seqs.append(result.message.seq)
            if len(seqs) == 1000:
                done.set_result(None)

        for _ in range(1000):
            store.append_soon(req(conv, a), answer)
        await asyncio.wait_for(done, 30)
        return store.stats.largest_batch, store.stats.transactions - tx0, seqs

    largest, transactions, seqs = _run(body, tmp_path / "db.sqlite", max_batch=100)
    assert largest <= 100
    assert transactions >= 10
    assert seqs == list(range(1, 1001))


def test_locked_past_busy_timeout_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"

    async def body(store: SQLiteStore) -> None:
        a, b = await users(store, "alice", "bob")
        conv = await store.direct_conversation(a, b)
        blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            request = req(conv, a)
            with pytest.raises(UnavailableError) as ei:
                await store.append(request)
            assert ei.value.code == ErrorCode.UNAVAILABLE
            with pytest.raises(UnavailableError):
                await store.create_user("carol", "h")
            # reads still work in WAL mode while a writer holds the lock
            assert await store.get_user(a) is not None
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        # nothing was acknowledged; the retry is stored exactly once
        result = await store.append(request)
        assert result.duplicate is False and result.message.seq == 1
        assert store.stats.failed_transactions == 2

    _run(body, path, busy_timeout_ms=100)


def test_unopenable_path_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(UnavailableError):
        _run(lambda s: s.ping(), tmp_path / "missing-dir" / "db.sqlite")


def test_bodies_stored_verbatim_as_blob(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    payload = b"\x00\xff\xfe binary \x80"

    async def body(store: SQLiteStore) -> None:
        a, b = await users(store, "alice", "bob")
        conv = await store.direct_conversation(a, b)
        await store.append(req(conv, a, body=payload))

    _run(body, path)
    with sqlite3.connect(path) as conn:
        value, kind = conn.execute("SELECT body, typeof(body) FROM messages").fetchone()
    assert (value, kind) == (payload, "blob")


CHILD = textwrap.dedent(
    """
    import asyncio, os, sys
    from gochat.store.base import AppendRequest
    from gochat.store.sqlite import SQLiteStore

    async def main():
        store = SQLiteStore(sys.argv[1])
        await store.open()
        a = await store.create_user("alice", "h")
        b = await store.create_user("bob", "h")
        conv = await store.direct_conversation(a, b)
        while True:
            reqs = [AppendRequest(conv, 1, a, os.urandom(16), 1, os.urandom(32)) for _ in range(8)]
            for r in await asyncio.gather(*(store.append(q) for q in reqs)):
                m = r.message
                # the ack: printed only after append() returned, i.e. after COMMIT
                print(m.conv, m.seq, m.msg_id, m.client_msg_id.hex(), m.body.hex(), flush=True)

    asyncio.run(main())
    """
)


def test_acked_appends_survive_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "durable.sqlite"
    acks = acks_until_sigkill(CHILD, [str(path)], 40)
    _run(lambda store: check_acked(store, acks), path)


def test_cancelled_waiter_does_not_break_batch(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"

    async def body(store: SQLiteStore) -> None:
        a, b = await users(store, "alice", "bob")
        conv = await store.direct_conversation(a, b)
        request = req(conv, a)
        task = asyncio.ensure_future(store.append(request))
        others = [asyncio.ensure_future(store.append(req(conv, b))) for _ in range(5)]
        await asyncio.sleep(0)
        task.cancel()
        results = await asyncio.gather(*others)
        assert len(results) == 5
        # the cancelled append may or may not have committed; a retry resolves it exactly once
        retry = await store.append(request)
        hist, _ = await store.history(conv, 0, 100, True)
        assert [m.seq for m in hist] == list(range(1, len(hist) + 1))
        assert sum(m.client_msg_id == request.client_msg_id for m in hist) == 1
        assert retry.message.client_msg_id == request.client_msg_id

    _run(body, path)


def test_unexpected_failure_of_one_append_is_isolated(tmp_path: Path) -> None:
    """A request that fails inside the transaction (here: an integer SQLite cannot store) is
    retried in isolation; the rest of its batch still commits."""

    async def body(store: SQLiteStore) -> None:
        a, b = await users(store, "alice", "bob")
        conv = await store.direct_conversation(a, b)
        bad = AppendRequest(conv, 1, 2**70, os.urandom(16), 1, b"x")
        results = await asyncio.gather(
            store.append(req(conv, a)), store.append(bad), store.append(req(conv, b)), return_exceptions=True
        )
        assert isinstance(results[1], RequestError) and results[1].code == ErrorCode.BAD_REQUEST
        assert sorted(r.message.seq for r in results if isinstance(r, AppendResult)) == [1, 2]
        assert (await store.append(req(conv, a))).message.seq == 3

    _run(body, tmp_path / "db.sqlite")


def test_purge_expired(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
        (a,) = await users(store, "alice")
        await store.add_refresh_token("old", "f", a, 100)
        await store.add_refresh_token("new", "f", a, 10_000)
        await store.revoke_jti("j-old", 100)
        await store.revoke_jti("j-new", 10_000)
        assert await store.purge_expired(5_000) == (1, 1)
        assert await store.revoked_jtis(0) == {"j-new": 10_000}

    _run(body, tmp_path / "db.sqlite")


def test_appends_from_two_event_loops(tmp_path: Path) -> None:
    """Futures are resolved on the loop that created them (one call_soon_threadsafe per loop)."""
    path = tmp_path / "db.sqlite"
    store = SQLiteStore(path)
    setup: dict[str, int] = {}

    async def open_and_setup() -> None:
        await store.open()
        a, b = await users(store, "alice", "bob")
        setup["a"], setup["conv"] = a, await store.direct_conversation(a, b)

    loop1 = asyncio.new_event_loop()
    loop1.run_until_complete(open_and_setup())
    results: list[int] = []
    errors: list[BaseException] = []

    def other_loop() -> None:
        async def go() -> None:
            rs = await asyncio.gather(*(store.append(req(setup["conv"], setup["a"])) for _ in range(50)))
            results.extend(r.message.seq for r in rs)

        try:
            asyncio.run(go())
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    thread = threading.Thread(target=other_loop)
    thread.start()

    async def here() -> list[int]:
        rs = await asyncio.gather(*(store.append(req(setup["conv"], setup["a"])) for _ in range(50)))
        return [r.message.seq for r in rs]

    mine = loop1.run_until_complete(here())
    thread.join()
    loop1.run_until_complete(store.close())
    loop1.close()
    assert not errors
    assert sorted(mine + results) == list(range(1, 101))


# ---- msg_id generator ------------------------------------------------------------------------


class FakeClock:
    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def test_id_layout() -> None:
    clock = FakeClock(EPOCH_MS + 12345)
    gen = IdGenerator(513, clock=clock)
    first = gen.next_id()
    assert id_parts(first) == (EPOCH_MS + 12345, 513, 0)
    assert id_parts(gen.next_id()) == (EPOCH_MS + 12345, 513, 1)
    assert id_unix_ms(first) == EPOCH_MS + 12345
    assert 0 < first < 2**63
    with pytest.raises(ValueError):
        IdGenerator(1024)
    with pytest.raises(ValueError):
        IdGenerator(-1)


def test_ids_monotonic_when_clock_steps_back() -> None:
    clock = FakeClock(EPOCH_MS + 1_000_000)
    gen = IdGenerator(1, clock=clock)
    ids = [gen.next_id() for _ in range(10)]
    clock.ms -= 5_000  # NTP step back by 5 s
    ids += [gen.next_id() for _ in range(10)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    # sequence exhaustion while the clock is behind borrows the next millisecond
    ids += [gen.next_id() for _ in range(MAX_SEQUENCE + 10)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert id_parts(ids[-1]).unix_ms == EPOCH_MS + 1_000_001
    clock.ms += 10_000  # clock catches up: real time again
    nxt = gen.next_id()
    assert nxt > ids[-1] and id_parts(nxt) == (clock.ms, 1, 0)


def test_ids_wait_for_next_ms_when_sequence_exhausted() -> None:
    gen = IdGenerator(2)  # real clock
    ids = [gen.next_id() for _ in range(3 * (MAX_SEQUENCE + 1))]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert max(id_parts(i).sequence for i in ids) <= MAX_SEQUENCE


def test_next_ids_blocks_interleave_with_single_ids() -> None:
    clock = FakeClock(EPOCH_MS + 7_000)
    gen = IdGenerator(3, clock=clock)
    ids = [gen.next_id(), *gen.next_ids(5), gen.next_id()]
    assert [id_parts(i).sequence for i in ids] == list(range(7))  # one millisecond, no gaps
    assert gen.next_ids(0) == []
    # a block that does not fit in this millisecond's sequence space goes one by one
    clock.ms -= 1_000  # and the clock stepped back meanwhile: still increasing
    ids += gen.next_ids(MAX_SEQUENCE + 3)
    ids += gen.next_ids(4)
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(id_parts(i).node_id == 3 for i in ids)
    clock.ms += 5_000  # a new millisecond: a block starts at sequence 0
    block = gen.next_ids(3)
    assert [id_parts(i) for i in block] == [(clock.ms, 3, 0), (clock.ms, 3, 1), (clock.ms, 3, 2)]


def test_ids_seeded_after_previous_id() -> None:
    clock = FakeClock(EPOCH_MS + 50_000)
    previous = IdGenerator(0, clock=clock).next_id()
    clock.ms -= 20_000  # restarted with a clock that went back
    gen = IdGenerator(0, clock=clock, after=previous)
    assert gen.next_id() > previous


def test_store_shares_and_advances_the_process_generator(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"

    async def first(store: SQLiteStore) -> int:
        a, b = await users(store, "alice", "bob")
        conv = await store.direct_conversation(a, b)
        return (await store.append(req(conv, a))).message.msg_id

    stored = _run(first, path)
    clock = FakeClock(id_unix_ms(stored) - 60_000)  # the process restarts with a clock a minute behind
    gen = IdGenerator(0, clock=clock)

    async def second(store: SQLiteStore) -> None:
        room_id = gen.next_id()  # e.g. a room message numbered by the messaging core
        assert room_id > stored
        (a,) = [u.user_id for u in [await store.get_user_by_name("alice")] if u]
        conv = (await store.conversations(a))[0].conv
        msg = (await store.append(req(conv, a))).message
        assert msg.msg_id > room_id and gen.next_id() > msg.msg_id

    _run(second, path, ids=gen)
    with pytest.raises(ValueError):
        SQLiteStore(path, node_id=1, ids=gen)


def test_ids_thread_safe() -> None:
    gen = IdGenerator(7)
    out: list[list[int]] = [[] for _ in range(4)]

    def work(i: int) -> None:
        out[i].extend(gen.next_id() for _ in range(5000))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = [x for chunk in out for x in chunk]
    assert len(set(everything)) == len(everything)
    for chunk in out:
        assert chunk == sorted(chunk)
