"""PostgresStore: the shared behaviour suite plus PostgreSQL-specific tests (migrations,
partitions, group commit, several nodes on one database, outages through a TCP proxy, SIGKILL).

Needs a real PostgreSQL: ``GOCHAT_TEST_POSTGRES_DSN`` (a URL; default
``postgresql://postgres@127.0.0.1:5432/test``). ``scripts/services.sh`` starts one. Each test
uses its own random schema, dropped afterwards. If PostgreSQL is unreachable the tests FAIL:
they are never skipped.
"""

from __future__ import annotations

import asyncio
import functools
import os
import secrets
import socket
import textwrap
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from gochat.errors import ErrorCode, RequestError, UnavailableError
from gochat.ids import IdGenerator
from gochat.store.base import AppendRequest, AppendResult, Store
from gochat.store.postgres import MESSAGE_PARTITIONS, SCHEMA_VERSION, PostgresStore, migrate

try:
    from tests.store_behaviour import (
        DIRECT,
        GROUP,
        StoreBehaviour,
        StoreFactory,
        acks_until_sigkill,
        check_acked,
        cmid,
        req,
        run_store,
        users,
    )
    from tests.tcpproxy import TcpProxy
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from store_behaviour import (  # type: ignore[no-redef,import-not-found]
        DIRECT,
        GROUP,
        StoreBehaviour,
        StoreFactory,
        acks_until_sigkill,
        check_acked,
        cmid,
        req,
        run_store,
        users,
    )
    from tcpproxy import TcpProxy  # type: ignore[no-redef,import-not-found]

T = TypeVar("T")
DSN = os.environ.get("GOCHAT_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")


# ---- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_dsn() -> str:
    """The DSN, after checking that PostgreSQL answers. Fails (never skips) otherwise."""

    async def check() -> None:
        conn = await asyncpg.connect(DSN, timeout=5)
        try:
            await conn.fetchval("SELECT 1")
        finally:
            await conn.close()

    problem = ""
    try:
        asyncio.run(asyncio.wait_for(check(), 10))
    except Exception as exc:
        problem = f"{type(exc).__name__}: {exc}"
    if problem:
        pytest.fail(
            f"PostgreSQL is not reachable at {DSN} ({problem}). The PostgreSQL store tests need a real "
            "server: run scripts/services.sh, or set GOCHAT_TEST_POSTGRES_DSN.",
            pytrace=False,
        )
    return DSN


async def _sql(query: str, *args: Any) -> list[Any]:
    conn = await asyncpg.connect(DSN, timeout=5)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


@pytest.fixture
def pg_schema(postgres_dsn: str) -> Iterator[str]:
    name = f"gochat_test_{secrets.token_hex(6)}"
    try:
        yield name
    finally:
        asyncio.run(_sql(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))


def _run(body: Callable[[PostgresStore], Awaitable[T]], schema: str, **kwargs: Any) -> T:
    dsn = kwargs.pop("dsn", DSN)
    return run_store(lambda: PostgresStore(dsn, schema=schema, min_size=1, max_size=4, **kwargs), body)


def _proxied(dsn: str, port: int) -> str:
    parts = urlsplit(dsn)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@127.0.0.1:{port}" if userinfo else f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _backend(dsn: str) -> tuple[str, int]:
    parts = urlsplit(dsn)
    return parts.hostname or "127.0.0.1", parts.port or 5432


# ---- the shared behaviour suite -------------------------------------------------------------------


class TestPostgresStore(StoreBehaviour):
    @pytest.fixture
    def store_factory(self, pg_schema: str) -> StoreFactory:
        return lambda: PostgresStore(DSN, schema=pg_schema, min_size=1, max_size=4)


# ---- PostgreSQL specifics -------------------------------------------------------------------------


def test_store_satisfies_protocol() -> None:
    assert isinstance(PostgresStore(DSN), Store)


def test_constructor_validates() -> None:
    for bad in ("Upper", "semi;colon", "", "1abc", 'quo"te', "x" * 64):
        with pytest.raises(ValueError):
            PostgresStore(DSN, schema=bad)
    with pytest.raises(ValueError):
        PostgresStore(DSN, node_id=1, ids=IdGenerator(2))
    with pytest.raises(ValueError):
        PostgresStore(DSN, min_size=5, max_size=2)


