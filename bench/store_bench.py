"""Store append throughput: SQLiteStore against PostgresStore, appends per second.

    python bench/store_bench.py [--backend sqlite,postgres] [--n 40000] [--concurrency 1000]
                                [--convs 100] [--body 100] [--repeat 3]
                                [--dsn postgresql://postgres@127.0.0.1:5432/test] [--uvloop]

Method: a fresh store (SQLite: a new file in a temporary directory, WAL, synchronous=FULL;
PostgreSQL: a new random schema, dropped afterwards, default server settings, so
``synchronous_commit=on``) with ``--convs`` direct conversations. ``--concurrency`` tasks each
append sequentially (closed loop: a task sends its next message when the previous one is
durable and acknowledged) until ``--n`` appends are done in total; messages go round-robin over
the conversations, with a ``--body``-byte body and a random client_msg_id. The clock covers only
the appends. Each run is repeated ``--repeat`` times on the same store and the best is shown
(noise only ever slows a run down), with the committed transactions of that run (group commit:
appends per transaction). Results go to stdout as a markdown table with the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import platform
import secrets
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Run from a checkout without installing: the repository root goes first on the path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gochat.store.base import AppendRequest, Store
from gochat.store.postgres import PostgresStore
from gochat.store.sqlite import SQLiteStore


async def _setup(store: Store, convs: int) -> list[tuple[int, int]]:
    me = await store.create_user("bench0", "x")
    out = []
    for i in range(convs):
        peer = await store.create_user(f"bench{i + 1}", "x")
        out.append((await store.direct_conversation(me, peer), me))
    return out


async def _run_once(
    store: Store, targets: list[tuple[int, int]], n: int, concurrency: int, body: bytes
) -> float:
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            conv, sender = targets[i % len(targets)]
            await store.append(AppendRequest(conv, 1, sender, os.urandom(16), 1, body))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start


async def bench(name: str, make: Callable[[], Store], args: argparse.Namespace) -> dict[str, Any]:
    store = make()
    await store.open()
    try:
        targets = await _setup(store, args.convs)
        body = os.urandom(args.body)
        best: tuple[float, int] | None = None
        for _ in range(args.repeat):
            tx0 = store.stats.transactions  # type: ignore[attr-defined]
            elapsed = await _run_once(store, targets, args.n, args.concurrency, body)
            tx = store.stats.transactions - tx0  # type: ignore[attr-defined]
            if best is None or elapsed < best[0]:
                best = (elapsed, tx)
        assert best is not None
        return {"backend": name, "seconds": best[0], "rate": args.n / best[0], "transactions": best[1]}
    finally:
        await store.close()


async def _pg_version(dsn: str) -> str:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        return str(await conn.fetchval("SHOW server_version")) + (
            ", synchronous_commit=" + str(await conn.fetchval("SHOW synchronous_commit"))
        )
    finally:
        await conn.close()


async def _drop_schema(dsn: str, schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def main(args: argparse.Namespace) -> None:
    results = []
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    extra = ""
    for backend in backends:
        if backend == "sqlite":
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "bench.db"
                results.append(await bench("SQLiteStore", functools.partial(SQLiteStore, path), args))
        elif backend == "postgres":
            schema = f"gochat_bench_{secrets.token_hex(4)}"
            extra = f"PostgreSQL {await _pg_version(args.dsn)}"
            try:
                results.append(
                    await bench(
                        "PostgresStore",
                        functools.partial(PostgresStore, args.dsn, schema=schema, min_size=2, max_size=10),
                        args,
                    )
                )
            finally:
                await _drop_schema(args.dsn, schema)
        else:
            raise SystemExit(f"unknown backend {backend!r}")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()},"
        f" Python {platform.python_version()}, loop {type(asyncio.get_running_loop()).__module__}"
        + (f"; {extra}" if extra else "")
    )
    print(
        f"n={args.n} appends, concurrency={args.concurrency}, {args.convs} conversations,"
        f" body={args.body} B, best of {args.repeat}\n"
    )
    print("| backend | appends/s | seconds | transactions | appends per transaction |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        per_tx = args.n / r["transactions"] if r["transactions"] else float("nan")
        print(
            f"| {r['backend']} | {r['rate']:,.0f} | {r['seconds']:.2f} | {r['transactions']} | {per_tx:,.1f} |"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="sqlite,postgres")
    parser.add_argument("--n", type=int, default=40_000)
    parser.add_argument("--concurrency", type=int, default=1000)
    parser.add_argument("--convs", type=int, default=100)
    parser.add_argument("--body", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--dsn",
        default=os.environ.get("GOCHAT_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"),
    )
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    ns = parser.parse_args()
    if ns.uvloop:
        import uvloop

        uvloop.run(main(ns))
    else:
        asyncio.run(main(ns))
