"""Results: JSON, a markdown report with ratios against the targets of the issue, PNG plots."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any


def _f(v: Any, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, (int, float)):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}f}"
    return str(v)


def _ms(us: Any) -> str:
    if us is None or (isinstance(us, float) and math.isnan(us)):
        return "–"
    return f"{us / 1000:.2f}"


def _fanout_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in results if "capacity" in r]


def _values(row: dict[str, Any], key: str) -> list[float]:
    """Every capacity run's ``key`` of a fan-out row (one value without ``--repeat``)."""
    st = (row.get("capacity_stats") or {}).get(key)
    if st:
        return [float(v) for v in st["values"]]
    v = row["capacity"].get(key)
    return [float(v)] if v is not None else []


def _median(row: dict[str, Any], key: str) -> Any:
    st = (row.get("capacity_stats") or {}).get(key)
    return st["median"] if st else row["capacity"].get(key)


def ratio_stats(num: list[float], den: list[float]) -> dict[str, Any] | None:
    """num / den over every pair of runs (the targets' repeats are not simultaneous, so no run of
    one pairs with a particular run of the other): median, and min–max = the extreme pairs."""
    pairs = sorted(a / b for a in num for b in den if b)
    if not pairs:
        return None
    return {"median": round(statistics.median(pairs), 4), "min": round(pairs[0], 4), "max": round(pairs[-1], 4),
            "pairs": len(pairs)}


def _fr(r: dict[str, Any] | None, digits: int = 2) -> str:
    """A ratio: "0.87×", with "(min–max)" when it comes from repeated runs."""
    if r is None:
        return "–"
    if r["pairs"] > 1:
        return f"{r['median']:.{digits}f}× ({r['min']:.{digits}f}–{r['max']:.{digits}f})"
    return f"{r['median']:.{digits}f}×"


def _range(row: dict[str, Any], key: str, digits: int) -> str:
    st = (row.get("capacity_stats") or {}).get(key)
    if st and st["min"] != st["max"]:
        return f"{_f(st['median'], digits)} ({_f(st['min'], digits)}–{_f(st['max'], digits)})"
    return _f(row["capacity"].get(key), digits)


_WRITES_MARK = {"shim": "", "proc-io-syscw": "†", "own-counters": "‡"}


def fanout_table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| subs | size | mode | target | deliveries/s | server CPU µs/delivery | deliveries/s per server core "
        "| writes/frame | loss % | server CPU % | loadgen CPU % | p50 / p99 / p99.9 ms @50% | spread p50 / p99 ms |",
        "|---:|---:|:-:|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    sources: set[str] = set()
    repeats = 1
    for r in sorted(_fanout_rows(results), key=lambda r: (r["subscribers"], r["size"], r["mode"])):
        c, lat = r["capacity"], r["latency"]
        lu, sp = lat["latency_us"], lat.get("spread_us") or {}
        mode = r["mode"] if r["batch"] == 1 else f"{r['mode']} (×{r['batch']})"
        repeats = max(repeats, (r.get("capacity_stats") or {}).get("n", 1))
        cpu = _median(r, "server_cpu_us_per_delivery")
        mark = ""
        if c.get("writes_per_frame") is not None:
            mark = _WRITES_MARK.get(c.get("writes_source", "own-counters"), "")
            sources.add(c.get("writes_source", "own-counters"))
        lines.append(
            f"| {r['subscribers']:,} | {r['size']} | {mode} "
            f"| {r['target']} | {_f(_median(r, 'deliveries_per_s'))} | {_range(r, 'server_cpu_us_per_delivery', 2)} "
            f"| {_f(1e6 / cpu if cpu and r.get('capacity_stats') else c.get('deliveries_per_core_s'))} "
            f"| {_f(c.get('writes_per_frame'), 3)}{mark} "
            f"| {_f(c['loss_pct'], 2)} | {_f(c['server_cpu_pct'])} | {_f(c['load_cpu_pct'])} "
            f"| {_ms(lu.get('p50'))} / {_ms(lu.get('p99'))} / {_ms(lu.get('p99.9'))} "
            f"| {_ms(sp.get('p50'))} / {_ms(sp.get('p99'))} |"
        )
    notes = []
    if repeats > 1:
        notes.append(f"- {repeats} capacity runs per row: deliveries/s and server CPU µs/delivery are the median "
                     "(server CPU: median (min–max)); the other capacity columns are from the run with the "
                     "median server CPU per delivery.")
    if "shim" in sources:
        notes.append("- writes/frame: the server's socket write calls (write, writev, send, sendto, sendmsg, "
                     "sendmmsg, counted by the LD_PRELOAD shim `bench/peers/syscount.c`) per frame delivered "
                     "(subscribers + probe), capacity run.")
    if "proc-io-syscw" in sources:
        notes.append("- † a Go server (nats-server): Go makes its syscalls without libc, so the shim cannot see "
                     "them; counted from `/proc/PID/io` syscw instead (write/writev calls on any fd, which "
                     "is what Go uses on sockets).")
    if "own-counters" in sources:
        notes.append("- ‡ writes/frame from the server's own counters (gochat's `/metrics`, the C floor's "
                     "SIGUSR1 dump): socket writes per frame it wrote; targets without one show –.")
    skipped = [r for r in results if "skipped" in r or "error" in r]
    for r in skipped:
        lines.append(f"\n- {r['target']} (n={r.get('subscribers')}): {r.get('skipped') or r.get('error')}")
    return "\n".join([*lines, "", *notes])


