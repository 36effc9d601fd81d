"""The dynamic large-group threshold (gochat/messaging/threshold.py): driven with injected
samples (no sleeping): it moves within its bounds under a load step and back, hysteresis holds it
under a load oscillating around its band, every change is logged with its reason; the numpy
statistics equal the pure-Python reference; and a running node exports it and applies it."""

from __future__ import annotations

import asyncio
import logging
import random
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from bench.threshold_bench import PyLoadStats
from gochat.cluster.base import NodeInfo
from gochat.config import load_settings
from gochat.errors import ConfigError
from gochat.messaging.loadstats import LoadStats
from gochat.messaging.threshold import CONFIRM, LAG_FULL_S, SendLatencySampler, ThresholdController
from gochat.observability.metrics import LatencyHistogram

ME = "node-a"


def _nodes(n: int = 1, my_connections: int = 100, others: int = 100) -> list[NodeInfo]:
    nodes = [NodeInfo(ME, "", "", "1", weight=100, connections=my_connections)]
    nodes += [NodeInfo(f"node-{i}", "", "", "1", weight=100, connections=others) for i in range(1, n)]
    return nodes


def _controller(start: int = 500, low: int = 300, high: int = 1000) -> tuple[ThresholdController, list[int]]:
    applied: list[int] = []
    return ThresholdController(start, low, high, apply=applied.append, node_id=ME, window=16), applied


def _run(c: ThresholdController, decisions: int, lag_s: float, nodes: list[NodeInfo]) -> list[int]:
    """``decisions`` decisions, each after 4 probes of ``lag_s``; the values after each."""
    values = []
    for _ in range(decisions):
        for _ in range(4):
            c.observe(lag_s, 0, 0.001)
        c.decide(nodes)
        values.append(c.value)
    return values


# ---- the controller ------------------------------------------------------------------------------
def test_moves_within_bounds_under_a_load_step_and_back(caplog: pytest.LogCaptureFixture) -> None:
    c, applied = _controller()
    nodes = _nodes(3)
    quiet = _run(c, 30, 0.0, nodes)  # 3 balanced nodes, no load: score 0.5 * (2/3) = 1/3
    assert quiet[-1] == pytest.approx(1000 - 700 / 3, abs=700 * 0.1 + 1)
    settled_quiet = quiet[-1]
    with caplog.at_level(logging.INFO, logger="gochat.threshold"):
        loaded = _run(c, 30, 2 * LAG_FULL_S, nodes)  # a load step: the loop lags 200 ms
    assert loaded[-1] == 300  # the floor: every group above 300 goes to the job tier
    assert all(300 <= v <= 1000 for v in quiet + loaded)
    # bounded steps: at most a quarter of the range per decision
    steps = [abs(b - a) for a, b in zip([settled_quiet, *loaded], loaded, strict=False)]
    assert max(steps) <= 175
    back = _run(c, 40, 0.0, nodes)  # the load ends: back to where it was (the window empties)
    assert abs(back[-1] - settled_quiet) <= 0.1 * back[-1] + 1
    assert applied and applied[-1] == c.value and c.changes == len(applied)
    # every change logged with its reason: the inputs behind it
    changes = [r.getMessage() for r in caplog.records if "large_group_threshold" in r.getMessage()]
    assert changes and all("lag p99" in m and "live nodes" in m and "target" in m for m in changes)
    assert "lag p99 200.0 ms" in changes[-1]


def test_hysteresis_holds_under_an_oscillating_load() -> None:
    c, applied = _controller(start=650)
    nodes = _nodes(1)  # alone: the target is max - 700 * load
    # load alternating each decision: a target equal to the current value, then one 54 % above it
    for i in range(60):
        lag = 0.5 * LAG_FULL_S if i % 2 else 0.0  # targets 650 and 1000
        for _ in range(16):  # fills the window: each decision sees only its own load
            c.observe(lag, 0, 0.0)
        c.decide(nodes)
    assert applied == [] and c.value == 650
    # a target hovering inside the band never moves it either
    for i in range(60):
        lag = (0.5 + (0.05 if i % 2 else -0.05)) * LAG_FULL_S  # targets 615 / 685: within 10 %
        for _ in range(16):
            c.observe(lag, 0, 0.0)
        c.decide(nodes)
    assert applied == [] and c.value == 650


