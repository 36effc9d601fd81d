"""Smoke test of the chaos soak: ``python -m bench chaos`` end to end on a short run.

Two real cluster nodes with PostgreSQL and Redis behind fault-injecting proxies, random faults
for 12 s (fixed seed), three senders; the run must finish, pass (nothing acknowledged lost or
duplicated, no node died), and write results.json and results.md with the documented fields
and a timeline. No timing is asserted.
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
@pytest.mark.timeout(120)
def test_chaos_soak_short_run(tmp_path: Path) -> None:
    out = tmp_path / "chaos"
    r = subprocess.run(
        [sys.executable, "-m", "bench", "chaos", "--duration", "12", "--nodes", "2", "--senders", "3",
         "--settle", "20", "--tail", "3", "--seed", "16", "--out", str(out)],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=110,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    doc = json.loads((out / "results.json").read_text())
    assert doc["scenario"] == "chaos" and doc["passed"] is True
    assert doc["command"].startswith("python -m bench chaos")
    res = doc["results"]
    acc = res["accounting"]
    assert acc["acknowledged"] > 0 and acc["stored"] >= acc["acknowledged"]
    assert acc["lost"] == 0 and acc["duplicated"] == 0 and acc["unacknowledged"] == 0
    for key in ("pushes_due", "pushed_unique", "pushes_received", "duplicated_stored", "duplicated_delivered"):
        assert key in acc, key
    assert res["crashed_nodes"] == []
    events = {e["event"] for e in res["timeline"]}
    assert {"nodes_started", "fault", "clear", "faults_cleared", "settled"} <= events, events
    assert any(e["event"] == "node_state" and "breakers" in e for e in res["timeline"])
    md = (out / "results.md").read_text()
    assert "# gochat bench: chaos — PASS" in md and "## Timeline" in md and "**lost**" in md
