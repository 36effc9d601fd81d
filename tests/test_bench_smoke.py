"""Smoke test of the benchmark harness: ``python -m bench quick`` end to end on small counts.

It starts real servers (gochat and at least two peers), the load generator processes and the
peers, and checks that the result JSON has the expected shape and that messages were delivered.
No timing is asserted: this machine's numbers are not a test oracle.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.e2e
@pytest.mark.timeout(400)
def test_bench_quick_mode(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(
        [sys.executable, "-m", "bench", "quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=360,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    doc = json.loads((out / "results.json").read_text())
    assert (out / "results.md").exists()

    assert doc["scenario"] == "quick"
    assert doc["command"].startswith("python -m bench quick")
    for key in ("cpu_model", "cpus", "kernel", "versions", "git_commit"):
        assert key in doc["machine"], key
    results = doc["results"]
    assert set(results) >= {"fanout", "direct", "memory", "storm"}

    fanout = [row for row in results["fanout"] if "capacity" in row]
    targets = {row["target"] for row in fanout}
    assert "gochat" in targets
    assert len(targets - {"gochat"}) >= 2, f"fewer than two peers ran: {results['fanout']}"
    for row in fanout:
        for phase in ("capacity", "latency"):
            m = row[phase]
            for key in ("deliveries", "deliveries_per_s", "server_cpu_us_per_delivery", "load_cpu_pct",
                        "latency_us", "spread_us", "loss_pct"):
                assert key in m, (row["target"], phase, key)
            assert m["deliveries"] > 0, (row["target"], row["mode"], phase)
            assert {"p50", "p99", "p99.9"} <= set(m["latency_us"])
    gochat_modes = {row["mode"] for row in fanout if row["target"] == "gochat"}
    assert gochat_modes == {"a", "b"}
    gochat_b = next(row for row in fanout if row["target"] == "gochat" and row["mode"] == "b")
    assert gochat_b["capacity"]["server_counters"]["socket_writes"] > 0

    # gochat and the C relay floor always run (test.sh installs a C compiler); the websockets
    # relay needs bench/requirements.txt, so without it its row must say why it did not run
    for target in ("gochat", "cfloor-relay", "websockets-relay"):
        direct = [row for row in results["direct"] if row["target"] == target]
        assert direct, (target, results["direct"])
        if target == "websockets-relay" and "skipped" in direct[0]:
            assert "websockets not installed" in direct[0]["skipped"]
            continue
        assert all(row["deliveries"] > 0 for row in direct), (target, results["direct"])
    assert "server CPU µs per message at" in (out / "results.md").read_text()

    memory = next(row for row in results["memory"] if row["target"] == "gochat")
    assert memory["points"][-1]["connections"] > 0
    assert "user_rss_bytes_per_conn" in memory["fit"]

    storm = results["storm"][0]
    assert storm["connections"] > 0 and storm["connects_per_s"] > 0


def _script_table(args: list[str]) -> tuple[str, list[list[str]]]:
    """Run a bench script; its stdout and the cells of its markdown table's data rows."""
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=100)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    return r.stdout, [[c.strip() for c in row.strip("|").split("|")] for row in rows]


@pytest.mark.timeout(120)
def test_writer_bench_runs_and_reports_every_column() -> None:
    """``bench/writer_bench.py`` on a tiny rate: one table row per rate, every append answered
    (the script asserts it), and the columns it documents. No timing is asserted."""
    out, rows = _script_table(["bench/writer_bench.py", "--rates", "500,1000", "--seconds", "0.5", "--convs", "4",
                               "--preload", "3000"])
    assert "preload 3,000 messages" in out
    assert [cells[0] for cells in rows] == ["500", "1,000"]
    for cells in rows:
        assert len(cells) == 7
        assert float(cells[1].replace(",", "")) > 0  # achieved rate
        assert " / " in cells[3] and " / " in cells[4]  # writer and loop CPU, user / sys