def test_a_change_needs_confirm_decisions_on_the_same_side() -> None:
    c, applied = _controller(start=1000)
    for i in range(CONFIRM - 1):
        for _ in range(16):
            c.observe(LAG_FULL_S, 0, 0.0)
        assert c.decide(_nodes(1)) is None, i
    for _ in range(16):
        c.observe(LAG_FULL_S, 0, 0.0)
    assert c.decide(_nodes(1)) == 825 == c.value == applied[-1]  # one bounded step toward 300


@pytest.mark.parametrize(
    ("lag_s", "queue", "commit_s", "nodes", "expected"),
    [
        (0.0, 0, 0.0, _nodes(1), 1000),  # alone and quiet: everything inline
        (10.0, 0, 0.0, _nodes(1), 300),  # overloaded: pressure clipped to 1
        (0.0, 1_000_000, 0.0, _nodes(1), 300),  # routing queue far behind
        (0.0, 0, 5.0, _nodes(1), 300),  # commits slower than overload_send_latency_ms
        (0.0, 0, 0.0, _nodes(2), 825),  # 2 balanced nodes: 0.5 * 0.5
        (0.0, 0, 0.0, _nodes(50, my_connections=10_000, others=10), 314),  # a hot node in a big cluster: 0.5 * 0.98 * 2
        (0.0, 0, 0.0, _nodes(2, my_connections=0), 1000),  # this node holds no connections
    ],
)
def test_target_stays_within_bounds(
    lag_s: float, queue: int, commit_s: float, nodes: list[NodeInfo], expected: int
) -> None:
    c, _ = _controller()
    for _ in range(16):
        c.observe(lag_s, queue, commit_s)
    target, inputs = c.target(nodes)
    assert target == expected and 0 <= inputs["score"] <= 1


def test_draining_nodes_and_bad_entries_do_not_count() -> None:
    c, _ = _controller()
    nodes = [*_nodes(1), NodeInfo("node-x", "", "", "1", weight=0, connections=5, draining=True)]
    assert c.target(nodes)[0] == 1000
    zero = [NodeInfo(ME, "", "", "1", weight=0, connections=0), NodeInfo("b", "", "", "1", weight=0)]
    assert 300 <= c.target(zero)[0] <= 1000


def test_off_when_min_equals_max_and_reset_is_bounded() -> None:
    off = ThresholdController(42, 500, 500)
    assert not off.enabled and off.value == 42
    for _ in range(10):
        off.observe(1.0, 0, 0.0)
        assert off.decide(_nodes(1)) is None
    assert off.value == 42
    c, applied = _controller(start=5)  # a start value outside the bounds is bounded
    assert c.value == 300
    c.reset(2000)  # a hot reload
    assert c.value == applied[-1] == 1000


def test_bounds_are_validated() -> None:
    with pytest.raises(ConfigError, match="large_group_threshold_min"):
        load_settings(env={"GOCHAT_LARGE_GROUP_THRESHOLD_MIN": "900", "GOCHAT_LARGE_GROUP_THRESHOLD_MAX": "800"})
    with pytest.raises(ConfigError, match="large_group_threshold_min"):
        load_settings(env={"GOCHAT_LARGE_GROUP_THRESHOLD_MIN": "0"})
    with pytest.raises(ConfigError, match="threshold_interval_s"):
        load_settings(env={"GOCHAT_THRESHOLD_INTERVAL_S": "0"})


def test_send_latency_sampler_is_the_mean_since_the_last_call() -> None:
    hist = LatencyHistogram((0.001, 0.01))
    hist.observe(0.5)
    sample = SendLatencySampler(hist)
    assert sample() is None
    hist.observe(0.002)
    hist.observe(0.004)
    assert sample() == pytest.approx(0.003)
    assert sample() is None