def test_migrations_idempotent(pg_schema: str) -> None:
    assert asyncio.run(migrate(DSN, pg_schema)) == SCHEMA_VERSION
    assert asyncio.run(migrate(DSN, pg_schema)) == SCHEMA_VERSION  # nothing to do
    _run(lambda s: s.create_user("alice", "h"), pg_schema)
    _run(lambda s: s.ping(), pg_schema)  # reopen: not re-applied
    rows = asyncio.run(_sql(f'SELECT version FROM "{pg_schema}".schema_version ORDER BY version'))
    assert [r[0] for r in rows] == list(range(1, SCHEMA_VERSION + 1))
    tables = asyncio.run(
        _sql(
            "SELECT tablename FROM pg_tables WHERE schemaname = $1 AND tablename NOT LIKE 'messages_p%'",
            pg_schema,
        )
    )
    assert {r[0] for r in tables} >= {
        "schema_version",
        "users",
        "refresh_tokens",
        "revoked_jtis",
        "conversations",
        "members",
        "message_keys",
    }


def test_concurrent_migrations(pg_schema: str) -> None:
    """Several nodes starting at once against an empty schema: the advisory lock lets exactly
    one of them apply each migration; every one of them opens."""

    async def main() -> None:
        stores = [PostgresStore(DSN, schema=pg_schema, node_id=i, min_size=1, max_size=2) for i in range(4)]
        results = await asyncio.gather(
            *(s.open() for s in stores),
            migrate(DSN, pg_schema),
            migrate(DSN, pg_schema),
            return_exceptions=True,
        )
        try:
            errors = [r for r in results if isinstance(r, BaseException)]
            assert not errors, errors
            assert results[-2:] == [SCHEMA_VERSION, SCHEMA_VERSION]
            uid = await stores[0].create_user("alice", "h")
            assert (await stores[3].get_user(uid)) is not None
        finally:
            for s in stores:
                await s.close()

    asyncio.run(main())
    rows = asyncio.run(_sql(f'SELECT version FROM "{pg_schema}".schema_version'))
    assert sorted(r[0] for r in rows) == list(range(1, SCHEMA_VERSION + 1))


def test_refuses_newer_schema(pg_schema: str) -> None:
    asyncio.run(migrate(DSN, pg_schema))
    asyncio.run(_sql(f'INSERT INTO "{pg_schema}".schema_version VALUES ($1, 0)', SCHEMA_VERSION + 1))
    with pytest.raises(UnavailableError, match="newer"):
        asyncio.run(migrate(DSN, pg_schema))

    async def open_it() -> None:
        await PostgresStore(DSN, schema=pg_schema, min_size=1).open()

    with pytest.raises(UnavailableError, match="newer"):
        asyncio.run(open_it())


def test_messages_are_hash_partitioned(pg_schema: str) -> None:
    async def body(store: PostgresStore) -> None:
        ids = await users(store, *(f"u{i}" for i in range(41)))
        convs = [await store.direct_conversation(ids[0], u) for u in ids[1:]]
        await asyncio.gather(*(store.append(req(c, ids[0])) for c in convs for _ in range(3)))
        for c in convs:
            hist, _ = await store.history(c, 0, 10, True)
            assert [m.seq for m in hist] == [1, 2, 3]

    _run(body, pg_schema)
    (strategy,) = asyncio.run(
        _sql(
            "SELECT p.partstrat::text, a.attname FROM pg_partitioned_table p"
            " JOIN pg_attribute a ON a.attrelid = p.partrelid AND a.attnum = p.partattrs[0]"
            " WHERE p.partrelid = to_regclass($1)",
            f'"{pg_schema}".messages',
        )
    )
    assert (strategy[0], strategy[1]) == ("h", "conv")
    parts = asyncio.run(
        _sql("SELECT count(*) FROM pg_inherits WHERE inhparent = to_regclass($1)", f'"{pg_schema}".messages')
    )
    assert parts[0][0] == MESSAGE_PARTITIONS
    used = asyncio.run(
        _sql(f'SELECT tableoid::regclass::text, count(*) FROM "{pg_schema}".messages GROUP BY 1')
    )
    assert len(used) > 4, used  # 40 conversations spread over the partitions
    assert sum(r[1] for r in used) == 120