@pytest.mark.timeout(120)
@pytest.mark.parametrize("layout", ["schema", "log"])
def test_sqlite_floor_runs_on_gochats_schema(layout: str) -> None:
    """``bench/sqlite_floor.py`` on small counts: it builds gochat's schema through SQLiteStore,
    appends with the sqlite3 module alone (into gochat's messages table, or the log layout's
    table), and prints one row per batch size. No timing is asserted."""
    out, rows = _script_table(["bench/sqlite_floor.py", "--batches", "10,40", "--preload", "2000", "--commits", "5",
                               "--convs", "4", "--layout", layout])
    table = "message_log" if layout == "log" else "messages"
    assert f"stored: {2000 + 10 * 5 + 40 * 5:,} rows in {table}" in out
    assert [cells[0] for cells in rows] == ["10", "40"]
    for cells in rows:
        assert len(cells) == 4
        assert float(cells[1]) > 0 and float(cells[2].replace(",", "")) > 0


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_cluster_bench_open_loop_steps() -> None:
    """``bench/cluster_bench.py --rates``: real cluster nodes (PostgreSQL and Redis, own schema
    and key prefix, removed afterwards), every message crossing nodes, one JSON row per step
    with the documented fields. No timing is asserted."""
    r = subprocess.run(
        [sys.executable, "bench/cluster_bench.py", "--nodes", "2", "--pairs", "4", "--seconds", "1",
         "--rates", "100,200"],
        cwd=ROOT, capture_output=True, text=True, timeout=170,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads(r.stdout)
    assert [s["offered_per_s"] for s in doc["steps"]] == [100.0, 200.0]
    for step in doc["steps"]:
        assert step["acked"] + step["refused"] == step["sent"] > 0
        assert step["delivered_per_s"] > 0
        for key in ("deliver_ms_p50", "deliver_ms_p99", "ack_ms_p50", "node_cpu_us_per_message", "loss_pct"):
            assert key in step, key


def _bench(args: list[str], out: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench", *args, "--out", str(out)],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT), **env), capture_output=True, text=True, timeout=150,
    )


@pytest.mark.e2e
@pytest.mark.timeout(330)
def test_bench_reruns_with_the_same_out(tmp_path: Path) -> None:
    """A second run into the same --out directory starts gochat on a fresh database: the users
    the scenario registers by fixed names are not 'taken' (409) from the first run."""
    out = tmp_path / "bench"
    for run in (1, 2):
        r = _bench(["storm", "--storm", "40"], out, BENCH_PURE_PYTHON_LOADGEN="1")
        assert r.returncode == 0, (run, r.stderr[-3000:])
        assert "username is taken" not in r.stderr
        storm = json.loads((out / "results.json").read_text())["results"]["storm"][0]
        assert storm["connections"] == 40 and storm["failed"] == 0, (run, storm)


@pytest.mark.e2e
@pytest.mark.timeout(200)
def test_bench_reports_the_pure_python_loadgen_fallback(tmp_path: Path) -> None:
    """Running on the pure-Python load generator is said on stderr and in results.json and
    results.md, with the reason."""
    out = tmp_path / "bench"
    r = _bench(["storm", "--storm", "40"], out, BENCH_PURE_PYTHON_LOADGEN="1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "WARNING: the load generators ran on the pure-Python fallback" in r.stderr, r.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    assert doc["machine"]["loadgen"] == "python"
    [warning] = doc["warnings"]
    assert "pure-Python fallback" in warning and "BENCH_PURE_PYTHON_LOADGEN=1" in warning
    assert f"> **WARNING:** {warning}" in (out / "results.md").read_text()


def test_loadgen_without_cython_falls_back_and_says_why(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """No Cython (and no listener built before): the pure-Python twin, a warning on stderr that
    names the cause and the install command, and fallback_reason() for the results."""
    from bench import native

    monkeypatch.setattr(native, "BUILD", tmp_path / "build")  # nothing built there
    monkeypatch.setitem(sys.modules, "Cython", None)  # import Cython -> ImportError
    monkeypatch.setenv("BENCH_PURE_PYTHON_LOADGEN", "0")  # restored after the test
    monkeypatch.setenv("BENCH_LOADGEN_FALLBACK_REASON", "")
    mod = native.loadgen()
    assert mod.__name__ == "bench._loadgen_py"
    err = capsys.readouterr().err
    assert "WARNING: Cython is not installed" in err and "bench/requirements.txt" in err, err
    reason = native.fallback_reason()
    assert reason is not None and "Cython is not installed" in reason
    assert native.loadgen_impl() == "python"


def test_bench_requirements_match_the_bench_extra() -> None:
    """bench/requirements.txt and pyproject's [bench] extra list the same packages, Cython
    (the load generator's listener) among them."""
    import tomllib

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["bench"]
    reqs = [line.split("#")[0].strip() for line in (ROOT / "bench" / "requirements.txt").read_text().splitlines()]
    reqs = [r for r in reqs if r]
    assert sorted(reqs) == sorted(extra)
    assert any(r.startswith("Cython") for r in reqs)
