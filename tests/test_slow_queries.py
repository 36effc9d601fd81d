"""Slow queries: fingerprints, the threshold, the log and its top N, statement timing in both
stores (a slow statement is counted, a fast one is not; plans sampled on PostgreSQL), the
metrics, ``GET /v1/admin/slow-queries`` on a real node, and the hot-query lists of
``gochat doctor`` checked against what the stores really run and what the migrations create.

PostgreSQL: ``GOCHAT_TEST_POSTGRES_DSN`` (default ``postgresql://postgres@127.0.0.1:5432/test``),
one schema per test, dropped afterwards; Redis (the cluster-mode node): ``GOCHAT_TEST_REDIS_URL``,
one key prefix per test, deleted afterwards. Run ``python tests/test_slow_queries.py`` to
print the timing overhead measured in docs/observability.md (``--commit-path``: also appends per
second through both stores' group commit, timed and not; PostgreSQL needed, about a minute).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import sqlite3
import sys
import time
import timeit
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import asyncpg
import pytest

from gochat.config import Settings
from gochat.errors import UnavailableError
from gochat.observability.metrics import Metrics
from gochat.observability.slow_queries import INTERNAL, SlowQueryLog, fingerprint, normalize_sql
from gochat.store.base import AppendRequest
from gochat.store.postgres import SCHEMA_VERSION as PG_VERSION
from gochat.store.postgres import PostgresStore, migrate
from gochat.store.postgres.doctor import expected_indexes as pg_expected_indexes
from gochat.store.postgres.explain import plan_scans, plan_shape
from gochat.store.postgres.hot_queries import HOT_QUERIES as PG_HOT
from gochat.store.postgres.hot_queries import hot_queries
from gochat.store.sqlite import SQLiteStore
from gochat.store.sqlite.doctor import expected_indexes as sqlite_expected_indexes
from gochat.store.sqlite.hot_queries import HOT_QUERIES as SQLITE_HOT
from tests.conftest import drop_redis_keys

T = TypeVar("T")
DSN = os.environ.get("GOCHAT_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("GOCHAT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
ADMIN_TOKEN = "slow-query-operator-0123456789"


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 60))  # type: ignore[arg-type]


async def _sql(query: str, *args: Any) -> list[Any]:
    conn = await asyncpg.connect(DSN, timeout=5)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


@pytest.fixture
def pg_schema() -> Iterator[str]:
    name = f"t_slow_{secrets.token_hex(6)}"
    try:
        yield name
    finally:
        run(_sql(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    prefix = f"t_slow:{secrets.token_hex(6)}:"
    try:
        yield prefix
    finally:
        run(drop_redis_keys(REDIS_URL, prefix))


def cmid(n: int) -> bytes:
    return n.to_bytes(16, "big")


# ---- fingerprints ---------------------------------------------------------------------------------


def test_fingerprint_strips_values_comments_schema_and_whitespace() -> None:
    same = [
        'SELECT m.conv FROM "gochat".messages m WHERE m.conv = $1 AND m.seq <= $2 LIMIT $3',
        "select m.conv from messages m\n   where m.conv = 7 and m.seq <= 99 -- newest\n limit 51",
        'SELECT  m.conv  FROM "other_schema" . messages m WHERE m.conv = ? AND m.seq <= ? /* x */ LIMIT ?',
    ]
    prints = {fingerprint(sql) for sql in same}
    assert len(prints) == 1, prints
    fp, text = prints.pop()
    assert text == "select m.conv from messages m where m.conv = ? and m.seq <= ? limit ?"
    assert re.fullmatch(r"[0-9a-f]{16}", fp)
    # strings (with quotes inside), lists and multi-row VALUES collapse; other statements differ
    assert normalize_sql("SELECT 1 FROM t WHERE name = 'it''s' AND id IN (1, 2, 3)") == (
        "select ? from t where name = ? and id in (?+)"
    )
    assert normalize_sql("INSERT INTO t (a, b) VALUES (?, ?), (?, ?), (?, ?)") == "insert into t (a, b) values (?+), …"
    assert normalize_sql("SELECT x FROM t WHERE a = ARRAY[1, 2]") == "select x from t where a = array[?+]"
    assert fingerprint("SELECT a FROM t WHERE b = 1")[0] != fingerprint("SELECT a FROM t WHERE c = 1")[0]
    # identifiers with digits are not literals
    assert normalize_sql("SELECT * FROM messages_p03 WHERE x1 = 5") == "select * from messages_p03 where x1 = ?"


def test_fingerprint_hash_is_stable() -> None:
    """The hash is part of what operators see (logs, the admin API): it must not change between
    processes or releases for the same normalized statement."""
    assert fingerprint("SELECT pg_sleep(0.2)") == ("6e48250f132a7b2b", "select pg_sleep(?)")


def test_plan_shape_shows_operators_and_each_partitioned_scan_once() -> None:
    def scan(i: int) -> dict[str, Any]:
        return {"Node Type": "Index Scan", "Index Name": f"messages_p{i:02d}_pkey", "Relation Name": f"messages_p{i:02d}"}

    plan = [{"Plan": {"Node Type": "Limit", "Plans": [
        {"Node Type": "Nested Loop", "Plans": [
            {"Node Type": "Append", "Plans": [scan(i) for i in range(16)]},
            {"Node Type": "Index Only Scan", "Index Name": "conversations_pkey", "Relation Name": "conversations"},
        ]},
        {"Node Type": "ModifyTable", "Relation Name": "message_keys", "Conflict Arbiter Indexes": ["message_keys_pkey"]},
    ]}}]
    assert plan_shape(plan) == (
        "Limit (Nested Loop (Append (16× Index Scan using messages_p*_pkey on messages_p*), Index Only Scan using "
        "conversations_pkey on conversations), ModifyTable on message_keys)"
    )
    scans = plan_scans(plan)
    assert len(scans) == 19 and scans[0].index == "messages_p00_pkey"
    assert (scans[-1].node, scans[-1].index) == ("Conflict Arbiter", "message_keys_pkey")


# ---- the log: threshold, counts, top N, logging ----------------------------------------------------


def test_log_counts_and_ranks_by_total_time() -> None:
    slow = SlowQueryLog("sqlite", 50)
    assert slow.threshold_s == 0.05 and slow.threshold_ms == 50
    with pytest.raises(ValueError):
        slow.set_threshold_ms(-1)
    before = int(time.time() * 1000)
    for _ in range(3):
        slow.record("SELECT a FROM t WHERE id = 1", 0.06)  # 180 ms in all
    slow.record("SELECT b FROM u WHERE id = 2", 0.5)  # 500 ms once
    slow.record("UPDATE t SET a = 1 WHERE id = 3", 0.1, failed=True)
    slow.record(INTERNAL + "EXPLAIN SELECT 1", 9.0)  # gochat's own diagnostics: never recorded
    assert slow.count == 5 and slow.seconds == pytest.approx(0.78)
    top = slow.top(10)
    assert [q["statement"] for q in top] == [
        "select b from u where id = ?",
        "select a from t where id = ?",
        "update t set a = ? where id = ?",
    ]
    first = top[1]
    assert set(first) == {
        "fingerprint", "statement", "count", "total_ms", "mean_ms", "max_ms", "last_seen_ms", "failed", "plan",
        "plan_fingerprint",
    }
    assert (first["count"], first["total_ms"], first["max_ms"], first["mean_ms"]) == (3, 180.0, 60.0, 60.0)
    assert first["last_seen_ms"] >= before and first["fingerprint"] == fingerprint("SELECT a FROM t WHERE id = 1")[0]
    assert top[2]["failed"] == 1
    assert [q["statement"] for q in slow.top(1)] == ["select b from u where id = ?"]
    snap = slow.snapshot(2)
    assert (snap["store"], snap["threshold_ms"], snap["slow_statements"], snap["fingerprints"]) == ("sqlite", 50.0, 5, 3)
    assert len(snap["queries"]) == 2


def test_log_keeps_at_most_capacity_fingerprints() -> None:
    slow = SlowQueryLog("sqlite", 0, capacity=3)
    for i, seconds in enumerate((0.3, 0.1, 0.2, 0.4)):
        slow.record(f"SELECT x{i} FROM t", seconds)
    assert [q["statement"] for q in slow.top(10)] == ["select x3 from t", "select x0 from t", "select x2 from t"]
    assert slow.evicted == 1 and slow.count == 4


def test_warnings_are_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    slow = SlowQueryLog("postgres", 10, log_interval_s=0.2, log_burst=2)
    with caplog.at_level(logging.WARNING, logger="gochat.slow_query"):
        for _ in range(50):
            slow.record("SELECT a FROM t WHERE id = $1", 0.02)
        assert len(caplog.records) == 1  # a fingerprint: its first slow statement only
        for i in range(5):
            slow.record(f"SELECT c{i} FROM t", 0.02)
        assert len(caplog.records) == 2  # at most log_burst lines per interval in all
        time.sleep(0.25)
        slow.record("SELECT a FROM t WHERE id = $1", 0.03)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    fp = fingerprint("SELECT a FROM t WHERE id = $1")[0]
    assert lines[0].startswith(f"slow postgres statement {fp}: 20.0 ms (threshold 10 ms; 1 slow so far")
    assert lines[0].endswith("select a from t where id = ?")
    assert "[49 more of it and 4 other lines not logged since]" in lines[2] and "51 slow so far" in lines[2]


def test_metrics_export_the_attached_logs() -> None:
    metrics = Metrics()
    text = metrics.render().decode()
    assert "# TYPE gochat_slow_queries_total counter" in text  # exported before a store is attached
    assert "# TYPE gochat_slow_query_seconds_total counter" in text
    store = SQLiteStore(Path("/nonexistent/x.db"))  # constructing opens nothing
    metrics.attach_slow_queries(store)
    metrics.attach_slow_queries(store)  # once is enough: not exported twice
    metrics.attach_slow_queries(object())  # no slow_queries: ignored
    store.slow_queries.record("SELECT 1", 0.25)
    text = metrics.render().decode()
    assert 'gochat_slow_queries_total{store="sqlite"} 1.0' in text
    assert 'gochat_slow_query_seconds_total{store="sqlite"} 0.25' in text


# ---- SQLite ---------------------------------------------------------------------------------------


def _sqlite(tmp_path: Path, body: Callable[[SQLiteStore], Awaitable[T]], **kw: Any) -> T:
    async def go() -> T:
        store = SQLiteStore(tmp_path / "gochat.db", **kw)
        await store.open()
        try:
            return await body(store)
        finally:
            await store.close()

    return run(go())


def _sleep_fn(conn: sqlite3.Connection) -> None:
    conn.create_function("sleep_ms", 1, lambda ms: time.sleep(ms / 1000) or ms)


def test_sqlite_times_reads_and_writes(tmp_path: Path) -> None:
    """A statement over the threshold is counted with its fingerprint, on a reader thread and on
    the writer thread; the fast statements around it (BEGIN, COMMIT, …) are not."""

    async def body(store: SQLiteStore) -> None:
        slow = store.slow_queries
        assert slow.threshold_ms == 40 and slow.store == "sqlite"
        base = slow.count  # open()'s migrations commit with fsync: maybe slow on this disk
        await store.create_user("alice", "x")  # fast statements only
        assert slow.count == base
        slow.clear()

        def read(conn: sqlite3.Connection) -> Any:
            _sleep_fn(conn)
            return conn.execute("SELECT sleep_ms(60)").fetchone()

        def write(conn: sqlite3.Connection) -> Any:
            _sleep_fn(conn)
            return conn.execute("SELECT sleep_ms(?)", (50,)).fetchone()

        await store._read(read)
        await store._write(write)
        await store._read(read)
        [q] = slow.top(5)
        assert q["statement"] == "select sleep_ms(?)" and q["count"] == 3
        assert 50 * 3 <= q["total_ms"] < 1000 and 60 <= q["max_ms"] < 400
        assert slow.count == base + 3

    _sqlite(tmp_path, body, slow_query_ms=40)


def test_sqlite_threshold_zero_times_every_statement(tmp_path: Path) -> None:
    async def body(store: SQLiteStore) -> None:
        a = await store.create_user("alice", "x")
        b = await store.create_user("bob", "x")
        conv = await store.direct_conversation(a, b)
        await store.append(AppendRequest(1, conv, a, cmid(1), 0, b"hi"))
        await store.history(conv, 0, 10, True)
        texts = {q["statement"] for q in store.slow_queries.top(500)}
        assert "begin immediate" in texts and "commit" in texts
        assert "select conv from conversations where user_lo = ? and user_hi = ?" in texts

    _sqlite(tmp_path, body, slow_query_ms=0)


def _exercise(store: Any) -> Callable[[], Awaitable[None]]:
    """Every store operation whose statements the hot-query lists name."""

    async def go() -> None:
        a = await store.create_user("alice", "x")
        b = await store.create_user("bob", "x")
        await store.get_user_by_name("alice")
        conv = await store.direct_conversation(a, b)
        group = (await store.create_group(a, "g", [b])).conv
        await store.add_member(group, a)
        for n in (1, 2, 1):  # the third is a duplicate: the dedup lookup runs
            await store.append(AppendRequest(2, group, a, cmid(n), 0, b"x"))
        await store.append(AppendRequest(1, conv, a, cmid(3), 0, b"x"))
        await store.history(group, 0, 10, True)
        await store.history(group, 1, 10, False)
        await store.members(group)
        await store.members_versioned(group)
        await store.conversations(a)
        await store.add_refresh_token("j1", "fam", a, 2**40)
        await store.use_refresh_token("j1", 1)
        await store.revoke_family("fam")
        await store.revoke_user_tokens(a)
        await store.revoke_jti("jti", 2**40)
        await store.revoked_jtis(1)
        await store.purge_expired(1)
        await store.recent_groups(10)

    return go


def test_sqlite_hot_queries_are_what_the_store_runs(tmp_path: Path) -> None:
    """Each statement of gochat/store/sqlite/hot_queries.py is one the store really runs (same
    fingerprint), and each index it names is created by the migrations."""

    async def body(store: SQLiteStore) -> set[str]:
        await _exercise(store)()
        return {q["fingerprint"] for q in store.slow_queries.top(1000)}

    ran = _sqlite(tmp_path, body, slow_query_ms=0)
    missing = [q.name for q in SQLITE_HOT if fingerprint(q.sql)[0] not in ran]
    assert not missing, f"hot queries the store never ran (edit gochat/store/sqlite/hot_queries.py): {missing}"
    created = sqlite_expected_indexes()
    assert {"members_user", "refresh_tokens_family", "sqlite_autoindex_messages_1"} <= set(created)
    named = {i for q in SQLITE_HOT for i in q.indexes}
    assert named <= set(created), named - set(created)


# ---- PostgreSQL -----------------------------------------------------------------------------------


def _pg(schema: str, body: Callable[[PostgresStore], Awaitable[T]], **kw: Any) -> T:
    async def go() -> T:
        store = PostgresStore(DSN, schema=schema, min_size=1, max_size=4, **kw)
        await store.open()
        try:
            return await body(store)
        finally:
            await store.close()

    return run(go())


def test_postgres_counts_a_slow_statement_and_samples_its_plan(pg_schema: str) -> None:
    """pg_sleep through the store's own read path: counted once, with its fingerprint; the plan of
    a slow statement on gochat's tables is fetched in the background (EXPLAIN, generic plan)."""

    async def body(store: PostgresStore) -> None:
        slow = store.slow_queries
        assert slow.store == "postgres" and slow.threshold_ms == 50
        s = f'"{pg_schema}"'
        base = slow.count  # open() may have been slow (migrations: DDL)
        await store.create_user("alice", "x")
        await store.conversations(1)
        assert slow.count == base
        await store._read(lambda conn: conn.fetchval("SELECT pg_sleep(0.08)"))
        sql = f"SELECT pg_sleep(0.06), (SELECT count(*) FROM {s}.messages m WHERE m.conv = $1 AND m.seq > $2)"
        await store._read(lambda conn: conn.fetchval(sql, 5, 0))
        assert slow.count == base + 2
        await store._plans.wait_idle()
        sleep_fp = fingerprint("SELECT pg_sleep(0.08)")[0]
        by_fp = {q["fingerprint"]: q for q in slow.top(50)}
        assert by_fp[sleep_fp]["count"] == 1 and by_fp[sleep_fp]["max_ms"] >= 80
        scan = by_fp[fingerprint(sql)[0]]
        assert scan["statement"] == "select pg_sleep(?), (select count(*) from messages m where m.conv = ? and m.seq > ?)"
        assert "on messages_p*" in scan["plan"] and re.fullmatch(r"[0-9a-f]{16}", scan["plan_fingerprint"])
        # the sampler's own statements are never recorded
        assert not [q for q in slow.top(100) if "explain" in q["statement"] or "prepare" in q["statement"]]
        # a statement cut off by the timeout is slow too, and marked failed
        with pytest.raises(UnavailableError):
            await store._with_conn(lambda conn: conn.fetchval("SELECT pg_sleep(5), 'cut off'"), timeout=0.2)
        cut = slow.get(fingerprint("SELECT pg_sleep(5), 'cut off'")[0])
        assert cut is not None and cut.failed == 1 and cut.max_s >= 0.2

    _pg(pg_schema, body, slow_query_ms=50)


