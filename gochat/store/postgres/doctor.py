"""``gochat doctor`` on PostgreSQL: schema version, the indexes the migrations create (present,
valid), the plans of the hot queries, table statistics, replication.

* **Expected indexes** are not a list kept by hand: :func:`expected_indexes` applies
  :data:`~gochat.store.postgres.schema.MIGRATIONS` (up to the schema's version) to temporary
  tables (``pg_temp``) in a transaction that is rolled back, and reads what they created, with
  the statement that recreates each. Nothing is left behind; it needs only the TEMP privilege.
* **Hot queries** (:data:`~gochat.store.postgres.hot_queries.HOT_QUERIES`, the statements the
  repositories run most; a test checks that the store runs exactly these and that every index
  named is created by the migrations) are
  planned with ``EXPLAIN (FORMAT JSON)`` (never ``ANALYZE``: nothing runs). A plan that does not
  use an expected index is planned again with ``enable_seqscan = off`` in a rolled-back
  transaction: if the index is used then, it exists and the planner prefers a sequential scan,
  which is right for a small table and a statistics problem for a big one; if not, the index is
  missing or unusable.
* **Statistics**: ``pg_stat_user_tables`` (last analyze, rows changed since).
* **Replication**: ``pg_stat_replication`` and ``pg_replication_slots`` on the primary.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from typing import Any, Final

import asyncpg

from gochat.observability.findings import Finding, HotQuery, Status
from gochat.store.postgres import schema
from gochat.store.postgres.explain import Scan, plan_scans, plan_shape
from gochat.store.postgres.hot_queries import HOT_QUERIES, hot_queries

__all__ = [
    "BIG_TABLE_ROWS",
    "check_postgres",
    "expected_indexes",
    "replication_findings",
    "statistics_findings",
]

#: a table with fewer rows may be scanned: the planner is right to prefer that
BIG_TABLE_ROWS: Final = 10_000
#: statistics are judged on tables with at least this many rows (or rows changed)
STATS_MIN_ROWS: Final = 1_000
#: statistics older than this with many rows changed since are stale
STATS_STALE_S: Final = 24 * 3600
LAG_WARN_S, LAG_ERROR_S = 5.0, 60.0
LAG_WARN_BYTES, LAG_ERROR_BYTES = 64 << 20, 1 << 30

_TEMP_SCHEMA = re.compile(r"\bpg_temp(?:_\d+)?\.")

_INDEXES_SQL = """
SELECT i.relname AS name, t.relname AS table_name, pg_get_indexdef(i.oid) AS indexdef, x.indisvalid AS valid,
       con.conname, pg_get_constraintdef(con.oid) AS condef, t.relkind = 'p' AS partitioned