def test_group_commit_batches(pg_schema: str) -> None:
    async def body(store: PostgresStore) -> None:
        a, b = await users(store, "alice", "bob")
        conv = await store.direct_conversation(a, b)
        before = store.stats
        results = await asyncio.gather(*(store.append(req(conv, a)) for _ in range(1000)))
        after = store.stats
        assert sorted(r.message.seq for r in results) == list(range(1, 1001))
        assert after.appended - before.appended == 1000
        assert after.transactions - before.transactions <= 10, after
        assert after.largest_batch == 512  # max_batch
        assert after.failed_transactions == 0

    _run(body, pg_schema)


def test_call_order_is_seq_order_across_batches(pg_schema: str) -> None:
    """Appends called in order get seqs in order, also when they span many batches, and their
    futures resolve in call order."""

    async def body(store: PostgresStore) -> None:
        a, b, c = await users(store, "alice", "bob", "carol")
        convs = [await store.direct_conversation(a, b), await store.direct_conversation(a, c)]
        group = (await store.create_group(a, "g", [b, c])).conv
        targets = [(convs[0], DIRECT), (convs[1], DIRECT), (group, GROUP)]
        resolved: list[int] = []
        tasks = []
        for i in range(300):
            conv, kind = targets[i % 3]
            task = asyncio.ensure_future(store.append(req(conv, a, kind=kind, body=b"%d" % i)))
            task.add_done_callback(functools.partial(lambda i, _t: resolved.append(i), i))
            tasks.append(task)
        results = await asyncio.gather(*tasks)
        for k in range(3):
            mine = results[k::3]
            assert [r.message.seq for r in mine] == list(range(1, 101))
        ids = [r.message.msg_id for r in results]
        assert ids == sorted(ids)
        assert resolved == list(range(300))
        assert store.stats.transactions > 10  # really several batches

    _run(body, pg_schema, max_batch=7)


def test_bad_value_fails_alone(pg_schema: str) -> None:
    async def body(store: PostgresStore) -> None:
        a, b = await users(store, "alice", "bob")
        conv = await store.direct_conversation(a, b)
        bad = AppendRequest(conv, DIRECT, 2**70, os.urandom(16), 1, b"x")
        results = await asyncio.gather(
            store.append(req(conv, a)), store.append(bad), store.append(req(conv, b)), return_exceptions=True
        )
        assert isinstance(results[1], RequestError) and results[1].code == ErrorCode.BAD_REQUEST
        assert sorted(r.message.seq for r in results if isinstance(r, AppendResult)) == [1, 2]
        with pytest.raises(RequestError):
            await store.get_user(2**64)
        assert (await store.set_read(conv, a, 2**64)) == 2  # capped, like SQLite
        hist, more = await store.history(conv, 2**64, 5, True)
        assert [m.seq for m in hist] == [1, 2] and not more

    _run(body, pg_schema)


def test_statement_failure_is_isolated(pg_schema: str) -> None:
    """A request that breaks the batch statement (here one that skipped validation) is retried
    alone; the rest of its batch still commits, in order."""

    async def body(store: PostgresStore) -> None:
        a, b = await users(store, "alice", "bob")
        conv = await store.direct_conversation(a, b)
        bad = AppendRequest(conv, DIRECT, 2**70, os.urandom(16), 1, b"x")
        results = await asyncio.gather(
            store.append(req(conv, a)),
            store._submit(bad),  # bypasses append()'s range checks
            store.append(req(conv, b)),
            return_exceptions=True,
        )
        assert isinstance(results[1], RequestError) and results[1].code == ErrorCode.BAD_REQUEST
        assert [r.message.seq for r in results if isinstance(r, AppendResult)] == [1, 2]
        assert (await store.append(req(conv, a))).message.seq == 3

    _run(body, pg_schema)


