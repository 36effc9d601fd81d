"""``python -m bench SCENARIO [options]``: gochat's server benchmarks.

Scenarios:

- ``fanout``  room fan-out, one publisher, N subscribers: (a) one message per publish tick,
              (b) a batch of K publishes per tick (coalesced); gochat against the C floor and peers
- ``direct``  one-to-one messages through gochat's durable path (SQLite) at rising fixed rates,
              against a websockets relay that stores nothing
- ``memory``  server memory per idle authenticated connection (fit over several counts)
- ``storm``   connect + authenticate rate
- ``all``     the four above with the full settings
- ``quick``   all four on small counts (about a minute): exercises the harness end to end
- ``report``  re-render results.md and the plots of ``--out DIR`` from its results.json
- ``chaos``   a cluster soak under random PostgreSQL/Redis faults: nothing acknowledged lost or
              duplicated (its own options: ``python -m bench chaos --help``; bench/chaos.py)
- ``groups``  group fan-out on a 3-node cluster: send → last delivery per tier (50 to 20,000
              members), direct-message p99 with and without a 20,000-member fan-out, against the
              Redis PUBLISH floor (its own options: ``python -m bench groups --help``; bench/groups.py)

Everything (servers, load generators, peers) is started here; the server under test is pinned
with ``taskset`` to ``--server-cpus`` and the load generators to ``--load-cpus``. Results go to
``--out`` (default ``bench/results/<UTC time>-<scenario>/``): results.json, results.md, PNGs, logs.

Every server under test runs under an LD_PRELOAD shim (``bench/peers/syscount.c``, built into
``bench/build/``) that counts its socket write syscalls: the "writes/frame" column, for every
target (``BENCH_NO_SYSCOUNT=1`` turns it off). ``--repeat N`` runs each fan-out capacity
measurement N times and reports median (min–max); ``all`` defaults to 3.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from bench import native, report
from bench.procs import ROOT, TARGETS, Placement, log, machine_facts
from bench.scenarios import Ctx, direct, fanout, memory, storm

FANOUT_TARGETS = ["gochat", "cfloor", "cfloor-coalesce", "picows", "websockets", "aiohttp", "node-ws"]
QUICK_FANOUT_TARGETS = ["gochat", "cfloor", "cfloor-coalesce", "picows", "websockets"]


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", choices=["quick", "fanout", "direct", "memory", "storm", "all", "report", "chaos"])
    p.add_argument("--out", type=Path, help="result directory")
    p.add_argument("--targets", help=f"comma list for fanout, direct or memory (known: {', '.join(TARGETS)})")
    p.add_argument("--subscribers", type=_ints, help="fanout: subscriber counts (default 1000,10000)")
    p.add_argument("--sizes", type=_ints, help="fanout: payload sizes in bytes (default 64,256)")
    p.add_argument("--batch", type=int, default=8, help="fanout mode (b): publishes per tick (default 8)")
    p.add_argument("--duration", type=float, help="seconds per measured run (default 6; at most 20)")
    p.add_argument("--repeat", type=int,
                   help="fanout: capacity runs per case, reported as median (min–max) (default 3 for "
                        "'all', else 1)")
    p.add_argument("--rates", type=_floats, help="direct: offered msgs/s steps")
    p.add_argument("--pairs", type=int, help="direct: sender/receiver pairs (default 50)")
    p.add_argument("--memory-steps", type=_ints, help="memory: connection counts (default 2000,...,18000)")
    p.add_argument("--storm", type=int, help="storm: connections (default 10000)")
    p.add_argument("--server-cpus", help="taskset CPU list for the server under test (default 0)")
    p.add_argument("--load-cpus", help="taskset CPU list for the load generators (default: the others)")
    a = p.parse_args(argv)
    if a.duration is not None and not 0 < a.duration <= 20:
        p.error("--duration must be in (0, 20]")
    if a.repeat is not None and not 1 <= a.repeat <= 9:
        p.error("--repeat must be in [1, 9]")
    return a


async def run(a: argparse.Namespace, argv: list[str]) -> Path:
    placement = Placement.default()
    if a.server_cpus is not None:
        placement.server = a.server_cpus
    if a.load_cpus is not None:
        placement.load = a.load_cpus
    quick = a.scenario == "quick"
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = a.out or (ROOT / "bench" / "results" / ("tmp" if quick else "") / f"{stamp}-{a.scenario}")
    out = out.resolve()
    work = out / "logs"
    work.mkdir(parents=True, exist_ok=True)
    if placement.load:
        # the driver itself stays off the server's core
        os.sched_setaffinity(0, {int(c) for c in placement.load.split(",")})
    # Build the native pieces once, before anything is timed.
    native.loadgen()
    native.cfloor()
    native.syscount()
    warnings = []
    fallback = native.fallback_reason()
    if fallback is not None:
        warnings.append(f"the load generators ran on the pure-Python fallback (bench/_loadgen_py.py), not the Cython "
                        f"listener (bench/_loadgen.pyx): {fallback}. It costs several times more CPU per delivery, so "
                        f"the load side may saturate before the server: these numbers are not comparable with "
                        f"runs on the Cython one.")
        bar = "!" * 100
        print(f"{bar}\nbench: WARNING: {warnings[-1]}\n{bar}", file=sys.stderr, flush=True)
    repeat = a.repeat or (3 if a.scenario == "all" else 1)
    ctx = Ctx(placement, work, quick, repeat)
    facts = machine_facts()  # before anything runs: the commit the servers start from
    t0 = time.monotonic()
    results: dict[str, Any] = {}

    def progress(what: str, m: dict[str, Any]) -> None:
        if "deliveries_per_s" in m:
            lat = m.get("latency_us", {})
            log(
                f"{what}: {m['deliveries_per_s']:,.0f} deliveries/s, server {m['server_cpu_pct']}% CPU "
                f"({m.get('server_cpu_us_per_delivery')} µs/delivery), loadgen {m['load_cpu_pct']}% CPU, "
                f"loss {m['loss_pct']}%, p50 {lat.get('p50')} µs p99 {lat.get('p99')} µs"
            )
        else:
            log(f"{what}: {m}")

    scen = a.scenario
    duration = a.duration or (1.5 if quick else 6.0)
    if scen in ("fanout", "all", "quick"):
        targets = a.targets.split(",") if a.targets else (QUICK_FANOUT_TARGETS if quick else FANOUT_TARGETS)
        subs = a.subscribers or ([200] if quick else [1000, 10000])
        sizes = a.sizes or ([64] if quick else [64, 256])
        results["fanout"] = await fanout(ctx, targets, subs, sizes, a.batch, duration, progress)
    if scen in ("direct", "all", "quick"):
        rates = a.rates or ([500, 1000] if quick else [1000, 2000, 4000, 8000, 12000, 16000, 24000, 28000, 32000, 36000, 40000, 44000, 48000, 56000, 64000])
        direct_targets = a.targets.split(",") if a.targets and scen == "direct" else ["gochat", "websockets-relay", "cfloor-relay"]
        results["direct"] = await direct(
            ctx, direct_targets, a.pairs or (8 if quick else 50), 64, rates,
            1.5 if quick else (a.duration or 5.0), progress,
        )
    if scen in ("memory", "all", "quick"):
        steps = a.memory_steps or ([100, 200, 400] if quick else [2000, 6000, 10000, 14000, 18000])
        mem_targets = a.targets.split(",") if a.targets and scen == "memory" else (
            ["gochat"] if quick else ["gochat", "picows"])
        results["memory"] = await memory(ctx, mem_targets, steps, progress)
    if scen in ("storm", "all", "quick"):
        total = a.storm or (300 if quick else 10000)
        results["storm"] = await storm(ctx, total, 1 if quick else 4, 64, progress)

    doc = {
        "scenario": scen,
        "command": "python -m bench " + " ".join(shlex.quote(x) for x in argv),
        "started": stamp,
        "elapsed_s": time.monotonic() - t0,
        "placement": {"server": placement.server, "load": placement.load},
        "repeat": repeat,
        "machine": facts,
        "results": results,
    }
    if warnings:
        doc["warnings"] = warnings
    end_commit = machine_facts()["git_commit"]
    if end_commit != facts["git_commit"]:
        doc["notes"] = [f"the working tree changed during the run: {facts['git_commit']} at the start, "
                        f"{end_commit} at the end; servers started later ran the newer code"]
    report.write(doc, out)
    log(f"done in {doc['elapsed_s']:.0f}s: {out / 'results.md'}")
    for w in warnings:
        log(f"WARNING: {w}")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["chaos"]:
        from bench import chaos

        return chaos.main(argv[1:])
    if argv[:1] == ["groups"]:
        from bench import groups

        return groups.main(argv[1:])
    a = parse(argv)
    if a.scenario == "report":
        if a.out is None:
            print("report needs --out DIR (a previous run)", file=sys.stderr)
            return 2
        doc = json.loads((a.out / "results.json").read_text())
        report.write(doc, a.out)
        print(a.out / "results.md")
        return 0
    try:
        import uvloop

        out = uvloop.run(run(a, argv))
    except ImportError:  # pragma: no cover
        out = asyncio.run(run(a, argv))
    print(out / "results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