# ---- the statistics: numpy against the pure-Python reference -------------------------------------
@pytest.mark.parametrize("seed", range(25))
def test_numpy_stats_equal_the_python_reference(seed: int) -> None:
    rng = random.Random(seed)
    capacity = rng.choice([1, 2, 7, 64, 256, 1000])
    alpha = rng.choice([0.05, 0.2, 0.5, 1.0])
    fast, ref = LoadStats(capacity, alpha), PyLoadStats(capacity, alpha)
    qs = [0.0, 1.0, 50.0, 90.0, 99.0, 99.9, 100.0, rng.uniform(0, 100)]
    for _ in range(rng.randint(1, 12)):
        xs = [rng.choice([rng.expovariate(50.0), rng.uniform(-5, 5), 0.0, 1e6]) for _ in range(rng.randint(0, 3 * capacity))]
        if rng.random() < 0.5:
            fast.extend(np.asarray(xs) if rng.random() < 0.5 else xs)  # the vectorised path
        else:
            for x in xs:
                fast.add(x)
        ref.extend(xs)
        assert fast.count == ref.count
        assert sorted(fast.window().tolist()) == sorted(ref.window())
        assert fast.ewma == pytest.approx(ref.ewma, rel=1e-9, abs=1e-9)
        assert fast.percentiles(qs).tolist() == pytest.approx(ref.percentiles(qs), rel=1e-12, abs=1e-12)
        assert fast.mean() == pytest.approx(ref.mean(), rel=1e-9, abs=1e-9)


def test_empty_stats_are_zero() -> None:
    s = LoadStats(8)
    assert (s.p50, s.p99, s.mean(), s.ewma) == (0.0, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        LoadStats(0)


# ---- a running node --------------------------------------------------------------------------------
def test_an_embedded_node_runs_exports_and_applies_it(tmp_path: Path) -> None:
    from gochat.server import Server

    s = load_settings(
        env={
            "GOCHAT_DATA_DIR": str(tmp_path),
            "GOCHAT_WS_PORT": "0",
            "GOCHAT_HTTP_PORT": "0",
            "GOCHAT_LARGE_GROUP_THRESHOLD": "2000",  # bounded to the max
            "GOCHAT_THRESHOLD_INTERVAL_S": "0.25",
        }
    )

    async def scenario() -> None:
        server = Server(s)
        await server.start()
        try:
            threshold = server.threshold
            assert threshold is not None and threshold.enabled
            assert server.core.delivery.large_group_threshold == 1000 == threshold.value
            await asyncio.sleep(0.8)  # a few probes and decisions
            assert threshold._task is not None and not threshold._task.done()
            # alone (no peer), nothing is sampled and numpy's statistics are not even loaded
            assert threshold._stats is None and threshold.changes == 0
            threshold.reset(700)  # what a hot reload does
            assert server.core.delivery.large_group_threshold == 700
            body = await asyncio.to_thread(
                lambda: urllib.request.urlopen(server.http_url + "/metrics", timeout=5).read().decode()
            )
            assert "gochat_large_group_threshold 700.0" in body
            assert "gochat_event_loop_lag_seconds " in body
            assert "gochat_large_group_threshold_changes_total 0.0" in body
        finally:
            await server.stop()
        assert threshold._task is None

    asyncio.run(scenario())


def test_the_timer_probes_and_decides_only_with_peers() -> None:
    async def scenario() -> None:
        c = ThresholdController(1000, 300, 1000, node_id=ME, interval_s=0.1, probe_s=0.02)
        has_peers = False
        c.start(lambda: _nodes(2), lambda: 0, lambda: None, lambda: has_peers)
        await asyncio.sleep(0.15)
        assert c._stats is None and c.lag_s >= 0.0
        has_peers = True
        await asyncio.sleep(0.3)
        await c.stop()
        assert c.lag.count >= 5 and c.inputs["nodes"] == 2.0  # sampled and decided
        assert c._task is None

    asyncio.run(scenario())


def test_importing_the_server_does_not_load_numpy() -> None:
    """numpy is loaded with the statistics, on a node's first sample with a peer
    (docs/dependencies.md, "numpy")."""
    import subprocess
    import sys

    code = "import sys, gochat.server, gochat.messaging.threshold; assert 'numpy' not in sys.modules, 'numpy'"
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