def test_usernames_case_insensitive(pg_schema: str) -> None:
    async def body(store: PostgresStore) -> None:
        uid = await store.create_user("Alice", "h")
        with pytest.raises(RequestError) as ei:
            await store.create_user("alice", "h")
        assert ei.value.code == ErrorCode.CONFLICT
        rec = await store.get_user_by_name("ALICE")
        assert rec is not None and rec.user_id == uid and rec.username == "Alice"

    _run(body, pg_schema)


def test_two_nodes_share_one_database(pg_schema: str) -> None:
    """Two stores (two nodes, distinct node ids) append concurrently to the same conversations
    and race on the same dedup keys: seqs stay gap-free, msg_ids unique, dedup exact."""

    async def main() -> None:
        n1 = PostgresStore(DSN, schema=pg_schema, node_id=1, min_size=1, max_size=4, max_batch=16)
        n2 = PostgresStore(DSN, schema=pg_schema, node_id=2, min_size=1, max_size=4, max_batch=16)
        await n1.open()
        await n2.open()
        try:
            ids = await users(n1, *(f"u{i}" for i in range(6)))
            pairs = [(ids[0], u) for u in ids[1:]]
            c1 = [await n1.direct_conversation(*p) for p in pairs]
            c2 = await asyncio.gather(*(n2.direct_conversation(b, a) for a, b in pairs))
            assert c1 == list(c2)
            keys = [cmid() for _ in range(100)]
            reqs1 = [req(c1[i % 5], ids[0], client_msg_id=keys[i]) for i in range(100)]
            # node 2 walks the conversations in the opposite order (lock-order inversion)
            reqs2 = [req(c1[4 - i % 5], ids[0], client_msg_id=keys[99 - i]) for i in range(100)]
            extra = [req(c1[i % 5], ids[i % 5 + 1]) for i in range(200)]
            res = await asyncio.gather(
                *(n1.append(r) for r in reqs1 + extra[:100]),
                *(n2.append(r) for r in reqs2 + extra[100:]),
            )
            by_key: dict[bytes, set[int]] = {}
            for r in res:
                by_key.setdefault(r.message.client_msg_id, set()).add(r.message.msg_id)
            assert all(len(v) == 1 for v in by_key.values())
            originals = [r for r in res if not r.duplicate]
            assert len(originals) == 300  # 100 shared keys once each + 200 distinct
            assert len({r.message.msg_id for r in originals}) == 300
            total = 0
            for conv in c1:
                hist, more = await n2.history(conv, 0, 1000, True)
                assert [m.seq for m in hist] == list(range(1, len(hist) + 1)) and not more
                total += len(hist)
            assert total == 300
            print("deadlock retries:", n1.stats.retried_transactions + n2.stats.retried_transactions)
        finally:
            await n1.close()
            await n2.close()

    asyncio.run(main())


def test_fresh_store_sees_committed_appends(pg_schema: str) -> None:
    async def main() -> None:
        writer = PostgresStore(DSN, schema=pg_schema, min_size=1, max_size=2)
        await writer.open()
        try:
            a, b = await users(writer, "alice", "bob")
            conv = await writer.direct_conversation(a, b)
            acked = await asyncio.gather(*(writer.append(req(conv, a)) for _ in range(20)))
            # A second process's view: a brand-new store with its own pool, writer still open.
            reader = PostgresStore(DSN, schema=pg_schema, min_size=1, max_size=2)
            await reader.open()
            try:
                hist, _ = await reader.history(conv, 0, 100, True)
                assert sorted(m.msg_id for m in hist) == sorted(r.message.msg_id for r in acked)
                nxt = await reader.append(req(conv, b))
                assert nxt.message.seq == 21
                assert nxt.message.msg_id > max(r.message.msg_id for r in acked)
            finally:
                await reader.close()
        finally:
            await writer.close()

    asyncio.run(main())