def fanout_ratio_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """gochat against every other target, per (subs, size, mode): the per-core ratio (other's
    server CPU per delivery ÷ gochat's) and the throughput ratio (gochat's deliveries/s ÷ other's),
    each as median and min–max over the pairs of repeated runs."""
    by: dict[tuple[int, int, str], dict[str, dict[str, Any]]] = {}
    for r in _fanout_rows(results):
        by.setdefault((r["subscribers"], r["size"], r["mode"]), {})[r["target"]] = r
    floor_a = {(n, s): t["cfloor"] for (n, s, m), t in by.items() if m == "a" and "cfloor" in t}
    out: list[dict[str, Any]] = []
    for (n, s, m), t in sorted(by.items()):
        g = t.get("gochat")
        if not g:
            continue
        others = dict(t)
        others.pop("gochat")
        if m == "b" and (n, s) in floor_a:
            others["cfloor (mode a, per-message)"] = floor_a[(n, s)]
        for name, o in sorted(others.items()):
            out.append({
                "subscribers": n, "size": s, "mode": m, "vs": name,
                "per_core": ratio_stats(_values(o, "server_cpu_us_per_delivery"),
                                        _values(g, "server_cpu_us_per_delivery")),
                "throughput": ratio_stats(_values(g, "deliveries_per_s"), _values(o, "deliveries_per_s")),
            })
    return out


def fanout_ratios(results: list[dict[str, Any]]) -> str:
    """gochat against the C floor and the other peers, per (subs, size, mode)."""
    lines = [
        "| subs | size | mode | vs | throughput ratio (gochat / other) | per-core ratio (other CPU/delivery ÷ gochat's) |",
        "|---:|---:|:-:|---|---:|---:|",
    ]
    for x in fanout_ratio_rows(results):
        lines.append(f"| {x['subscribers']:,} | {x['size']} | {x['mode']} | {x['vs']} | {_fr(x['throughput'])} "
                     f"| {_fr(x['per_core'])} |")
    return "\n".join(lines)


def direct_table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| target | offered msgs/s | delivered msgs/s | loss % | server CPU µs/msg | server CPU % | loadgen CPU % "
        "| p50 / p99 / p99.9 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['target']} | skipped: {r['skipped']} |||||||")
            continue
        lu = r["latency_us"]
        lines.append(
            f"| {r['target']} | {_f(r['offered_msgs_per_s'])} | {_f(r['deliveries_per_s'])} | {_f(r['loss_pct'], 2)} "
            f"| {_f(r['server_cpu_us_per_delivery'], 1)} | {_f(r['server_cpu_pct'])} | {_f(r['load_cpu_pct'])} "
            f"| {_ms(lu.get('p50'))} / {_ms(lu.get('p99'))} / {_ms(lu.get('p99.9'))} |"
        )
    knees = direct_knees(results)
    if knees:
        lines.append("")
        for name, k in knees.items():
            lines.append(f"- {name}: knee (highest step delivering ≥ 99 % of the offered rate with p99 ≤ 100 ms): "
                         f"{_f(k)} msgs/s")
        if "gochat" in knees and "websockets-relay" in knees and knees["websockets-relay"]:
            lines.append(f"- gochat / websockets relay: {knees['gochat'] / knees['websockets-relay']:.2f}×")
    per_core = direct_per_core(results)
    if per_core:
        rate, cpu = per_core
        shown = ", ".join(f"{name} {us:.1f}" for name, us in cpu.items())
        lines.append(f"- server CPU µs per message at {_f(rate)} msgs/s, the highest step every target delivered "
                     f"in full: {shown}")
        if "gochat" in cpu and "websockets-relay" in cpu:
            lines.append(f"- per core, websockets relay ÷ gochat: {cpu['websockets-relay'] / cpu['gochat']:.2f}×")
    return "\n".join(lines)


