"""Hot reload from outside (docs/configuration.md, "Hot reload"), on real server processes: SIGHUP
after editing the node's TOML file applies the new value and bumps ``config_version``; a
malformed file is refused (logged, counted) with the running configuration kept; and a change
through ``PUT /v1/admin/config`` on one node of a real three-node cluster applies on all three
under one version (``/v1/gateways``, ``/metrics``, the value in force)."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gochat.client import Client, Kind, RequestError
from tests.conftest import GochatProcess, create_user, run
from tests.e2e.test_cluster_e2e import REDIS_URL, Cluster

pytestmark = pytest.mark.e2e

ADMIN_TOKEN = "operator-secret-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def _get(http: aiohttp.ClientSession, url: str, **kw: Any) -> Any:
    async with http.get(url, **kw) as r:
        assert r.status == 200, await r.text()
        return await (r.json() if r.content_type == "application/json" else r.text())


async def _config_version(http: aiohttp.ClientSession, base: str) -> tuple[int, int, float]:
    """(version in /v1/gateways for this node, gochat_config_version, reload failures)."""
    gateways = (await _get(http, base + "/v1/gateways"))["gateways"]
    mine = [g["config_version"] for g in gateways if g["http_url"] == base]
    text = await _get(http, base + "/metrics")
    gauge = int(float(re.search(r"^gochat_config_version (\S+)$", text, re.M).group(1)))  # type: ignore[union-attr]
    failures = float(re.search(r"^gochat_config_reload_failures_total (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]
    return mine[0], gauge, failures


async def _wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


@pytest.fixture
def configured_node(tmp_path: Path) -> Iterator[tuple[GochatProcess, Path]]:
    cfg = tmp_path / "gochat.toml"
    cfg.write_text("[gochat]\nhistory_max_limit = 500\n")
    node = GochatProcess(tmp_path / "data", {"GOCHAT_ADMIN_TOKEN": ADMIN_TOKEN}, args=["--config", str(cfg)])
    node.start()
    try:
        yield node, cfg
    finally:
        node.stop()


def test_sighup_reloads_the_file_and_a_malformed_one_is_refused(configured_node: tuple[GochatProcess, Path]) -> None:
    node, cfg = configured_node
    assert node.proc is not None

    async def page_size(c: Client, peer: int) -> int:
        return len((await c.history(Kind.DIRECT, peer, 1, 100)).messages)

    async def scenario() -> None:
        alice = await create_user(node.http_url, "reload_alice")
        bob = await create_user(node.http_url, "reload_bob")
        c = await Client.connect(node.ws_url, alice.access_token)
        try:
            for i in range(6):
                await c.send(Kind.DIRECT, bob.user_id, f"m{i}")
            assert await page_size(c, bob.user_id) == 6
            async with aiohttp.ClientSession() as http:
                assert await _config_version(http, node.http_url) == (0, 0, 0.0)

                cfg.write_text("[gochat]\nhistory_max_limit = 4\n")
                node.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]

                async def reloaded() -> bool:
                    return (await _config_version(http, node.http_url))[:2] == (1, 1)

                await _wait_for(reloaded)
                assert await page_size(c, bob.user_id) == 4  # the new cap is in force
                assert "configuration reloaded: version 1 (history_max_limit)" in node.log_text()

                # a malformed file: logged, counted, nothing changes
                cfg.write_text("[gochat]\nhistory_max_limit = = 2\n")
                node.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]

                async def refused() -> bool:
                    return (await _config_version(http, node.http_url))[2] == 1.0

                await _wait_for(refused)
                assert "configuration reload refused, version 1 kept: cannot read config file" in node.log_text()
                assert (await _config_version(http, node.http_url))[:2] == (1, 1)
                assert await page_size(c, bob.user_id) == 4
                admin = await _get(http, node.http_url + "/v1/admin/config", headers=ADMIN)
                assert admin["config_version"] == 1 and admin["settings"]["history_max_limit"] == 4

                # a change to a setting that is not reloadable: refused too, naming it
                cfg.write_text("[gochat]\nhistory_max_limit = 3\nmax_body = 1000\n")
                node.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]

                async def refused_again() -> bool:
                    return (await _config_version(http, node.http_url))[2] == 2.0

                await _wait_for(refused_again)
                assert "not reloadable (restart the node to change): max_body" in node.log_text()
                assert await page_size(c, bob.user_id) == 4
        finally:
            await c.close()

    run(scenario())


@pytest.fixture
def admin_cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, REDIS_URL, env={"GOCHAT_ADMIN_TOKEN": ADMIN_TOKEN})
    try:
        c.start()
        yield c
    finally:
        c.stop()


def test_an_admin_change_on_one_node_applies_on_every_node_with_one_version(admin_cluster: Cluster) -> None:
    a, b, c = admin_cluster.nodes

    async def versions(http: aiohttp.ClientSession) -> list[tuple[int, ...]]:
        out = []
        for node in (a, b, c):
            gateways = (await _get(http, node.http_url + "/v1/gateways"))["gateways"]
            text = await _get(http, node.http_url + "/metrics")
            gauge = int(float(re.search(r"^gochat_config_version (\S+)$", text, re.M).group(1)))  # type: ignore[union-attr]
            out.append((gauge, *sorted(g["config_version"] for g in gateways)))
        return out

    async def scenario() -> None:
        owner = await create_user(a.http_url, "cfg_owner")
        members = [await create_user(a.http_url, f"cfg_m{i}") for i in range(3)]
        async with aiohttp.ClientSession() as http:
            assert await versions(http) == [(0, 0, 0, 0)] * 3
            # refused: nothing applied anywhere
            for body, why in (
                ({"ws_port": 1}, "not reloadable"),
                ({"max_group_members": 1}, "max_group_members"),
                ({"nope": 1}, "unknown setting"),
            ):
                async with http.put(a.http_url + "/v1/admin/config", json=body, headers=ADMIN) as r:
                    assert r.status == 400
                    assert why in (await r.json())["error"]["message"]
            async with http.put(a.http_url + "/v1/admin/config", json={"max_group_members": 3}) as r:
                assert r.status == 401
            async with http.put(a.http_url + "/v1/admin/config", json={"max_group_members": 3}, headers=ADMIN) as r:
                assert r.status == 200
                body = await r.json()
            assert body["config_version"] == 1 and body["changed"] == ["max_group_members"]
            assert body["settings"]["max_group_members"] == 3

            async def everywhere() -> bool:
                return await versions(http) == [(1, 1, 1, 1)] * 3

            await _wait_for(everywhere)
            for node in (b, c):
                admin = await _get(http, node.http_url + "/v1/admin/config", headers=ADMIN)
                assert (admin["config_version"], admin["settings"]["max_group_members"]) == (1, 3)
        # the value is in force on another node: a group of 3 cannot grow there
        client = await Client.connect(c.ws_url, owner.access_token)
        try:
            g = await client.call("group.create", {"name": "small", "members": [members[0].user_id, members[1].user_id]})
            with pytest.raises(RequestError, match="group is full"):
                await client.call("group.add", {"group_id": int(g["group_id"]), "user_id": members[2].user_id})
        finally:
            await client.close()

    run(scenario())