FROM pg_index x
JOIN pg_class i ON i.oid = x.indexrelid
JOIN pg_class t ON t.oid = x.indrelid
LEFT JOIN pg_constraint con ON con.conindid = i.oid AND con.conrelid = t.oid
WHERE t.relnamespace = {namespace} AND NOT t.relispartition AND t.relname <> 'schema_version'
"""


async def expected_indexes(conn: Any, version: int, quoted_schema: str) -> dict[str, dict[str, Any]]:
    """index name -> {table, ddl}: what the first ``version`` migrations create, each with the
    statement that recreates it in ``quoted_schema``. Built on temporary tables in a transaction
    that is rolled back."""
    tr = conn.transaction()
    await tr.start()
    try:
        for n in range(version):
            await conn.execute(schema.MIGRATIONS[n].replace("{s}", "pg_temp"))
        rows = await conn.fetch(_INDEXES_SQL.format(namespace="pg_my_temp_schema()"))
    finally:
        await tr.rollback()
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["conname"]:
            ddl = f"ALTER TABLE {quoted_schema}.{r['table_name']} ADD CONSTRAINT {r['conname']} {r['condef']}"
        else:
            ddl = _TEMP_SCHEMA.sub(f"{quoted_schema}.", r["indexdef"])
            if r["partitioned"]:  # build it on every partition, not ON ONLY the parent
                ddl = ddl.replace(" ON ONLY ", " ON ")
            else:  # without blocking writes
                ddl = ddl.replace("CREATE INDEX ", "CREATE INDEX CONCURRENTLY ", 1).replace(
                    "CREATE UNIQUE INDEX ", "CREATE UNIQUE INDEX CONCURRENTLY ", 1
                )
        out[r["name"]] = {
            "table": r["table_name"],
            "ddl": ddl,
            "partitioned": r["partitioned"],
            "constraint": bool(r["conname"]),
        }
    return out


# ---- pure checks (tested on rows) -----------------------------------------------------------


def _seconds(value: Any) -> float:
    if value is None:
        return 0.0
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    return float(value)


def _human_s(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def statistics_findings(rows: list[dict[str, Any]], quoted_schema: str) -> list[Finding]:
    """Rows of ``pg_stat_user_tables`` (``relname``, ``relkind``, ``relispartition``, ``parent``,
    ``n_live_tup``, ``n_mod_since_analyze``, ``age_s``: seconds since the last analyze, manual or
    automatic, None when never) → findings."""
    out: list[Finding] = []
    children: dict[str, int] = {}
    for r in rows:
        if r.get("parent"):
            children[r["parent"]] = children.get(r["parent"], 0) + int(r["n_live_tup"] or 0)
    judged, oldest = 0, 0.0
    for r in rows:
        name, age = r["relname"], r["age_s"]
        table = f"{quoted_schema}.{name}"
        if r["relkind"] == "p":
            total = children.get(name, 0)
            if total >= STATS_MIN_ROWS and age is None:
                out.append(
                    Finding(
                        "statistics",
                        Status.WARN,
                        table,
                        f"partitioned table {name} ({total} rows in its partitions) was never analyzed: autovacuum "
                        "analyzes only the partitions, so plans over the whole table use default estimates",
                        f"ANALYZE {table}; (and again after large changes, e.g. daily from cron)",
                    )
                )
            continue
        live, mods = int(r["n_live_tup"] or 0), int(r["n_mod_since_analyze"] or 0)
        if max(live, mods) < STATS_MIN_ROWS:
            continue
        judged += 1
        if age is None:
            out.append(
                Finding(
                    "statistics",
                    Status.WARN,
                    table,
                    f"{name} ({live} rows, {mods} changed) was never analyzed: the planner guesses its size",
                    f"ANALYZE {table}; then check that autovacuum runs (SHOW autovacuum; pg_stat_user_tables)",
                    {"n_live_tup": live, "n_mod_since_analyze": mods},
                )
            )
            continue
        oldest = max(oldest, float(age))
        if mods >= max(STATS_MIN_ROWS, 0.2 * live) and age > STATS_STALE_S:
            out.append(
                Finding(
                    "statistics",
                    Status.WARN,
                    table,
                    f"{name}: statistics are {_human_s(age)} old and {mods} of {live} rows changed since",
                    f"ANALYZE {table}; if it recurs, lower autovacuum_analyze_scale_factor for it "
                    f"(ALTER TABLE {table} SET (autovacuum_analyze_scale_factor = 0.02))",
                    {"n_live_tup": live, "n_mod_since_analyze": mods, "age_s": age},
                )
            )
    if not out:
        text = (
            f"{judged} tables of {STATS_MIN_ROWS}+ rows have fresh statistics (oldest {_human_s(oldest)})"
            if judged
            else f"no table has {STATS_MIN_ROWS} rows yet (smaller ones are not judged)"
        )
        out.append(Finding("statistics", Status.OK, quoted_schema, text))
    return out


def replication_findings(
    replicas: list[dict[str, Any]], *, in_recovery: bool = False, slots: list[dict[str, Any]] | None = None
) -> list[Finding]:
    """Rows of ``pg_stat_replication`` (``application_name``, ``client_addr``, ``state``,
    ``write_lag``/``flush_lag``/``replay_lag`` (intervals), ``replay_bytes``) and of
    ``pg_replication_slots`` (``slot_name``, ``active``, ``retained_bytes``) → findings."""
    if in_recovery:
        return [
            Finding(
                "replication",
                Status.ERROR,
                "postgres_dsn",
                "the DSN points at a standby (in recovery, read-only): gochat writes need the primary",
                "point postgres_dsn at the primary (or at a proxy that follows it)",
            )
        ]
    out: list[Finding] = []
    for r in replicas:
        name = r.get("application_name") or str(r.get("client_addr") or "replica")
        lag = max(_seconds(r.get(k)) for k in ("write_lag", "flush_lag", "replay_lag"))
        behind = r.get("replay_bytes")
        behind_b = int(behind) if behind is not None else 0
        state = r.get("state") or "?"
        details = {"state": state, "lag_s": round(lag, 3), "replay_bytes": behind, "sync_state": r.get("sync_state")}
        text = f"replica {name} ({state}): replay lag {lag:.3f} s, {behind_b} bytes behind"
        if behind is None:
            text += " (bytes unknown: needs pg_read_all_stats)"
        if state != "streaming" or lag >= LAG_ERROR_S or behind_b >= LAG_ERROR_BYTES:
            status = Status.ERROR if lag >= LAG_ERROR_S or behind_b >= LAG_ERROR_BYTES else Status.WARN
            out.append(
                Finding(
                    "replication",
                    status,
                    name,
                    text,
                    "check the replica: its disk and CPU (replay), the network, long queries holding replay back "
                    "(max_standby_streaming_delay), its log; a replica that cannot catch up needs a new base backup",
                    details,
                )
            )
        elif lag >= LAG_WARN_S or behind_b >= LAG_WARN_BYTES:
            out.append(Finding("replication", Status.WARN, name, text, "watch it: the replica falls behind", details))
        else:
            out.append(Finding("replication", Status.OK, name, text, details=details))
    if not replicas:
        out.append(Finding("replication", Status.OK, "primary", "no replicas (pg_stat_replication is empty)"))
    for s in slots or ():
        if s.get("active"):
            continue
        retained = int(s.get("retained_bytes") or 0)
        status = Status.WARN if retained >= LAG_ERROR_BYTES else Status.INFO
        out.append(
            Finding(
                "replication",
                status,
                f"slot {s['slot_name']}",
                f"replication slot {s['slot_name']} is inactive and keeps {retained} bytes of WAL",
                f"bring its consumer back, or drop it: SELECT pg_drop_replication_slot('{s['slot_name']}'); "
                "(an abandoned slot keeps WAL until the disk fills)",
            )
        )
    return out


# ---- the checks on a database ----------------------------------------------------------------


async def _plan(conn: Any, sql: str, params: tuple[Any, ...], *, no_seqscan: bool) -> Any:
    tr = conn.transaction()
    await tr.start()
    try:
        if no_seqscan:
            await conn.execute("SET LOCAL enable_seqscan = off")
        return await conn.fetchval("EXPLAIN (FORMAT JSON) " + sql, *params)
    finally:
        await tr.rollback()


def _used(scans: list[Scan], parent_of: dict[str, str]) -> set[str]:
    return {parent_of.get(s.index, s.index) for s in scans if s.index}


def _seq_scanned(scans: list[Scan], parent_of: dict[str, str]) -> set[str]:
    return {parent_of.get(s.relation, s.relation) for s in scans if s.node == "Seq Scan" and s.relation}


async def _hot_query_finding(
    conn: Any, q: HotQuery, parent_of: dict[str, str], rows: dict[str, float], missing: dict[str, str]
) -> Finding:
    details: dict[str, Any] = {"expected": list(q.indexes), "purpose": q.purpose}
    try:
        plan = await _plan(conn, q.sql, q.params, no_seqscan=False)
    except asyncpg.PostgresError as exc:
        return Finding("hot_query", Status.ERROR, q.name, f"cannot plan: {exc}", "compare the schema with the migrations")
    scans = plan_scans(plan)
    details["plan"] = plan_shape(plan)
    unused = [i for i in q.indexes if i not in _used(scans, parent_of)]
    if not unused:
        return Finding("hot_query", Status.OK, q.name, f"uses {', '.join(q.indexes)}", details=details)
    forced = plan_scans(await _plan(conn, q.sql, q.params, no_seqscan=True))
    still = [i for i in unused if i not in _used(forced, parent_of)]
    if still:
        gone = [i for i in still if i in missing]
        return Finding(
            "hot_query",
            Status.ERROR,
            q.name,
            f"{q.purpose}: cannot use {', '.join(still)}" + (" (missing)" if gone else ""),
            "; ".join(missing[i] for i in gone) + ";" if gone else "check the index (REINDEX) and the schema",
            details,
        )
    scanned = _seq_scanned(scans, parent_of)
    big = {t: rows.get(t, 0.0) for t in scanned if rows.get(t, 0.0) >= BIG_TABLE_ROWS}
    if not big:
        return Finding(
            "hot_query",
            Status.OK,
            q.name,
            f"can use {', '.join(unused)}; the planner scans {', '.join(sorted(scanned)) or 'instead'} while the "
            f"tables are small (< {BIG_TABLE_ROWS} rows)",
            details=details,
        )
    tables = ", ".join(f"{t} (~{n:.0f} rows)" for t, n in sorted(big.items()))
    return Finding(
        "hot_query",
        Status.WARN,
        q.name,
        f"{q.purpose}: the planner prefers a sequential scan of {tables} over {', '.join(unused)}",
        f"ANALYZE {', '.join(sorted(big))} (stale statistics mislead the planner); see the statistics finding",
        details,
    )


async def check_postgres(dsn: str, schema_name: str, *, timeout: float = 30.0) -> list[Finding]:
    """Every PostgreSQL check of schema ``schema_name`` on the database at ``dsn``."""
    quoted = schema.check_schema(schema_name)
    try:
        conn = await asyncio.wait_for(asyncpg.connect(dsn, timeout=timeout), timeout)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return [Finding("schema", Status.ERROR, "postgres_dsn", f"cannot connect to PostgreSQL: {exc}", "check postgres_dsn")]
    try:
        async with asyncio.timeout(timeout):
            await conn.execute("SET application_name = 'gochat-doctor'")
            return await _check(conn, schema_name, quoted)
    except TimeoutError:
        return [Finding("schema", Status.ERROR, quoted, f"the checks took longer than {timeout:g} s", "check the database load")]
    finally:
        await conn.close()


async def _check(conn: Any, schema_name: str, quoted: str) -> list[Finding]:
    out: list[Finding] = []
    in_recovery = bool(await conn.fetchval("SELECT pg_is_in_recovery()"))
    # replication first: the index check writes catalog rows (of temporary tables) that the
    # replicas then replay, which would show as lag
    replication = await _replication(conn, in_recovery)
    namespace = await conn.fetchval("SELECT oid FROM pg_namespace WHERE nspname = $1", schema_name)
    version = 0
    if namespace is not None and await conn.fetchval("SELECT to_regclass($1)", f"{quoted}.schema_version"):
        version = int(await conn.fetchval(f"SELECT COALESCE(max(version), 0) FROM {quoted}.schema_version"))
    if version != schema.SCHEMA_VERSION:
        newer = version > schema.SCHEMA_VERSION
        out.append(
            Finding(
                "schema",
                Status.ERROR,
                quoted,
                f"schema {schema_name!r} is at version {version}, this gochat has {schema.SCHEMA_VERSION}"
                if version
                else f"schema {schema_name!r} has no gochat tables",
                "upgrade gochat (the schema is newer)"
                if newer
                else f"gochat migrate --postgres DSN --schema {schema_name} (or start a node: it migrates)",
            )
        )
    else:
        out.append(Finding("schema", Status.OK, quoted, f"version {version}"))
    if version and not version > schema.SCHEMA_VERSION and not in_recovery:  # a standby: read-only
        out += await _index_findings(conn, namespace, version, quoted)
        out += await _stats(conn, schema_name, quoted)
    return out + replication


async def _replication(conn: Any, in_recovery: bool) -> list[Finding]:
    if in_recovery:
        return replication_findings([], in_recovery=True)
    replicas = await conn.fetch(
        "SELECT application_name, client_addr::text, state, sync_state, write_lag, flush_lag, replay_lag,"
        " pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint AS replay_bytes FROM pg_stat_replication"
    )
    slots = await conn.fetch(
        "SELECT slot_name, active, pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint AS retained_bytes"
        " FROM pg_replication_slots"
    )
    return replication_findings([dict(r) for r in replicas], slots=[dict(r) for r in slots])


async def _index_findings(conn: Any, namespace: int, version: int, quoted: str) -> list[Finding]:
    out: list[Finding] = []
    try:
        expected = await expected_indexes(conn, version, quoted)
    except asyncpg.PostgresError as exc:
        return [
            Finding(
                "indexes",
                Status.WARN,
                quoted,
                f"cannot derive the expected indexes (the migrations on temporary tables): {exc}",
                "grant the doctor's role TEMP on the database (GRANT TEMPORARY ON DATABASE … TO …)",
            )
        ]
    live = {r["name"]: dict(r) for r in await conn.fetch(_INDEXES_SQL.format(namespace="$1"), namespace)}
    missing = {name: expected[name]["ddl"] for name in expected if name not in live}
    users = {name: [q.name for q in HOT_QUERIES if name in q.indexes] for name in missing}
    for name in sorted(missing):
        e = expected[name]
        why = f"; hot queries that need it: {', '.join(users[name])}" if users[name] else ""
        if e["constraint"]:
            why += "; it enforces a UNIQUE/PRIMARY KEY constraint: duplicates can be stored while it is missing"
        out.append(
            Finding(
                "indexes",
                Status.ERROR,
                name,
                f"index {name} on {quoted}.{e['table']} is missing{why}",
                e["ddl"]
                + ";"
                + (" (locks writes to the table while it builds)" if e["partitioned"] else "")
                + (" (if duplicates were stored meanwhile it fails: remove them first)" if e["constraint"] else ""),
                {"table": e["table"], "hot_queries": users[name]},
            )
        )
    for name in sorted(set(live) - set(missing)):
        r = live[name]
        if not r["valid"]:
            out.append(
                Finding(
                    "indexes",
                    Status.ERROR,
                    name,
                    f"index {name} on {quoted}.{r['table_name']} is invalid (a failed CREATE INDEX CONCURRENTLY?): "
                    "queries cannot use it, writes still maintain it",
                    f"REINDEX INDEX {'' if r['partitioned'] else 'CONCURRENTLY '}{quoted}.{name};",
                )
            )
        elif name not in expected:
            out.append(
                Finding("indexes", Status.INFO, name, f"index {name} on {quoted}.{r['table_name']} is not created by gochat's migrations")
            )
    if not missing:
        out.append(
            Finding("indexes", Status.OK, quoted, f"all {len(expected)} indexes of schema version {version} are present")
        )
    # partition → parent, for tables and indexes (a partition's index counts for its parent's)
    parent_of = {
        r[0]: r[1]
        for r in await conn.fetch(
            "SELECT c.relname, p.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " JOIN pg_class p ON p.oid = i.inhparent WHERE c.relnamespace = $1",
            namespace,
        )
    }
    rows: dict[str, float] = {}
    for name, n in await conn.fetch("SELECT relname, reltuples FROM pg_class WHERE relnamespace = $1 AND relkind = 'r'", namespace):
        table = parent_of.get(name, name)
        rows[table] = rows.get(table, 0.0) + max(float(n), 0.0)
    for q in hot_queries(quoted):
        out.append(await _hot_query_finding(conn, q, parent_of, rows, missing))
    return out


async def _stats(conn: Any, schema_name: str, quoted: str) -> list[Finding]:
    rows = await conn.fetch(
        """
SELECT s.relname, c.relkind::text AS relkind, c.relispartition, p.relname AS parent, s.n_live_tup, s.n_mod_since_analyze,
       EXTRACT(EPOCH FROM now() - GREATEST(s.last_analyze, s.last_autoanalyze))::float8 AS age_s
FROM pg_stat_user_tables s
JOIN pg_class c ON c.oid = s.relid
LEFT JOIN pg_inherits i ON i.inhrelid = c.oid
LEFT JOIN pg_class p ON p.oid = i.inhparent
WHERE s.schemaname = $1 AND s.relname <> 'schema_version'
ORDER BY s.relname
""",
        schema_name,
    )
    return statistics_findings([dict(r) for r in rows], quoted)