def test_postgres_hot_queries_are_what_the_store_runs(pg_schema: str) -> None:
    async def body(store: PostgresStore) -> set[str]:
        await _exercise(store)()
        await store._plans.wait_idle()
        return {q["fingerprint"] for q in store.slow_queries.top(1000)}

    ran = _pg(pg_schema, body, slow_query_ms=0)
    queries = hot_queries(f'"{pg_schema}"')
    assert [q.name for q in queries] == [q.name for q in PG_HOT]
    missing = [q.name for q in queries if fingerprint(q.sql)[0] not in ran]
    assert not missing, f"hot queries the store never ran (edit gochat/store/postgres/hot_queries.py): {missing}"


def test_postgres_expected_indexes_are_what_the_migrations_create(pg_schema: str) -> None:
    """gochat doctor derives the expected indexes by migrating temporary tables (rolled back):
    the same names and definitions as a real migrated schema, and every index a hot query names."""

    async def go() -> None:
        await migrate(DSN, pg_schema)
        conn = await asyncpg.connect(DSN)
        try:
            quoted = f'"{pg_schema}"'
            expected = await pg_expected_indexes(conn, PG_VERSION, quoted)
            real = {
                r["indexname"]: r["indexdef"]
                for r in await conn.fetch(
                    "SELECT i.indexname, i.indexdef FROM pg_indexes i JOIN pg_class c ON c.relname = i.tablename"
                    " AND c.relnamespace = i.schemaname::regnamespace"
                    " WHERE i.schemaname = $1 AND NOT c.relispartition AND i.tablename <> 'schema_version'",
                    pg_schema,
                )
            }
            assert set(expected) == set(real)
            for name, e in expected.items():
                if not e["constraint"]:
                    ddl = e["ddl"].replace(" CONCURRENTLY", "")
                    assert ddl == real[name].replace(" ON ONLY ", " ON ").replace(f" {pg_schema}.", f" {quoted}."), name
            assert await conn.fetchval("SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()") in (0, None)
            named = {i for q in PG_HOT for i in q.indexes}
            assert named <= set(expected), named - set(expected)
        finally:
            await conn.close()

    run(go())


