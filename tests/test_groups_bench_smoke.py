"""Smoke test of the group fan-out bench: ``python -m bench groups`` end to end on tiny settings.

Three real cluster nodes on PostgreSQL and Redis (no skip: a missing service fails the test).
The fan-out tiers are lowered through the bench's ``--set NAME=VALUE`` option (a server setting
``GOCHAT_<NAME>`` for every node) so that groups of 8, 20, 60 and 150 members take the inline,
batched, sharded and cascaded tiers: inline up to 10, batched up to 30 (dynamic threshold pinned),
sharded up to 100 in shards of 25, cascaded above. Asserted: a row per size with the tier the
server reported and its latencies, jobs at 100 % for the job tiers, no direct message lost in
the warm-up (each direct conversation's first message) or either phase, no DELIVER to a user a
message was not for, and the run's PostgreSQL schema and Redis prefix gone afterwards. No timing
is asserted.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PG_DSN = os.environ.get("GOCHAT_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("GOCHAT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

SIZES = {8: "inline", 20: "batched", 60: "sharded", 150: "cascaded"}
SETTINGS = {
    "fanout_inline_max": 10,
    "large_group_threshold": 30,
    "large_group_threshold_min": 30,
    "large_group_threshold_max": 30,
    "fanout_cascade_min": 100,
    "fanout_shard_size": 25,
}


async def _leftovers(schema: str, prefix: str) -> tuple[bool, list[bytes]]:
    import asyncpg
    import redis.asyncio as aioredis

    pg = await asyncpg.connect(PG_DSN, timeout=10)
    try:
        schema_left = bool(await pg.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = $1", schema))
    finally:
        await pg.close()
    r = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in r.scan_iter(match=f"{prefix}*", count=1000)]
    finally:
        await r.aclose()
    return schema_left, keys


@pytest.mark.e2e
@pytest.mark.timeout(90)
def test_groups_bench_tiny_run(tmp_path: Path) -> None:
    out = tmp_path / "groups"
    sets = [x for k, v in SETTINGS.items() for x in ("--set", f"{k}={v}")]
    r = subprocess.run(
        [sys.executable, "-m", "bench", "groups", "--sizes", ",".join(map(str, SIZES)), "--online", "9",
         "--repeats", "2", "--duration", "2", "--direct-rate", "60", "--group-rate", "10", "--floor-samples", "50",
         *sets, "--out", str(out)],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=80,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    doc = json.loads((out / "results.json").read_text())
    assert doc["scenario"] == "groups" and doc["passed"] is True
    assert doc["command"].startswith("python -m bench groups")
    assert doc["machine"]["cpus"] >= 1 and doc["machine"]["git_commit"]
    res = doc["results"]

    rows = {row["size"]: row for row in res["tiers"]}
    assert sorted(rows) == sorted(SIZES)
    for size, tier in SIZES.items():
        row = rows[size]
        assert row["tier"] == tier, (size, row)
        assert row["fanout_counter_diff"][tier] == 3, row  # 1 warm-up + 2 measured
        assert row["lost"] == 0 and row["errors"] == [], row
        assert row["n"] == 2 and 0 < row["p50_ms"] <= row["p95_ms"] <= row["max_ms"], row
        assert row["p50_x_floor"] > 0
        if tier in ("sharded", "cascaded"):
            assert row["jobs"]["seen"] == 3 and row["jobs"]["at_100_pct"] == 3, row
            assert row["jobs"]["tiers"] == [tier], row
        else:
            assert row["jobs"]["seen"] == 0, row

    assert res["floor"]["samples"] == 50 and res["floor"]["p50_us"] > 0
    d = res["direct"]
    assert d["group_size"] == 150
    for phase, sent in (("warmup", 8), ("A", 120), ("B", 120)):  # warm-up: each route's first message
        p = d[phase]
        assert p["sent"] == sent and p["delivered"] == sent, (phase, p)
        assert p["lost"] == 0 and p["not_acknowledged"] == 0, (phase, p)
        assert p["p50_ms"] is not None and p["p99_ms"] is not None
    assert res["misdelivered"]["count"] == 0, res["misdelivered"]
    assert set(res["order_gate"]) == {"node0", "node1", "node2"}
    assert d["B"]["group"]["sent"] > 0 and d["B"]["group"]["lost"] == 0
    assert d["p99_ratio_B_over_A"] is not None
    assert res["crashed_nodes"] == []

    md = (out / "results.md").read_text()
    assert "# gochat bench: groups — PASS" in md and "| 150 | 9 | cascaded |" in md

    schema_left, keys = asyncio.run(_leftovers(res["schema"], res["redis_prefix"]))
    assert not schema_left, f"schema {res['schema']} left behind"
    assert keys == [], f"redis keys left behind under {res['redis_prefix']}: {keys[:10]}"
