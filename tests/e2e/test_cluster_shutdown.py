"""Stopping every node of a cluster at once (a deploy, a host shutdown) is a clean exit for each:
no coroutine left un-awaited, no backend close that times out, no traceback, exit status 0.

Three real ``gochat serve`` nodes on the Redis and PostgreSQL that the cluster tests use, each
with users online, then SIGTERM to all three in the same instant.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from gochat.protocol.frames import AuthOk
from tests.conftest import create_user, run
from tests.e2e.rawclient import connect
from tests.e2e.test_cluster_e2e import REDIS_URL, Cluster

pytestmark = pytest.mark.e2e

BAD = ("never awaited", "timed out", "Traceback", "Task was destroyed", "Unclosed", "ERROR")


@pytest.mark.timeout(120)
def test_sigterm_to_all_three_nodes_at_once_exits_cleanly(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, REDIS_URL)
    try:
        cluster.start()

        async def sessions() -> list[object]:
            clients = []
            for i, node in enumerate(cluster.nodes):
                user = await create_user(node.http_url, f"quit{i}")
                c = await connect(node.ws_url, user.access_token)
                await c.expect(AuthOk)
                clients.append(c)
            return clients

        run(sessions())  # the clients stay connected (their loop is gone): the nodes drain them
        procs = [n.proc for n in cluster.nodes]
        assert all(p is not None and p.poll() is None for p in procs)
        for p in procs:
            assert p is not None
            p.send_signal(signal.SIGTERM)
        codes = []
        for p in procs:
            assert p is not None
            try:
                codes.append(p.wait(30))
            except subprocess.TimeoutExpired:
                p.kill()
                codes.append(p.wait(5))
        logs = {n.log_path.name: n.log_text() for n in cluster.nodes}
        for name, text in logs.items():
            assert "gochat stopped" in text, (name, text[-3000:])
            for bad in BAD:
                assert bad not in text, (name, bad, text[-4000:])
        assert codes == [0, 0, 0], (codes, {k: v[-2000:] for k, v in logs.items()})
    finally:
        cluster.stop()