# ---- the admin endpoint, on real nodes ------------------------------------------------------------


async def _get(http: aiohttp.ClientSession, url: str, token: str | None = ADMIN_TOKEN) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.get(url, headers=headers) as r:
        return r.status, await r.json()


def _wire(server: Any, threshold_ms: float) -> None:
    """What server.py does once it wires the setting (docs/observability.md): the store's
    threshold and the node's metrics. Idempotent, so this stays right after the wiring lands."""
    server.store.slow_queries.set_threshold_ms(threshold_ms)
    server.metrics.attach_slow_queries(server.store)


def test_admin_endpoint_lists_the_top_statements_by_total_time(tmp_path: Path) -> None:
    """Embedded node, every statement slow (threshold 0): the endpoint needs the operator
    credential, lists the top N by total time, most first, with every field."""
    from gochat.server import Server
    from tests.conftest import create_user

    async def go() -> None:
        server = Server(Settings(data_dir=str(tmp_path), ws_port=0, http_port=0, admin_token=ADMIN_TOKEN, slow_query_ms=0))
        await server.start()
        try:
            _wire(server, 0)
            user = await create_user(server.http_url, "slowpoke")
            url = f"{server.http_url}/v1/admin/slow-queries"
            async with aiohttp.ClientSession() as http:
                assert (await _get(http, url, None))[0] == 401
                assert (await _get(http, url, user.access_token))[0] == 403
                status, body = await _get(http, url)
                assert status == 200, body
                assert (body["store"], body["threshold_ms"]) == ("sqlite", 0.0)
                assert body["slow_statements"] > 0 and body["fingerprints"] >= len(body["queries"]) > 3
                totals = [q["total_ms"] for q in body["queries"]]
                assert totals == sorted(totals, reverse=True)
                assert len(body["queries"]) <= 20
                statements = {q["statement"] for q in (await _get(http, url + "?limit=500"))[1]["queries"]}
                assert "select user_id, username, password_hash, created_ms from users where username = ?" in statements
                for q in body["queries"]:
                    assert q["count"] >= 1 and q["max_ms"] <= q["total_ms"] + 1e-6
                    assert re.fullmatch(r"[0-9a-f]{16}", q["fingerprint"]) and q["last_seen_ms"] > 0
                status, top1 = await _get(http, url + "?limit=1")  # totals only grow
                assert status == 200 and len(top1["queries"]) == 1 and top1["queries"][0]["total_ms"] >= totals[0]
                for bad in ("0", "501", "x"):
                    status, err = await _get(http, f"{url}?limit={bad}")
                    assert status == 400, (bad, err)
                async with http.get(f"{server.http_url}/metrics") as r:
                    m = re.search(r'^gochat_slow_queries_total\{store="sqlite"\} (\S+)$', await r.text(), re.M)
                    assert m and float(m[1]) > 0
        finally:
            await server.stop()

    run(go())


