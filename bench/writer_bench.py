"""The SQLite writer alone, open loop: what one durable append costs at a fixed rate.

    python bench/writer_bench.py [--rates 12000,24000] [--seconds 4] [--convs 50]
                                 [--commit-delay-ms 8] [--body 64] [--preload 0]

Method: a fresh ``SQLiteStore`` (a new file in a temporary directory; WAL, synchronous=FULL)
with ``--convs`` direct conversations. The event loop calls ``append_soon`` at ``--rate``
appends/s spread evenly over time (open loop, 1 ms steps), round-robin over the conversations,
with UUIDv7 client ids as the SDK makes them, for ``--seconds``; ``--preload N`` first stores N
messages as fast as the writer takes them, so the indexes are as deep as in a database in use
(a fresh file keeps every conversation's index entries in a few shared pages, and a commit
dirties fewer pages than it would later). Reported per append: CPU of the
writer thread and of the loop thread (user / kernel, from ``/proc/self/task``), bytes the
process wrote to the file system and write syscalls (``/proc/self/io``), and appends per commit.
This is the instrument behind docs/storage-and-auth.md's figures for schema 2 and the commit
gathering; the full path (gateway, fan-out, acks) is ``python -m bench direct``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

# Run from a checkout without installing: the repository root goes first on the path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvloop

from bench.procs import proc_io
from gochat.client import new_client_msg_id
from gochat.store.base import AppendRequest, AppendResult
from gochat.store.sqlite import SQLiteStore

_TICK_S = os.sysconf("SC_CLK_TCK")


def _thread_cpu(tid: int) -> tuple[int, int]:
    """(user, system) clock ticks of one thread of this process."""
    fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


async def direct_pairs(store: SQLiteStore, n: int) -> list[tuple[int, int]]:
    """``n`` direct conversations between new users: [(conv, sender)]."""
    out = []
    for i in range(n):
        a = await store.create_user(f"a{i}", "x")
        b = await store.create_user(f"b{i}", "x")
        out.append((await store.direct_conversation(a, b), a))
    return out


async def run_rate(
    rate: float, seconds: float, convs: int, body_size: int, delay_ms: float, preload: int = 0
) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(Path(tmp) / "writer.db", commit_delay_ms=delay_ms)
        await store.open()
        try:
            targets = await direct_pairs(store, convs)
            writer = next(t for t in threading.enumerate() if t.name.startswith("gochat-sqlite-writer"))
            assert writer.native_id is not None
            body = os.urandom(body_size)
            answered = 0

            def done(result: AppendResult | None, error: BaseException | None) -> None:
                nonlocal answered
                assert error is None, error
                answered += 1

            def append(i: int) -> None:
                conv, sender = targets[i % convs]
                store.append_soon(AppendRequest(conv, 1, sender, new_client_msg_id(), 1, body), done)

            # preload (closed loop, at most 4,096 outstanding), then a warm-up of 2,000
            warm = preload + 2000
            issued = 0
            while issued < warm:
                while issued < warm and issued - answered < 4096:
                    append(issued)
                    issued += 1
                await asyncio.sleep(0.001)
            while answered < warm:
                await asyncio.sleep(0.005)

            n = int(rate * seconds)
            io0, tx0 = proc_io(os.getpid()), store.stats.transactions
            w0, l0 = _thread_cpu(writer.native_id), _thread_cpu(threading.get_native_id())
            start = time.perf_counter()
            sent = 0
            while sent < n:
                due = min(n, int((time.perf_counter() - start) * rate))
                while sent < due:
                    append(sent)
                    sent += 1
                await asyncio.sleep(0.001)
            while answered < warm + n:
                await asyncio.sleep(0.001)
            elapsed = time.perf_counter() - start
            io1, tx1 = proc_io(os.getpid()), store.stats.transactions
            w1, l1 = _thread_cpu(writer.native_id), _thread_cpu(threading.get_native_id())
        finally:
            await store.close()

    def per_append(ticks: int) -> float:
        return ticks / _TICK_S * 1e6 / n

    return {
        "rate": rate,
        "achieved": n / elapsed,
        "per_commit": n / max(1, tx1 - tx0),
        "writer_user": per_append(w1[0] - w0[0]),
        "writer_sys": per_append(w1[1] - w0[1]),
        "loop_user": per_append(l1[0] - l0[0]),
        "loop_sys": per_append(l1[1] - l0[1]),
        "bytes": (io1["wchar"] - io0["wchar"]) / n,
        "writes": (io1["syscw"] - io0["syscw"]) / n,
    }


async def main(args: argparse.Namespace) -> None:
    rows = [
        await run_rate(rate, args.seconds, args.convs, args.body, args.commit_delay_ms, args.preload)
        for rate in (float(r) for r in args.rates.split(","))
    ]
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()},"
        f" Python {platform.python_version()}; {args.convs} conversations, {args.body} B bodies,"
        f" commit_delay_ms={args.commit_delay_ms}, preload {args.preload:,} messages\n"
    )
    print("| offered/s | achieved/s | appends per commit | writer µs user / sys | loop µs user / sys"
          " | bytes written | write syscalls |")
    print("|---:|---:|---:|---|---|---:|---:|")
    for r in rows:
        print(
            f"| {r['rate']:,.0f} | {r['achieved']:,.0f} | {r['per_commit']:.0f} |"
            f" {r['writer_user']:.1f} / {r['writer_sys']:.1f} | {r['loop_user']:.1f} / {r['loop_sys']:.1f} |"
            f" {r['bytes']:,.0f} | {r['writes']:.2f} |"
        )


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", default="12000,24000", help="offered appends/s, comma list")
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--convs", type=int, default=50)
    p.add_argument("--body", type=int, default=64)
    p.add_argument("--commit-delay-ms", type=float, default=8.0)
    p.add_argument("--preload", type=int, default=0, help="messages stored before the measured run")
    uvloop.run(main(p.parse_args()))
