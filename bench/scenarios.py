"""The bench scenarios: room fan-out, direct durable messages, idle memory, connect storm."""

from __future__ import annotations

import asyncio
import contextlib
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import hist
from bench.procs import (
    TARGETS,
    LoadProc,
    Placement,
    ServerProc,
    Target,
    cpu_ns,
    cpu_split_s,
    gochat_distinct_tokens,
    gochat_users,
    log,
    proc_io,
    proc_status,
    slab_bytes,
    sockstat,
    source_ips,
)

ROOM = 42
# servers whose write syscalls the LD_PRELOAD shim cannot see (Go: no libc for syscalls); their
# writes/frame comes from /proc/PID/io syscw, which counts write/writev calls (on any fd)
SYSCW_TARGETS = ("nats",)


@dataclass
class Ctx:
    placement: Placement
    workdir: Path
    quick: bool
    repeat: int = 1  # fan-out capacity runs per (target, subscribers, size, mode)


# metrics of a capacity run summarised over its repeats (median, min, max, every value)
REPEAT_METRICS = ("server_cpu_us_per_delivery", "deliveries_per_s", "server_cpu_pct", "load_cpu_pct",
                  "writes_per_frame")


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median server CPU per delivery (the lower middle one for an even count)."""
    ok = [r for r in runs if r.get("server_cpu_us_per_delivery") is not None]
    if not ok:
        return runs[len(runs) // 2]
    ok.sort(key=lambda r: r["server_cpu_us_per_delivery"])
    return ok[(len(ok) - 1) // 2]


def repeat_stats(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"n": len(runs)}
    for key in REPEAT_METRICS:
        vals = [r[key] for r in runs if r.get(key) is not None]
        if vals:
            out[key] = {"median": round(statistics.median(vals), 4), "min": min(vals), "max": max(vals),
                        "values": vals}
    return out


def _split(n: int, parts: int) -> list[int]:
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts) if base + (1 if i < extra else 0) > 0]


async def _stop_all(procs: list[LoadProc]) -> None:
    await asyncio.gather(*(p.stop() for p in procs), return_exceptions=True)


# ---- fan-out ---------------------------------------------------------------------------------
async def _drain(subs: list[LoadProc], expected: int, idle_s: float = 1.0, max_s: float = 20.0) -> None:
    """Wait until the subscribers got ``expected`` deliveries or stopped receiving."""
    last_total = -1
    still_since = time.monotonic()
    deadline = time.monotonic() + max_s
    while time.monotonic() < deadline:
        stats = await asyncio.gather(*(s.cmd("stats", "stats") for s in subs))
        total = sum(int(s["deliveries"]) for s in stats)
        if total >= expected:
            return
        if total != last_total:
            last_total = total
            still_since = time.monotonic()
        elif time.monotonic() - still_since > idle_s:
            return
        await asyncio.sleep(0.1)


async def _measured(
    server: ServerProc, subs: list[LoadProc], others: list[LoadProc], run: Any, expected_per_msg: int, tag: str,
    probe_frames_per_msg: int = 0,
) -> dict[str, Any]:
    """Run ``run()`` (returns the publisher's 'done'), wait for delivery, collect everything.
    ``probe_frames_per_msg``: frames per message the server writes to connections outside
    ``subs`` (the publisher process' probe), counted as delivered for writes/frame."""
    await asyncio.gather(*(s.cmd("reset", "reset") for s in subs))
    counters0 = await server.write_counters()
    load_pids = [p.pid for p in subs + others]
    sc0 = server.socket_writes()
    io0 = proc_io(server.pid)
    s0 = cpu_ns(server.pid)
    split0 = cpu_split_s(server.pid)
    l0 = sum(cpu_ns(p) for p in load_pids)
    t0 = time.monotonic()
    done = await run()
    await _drain(subs, int(done["sent"]) * expected_per_msg)
    s1 = cpu_ns(server.pid)
    split1 = cpu_split_s(server.pid)
    l1 = sum(cpu_ns(p) for p in load_pids)
    wall = time.monotonic() - t0
    sc1 = server.socket_writes()
    io1 = proc_io(server.pid)
    counters1 = await server.write_counters()
    reports = await asyncio.gather(
        *(s.cmd(f"report {server.workdir / f'{tag}-{i}.npz'}", "report") for i, s in enumerate(subs))
    )
    merged = hist.merge_reports([r["path"] for r in reports])
    deliveries = sum(int(r["deliveries"]) for r in reports)
    last_ns = max((int(r["last_ns"]) for r in reports if r["last_ns"]), default=int(done["end_ns"]))
    span_s = max(1e-9, (max(last_ns, int(done["end_ns"])) - int(done["start_ns"])) / 1e9)
    expected = int(done["sent"]) * expected_per_msg
    out: dict[str, Any] = {
        "sent": int(done["sent"]),
        "expected_deliveries": expected,
        "deliveries": deliveries,
        "loss_pct": round(100.0 * (expected - deliveries) / expected, 3) if expected else 0.0,
        "span_s": round(span_s, 3),
        "deliveries_per_s": round(deliveries / span_s, 1),
        "msgs_per_s": round(int(done["sent"]) / span_s, 2),
        "server_cpu_s": round((s1 - s0) / 1e9, 3),
        "server_cpu_pct": round(100.0 * (s1 - s0) / 1e9 / wall, 1),
        "server_cpu_us_per_delivery": round((s1 - s0) / 1e3 / deliveries, 3) if deliveries else None,
        # user-space versus kernel share of the server's CPU (clock-tick resolution)
        "server_user_us_per_delivery": round((split1[0] - split0[0]) * 1e6 / deliveries, 3) if deliveries else None,
        "server_sys_us_per_delivery": round((split1[1] - split0[1]) * 1e6 / deliveries, 3) if deliveries else None,
        "load_cpu_pct": round(100.0 * (l1 - l0) / 1e9 / wall, 1),
        "load_cpu_us_per_delivery": round((l1 - l0) / 1e3 / deliveries, 3) if deliveries else None,
        "latency_us": merged["latency"],
        "spread_us": merged["spread"],
        "server_rss_kib": proc_status(server.pid).get("VmRSS"),
    }
    refused: dict[str, int] = {}
    for r in reports:
        for code, n in (r.get("error_counts") or {}).items():
            refused[str(code)] = refused.get(str(code), 0) + int(n)
    if refused:
        # gochat ERROR answers to the load's requests, by code ("503": OVERLOADED, load shed)
        out["errors_by_code"] = refused
    if out["server_cpu_us_per_delivery"]:
        out["deliveries_per_core_s"] = round(1e6 / out["server_cpu_us_per_delivery"], 1)
    for key in ("stalls", "max_lag_ns"):
        if key in done:
            out[key] = done[key]
    # Write syscalls. "writes_per_frame" = server socket write calls (the LD_PRELOAD shim) per
    # frame delivered (subscribers' deliveries + the probe's); the server's own counters (gochat,
    # the C floor) are kept next to it as a cross-check ("writes_per_frame_own").
    frames = deliveries + int(done["sent"]) * probe_frames_per_msg
    out["frames_delivered"] = frames
    if counters0 is not None and counters1 is not None:
        d = {k: counters1[k] - counters0.get(k, 0) for k in counters1}
        out["server_counters"] = d
        if d.get("frames_out"):
            out["writes_per_frame_own"] = round(d["socket_writes"] / d["frames_out"], 4)
        if deliveries:
            out["writes_per_delivery"] = round(d.get("socket_writes", 0) / deliveries, 4)
    if "syscw" in io0 and "syscw" in io1:
        # write(2)/writev(2) on any fd (not send*): the only count for servers that bypass libc
        out["proc_io_syscw"] = io1["syscw"] - io0["syscw"]
    if sc0 is not None and sc1 is not None:
        sc = {k: sc1[k] - sc0.get(k, 0) for k in sc1 if k != "processes"}
        out["syscount"] = sc
        if sc["calls"] and frames:
            out["writes_per_frame"] = round(sc["calls"] / frames, 4)
            out["writes_source"] = "shim"
    if "writes_per_frame" not in out:
        if server.target.name in SYSCW_TARGETS and frames and out.get("proc_io_syscw"):
            # a Go server: its writes bypass libc, but they are write/writev, which syscw counts
            out["writes_per_frame"] = round(out["proc_io_syscw"] / frames, 4)
            out["writes_source"] = "proc-io-syscw"
        elif "writes_per_frame_own" in out:
            out["writes_per_frame"] = out["writes_per_frame_own"]
            out["writes_source"] = "own-counters"
    return out


async def fanout(
    ctx: Ctx,
    targets: list[str],
    subscribers: list[int],
    sizes: list[int],
    batch: int,
    duration: float,
    progress: Any,
) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    for n in subscribers:
        for name in targets:
            target = TARGETS[name]
            why = target.available()
            if why:
                log(f"fanout: skip {name}: {why}")
                results.append({"target": name, "subscribers": n, "skipped": why})
                continue
            modes = ["b"] if name == "cfloor-coalesce" else ["a", "b"]
            try:
                results += await _fanout_target(ctx, target.name, n, sizes, modes, batch, duration, progress)
            except Exception as exc:
                log(f"fanout: {name} n={n} failed: {exc!r}")
                results.append({"target": name, "subscribers": n, "error": repr(exc)})
    return results


async def _fanout_target(
    ctx: Ctx, name: str, n: int, sizes: list[int], modes: list[str], batch: int, duration: float, progress: Any
) -> list[dict[str, Any]]:
    target = TARGETS[name]
    workdir = ctx.workdir / f"fanout-{name}-{n}"
    workdir.mkdir(parents=True, exist_ok=True)
    server = ServerProc(target, ctx.placement, workdir)
    await server.start()
    procs: list[LoadProc] = []
    out: list[dict[str, Any]] = []
    try:
        gochat = target.kind == "gochat"
        sub_tokens: list[str] = [""]
        pub_token = ""
        if gochat:
            users = await gochat_users(server.http_url, min(n, 16 if ctx.quick else 32) + 1, f"f{n}u")
            pub_token = users[0][1]
            sub_tokens = [t for _, t in users[1:]]
        per_proc = 5000
        counts = _split(n, max(1, math.ceil(n / per_proc)))
        t0 = time.monotonic()
        subs = [
            LoadProc(
                f"{name}-{n}-sub{i}",
                {
                    "role": "sub", "url": server.ws_url, "gochat": gochat, "count": c,
                    "tokens": sub_tokens, "room": ROOM if gochat else None, "src": source_ips(i, 4),
                    "conc": 200, "maxseq": 1 << 20, "proto": target.proto,
                },
                ctx.placement,
                workdir,
            )
            for i, c in enumerate(counts)
        ]
        procs += subs
        readies = await asyncio.gather(*(s.start() for s in subs))
        connected = sum(int(r["connected"]) for r in readies)
        if connected < n:
            errs = [e for r in readies for e in r.get("errors", [])]
            raise RuntimeError(f"only {connected}/{n} subscribers connected: {errs[:3]}")
        log(f"fanout {name} n={n}: {connected} subscribers ready in {time.monotonic() - t0:.1f}s")
        for size in sizes:
            pub = LoadProc(
                f"{name}-{n}-pub{size}",
                {"role": "pub", "url": server.ws_url, "gochat": gochat, "tokens": [pub_token],
                 "room": ROOM, "size": size, "src": source_ips(90), "proto": target.proto},
                ctx.placement,
                workdir,
            )
            procs.append(pub)
            await pub.start()
            # warm-up (connections, caches, allocator)
            await pub.cmd(f"capacity {min(1.0, duration / 4)} {batch}", "done")
            # (a broker adapter's Python parser can fall behind the server: let its backlog drain)
            await _drain(subs, 0 if target.proto == "ws" else 1 << 62, idle_s=0.3)
            # Capacity: ``ctx.repeat`` rounds, each mode once per round (a repeat is not run
            # back to back with itself), then one latency run per mode at 50 % of the median
            # capacity. The row's "capacity" is the run with the median server CPU per delivery;
            # every run is in "capacity_repeats" and the spread in "capacity_stats".
            caps: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
            for rep in range(ctx.repeat):
                for mode in modes:
                    k = 1 if mode == "a" else batch
                    tag = f"{n}-{size}-{mode}" + (f"-r{rep + 1}" if ctx.repeat > 1 else "")

                    async def cap_run(k: int = k, pub: LoadProc = pub) -> dict[str, Any]:
                        return await pub.cmd(f"capacity {duration} {k}", "done", timeout=duration + 60)

                    cap = await _measured(server, subs, [pub], cap_run, n, f"cap-{tag}", probe_frames_per_msg=1)
                    caps[mode].append(cap)
                    of = f" ({rep + 1}/{ctx.repeat})" if ctx.repeat > 1 else ""
                    progress(f"fanout {name} n={n} {size}B mode {mode}: capacity{of}", cap)
            for mode in modes:
                k = 1 if mode == "a" else batch
                row: dict[str, Any] = {"target": name, "subscribers": n, "size": size, "mode": mode, "batch": k}
                tag = f"{n}-{size}-{mode}"
                row["capacity"] = median_run(caps[mode])
                if ctx.repeat > 1:
                    row["capacity_stats"] = repeat_stats(caps[mode])
                    row["capacity_repeats"] = caps[mode]
                    msgs = statistics.median(c["msgs_per_s"] for c in caps[mode])
                else:
                    msgs = row["capacity"]["msgs_per_s"]
                rate = max(1.0, 0.5 * msgs)
                row["latency_rate_msgs_per_s"] = round(rate, 2)

                async def lat_run(k: int = k, rate: float = rate, pub: LoadProc = pub) -> dict[str, Any]:
                    return await pub.cmd(f"rate {rate} {k} {duration}", "done", timeout=duration + 60)

                lat = await _measured(server, subs, [pub], lat_run, n, f"lat-{tag}", probe_frames_per_msg=1)
                row["latency"] = lat
                progress(f"fanout {name} n={n} {size}B mode {mode}: latency at 50% load", lat)
                out.append(row)
            await pub.stop()
            procs.remove(pub)
    finally:
        await _stop_all(procs)
        await server.stop()
    return out


# ---- direct, durable -------------------------------------------------------------------------
async def direct(
    ctx: Ctx, targets: list[str], pairs: int, size: int, rates: list[float], step_s: float, progress: Any
) -> list[dict[str, Any]]:
    """Every target's server and generator start first; then each rate step is measured on
    every target still below its knee, one target after the other, so that a slow phase of the
    machine (common here: ±30 % over minutes) hits every target at about the same steps instead
    of whichever ran last."""
    results: list[dict[str, Any]] = []
    running: dict[str, tuple[ServerProc, LoadProc]] = {}
    try:
        for name in targets:
            target = TARGETS[name]
            why = target.available()
            if why:
                log(f"direct: skip {name}: {why}")
                results.append({"target": name, "skipped": why})
                continue
            running[name] = await _direct_setup(ctx, target, pairs, size, rates[0])
        for rate in rates:
            for name, (server, gen) in list(running.items()):

                async def run(rate: float = rate, g: LoadProc = gen) -> dict[str, Any]:
                    return await g.cmd(f"rate {rate} {step_s}", "done", timeout=step_s + 60)

                m = await _measured(server, [gen], [], run, 1, f"direct-{int(rate)}")
                results.append({"target": name, "offered_msgs_per_s": rate, **m})
                progress(f"direct {name} offered {rate:.0f}/s", m)
                if m["loss_pct"] > 1.0 or m["deliveries_per_s"] < 0.9 * rate or m["latency_us"]["p99"] > 1_000_000:
                    log(f"direct {name}: past the knee at {rate:.0f}/s")
                    del running[name]
                    await _direct_teardown(server, gen)
    finally:
        for server, gen in running.values():
            await _direct_teardown(server, gen)
    # one target's rows together, in target order, as before
    order = {name: i for i, name in enumerate(targets)}
    results.sort(key=lambda r: order[r["target"]])
    return results


async def _direct_setup(
    ctx: Ctx, target: Target, pairs: int, size: int, warm_rate: float
) -> tuple[ServerProc, LoadProc]:
    """Start ``target`` and its generator with ``pairs`` connected pairs, warmed up."""
    workdir = ctx.workdir / f"direct-{target.name}"
    workdir.mkdir(parents=True, exist_ok=True)
    server = ServerProc(target, ctx.placement, workdir)
    await server.start()
    gen: LoadProc | None = None
    try:
        gochat = target.kind == "gochat"
        pair_cfg: Any
        if gochat:
            users = await gochat_users(server.http_url, 2 * pairs, "d")
            pair_cfg = [[users[2 * i][1], users[2 * i + 1][1], users[2 * i + 1][0]] for i in range(pairs)]
        else:
            pair_cfg = [[] for _ in range(pairs)]
        gen = LoadProc(
            f"direct-{target.name}",
            {"role": "direct", "url": server.ws_url, "gochat": gochat, "pairs": pair_cfg, "size": size,
             "src": source_ips(0, 2)},
            ctx.placement,
            workdir,
        )
        await gen.start()
        log(f"direct {target.name}: {pairs} pairs ready")
        await gen.cmd(f"rate {warm_rate} 0.5", "done")  # warm-up
        await _drain([gen], 0, idle_s=0.5)
    except BaseException:
        await _direct_teardown(server, gen)
        raise
    return server, gen


async def _direct_teardown(server: ServerProc, gen: LoadProc | None) -> None:
    if gen is not None:
        with contextlib.suppress(Exception):
            await gen.stop()
    await server.stop()


# ---- memory per idle connection ------------------------------------------------------------------
async def memory(ctx: Ctx, targets: list[str], steps: list[int], progress: Any) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    for name in targets:
        target = TARGETS[name]
        why = target.available()
        if why:
            results.append({"target": name, "skipped": why})
            continue
        workdir = ctx.workdir / f"memory-{name}"
        workdir.mkdir(parents=True, exist_ok=True)
        server = ServerProc(target, ctx.placement, workdir)
        await server.start()
        procs: list[LoadProc] = []
        try:
            gochat = target.kind == "gochat"
            nproc = 4 if steps[-1] > 4000 else 1
            # Every connection presents its own token, as real clients do: the server keeps
            # per-token state (the verified-token cache), and 8 shared tokens would hide it.
            token_files: list[str | None] = [None] * nproc
            if gochat:
                tokens = await gochat_distinct_tokens(server.http_url, steps[-1], "m")
                for i in range(nproc):
                    path = workdir / f"tokens-{i}.txt"
                    path.write_text("\n".join(tokens[i::nproc]))
                    token_files[i] = str(path)
            procs = [
                LoadProc(f"idle-{name}-{i}",
                         {"role": "idle", "url": server.ws_url, "gochat": gochat, "tokens_file": token_files[i],
                          "src": source_ips(20 + i, 2), "conc": 100},
                         ctx.placement, workdir)
                for i in range(nproc)
            ]
            await asyncio.gather(*(p.start() for p in procs))
            points: list[dict[str, Any]] = []
            await asyncio.sleep(0.5)
            points.append(_mem_point(server.pid, 0))
            have = 0
            for step in steps:
                add = _split(step - have, nproc)
                rs = await asyncio.gather(*(p.cmd(f"add {a}", "added", timeout=300) for p, a in zip(procs, add, strict=False)))
                failed = sum(int(r["failed"]) for r in rs)
                have = step
                await asyncio.sleep(1.5)
                pt = _mem_point(server.pid, step)
                pt["failed"] = failed
                points.append(pt)
                progress(f"memory {name}: {step} idle connections", pt)
            results.append({"target": name, "points": points, "fit": _mem_fit(points)})
        finally:
            await _stop_all(procs)
            await server.stop()
    return results


def _mem_point(pid: int, conns: int) -> dict[str, Any]:
    st = proc_status(pid)
    ss = sockstat()
    return {
        "connections": conns,
        "rss_kib": st.get("VmRSS", 0),
        "rss_anon_kib": st.get("RssAnon", 0),
        "tcp_mem_pages": ss.get("mem", 0),
        "tcp_inuse": ss.get("inuse", 0),
        "slab_bytes": slab_bytes(),
    }


def _mem_fit(points: list[dict[str, Any]]) -> dict[str, Any]:
    import numpy as np

    pts = [p for p in points if p["connections"] > 0]
    if len(pts) < 2:
        return {}
    x = np.array([p["connections"] for p in pts], dtype=float)

    def slope(vals: list[float]) -> float:
        return float(np.polyfit(x, np.array(vals, dtype=float), 1)[0])

    fit = {
        "user_rss_bytes_per_conn": round(slope([p["rss_kib"] * 1024 for p in pts]), 1),
        "user_anon_bytes_per_conn": round(slope([p["rss_anon_kib"] * 1024 for p in pts]), 1),
        # both ends of each loopback connection live in this kernel: halve for one socket
        "kernel_tcp_mem_bytes_per_conn_pair": round(slope([p["tcp_mem_pages"] * 4096 for p in pts]), 1),
    }
    slabs = sorted({k for p in pts for k in p["slab_bytes"]})
    if slabs:
        fit["kernel_slab_bytes_per_conn_pair"] = {
            k: round(slope([p["slab_bytes"].get(k, 0) for p in pts]), 1) for k in slabs
        }
    return fit


# ---- connect + authenticate storm ------------------------------------------------------------
async def storm(ctx: Ctx, total: int, nproc: int, conc: int, progress: Any) -> list[dict[str, Any]]:
    target = TARGETS["gochat"]
    workdir = ctx.workdir / "storm-gochat"
    workdir.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    server = ServerProc(target, ctx.placement, workdir)
    await server.start()
    procs: list[LoadProc] = []
    try:
        tokens = [t for _, t in await gochat_users(server.http_url, 8, "s")]
        procs = [
            LoadProc(f"storm-{i}", {"role": "idle", "url": server.ws_url, "gochat": True, "tokens": tokens,
                                    "src": source_ips(40 + i, 2), "conc": conc}, ctx.placement, workdir)
            for i in range(nproc)
        ]
        await asyncio.gather(*(p.start() for p in procs))
        # warm-up: a few connections per process
        await asyncio.gather(*(p.cmd("add 20", "added") for p in procs))
        s0 = cpu_ns(server.pid)
        l0 = sum(cpu_ns(p.pid) for p in procs)
        counts = _split(total, nproc)
        rs = await asyncio.gather(*(p.cmd(f"go {c}", "storm", timeout=600) for p, c in zip(procs, counts, strict=False)))
        s1 = cpu_ns(server.pid)
        l1 = sum(cpu_ns(p.pid) for p in procs)
        start = min(int(r["start_ns"]) for r in rs)
        end = max(int(r["end_ns"]) for r in rs)
        ok = sum(int(r["ok"]) for r in rs)
        wall = (end - start) / 1e9
        us_per = (s1 - s0) / 1e3 / ok if ok else None
        row = {
            "target": "gochat",
            "connections": ok,
            "failed": sum(int(r["failed"]) for r in rs),
            "wall_s": round(wall, 3),
            "connects_per_s": round(ok / wall, 1) if wall else None,
            "server_cpu_pct": round(100 * (s1 - s0) / 1e9 / wall, 1) if wall else None,
            "server_cpu_us_per_connect": round(us_per, 1) if us_per else None,
            "connects_per_core_s": round(1e6 / us_per, 1) if us_per else None,
            "load_cpu_pct": round(100 * (l1 - l0) / 1e9 / wall, 1) if wall else None,
            "errors": [e for r in rs for e in r.get("errors", [])][:3],
        }
        results.append(row)
        progress("storm gochat", row)
    finally:
        with contextlib.suppress(Exception):
            await _stop_all(procs)
        await server.stop()
    return results