def test_cluster_node_lists_a_slow_postgres_statement(tmp_path: Path, pg_schema: str, redis_prefix: str) -> None:
    """Cluster node on the default threshold (100 ms): one pg_sleep(0.15) through the store is
    the one slow statement listed, with its plan once sampled; /metrics counts it."""
    from gochat.server import Server

    async def go() -> None:
        settings = Settings(
            data_dir=str(tmp_path), ws_port=0, http_port=0, admin_token=ADMIN_TOKEN, postgres_dsn=DSN,
            postgres_schema=pg_schema, redis_url=REDIS_URL, redis_prefix=redis_prefix,
        )
        server = Server(settings)
        await server.start()
        try:
            _wire(server, settings.slow_query_ms)
            store: Any = server.store
            store.slow_queries.clear()  # the start's migrations may have been slow (DDL)
            base = store.slow_queries.count
            await store._read(lambda conn: conn.fetchval("SELECT pg_sleep(0.15)"))
            await store._plans.wait_idle()
            async with aiohttp.ClientSession() as http:
                status, body = await _get(http, f"{server.http_url}/v1/admin/slow-queries")
                assert status == 200, body
                assert (body["store"], body["threshold_ms"]) == ("postgres", 100.0)
                assert body["slow_statements"] >= base + 1
                [q] = [q for q in body["queries"] if q["fingerprint"] == fingerprint("SELECT pg_sleep(0.15)")[0]]
                assert (q["statement"], q["count"], q["failed"]) == ("select pg_sleep(?)", 1, 0)
                assert 150 <= q["total_ms"] == q["max_ms"] == q["mean_ms"] < 2000
                assert q["plan"] == "Result" and q["plan_fingerprint"]
                async with http.get(f"{server.http_url}/metrics") as r:
                    text = await r.text()
                m = re.search(r'^gochat_slow_queries_total\{store="postgres"\} (\S+)$', text, re.M)
                assert m and float(m[1]) >= base + 1
        finally:
            await server.stop()

    run(go())


