"""The dynamic large-group threshold on three real nodes (docs/cluster.md, "Dynamic large-group
threshold"): a node whose event loop lags lowers its own threshold within its bounds, and raises it
again once the load is gone; the other nodes keep theirs."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import run
from tests.e2e.test_cluster_e2e import REDIS_URL, Cluster

pytestmark = pytest.mark.e2e

LOW, HIGH = 300, 1000


async def threshold(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url + "/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith("gochat_large_group_threshold "):
                return int(float(line.split()[1]))
    raise AssertionError("gochat_large_group_threshold missing from /metrics")


def test_a_lagging_node_lowers_its_threshold_and_raises_it_back(tmp_path: Path) -> None:
    env = {
        "GOCHAT_THRESHOLD_INTERVAL_S": "0.5",
        "GOCHAT_LARGE_GROUP_THRESHOLD_MIN": str(LOW),
        "GOCHAT_LARGE_GROUP_THRESHOLD_MAX": str(HIGH),
    }
    c = Cluster(tmp_path, REDIS_URL, env=env)
    try:
        c.start()
        urls = [n.http_url for n in c.nodes]
        victim = c.nodes[0].proc
        assert victim is not None

        async def scenario() -> None:
            seen: list[list[int]] = []

            async def sample(http: aiohttp.ClientSession) -> list[int]:
                values = [await threshold(http, u) for u in urls]
                assert all(LOW <= v <= HIGH for v in values), values
                seen.append(values)
                return values

            async with aiohttp.ClientSession() as http:
                # quiet, three balanced nodes: each settles above the start (500), at about the
                # same value (their connection shares differ a little)
                deadline = time.monotonic() + 30
                while True:
                    values = await sample(http)
                    if len(seen) >= 3 and seen[-3] == values and min(values) > 500:
                        break
                    assert time.monotonic() < deadline, seen[-5:]
                    await asyncio.sleep(0.5)
                quiet = values
                # load: node 0's event loop stalls 0.3 s of every 0.5 s (its timers fire late)
                deadline = time.monotonic() + 30
                while True:
                    os.kill(victim.pid, signal.SIGSTOP)
                    await asyncio.sleep(0.3)
                    os.kill(victim.pid, signal.SIGCONT)
                    await asyncio.sleep(0.2)
                    values = await sample(http)
                    if values[0] <= quiet[0] - 175:
                        break
                    assert time.monotonic() < deadline, seen[-5:]
                loaded = values[0]
                assert values[1:] == quiet[1:], seen[-5:]  # the others keep theirs
                # the load is gone: it comes back up (once the lagging probes left its window)
                deadline = time.monotonic() + 60
                while True:
                    await asyncio.sleep(0.5)
                    values = await sample(http)
                    if values[0] >= loaded + (quiet[0] - loaded) // 2:  # at least half way back
                        break
                    assert time.monotonic() < deadline, seen[-5:]
                print(f"[threshold e2e] quiet {quiet}, loaded {loaded}, back to {values[0]}")

        run(scenario())
    finally:
        if c.nodes[0].proc is not None:
            os.kill(c.nodes[0].proc.pid, signal.SIGCONT)
        c.stop()