def direct_per_core(results: list[dict[str, Any]]) -> tuple[float, dict[str, float]] | None:
    """(rate, {target: server CPU µs per message}) at the highest offered rate that every
    target delivered in full (≥ 99 %, loss ≤ 1 %): a per-core comparison that the one-core load
    generator's own ceiling does not cap, unlike the knee."""
    by_rate: dict[float, dict[str, float]] = {}
    targets = {r["target"] for r in results if "skipped" not in r}
    for r in results:
        if "skipped" in r or not r.get("server_cpu_us_per_delivery"):
            continue
        if r["deliveries_per_s"] >= 0.99 * r["offered_msgs_per_s"] and r["loss_pct"] <= 1.0:
            by_rate.setdefault(r["offered_msgs_per_s"], {})[r["target"]] = r["server_cpu_us_per_delivery"]
    full = [rate for rate, cpu in by_rate.items() if set(cpu) == targets]
    if not full:
        return None
    rate = max(full)
    return rate, dict(sorted(by_rate[rate].items()))


def direct_knees(results: list[dict[str, Any]]) -> dict[str, float]:
    """Per target: the best delivered rate among steps that deliver ≥ 99 % of the offered rate
    with p99 ≤ 100 ms (the knee)."""
    out: dict[str, float] = {}
    for r in results:
        if "skipped" in r:
            continue
        ok = (
            r["deliveries_per_s"] >= 0.99 * r["offered_msgs_per_s"]
            and r["loss_pct"] <= 1.0
            and r["latency_us"]["p99"] <= 100_000
        )
        if ok:
            out[r["target"]] = max(out.get(r["target"], 0.0), r["deliveries_per_s"])
    return out


def memory_table(results: list[dict[str, Any]]) -> str:
    lines = ["| target | connections | server RSS KiB | RssAnon KiB | TCP mem pages (system) | failed |",
             "|---|---:|---:|---:|---:|---:|"]
    fits = []
    for r in results:
        if "skipped" in r:
            continue
        for p in r["points"]:
            lines.append(f"| {r['target']} | {p['connections']:,} | {p['rss_kib']:,} | {p['rss_anon_kib']:,} "
                         f"| {p['tcp_mem_pages']:,} | {p.get('failed', 0)} |")
        f = r["fit"]
        if f:
            slab = f.get("kernel_slab_bytes_per_conn_pair", {})
            slab_s = ", ".join(f"{k} {v:,.0f}" for k, v in slab.items()) or "n/a"
            fits.append(
                f"- **{r['target']}**: user space {f['user_rss_bytes_per_conn'] / 1024:.2f} KiB RSS per connection "
                f"({f['user_anon_bytes_per_conn'] / 1024:.2f} KiB anonymous); kernel, per loopback pair (both "
                f"ends): TCP buffers {f['kernel_tcp_mem_bytes_per_conn_pair']:,.0f} B, slab {slab_s} B"
            )
    return "\n".join([*lines, "", *fits])


def storm_table(results: list[dict[str, Any]]) -> str:
    lines = ["| target | connections | failed | wall s | connect+auth /s | server CPU µs/connect "
             "| per server core /s | server CPU % | loadgen CPU % |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(
            f"| {r['target']} | {r['connections']:,} | {r['failed']} | {_f(r['wall_s'], 2)} | {_f(r['connects_per_s'])} "
            f"| {_f(r['server_cpu_us_per_connect'])} | {_f(r['connects_per_core_s'])} | {_f(r['server_cpu_pct'])} "
            f"| {_f(r['load_cpu_pct'])} |"
        )
    return "\n".join(lines)