# ---- timing overhead ------------------------------------------------------------------------------


def measure_overhead(n: int = 200_000) -> dict[str, float]:
    """Nanoseconds: a SQLite point SELECT on a plain and on a timed connection (the same
    statement, best of 5 rounds), and the PostgreSQL wrapper alone (asyncpg's _execute replaced
    by a stub) against the stub called directly."""
    from gochat.store.postgres import timing as pgt
    from gochat.store.sqlite.timing import timed_connection_class

    out: dict[str, float] = {}
    stmt = "SELECT b FROM t WHERE a = ?"
    for name, factory in (("sqlite_plain_ns", sqlite3.Connection), ("sqlite_timed_ns", timed_connection_class(SlowQueryLog("s")))):
        c = sqlite3.connect(":memory:", factory=factory, isolation_level=None)
        c.execute("CREATE TABLE t (a INTEGER PRIMARY KEY, b)")
        c.executemany("INSERT INTO t VALUES (?, ?)", [(i, i) for i in range(1000)])
        if hasattr(c, "finish_statements"):
            c.finish_statements()
        out[name] = min(timeit.repeat(lambda c=c: c.execute(stmt, (5,)).fetchone(), number=n, repeat=5)) / n * 1e9
        c.close()

    def stub(
        self: Any, query: str, args: Any, limit: int, timeout: Any, *, return_status: bool = False,
        ignore_custom_codec: bool = False, record_class: Any = None,
    ) -> None:
        return None

    conn: Any = object.__new__(pgt.timed_connection_class(SlowQueryLog("p")))
    conn._gochat_sql, conn._gochat_t0, conn._aborted, conn._protocol = None, 0.0, True, None
    real, pgt._execute = pgt._execute, stub  # type: ignore[assignment]
    try:
        out["pg_direct_ns"] = min(timeit.repeat(lambda: stub(conn, "SELECT 1", (), 0, None), number=n, repeat=5)) / n * 1e9
        out["pg_timed_ns"] = min(timeit.repeat(lambda: conn._execute("SELECT 1", (), 0, None), number=n, repeat=5)) / n * 1e9
    finally:
        pgt._execute = real  # type: ignore[assignment]
    return out