CHILD = textwrap.dedent(
    """
    import asyncio, os, sys
    from gochat.store.base import AppendRequest
    from gochat.store.postgres import PostgresStore

    async def main():
        store = PostgresStore(sys.argv[1], schema=sys.argv[2], min_size=1, max_size=2)
        await store.open()
        a = await store.create_user("alice", "h")
        b = await store.create_user("bob", "h")
        conv = await store.direct_conversation(a, b)
        while True:
            batch = [AppendRequest(conv, 1, a, os.urandom(16), 1, os.urandom(8)) for _ in range(5)]
            for r in await asyncio.gather(*(store.append(x) for x in batch)):
                m = r.message
                print(m.conv, m.seq, m.msg_id, m.client_msg_id.hex(), m.body.hex(), flush=True)

    asyncio.run(main())
    """
)


def test_acked_appends_survive_sigkill(pg_schema: str) -> None:
    acks = acks_until_sigkill(CHILD, [DSN, pg_schema], 50)
    _run(lambda store: check_acked(store, acks), pg_schema)


def test_deadlock_between_nodes_is_retried(pg_schema: str) -> None:
    """Another node holds the conversation row and then waits for our dedup key: PostgreSQL
    breaks the deadlock by aborting one transaction; the batch is retried, not failed."""

    async def main() -> None:
        store = PostgresStore(DSN, schema=pg_schema, min_size=1, max_size=2)
        await store.open()
        other = await asyncpg.connect(DSN)
        try:
            a, b = await users(store, "alice", "bob")
            conv = await store.direct_conversation(a, b)
            key = cmid()
            s = f'"{pg_schema}"'
            await other.execute("BEGIN")
            await other.execute(f"UPDATE {s}.conversations SET name = name WHERE conv = $1", conv)
            append = asyncio.ensure_future(store.append(req(conv, a, client_msg_id=key)))
            for _ in range(100):  # until the committer waits for the row lock
                waiting = await _sql(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND application_name = 'gochat' AND query LIKE $1",
                    f"%{pg_schema}%",
                )
                if waiting[0][0]:
                    break
                await asyncio.sleep(0.02)
            # closes the cycle: we wait for the key the committer inserted
            await other.execute(
                f"INSERT INTO {s}.message_keys VALUES ($1, $2, $3, 1) ON CONFLICT DO NOTHING", a, key, conv
            )
            await other.execute("ROLLBACK")
            result = await asyncio.wait_for(append, 10)
            assert not result.duplicate and result.message.seq == 1
            assert store.stats.retried_transactions >= 1
            assert store.stats.failed_transactions == 0
        finally:
            await other.close()
            await store.close()

    asyncio.run(main())


def test_recovers_after_backends_are_terminated(pg_schema: str) -> None:
    """PostgreSQL restarted / connections killed by an admin: the pool notices the closed
    connections and opens new ones; the next operations succeed."""

    async def main() -> None:
        store = PostgresStore(DSN, schema=pg_schema, min_size=2, max_size=2)
        await store.open()
        try:
            a, b = await users(store, "alice", "bob")
            conv = await store.direct_conversation(a, b)
            await asyncio.gather(*(store.append(req(conv, a)) for _ in range(5)))
            killed = await _sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'gochat' AND query LIKE $1 AND pid <> pg_backend_pid()",
                f"%{pg_schema}%",
            )
            assert killed and all(r[0] for r in killed)
            await asyncio.sleep(0.2)
            r = await _until_ok(lambda: store.append(req(conv, b)), 5)
            assert r.message.seq == 6
            await store.ping()
            assert len((await store.history(conv, 0, 100, True))[0]) == 6
        finally:
            await store.close()

    asyncio.run(main())


# ---- outages ------------------------------------------------------------------------------------

OUTAGE_TIMEOUTS: dict[str, Any] = {"command_timeout": 1.0, "connect_timeout": 1.0, "ping_timeout": 0.5}


async def _expect_unavailable(coro: Awaitable[Any], bound: float) -> float:
    start = time.monotonic()
    with pytest.raises(UnavailableError):
        await asyncio.wait_for(coro, bound + 5)  # wait_for only guards the test itself
    elapsed = time.monotonic() - start
    assert elapsed < bound, f"took {elapsed:.1f}s to report unavailable"
    return elapsed


async def _until_ok(fn: Callable[[], Awaitable[T]], within: float) -> T:
    deadline = time.monotonic() + within
    while True:
        try:
            return await fn()
        except UnavailableError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