def _cap(rows: list[dict[str, Any]], target: str, n: int, size: int, mode: str) -> dict[str, Any] | None:
    for r in rows:
        if (r["target"], r["subscribers"], r["size"], r["mode"]) == (target, n, size, mode):
            return r
    return None


def targets_summary(results: dict[str, Any]) -> str:
    """The issue's targets, each with the measured value and met / missed."""
    out = ["| target | measured | verdict |", "|---|---|---|"]

    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    rows = _fanout_rows(results.get("fanout") or [])
    cases = sorted({(r["subscribers"], r["size"]) for r in rows})
    for n, size in cases:
        g, f, w = (_cap(rows, t, n, size, "a") for t in ("gochat", "cfloor", "websockets"))
        for other, label, goal in ((f, "C floor", 0.85), (w, "websockets", 1.5)):
            if not (g and other):
                continue
            per_core = ratio_stats(_values(other, "server_cpu_us_per_delivery"),
                                   _values(g, "server_cpu_us_per_delivery"))
            thr = ratio_stats(_values(g, "deliveries_per_s"), _values(other, "deliveries_per_s"))
            if per_core is None or thr is None:
                continue
            out.append(f"| (a) {n:,} subs {size} B: ≥ {goal}× {label} | per core {_fr(per_core)}, "
                       f"throughput {_fr(thr)} | {verdict(per_core['median'] >= goal)} |")
        gb = _cap(rows, "gochat", n, size, "b")
        if gb and f and n >= 10000:
            thr_r = ratio_stats(_values(gb, "deliveries_per_s"), _values(f, "deliveries_per_s"))
            core_r = ratio_stats(_values(f, "server_cpu_us_per_delivery"), _values(gb, "server_cpu_us_per_delivery"))
            if thr_r is None or core_r is None:
                continue
            p99 = gb["latency"]["latency_us"]["p99"] / 1000
            out.append(f"| (b) {n:,} subs {size} B: ≥ 5× C floor per-message, p99 ≤ 50 ms | throughput "
                       f"{_fr(thr_r, 1)}, per core {_fr(core_r, 1)}, p99 {p99:.0f} ms at 50 % load | "
                       f"{verdict(thr_r['median'] >= 5)} / p99 {verdict(p99 <= 50)} |")
    knees = direct_knees(results.get("direct") or [])
    if "gochat" in knees and knees.get("websockets-relay"):
        ratio = knees["gochat"] / knees["websockets-relay"]
        out.append(f"| direct durable ≥ 2× websockets relay | {knees['gochat']:,.0f} vs ≥ "
                   f"{knees['websockets-relay']:,.0f} msgs/s = {ratio:.2f}× | {verdict(ratio >= 2)} |")
    for m in results.get("memory") or []:
        if m.get("target") == "gochat" and m.get("fit"):
            kib = m["fit"]["user_rss_bytes_per_conn"] / 1024
            out.append(f"| idle memory ≤ 4 KiB user space per connection | {kib:.1f} KiB | {verdict(kib <= 4)} |")
    for st in results.get("storm") or []:
        per = st.get("connects_per_core_s") or 0
        out.append(f"| connect+auth ≥ 5,000/s per core | {per:,.0f}/s per core ({st['connects_per_s']:,.0f}/s "
                   f"measured) | {verdict(per >= 5000)} |")
    return "\n".join(out) if len(out) > 2 else ""


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    parts = [
        f"# gochat bench: {doc['scenario']}",
        "",
        *[line for w in doc.get("warnings", []) for line in (f"> **WARNING:** {w}", "")],
        f"- command: `{doc['command']}`",
        f"- started: {doc['started']}, took {doc['elapsed_s']:.0f} s",
        f"- machine: {m['cpu_model']}, {m['cpus']} CPUs, {m['mem_gib']} GiB, Linux {m['kernel']}",
        f"- placement: server on CPU `{doc['placement']['server']}`, load generators on CPU `{doc['placement']['load']}`",
        *([f"- repeats: {doc['repeat']} capacity runs per fan-out case"] if doc.get("repeat", 1) > 1 else []),
        f"- versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}",
        f"- gochat commit: {m['git_commit']}; load generator listener: {m.get('loadgen', 'cython')}",
        *[f"- note: {n}" for n in doc.get("notes", [])],
        "",
    ]
    r = doc["results"]
    summary = targets_summary(r)
    if summary:
        parts += ["## Targets", "", summary, ""]
    if r.get("fanout"):
        parts += ["## Room fan-out", "", "Capacity = closed loop (one batch in flight); latency = open loop at 50 % "
                  "of that target's capacity.", "", fanout_table(r["fanout"]), "", "### Ratios", "",
                  fanout_ratios(r["fanout"]), ""]
    if r.get("direct"):
        parts += ["## Direct messages (gochat: durable, SQLite group commit)", "", direct_table(r["direct"]), ""]
    if r.get("memory"):
        parts += ["## Memory per idle authenticated connection", "", memory_table(r["memory"]), ""]
    if r.get("storm"):
        parts += ["## Connect + authenticate storm", "", storm_table(r["storm"]), ""]
    if doc.get("plots"):
        parts += ["## Plots", ""] + [f"![{p}]({p})" for p in doc["plots"]] + [""]
    return "\n".join(parts)


