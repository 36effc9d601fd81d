"""``gochat doctor`` on the embedded store: schema version, the indexes the migrations create,
and the plans of the hot queries (``EXPLAIN QUERY PLAN``).

The expected indexes are not a list kept by hand: :func:`expected_indexes` applies
:data:`~gochat.store.sqlite.schema.MIGRATIONS` (up to the database's version) to an in-memory
database and reads what they created. The hot queries are
:data:`~gochat.store.sqlite.hot_queries.HOT_QUERIES`, kept next to the schema.
The database is opened read-only (``mode=ro``): the doctor never writes to it, and never
creates its ``-wal``/``-shm`` files as another user.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

from gochat.observability.findings import Finding, HotQuery, Status
from gochat.store.sqlite import schema
from gochat.store.sqlite.hot_queries import HOT_QUERIES

__all__ = ["check_database", "expected_indexes", "query_plan"]

_USING = re.compile(r"USING (?:COVERING )?INDEX (\S+)")
_SCAN = re.compile(r"^SCAN (\S+)")  # a full pass over a table (or over all of an index)


def expected_indexes(version: int = schema.SCHEMA_VERSION) -> dict[str, tuple[str, str | None]]:
    """index name -> (table, CREATE INDEX statement or None for a constraint's autoindex): what
    the first ``version`` migrations create, read from an in-memory database."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    try:
        conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_ms INTEGER NOT NULL)")
        for n in range(version):
            for statement in schema._split_sql(schema.MIGRATIONS[n]):
                conn.execute(statement)
        rows = conn.execute(
            "SELECT name, tbl_name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name != 'schema_version'"
        ).fetchall()
    finally:
        conn.close()
    return {name: (table, sql) for name, table, sql in rows}


def query_plan(conn: sqlite3.Connection, query: HotQuery) -> list[str]:
    """The ``EXPLAIN QUERY PLAN`` lines of a hot query."""
    return [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + query.sql, query.params)]


def _plan_findings(query: HotQuery, plan: list[str], missing: dict[str, str]) -> Finding:
    used = {m[1] for line in plan for m in _USING.finditer(line)}
    scans = [m[1] for line in plan if (m := _SCAN.match(line)) and m[1] != "CONSTANT"]
    unused = [i for i in query.indexes if i not in used]
    subject = query.name
    details = {"plan": plan, "expected": list(query.indexes), "purpose": query.purpose}
    if not unused and not scans:
        used_text = ", ".join(sorted(used)) or "primary keys"
        return Finding("hot_query", Status.OK, subject, f"uses {used_text}", details=details)
    problems = []
    if scans:
        problems.append(f"scans all of {', '.join(scans)}")
    if unused:
        problems.append(f"does not use {', '.join(unused)}")
    gone = [i for i in unused if i in missing]
    fix = (
        " ".join(missing[i] for i in gone)
        if gone
        else "compare the schema with the migrations (gochat/store/sqlite/schema.py); run ANALYZE if sqlite_stat1 "
        "holds statistics that mislead the planner"
    )
    return Finding(
        "hot_query", Status.ERROR, subject, f"{query.purpose or query.name}: {'; '.join(problems)}", fix, details
    )


def check_database(path: str | Path) -> list[Finding]:
    """Every embedded-store check on the database at ``path`` (read-only)."""
    path = Path(path)
    if not path.exists():
        return [
            Finding(
                "schema",
                Status.ERROR,
                str(path),
                "no database file",
                "check data_dir (the node creates gochat.db there when it first starts)",
            )
        ]
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, cached_statements=0)
    try:
        return _check(conn, path)
    except sqlite3.Error as exc:
        return [Finding("schema", Status.ERROR, str(path), f"cannot read the database: {exc}", "check the file")]
    finally:
        conn.close()


def _check(conn: sqlite3.Connection, path: Path) -> list[Finding]:
    out: list[Finding] = []
    # a read transaction loads the current schema (a connection's cached one may be stale)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    version = 0
    if "schema_version" in tables:
        version = int(conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0])
    if version != schema.SCHEMA_VERSION:
        newer = version > schema.SCHEMA_VERSION
        out.append(
            Finding(
                "schema",
                Status.ERROR,
                str(path),
                f"schema version {version}, this gochat has {schema.SCHEMA_VERSION}",
                "upgrade gochat (the database is newer)" if newer else "start this gochat once: it migrates at start",
            )
        )
        if version == 0 or newer:
            return out
    else:
        out.append(Finding("schema", Status.OK, str(path), f"schema version {version}"))
    expected = expected_indexes(version)
    present = {r[0]: r[1] for r in conn.execute("SELECT name, tbl_name FROM sqlite_master WHERE type = 'index'")}
    missing: dict[str, str] = {}
    for name in sorted(set(expected) - set(present)):
        table, sql = expected[name]
        fix = missing[name] = (
            f"{sql}; (it blocks the node's writes while it builds: on a large table stop the node first)"
            if sql
            else f"the table {table} lost a UNIQUE/PRIMARY KEY constraint: restore it from a backup"
        )
        users = [q.name for q in HOT_QUERIES if name in q.indexes]
        why = f"; hot queries that need it: {', '.join(users)}" if users else ""
        out.append(
            Finding("indexes", Status.ERROR, name, f"index {name} on {table} is missing{why}", fix, {"hot_queries": users})
        )
    for name in sorted(set(present) - set(expected)):
        out.append(
            Finding("indexes", Status.INFO, name, f"index {name} on {present[name]} is not created by gochat's migrations")
        )
    if not missing:
        out.append(
            Finding("indexes", Status.OK, "schema", f"all {len(expected)} indexes of schema version {version} are present")
        )
    for query in HOT_QUERIES:
        try:
            plan = query_plan(conn, query)
        except sqlite3.Error as exc:
            out.append(
                Finding("hot_query", Status.ERROR, query.name, f"cannot plan: {exc}", "compare the schema with the migrations")
            )
            continue
        out.append(_plan_findings(query, plan, missing))
    return out