@pytest.mark.parametrize("mode", ["partition", "server-down"])
def test_outage_unavailable_then_recovers(pg_schema: str, mode: str) -> None:
    """Link cut (a silent partition, or every connection reset and refused): appends, reads
    and ping fail with UnavailableError within a bounded time and nothing hangs; once the link
    is back the store recovers by itself (new pool connections) and nothing acknowledged is
    lost."""

    async def main() -> None:
        proxy = TcpProxy(*_backend(DSN))
        await proxy.start()
        store = PostgresStore(
            _proxied(DSN, proxy.port), schema=pg_schema, min_size=2, max_size=4, **OUTAGE_TIMEOUTS
        )
        await store.open()
        try:
            a, b = await users(store, "alice", "bob")
            conv = await store.direct_conversation(a, b)
            acked = list(await asyncio.gather(*(store.append(req(conv, a)) for _ in range(10))))

            proxy.cut(reset=(mode == "server-down"))
            bound = 3.0  # command_timeout 1 s: one batch in flight + ours, plus slack
            await _expect_unavailable(store.ping(), 2.0)
            results = await asyncio.wait_for(
                asyncio.gather(*(store.append(req(conv, a)) for _ in range(20)), return_exceptions=True),
                bound + 5,
            )
            assert all(isinstance(r, UnavailableError) for r in results), results
            assert all(r.code == ErrorCode.UNAVAILABLE and r.spec.retryable for r in results)  # type: ignore[union-attr]
            await _expect_unavailable(store.append(req(conv, b)), bound)
            await _expect_unavailable(store.history(conv, 0, 10, True), bound)
            await _expect_unavailable(store.create_user("carol", "h"), bound)
            assert store.stats.failed_transactions >= 1

            proxy.restore()
            after = await _until_ok(lambda: store.append(req(conv, b)), 10)
            acked.append(after)
            acked += await asyncio.gather(*(store.append(req(conv, a)) for _ in range(10)))
            await store.ping()
            hist, _ = await store.history(conv, 0, 1000, True)
            stored = {m.msg_id for m in hist}
            assert {r.message.msg_id for r in acked} <= stored, "an acknowledged message was lost"
            assert [m.seq for m in hist] == list(range(1, len(hist) + 1))
            if mode == "partition":
                # bytes sent during the partition never reached PostgreSQL: nothing extra stored
                assert len(hist) == len(acked)
        finally:
            await store.close()
            await proxy.close()

    asyncio.run(main())


def test_close_during_outage_does_not_hang(pg_schema: str) -> None:
    async def main() -> None:
        proxy = TcpProxy(*_backend(DSN))
        await proxy.start()
        store = PostgresStore(
            _proxied(DSN, proxy.port), schema=pg_schema, min_size=1, max_size=2, **OUTAGE_TIMEOUTS
        )
        await store.open()
        try:
            a, b = await users(store, "alice", "bob")
            conv = await store.direct_conversation(a, b)
            proxy.cut()
            pending = [asyncio.ensure_future(store.append(req(conv, a))) for _ in range(5)]
            await asyncio.sleep(0)
            start = time.monotonic()
            await asyncio.wait_for(store.close(), 10)
            assert time.monotonic() - start < 5
            results = await asyncio.gather(*pending, return_exceptions=True)
            assert all(isinstance(r, UnavailableError) for r in results)
        finally:
            await store.close()
            await proxy.close()

    asyncio.run(main())


def test_unreachable_server_fails_fast() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dsn = _proxied(DSN, port)

    async def main() -> None:
        store = PostgresStore(dsn, schema="gochat_unreachable", connect_timeout=1.0, command_timeout=1.0)
        start = time.monotonic()
        with pytest.raises(UnavailableError):
            await store.open()
        assert time.monotonic() - start < 5
        with pytest.raises(UnavailableError):
            await store.append(req(1, 1))
        with pytest.raises(UnavailableError):
            await store.ping()
        with pytest.raises(UnavailableError):
            await migrate(dsn, "gochat_unreachable", timeout=2)

    asyncio.run(main())