def plots(doc: dict[str, Any], out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made: list[str] = []
    r = doc["results"]
    rows = _fanout_rows(r.get("fanout") or [])
    if rows:
        for metric, label, fname in (
            ("deliveries_per_s", "deliveries/s (capacity run)", "fanout_throughput.png"),
            ("server_cpu_us_per_delivery", "server CPU µs per delivery (lower is better)", "fanout_cpu.png"),
        ):
            cases = sorted({(x["subscribers"], x["size"], x["mode"]) for x in rows})
            targets = sorted({x["target"] for x in rows}, key=lambda t: (t != "gochat", t))
            fig, ax = plt.subplots(figsize=(max(8, len(cases) * 1.6), 5))
            width = 0.8 / max(1, len(targets))
            for ti, t in enumerate(targets):
                vals = []
                for c in cases:
                    hit = [x for x in rows if (x["subscribers"], x["size"], x["mode"]) == c and x["target"] == t]
                    vals.append((_median(hit[0], metric) or 0) if hit else 0)
                ax.bar([i + ti * width for i in range(len(cases))], vals, width, label=t)
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
            ax.set_xticklabels([f"{n:,} subs\n{s} B, mode {m}" for n, s, m in cases], fontsize=8)
            ax.set_ylabel(label)
            ax.legend(fontsize=8)
            ax.set_title(f"Room fan-out: {label}")
            fig.tight_layout()
            fig.savefig(out / fname, dpi=110)
            plt.close(fig)
            made.append(fname)
    d = [x for x in (r.get("direct") or []) if "skipped" not in x]
    if d:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for t in sorted({x["target"] for x in d}):
            pts = [x for x in d if x["target"] == t]
            ax.plot([x["deliveries_per_s"] for x in pts], [x["latency_us"]["p99"] / 1000 for x in pts], "o-",
                    label=f"{t} p99")
            ax.plot([x["deliveries_per_s"] for x in pts], [x["latency_us"]["p50"] / 1000 for x in pts], "x--",
                    label=f"{t} p50")
        ax.set_xlabel("delivered msgs/s")
        ax.set_ylabel("latency ms")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
        ax.set_title("Direct messages: latency vs throughput")
        fig.tight_layout()
        fig.savefig(out / "direct_latency.png", dpi=110)
        plt.close(fig)
        made.append("direct_latency.png")
    mem = [x for x in (r.get("memory") or []) if "points" in x]
    if mem:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for x in mem:
            ax.plot([p["connections"] for p in x["points"]], [p["rss_kib"] / 1024 for p in x["points"]], "o-",
                    label=f"{x['target']} RSS")
        ax.set_xlabel("idle authenticated connections")
        ax.set_ylabel("server RSS MiB")
        ax.legend(fontsize=8)
        ax.set_title("Memory per idle connection")
        fig.tight_layout()
        fig.savefig(out / "memory.png", dpi=110)
        plt.close(fig)
        made.append("memory.png")
    return made


def write(doc: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    doc["plots"] = plots(doc, out)
    if (doc.get("results") or {}).get("fanout"):
        doc["fanout_ratios"] = fanout_ratio_rows(doc["results"]["fanout"])
    (out / "results.json").write_text(json.dumps(doc, indent=1, default=_json_default))
    (out / "results.md").write_text(markdown(doc))


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:
        pass
    return str(o)