def test_timing_overhead_is_a_fraction_of_a_microsecond() -> None:
    """The numbers docs/observability.md states, checked loosely (10x the measured cost)."""
    m = measure_overhead(50_000)
    assert m["sqlite_timed_ns"] - m["sqlite_plain_ns"] < 2000, m
    assert m["pg_timed_ns"] - m["pg_direct_ns"] < 2000, m


async def _appends_per_s(store: Any, n: int = 20_000, window: int = 512) -> float:
    a = await store.create_user(f"a{secrets.token_hex(4)}", "x")
    b = await store.create_user(f"b{secrets.token_hex(4)}", "x")
    group = (await store.create_group(a, "g", [b])).conv
    room, done, left = asyncio.Semaphore(window), asyncio.Event(), [n]

    def answered(result: Any, error: BaseException | None) -> None:
        room.release()
        left[0] -= 1
        if not left[0]:
            done.set()

    started = time.perf_counter()
    for _ in range(n):
        await room.acquire()
        store.append_soon(AppendRequest(2, group, a, secrets.token_bytes(16), 0, b"x" * 32), answered)
    await done.wait()
    return n / (time.perf_counter() - started)


async def measure_commit_path(rounds: int = 10) -> dict[str, float]:
    """Appends per second through each store's group commit (20,000 to one group, 512 in flight),
    with its timed connections and with plain ones, alternating; the median of ``rounds`` runs."""
    import statistics
    import tempfile

    async def postgres(timed: bool) -> float:
        schema = f"t_bench_{secrets.token_hex(4)}"
        store = PostgresStore(DSN, schema=schema)
        if not timed:
            store._connection_class = asyncpg.Connection
        await store.open()
        try:
            return await _appends_per_s(store)
        finally:
            await store._with_conn(lambda conn: conn.execute(f'DROP SCHEMA "{schema}" CASCADE'))
            await store.close()

    async def sqlite(timed: bool) -> float:
        store = SQLiteStore(Path(tempfile.mkdtemp()) / "gochat.db")
        if not timed:
            store._connection_class = sqlite3.Connection  # type: ignore[assignment]
        await store.open()
        try:
            return await _appends_per_s(store)
        finally:
            await store.close()

    out: dict[str, float] = {}
    for name, bench in (("postgres", postgres), ("sqlite", sqlite)):
        runs: dict[bool, list[float]] = {True: [], False: []}
        for i in range(rounds):
            for timed in (True, False) if i % 2 else (False, True):
                runs[timed].append(await bench(timed))
        out[f"{name}_plain_appends_per_s"] = statistics.median(runs[False])
        out[f"{name}_timed_appends_per_s"] = statistics.median(runs[True])
    return out


if __name__ == "__main__":
    results = measure_overhead()
    if "--commit-path" in sys.argv:
        results |= asyncio.run(measure_commit_path())
    sys.stdout.write("".join(f"{k}: {v:.0f}\n" for k, v in results.items()))
