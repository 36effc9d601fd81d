"""``gochat doctor`` end to end: the CLI (``python -m gochat.cli doctor``) on a real PostgreSQL
schema and a real SQLite database, healthy (exit 0), with an index dropped (the finding, the
statement that recreates it, exit 1), and healthy again once that statement ran; table
statistics on a real table; Redis memory and eviction policy (pure checks on INFO dicts, and
the real server read); replication (pure checks, "no replicas" on the shared server, and the
lag of a real streaming standby on a private primary started for the test); clock skew between
nodes listed in a real registry.

Needs PostgreSQL (``GOCHAT_TEST_POSTGRES_DSN``) and Redis (``GOCHAT_TEST_REDIS_URL``); each
test has its own schema and key prefix, dropped afterwards. The standby test needs the
PostgreSQL server binaries (initdb, pg_ctl, pg_basebackup; scripts/services.sh installs PostgreSQL
with them) and fails without them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import glob
import os
import secrets
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import orjson
import pytest
from aiohttp import web

from gochat.cluster.base import NodeInfo
from gochat.config import Settings
from gochat.doctor import ClockSample, check_clocks, check_redis, clock_findings, redis_findings, render_text
from gochat.observability.findings import Finding, Status
from gochat.store.postgres import migrate
from gochat.store.postgres.doctor import (
    _hot_query_finding,
    check_postgres,
    replication_findings,
    statistics_findings,
)
from gochat.store.postgres.hot_queries import hot_queries
from gochat.store.sqlite import SQLiteStore
from tests.conftest import drop_redis_keys

pytestmark = pytest.mark.e2e

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[2]
PG_DSN = os.environ.get("GOCHAT_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("GOCHAT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def run(coro: Awaitable[T], timeout: float = 120) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))  # type: ignore[arg-type]


def doctor(*args: str, env: dict[str, str] | None = None, json: bool = True) -> tuple[int, Any]:
    """``gochat doctor`` in a process of its own, without the caller's GOCHAT_* variables."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GOCHAT_")}
    r = subprocess.run(
        [sys.executable, "-m", "gochat.cli", "doctor", *args, *(["--json"] if json else [])],
        cwd=ROOT,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode in (0, 1), r.stdout + r.stderr
    return r.returncode, orjson.loads(r.stdout) if json else r.stdout


def failing(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [f for f in report["findings"] if f["status"] in ("warn", "error")]


async def _sql(query: str, *args: Any, dsn: str = PG_DSN) -> list[Any]:
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


@pytest.fixture
def pg_schema() -> Iterator[str]:
    name = f"t_doctor_{secrets.token_hex(6)}"
    run(migrate(PG_DSN, name))
    try:
        yield name
    finally:
        run(_sql(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    prefix = f"t_doctor:{secrets.token_hex(6)}:"
    try:
        yield prefix
    finally:
        run(drop_redis_keys(REDIS_URL, prefix))


# ---- PostgreSQL ---------------------------------------------------------------------------------


def test_doctor_finds_a_dropped_postgres_index_and_its_fix_works(pg_schema: str, redis_prefix: str) -> None:
    args = ("--postgres", PG_DSN, "--redis", REDIS_URL, "--schema", pg_schema, "--redis-prefix", redis_prefix)
    rc, report = doctor(*args)
    assert rc == 0 and report["ok"] and report["mode"] == "cluster", failing(report)
    checks = {f["check"] for f in report["findings"]}
    assert {"schema", "indexes", "hot_query", "statistics", "replication", "redis", "clock"} <= checks
    hot = {f["subject"]: f for f in report["findings"] if f["check"] == "hot_query"}
    assert set(hot) == {q.name for q in hot_queries('"x"')} and all(f["status"] == "ok" for f in hot.values())

    run(_sql(f'DROP INDEX "{pg_schema}".members_conv'))
    rc, report = doctor(*args)
    assert rc == 1 and not report["ok"]
    bad = {(f["check"], f["subject"]): f for f in failing(report)}
    assert set(bad) == {("indexes", "members_conv"), ("hot_query", "members_by_conv"), ("hot_query", "members_versioned")}
    index = bad["indexes", "members_conv"]
    assert index["status"] == "error" and "members_by_conv" in index["message"]
    fix = f'CREATE INDEX CONCURRENTLY members_conv ON "{pg_schema}".members USING btree (conv, user_id);'
    assert index["fix"] == fix
    assert "cannot use members_conv (missing)" in bad["hot_query", "members_by_conv"]["message"]
    assert bad["hot_query", "members_by_conv"]["fix"] == fix
    rc, text = doctor(*args, json=False)
    assert rc == 1 and f"[ERROR] indexes: members_conv: index members_conv on \"{pg_schema}\".members is missing" in text
    assert f"          fix: {fix}" in text and text.rstrip().endswith("(--verbose lists them)")

    run(_sql(fix))  # what the finding says to run
    rc, report = doctor(*args)
    assert rc == 0, failing(report)


def test_doctor_finds_a_dropped_unique_constraint(pg_schema: str, redis_prefix: str) -> None:
    """The dedup key of appends: without it a retried SEND would be stored twice."""
    args = ("--postgres", PG_DSN, "--redis", REDIS_URL, "--schema", pg_schema, "--redis-prefix", redis_prefix)
    run(_sql(f'ALTER TABLE "{pg_schema}".message_keys DROP CONSTRAINT message_keys_pkey'))
    rc, report = doctor(*args)
    assert rc == 1
    [index] = [f for f in failing(report) if f["check"] == "indexes"]
    assert index["subject"] == "message_keys_pkey" and "duplicates can be stored" in index["message"]
    ddl = f'ALTER TABLE "{pg_schema}".message_keys ADD CONSTRAINT message_keys_pkey PRIMARY KEY (sender_id, client_msg_id)'
    assert index["fix"].startswith(ddl + ";")
    assert [f["subject"] for f in failing(report) if f["check"] == "hot_query"] == ["append_dedup"]
    run(_sql(ddl))
    assert doctor(*args)[0] == 0


def test_doctor_on_a_missing_or_old_schema(pg_schema: str) -> None:
    async def go() -> None:
        gone = await check_postgres(PG_DSN, pg_schema + "_none")
        [schema] = [f for f in gone if f.check == "schema"]
        assert schema.status is Status.ERROR and "gochat migrate" in schema.fix
        await _sql(f'DELETE FROM "{pg_schema}".schema_version WHERE version = (SELECT max(version) FROM "{pg_schema}".schema_version)')
        old = await check_postgres(PG_DSN, pg_schema)
        assert [f.message for f in old if f.check == "schema"] == [f"schema {pg_schema!r} is at version 2, this gochat has 3"]
        bad = await check_postgres("postgresql://postgres@127.0.0.1:1/none", pg_schema, timeout=3)
        assert bad[0].status is Status.ERROR and "cannot connect" in bad[0].message

    run(go())


def test_statistics_age_on_a_real_table(pg_schema: str) -> None:
    """A table of 2,000 rows that autovacuum may not analyze: flagged with ANALYZE as the fix;
    after ANALYZE it is fresh."""
    table = f'"{pg_schema}".users'

    async def stats() -> list[Finding]:
        return [f for f in await check_postgres(PG_DSN, pg_schema) if f.check == "statistics"]

    async def go() -> None:
        await _sql(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
        await _sql(f"INSERT INTO {table} (username, password_hash, created_ms) SELECT 'u' || g, 'x', 0 FROM generate_series(1, 2000) g")
        for _ in range(50):  # the statistics collector reports within a moment
            [f] = await stats()
            if f.status is Status.WARN:
                break
            await asyncio.sleep(0.1)
        assert f.status is Status.WARN and f.subject == table, f
        assert "never analyzed" in f.message and f.fix.startswith(f"ANALYZE {table};")
        await _sql(f"ANALYZE {table}")
        for _ in range(50):
            [f] = await stats()
            if f.status is Status.OK:
                break
            await asyncio.sleep(0.1)
        assert f.status is Status.OK and "1 tables of 1000+ rows have fresh statistics" in f.message, f

    run(go())


def test_statistics_findings() -> None:
    day = 86400.0
    rows = [
        {"relname": "users", "relkind": "r", "parent": None, "n_live_tup": 50_000, "n_mod_since_analyze": 20_000, "age_s": 3 * day},
        {"relname": "members", "relkind": "r", "parent": None, "n_live_tup": 50_000, "n_mod_since_analyze": 100, "age_s": 9 * day},
        {"relname": "tiny", "relkind": "r", "parent": None, "n_live_tup": 10, "n_mod_since_analyze": 10, "age_s": None},
        {"relname": "messages", "relkind": "p", "parent": None, "n_live_tup": 0, "n_mod_since_analyze": 0, "age_s": None},
        {"relname": "messages_p00", "relkind": "r", "parent": "messages", "n_live_tup": 900, "n_mod_since_analyze": 0, "age_s": 60.0},
        {"relname": "messages_p01", "relkind": "r", "parent": "messages", "n_live_tup": 900, "n_mod_since_analyze": 0, "age_s": 60.0},
    ]
    out = statistics_findings(rows, '"s"')
    assert [(f.status, f.subject) for f in out] == [(Status.WARN, '"s".users'), (Status.WARN, '"s".messages')]
    assert "3.0 d old and 20000 of 50000 rows changed" in out[0].message
    assert "autovacuum analyzes only the partitions" in out[1].message
    fresh = statistics_findings([{**rows[1], "age_s": 3600.0}], '"s"')
    assert [(f.status, f.message) for f in fresh] == [(Status.OK, "1 tables of 1000+ rows have fresh statistics (oldest 60 min)")]


def test_a_planner_that_scans_a_big_table_instead_of_its_index_is_a_warning(pg_schema: str) -> None:
    """The index exists (found with enable_seqscan off) but the plan scans: fine for a small
    table, a statistics problem for a big one."""

    async def go() -> None:
        conn = await asyncpg.connect(PG_DSN)
        try:
            await conn.execute(f'ALTER TABLE "{pg_schema}".refresh_tokens SET (autovacuum_enabled = false)')
            [q] = [q for q in hot_queries(f'"{pg_schema}"') if q.name == "expired_tokens_purge"]
            small = await _hot_query_finding(conn, q, {}, {"refresh_tokens": 10.0}, {})
            if "Seq Scan on refresh_tokens" not in small.details["plan"]:
                # the planner took the index even on an empty table: nothing scans, nothing to say
                assert small.status is Status.OK, small.details["plan"]
                return
            assert small.status is Status.OK and "while the tables are small" in small.message
            big = await _hot_query_finding(conn, q, {}, {"refresh_tokens": 2e6}, {})
            assert big.status is Status.WARN and "refresh_tokens (~2000000 rows)" in big.message
            assert big.fix.startswith("ANALYZE refresh_tokens")
        finally:
            await conn.close()

    run(go())


# ---- SQLite -------------------------------------------------------------------------------------


def test_doctor_finds_a_dropped_sqlite_index_and_its_fix_works(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    config = tmp_path / "gochat.toml"
    config.write_text(f'[gochat]\ndata_dir = "{data}"\n')
    rc, report = doctor("--config", str(config))
    assert rc == 1 and failing(report)[0]["message"] == "no database file"

    async def create() -> None:
        store = SQLiteStore(data / "gochat.db")
        await store.open()
        await store.create_user("alice", "x")
        await store.close()

    run(create())
    rc, report = doctor("--config", str(config))
    assert rc == 0 and report["mode"] == "embedded", failing(report)
    assert report["target"] == {"database": str(data / "gochat.db")}
    assert sum(f["check"] == "hot_query" for f in report["findings"]) >= 10
    with sqlite3.connect(data / "gochat.db") as db:
        db.execute("DROP INDEX members_user")
    rc, report = doctor(env={"GOCHAT_DATA_DIR": str(data)})  # the environment, as for serve
    assert rc == 1
    bad = {(f["check"], f["subject"]): f for f in failing(report)}
    assert set(bad) == {("indexes", "members_user"), ("hot_query", "conversations_of_user")}
    fix = bad["indexes", "members_user"]["fix"]
    assert fix.startswith("CREATE INDEX members_user ON members(user_id, conv);")
    scan = bad["hot_query", "conversations_of_user"]
    assert "scans all of" in scan["message"] and "does not use members_user" in scan["message"]
    assert any(line.startswith("SCAN ") for line in scan["details"]["plan"]) and scan["fix"] == fix
    with sqlite3.connect(data / "gochat.db") as db:
        db.execute(fix.split(";")[0])
    rc, report = doctor("--data-dir", str(data))
    assert rc == 0, failing(report)


def test_doctor_refuses_unusable_settings(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "gochat.cli", "doctor", "--redis", REDIS_URL],  # no --postgres
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("GOCHAT_")},
    )
    assert r.returncode == 2 and "cluster mode needs both" in r.stderr


# ---- Redis ----------------------------------------------------------------------------------------


def test_redis_findings() -> None:
    healthy = {"maxmemory_policy": "noeviction", "used_memory": 100 << 20, "maxmemory": 1 << 30, "role": "master"}
    assert [f.status for f in redis_findings(healthy)] == [Status.OK, Status.OK]
    lru = redis_findings({**healthy, "maxmemory_policy": "allkeys-lru"})
    assert lru[0].status is Status.ERROR and lru[0].subject == "maxmemory-policy"
    assert "distributed locks" in lru[0].message and "streams" in lru[0].message
    assert lru[0].fix.startswith("CONFIG SET maxmemory-policy noeviction")
    near = redis_findings({**healthy, "used_memory": 800 << 20})
    assert near[1].status is Status.WARN and "(78%)" in near[1].message
    full = redis_findings({**healthy, "used_memory": 1000 << 20, "evicted_keys": 12})
    assert [f.status for f in full] == [Status.OK, Status.ERROR, Status.ERROR]
    assert "evicted 12 keys" in full[1].message
    unbounded = redis_findings({**healthy, "maxmemory": 0, "total_system_memory": 16 << 30})
    assert unbounded[1].status is Status.INFO and "no maxmemory" in unbounded[1].message
    replica = redis_findings({**healthy, "role": "slave"})
    assert replica[-1].status is Status.ERROR and "read-only" in replica[-1].message
    primary = redis_findings(
        {**healthy, "connected_slaves": 1, "master_repl_offset": 5000,
         "slave0": {"ip": "10.0.0.2", "port": 6380, "state": "online", "offset": 4000, "lag": 0}}
    )
    assert primary[-1].status is Status.OK and primary[-1].message.endswith("1000 bytes behind, last ack 0 s ago")


def test_redis_check_reads_the_real_server() -> None:
    async def go() -> None:
        from redis.asyncio import Redis

        r = Redis.from_url(REDIS_URL, decode_responses=True)
        try:
            policy = (await r.config_get("maxmemory-policy"))["maxmemory-policy"]
        finally:
            await r.aclose()
        findings = await check_redis(REDIS_URL)
        [f] = [f for f in findings if f.subject == "maxmemory-policy"]
        assert (f.status is Status.OK) == (policy == "noeviction")
        assert any(f.subject == "memory" for f in findings)
        assert (await check_redis("redis://127.0.0.1:1/0", timeout=1))[0].status is Status.ERROR

    run(go())


# ---- replication ----------------------------------------------------------------------------------


def test_replication_findings() -> None:
    assert [(f.status, f.message) for f in replication_findings([])] == [
        (Status.OK, "no replicas (pg_stat_replication is empty)")
    ]
    lag = dt.timedelta
    rows = [
        {"application_name": "a", "state": "streaming", "replay_lag": lag(seconds=0.01), "replay_bytes": 100},
        {"application_name": "b", "state": "streaming", "replay_lag": lag(seconds=8), "replay_bytes": 100},
        {"application_name": "c", "state": "streaming", "write_lag": None, "replay_lag": None, "replay_bytes": 2 << 30},
        {"application_name": "d", "state": "catchup", "replay_lag": None, "replay_bytes": 0},
    ]
    out = replication_findings(rows, slots=[{"slot_name": "old", "active": False, "retained_bytes": 5 << 30}])
    assert [(f.subject, f.status) for f in out] == [
        ("a", Status.OK), ("b", Status.WARN), ("c", Status.ERROR), ("d", Status.WARN), ("slot old", Status.WARN),
    ]
    assert out[1].message == "replica b (streaming): replay lag 8.000 s, 100 bytes behind"
    assert "pg_drop_replication_slot('old')" in out[4].fix
    [standby] = replication_findings([], in_recovery=True)
    assert standby.status is Status.ERROR and "standby" in standby.message


def test_replication_on_the_shared_server(pg_schema: str) -> None:
    async def go() -> None:
        rows = await _sql("SELECT count(*) FROM pg_stat_replication")
        findings = [f for f in await check_postgres(PG_DSN, pg_schema) if f.check == "replication"]
        if rows[0][0] == 0:
            assert [f.message for f in findings if f.subject == "primary"] == ["no replicas (pg_stat_replication is empty)"]
        else:
            assert len([f for f in findings if f.subject != "primary"]) >= rows[0][0]

    run(go())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _PrivateCluster:
    """A PostgreSQL primary and a streaming standby of its own (initdb, pg_basebackup -R)."""

    def __init__(self) -> None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        bindir = Path(found[-1]).parent if found else Path(shutil.which("initdb") or "/nonexistent").parent
        self.bin = bindir
        if not all((bindir / t).exists() for t in ("initdb", "pg_ctl", "pg_basebackup")):
            pytest.fail("the PostgreSQL server binaries (initdb, pg_ctl, pg_basebackup) are not installed")
        self.prefix: list[str] = []
        if os.geteuid() == 0:  # postgres refuses to run as root
            if not shutil.which("runuser"):
                pytest.fail("running as root without runuser")
            try:
                import pwd

                pwd.getpwnam("postgres")
            except KeyError:
                pytest.fail("running as root and there is no postgres user")
            self.prefix = ["runuser", "-u", "postgres", "--"]
        self.dir = Path(tempfile.mkdtemp(prefix="gochat-doctor-pg-"))
        if self.prefix:
            shutil.chown(self.dir, "postgres")
        self.primary_port, self.standby_port = _free_port(), _free_port()
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.primary_port}/postgres"
        self.standby_dsn = f"postgresql://postgres@127.0.0.1:{self.standby_port}/postgres"

    def _run(self, *args: str) -> None:
        r = subprocess.run([*self.prefix, *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"{args}: {r.stdout}{r.stderr}"

    def start(self) -> None:
        d, b = self.dir, self.bin
        self._run(str(b / "initdb"), "-D", str(d / "primary"), "-U", "postgres", "--auth=trust", "-N")
        conf = (
            f"port = {self.primary_port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{d}'\n"
            "wal_level = replica\nmax_wal_senders = 4\nfsync = off\n"
        )
        self._run("sh", "-c", f"cat >> {d}/primary/postgresql.conf <<'EOF'\n{conf}EOF\n"
                  f"echo 'host replication all 127.0.0.1/32 trust' >> {d}/primary/pg_hba.conf")
        self._run(str(b / "pg_ctl"), "-D", str(d / "primary"), "-l", str(d / "primary.log"), "-w", "start")
        self._run(str(b / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(self.primary_port), "-U", "postgres",
                  "-D", str(d / "standby"), "-R", "-X", "stream")
        self._run("sh", "-c", f"sed -i 's/^port = .*/port = {self.standby_port}/' {d}/standby/postgresql.conf && "
                  f"echo \"primary_conninfo = 'host=127.0.0.1 port={self.primary_port} user=postgres "
                  f"application_name=standby1'\" >> {d}/standby/postgresql.auto.conf")
        self._run(str(b / "pg_ctl"), "-D", str(d / "standby"), "-l", str(d / "standby.log"), "-w", "start")

    def stop(self) -> None:
        for node in ("standby", "primary"):
            if (self.dir / node / "postmaster.pid").exists():
                subprocess.run([*self.prefix, str(self.bin / "pg_ctl"), "-D", str(self.dir / node), "-m", "immediate", "stop"],
                               capture_output=True, timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)


def test_doctor_reports_the_lag_of_a_real_standby(redis_prefix: str) -> None:
    """A private primary with a streaming standby: the doctor lists the replica and its lag; with
    replay paused and 70 MB written, the replica is 64 MiB+ behind: a warning (exit 1); replay
    resumed, it catches up (exit 0)."""
    cluster = _PrivateCluster()
    try:
        cluster.start()
        run(migrate(cluster.dsn, "gochat"))
        args = ("--postgres", cluster.dsn, "--redis", REDIS_URL, "--redis-prefix", redis_prefix)

        async def replay_bytes() -> int:
            rows = await _sql("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn) FROM pg_stat_replication", dsn=cluster.dsn)
            return int(rows[0][0]) if rows and rows[0][0] is not None else -1

        async def wait(cond: Any) -> None:
            for _ in range(300):
                if cond(await replay_bytes()):
                    return
                await asyncio.sleep(0.1)
            raise AssertionError(f"replay_bytes stayed at {await replay_bytes()}")

        run(wait(lambda n: n == 0))
        rc, report = doctor(*args)
        [replica] = [f for f in report["findings"] if f["check"] == "replication"]
        assert rc == 0 and replica["subject"] == "standby1" and replica["status"] == "ok", failing(report)
        assert replica["message"].startswith("replica standby1 (streaming): replay lag ")
        assert replica["details"]["replay_bytes"] == 0

        # a DSN that points at the standby is refused (read-only), not checked
        [standby] = run(check_postgres(cluster.standby_dsn, "gochat"))[-1:]
        assert standby.status is Status.ERROR and "standby" in standby.message

        run(_sql("SELECT pg_wal_replay_pause()", dsn=cluster.standby_dsn))
        run(_sql("CREATE TABLE ballast AS SELECT repeat('x', 1000) AS pad FROM generate_series(1, 70000)", dsn=cluster.dsn))
        run(wait(lambda n: n >= 64 << 20))
        rc, report = doctor(*args)
        [replica] = [f for f in report["findings"] if f["check"] == "replication"]
        assert rc == 1 and replica["status"] == "warn", replica
        assert replica["details"]["replay_bytes"] >= 64 << 20 and "bytes behind" in replica["message"]

        run(_sql("SELECT pg_wal_replay_resume()", dsn=cluster.standby_dsn))
        run(wait(lambda n: n == 0))
        rc, report = doctor(*args)
        assert rc == 0, failing(report)
    finally:
        cluster.stop()


# ---- clocks ---------------------------------------------------------------------------------------


def test_clock_findings() -> None:
    samples = [
        ClockSample("redis", 3.0, 0.5, "TIME"),
        ClockSample("node a", 40.0, 1.0, "time_ms"),
        ClockSample("node b", 2500.0, 1.0, "time_ms"),
        ClockSample("node c", 900.0, 501.0, "Date header"),  # within its uncertainty
        ClockSample("node d", None, problem="unreachable"),
    ]
    out = {f.subject: f for f in clock_findings(samples, max_skew_ms=500)}
    assert out["this machine"].status is Status.OK and out["this machine"].details["skew_ms"] == -3.0
    assert out["node a"].status is Status.OK and out["node a"].message == "+37 ms against Redis TIME (±2 ms, time_ms)"
    assert out["node b"].status is Status.ERROR and "chrony" in out["node b"].fix
    assert out["node c"].status is Status.OK and out["node d"].status is Status.WARN
    assert "redis" not in out


def test_doctor_flags_a_skewed_node_of_the_registry(tmp_path: Path, pg_schema: str, redis_prefix: str) -> None:
    """Three nodes in a real registry: one whose /healthz sends a time_ms 5 s ahead (flagged),
    one with only the HTTP Date header (fine, to the second), one that does not answer."""
    from gochat.cluster.redis.registry import RedisRegistry

    async def healthz_skewed(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "time_ms": int(time.time() * 1000) + 5000})

    async def healthz_plain(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def go() -> None:
        runners, registries = [], []
        try:
            urls = []
            for handler in (healthz_skewed, healthz_plain):
                app = web.Application()
                app.router.add_get("/healthz", handler)
                runner = web.AppRunner(app)
                await runner.setup()
                site = web.TCPSite(runner, "127.0.0.1", 0)
                await site.start()
                runners.append(runner)
                urls.append(f"http://127.0.0.1:{runner.addresses[0][1]}")
            urls.append(f"http://127.0.0.1:{_free_port()}")  # nobody listens
            for name, url in zip(("ahead", "plain", "gone"), urls, strict=True):
                reg = RedisRegistry(REDIS_URL, redis_prefix, ttl_s=30, renew_s=10)
                await reg.register(NodeInfo(node_id=name, ws_url="ws://127.0.0.1:1/ws", http_url=url, version="test"))
                registries.append(reg)
            settings = Settings(redis_url=REDIS_URL, postgres_dsn=PG_DSN, redis_prefix=redis_prefix, postgres_schema=pg_schema)
            out = {f.subject: f for f in await check_clocks(settings, 500)}
            assert out["node ahead"].status is Status.ERROR and out["node ahead"].details["source"] == "time_ms"
            assert 4500 < out["node ahead"].details["skew_ms"] < 5500
            assert out["node plain"].status is Status.OK and out["node plain"].details["source"] == "Date header"
            assert out["node gone"].status is Status.WARN and "unreachable" in out["node gone"].message
            assert out["this machine"].status is Status.OK
            # the CLI: the skewed node makes the exit status 1
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gochat.cli", "doctor", "--postgres", PG_DSN, "--redis", REDIS_URL,
                "--schema", pg_schema, "--redis-prefix", redis_prefix,
                cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                env={k: v for k, v in os.environ.items() if not k.startswith("GOCHAT_")},
            )
            stdout, stderr = await proc.communicate()
            text = stdout.decode()
            assert proc.returncode == 1, text + stderr.decode()
            assert "[ERROR] clock: node ahead: clock off by +" in text and "[WARN ] clock: node gone" in text
        finally:
            for reg in registries:
                await reg.deregister()
                await reg.close()
            for runner in runners:
                await runner.cleanup()

    run(go())


def test_render_text_lists_problems_and_their_fixes() -> None:
    from gochat.doctor import Report

    report = Report("embedded", {"database": "/x/gochat.db"})
    report.findings += [
        Finding("schema", Status.OK, "/x/gochat.db", "schema version 4"),
        Finding("indexes", Status.ERROR, "members_user", "index members_user on members is missing", "CREATE INDEX …"),
    ]
    assert report.exit_code == 1
    assert render_text(report) == (
        "gochat doctor: embedded mode (database=/x/gochat.db)\n"
        "[ERROR] indexes: members_user: index members_user on members is missing\n"
        "          fix: CREATE INDEX …\n"
        "2 checks: 1 errors, 0 warnings, 1 ok (--verbose lists them)\n"
    )
    assert "[ok   ] schema: /x/gochat.db: schema version 4" in render_text(report, verbose=True)
