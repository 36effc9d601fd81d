"""The SQLite engine's own cost per durable append: the floor under gochat's durable direct path.

    python bench/sqlite_floor.py [--batches 50,163,500] [--preload 100000] [--convs 50]
                                 [--commits 40] [--body 64] [--layout schema|log]

Method: a database made by ``SQLiteStore.open()`` (gochat's real schema, indexes and pragmas:
WAL, ``synchronous=FULL``), then closed, with ``--convs`` direct conversations. The script then
writes to it with the ``sqlite3`` module alone, as gochat's writer does but with no gochat code
per row: ``--preload`` messages first (so the indexes are as deep as in a database in use),
then for each batch size B, ``--commits`` transactions of B appends round-robin over the
conversations: one ``executemany`` INSERT, one UPDATE of each touched conversation's
``last_seq``, COMMIT (the fdatasync). Rows carry UUIDv7-style client ids and ``--body`` random
bytes. Reported per append: process CPU (user + kernel, ``time.process_time``: the engine, the
file system and the fsync) and bytes written (``/proc/self/io``). The rows are built before the
clock starts, so Python's share is one ``executemany`` step per row.

``--layout log`` measures a write-optimised alternative instead: the same rows in a table keyed
by ``msg_id`` with only the (time-ordered) dedup index, i.e. without the per-conversation
``(conv, seq)`` index, which dirties one page per active conversation per commit. That is what
a layout with a deferred per-conversation index would pay in the commit path.

A server that stores each message durably in SQLite pays at least this per message, on top of
reading the SEND and writing the ACK and the delivery (the C relay floor of
``python -m bench direct``); docs/benchmarks.md puts the two together.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.procs import proc_io
from bench.writer_bench import direct_pairs
from gochat.store.sqlite import SQLiteStore

_INSERT = (
    "INSERT INTO messages (conv, seq, msg_id, sender_id, ts_ms, client_msg_id, content_type, body)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)


async def _make_db(path: Path, convs: int) -> list[tuple[int, int]]:
    """gochat's schema with ``convs`` direct conversations: [(conv, sender)]."""
    store = SQLiteStore(path)
    await store.open()
    try:
        return await direct_pairs(store, convs)
    finally:
        await store.close()


def _log_table_sql(conn: sqlite3.Connection) -> str:
    """gochat's messages table as stored, renamed message_log, without its (conv, seq) index."""
    sql: str = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'messages'").fetchone()[0]
    without = re.sub(r"UNIQUE \(conv, seq\),\s*", "", sql)
    if without == sql:
        raise SystemExit("sqlite_floor: gochat's messages table no longer has UNIQUE (conv, seq)")
    return without.replace('"messages"', "message_log", 1)


class Appender:
    """Appends batches with the sqlite3 module only, keeping seqs and msg_ids like the writer."""

    def __init__(self, path: Path, targets: list[tuple[int, int]], body: int, layout: str) -> None:
        self.conn = sqlite3.connect(str(path), isolation_level=None)
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA synchronous = FULL")
        self.conn.execute("PRAGMA foreign_keys = ON")
        self.insert = _INSERT
        if layout == "log":
            self.conn.execute(_log_table_sql(self.conn))
            self.insert = _INSERT.replace("INTO messages", "INTO message_log")
        self.targets = targets
        self.seqs = dict.fromkeys((conv for conv, _ in targets), 0)
        self.msg_id = 1
        self.body = body
        self.next = 0

    def rows(self, n: int) -> tuple[list[tuple[object, ...]], dict[int, int]]:
        rows: list[tuple[object, ...]] = []
        touched: dict[int, int] = {}
        for _ in range(n):
            conv, sender = self.targets[self.next % len(self.targets)]
            self.next += 1
            seq = self.seqs[conv] = self.seqs[conv] + 1
            touched[conv] = seq
            cmid = (time.time_ns() // 1_000_000).to_bytes(6, "big") + os.urandom(10)
            rows.append((conv, seq, self.msg_id, sender, 0, cmid, 1, os.urandom(self.body)))
            self.msg_id += 1
        return rows, touched

    def commit(self, rows: list[tuple[object, ...]], touched: dict[int, int]) -> None:
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        c.executemany(self.insert, rows)
        c.executemany("UPDATE conversations SET last_seq = ? WHERE conv = ?", [(s, v) for v, s in touched.items()])
        c.execute("COMMIT")


def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "floor.db"
        targets = asyncio.run(_make_db(path, args.convs))
        app = Appender(path, targets, args.body, args.layout)
        left = args.preload
        while left > 0:
            n = min(left, 1000)
            app.commit(*app.rows(n))
            left -= n
        app.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        results = []
        for batch in (int(b) for b in args.batches.split(",")):
            work = [app.rows(batch) for _ in range(args.commits)]
            w0, c0 = proc_io(os.getpid())["wchar"], time.process_time()
            t0 = time.perf_counter()
            for rows, touched in work:
                app.commit(rows, touched)
            wall = time.perf_counter() - t0
            cpu, written = time.process_time() - c0, proc_io(os.getpid())["wchar"] - w0
            n = batch * args.commits
            results.append((batch, cpu * 1e6 / n, written / n, wall * 1e3 / args.commits))
        table = "message_log" if args.layout == "log" else "messages"
        stored = app.conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
        app.conn.close()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()},"
        f" Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}; {args.convs} conversations,"
        f" {args.body} B bodies, preload {args.preload:,} messages, {args.commits} commits per batch size,"
        f" layout {args.layout}\n"
    )
    print(f"stored: {stored:,} rows in {table}\n")
    print("| appends per commit | CPU µs per append (user + kernel) | bytes written per append | ms per commit |")
    print("|---:|---:|---:|---:|")
    for batch, cpu_us, written, ms in results:
        print(f"| {batch:,} | {cpu_us:.1f} | {written:,.0f} | {ms:.2f} |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="50,163,500", help="appends per commit, comma list")
    p.add_argument("--preload", type=int, default=100_000, help="messages stored before measuring")
    p.add_argument("--convs", type=int, default=50)
    p.add_argument("--commits", type=int, default=40, help="transactions measured per batch size")
    p.add_argument("--body", type=int, default=64)
    p.add_argument("--layout", choices=["schema", "log"], default="schema",
                   help="schema: gochat's messages table; log: without the (conv, seq) index")
    p.add_argument("--dir", default=None, help="directory for the database (default: the system temp dir)")
    main(p.parse_args())
