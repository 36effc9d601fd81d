"""The admin API and the degradation switches from outside, on real server processes: the
operator credential (401 / 403, a user's token refused), the switches as clients see them
(504 READ_ONLY with retry_after_ms, EVENT DEGRADED), /readiness and /metrics, on one embedded
node; and a switch set through one node of a real three-node cluster applied on the others."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gochat.errors import ErrorCode
from gochat.protocol import EventType, Kind
from gochat.protocol.frames import AuthOk, Error, Event, SendAck
from tests.conftest import GochatProcess, create_user, run
from tests.e2e.rawclient import connect, send_frame
from tests.e2e.test_cluster_e2e import REDIS_URL, Cluster

pytestmark = pytest.mark.e2e

ADMIN_TOKEN = "operator-secret-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GochatProcess]:
    server = GochatProcess(Path(tmp_path_factory.mktemp("admin")) / "data", {"GOCHAT_ADMIN_TOKEN": ADMIN_TOKEN})
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def _call(http: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> tuple[int, Any]:
    async with http.request(method, url, **kw) as r:
        return r.status, await r.json()


def test_admin_routes_need_the_operator_credential(node: GochatProcess) -> None:
    async def scenario() -> None:
        user = await create_user(node.http_url, "notanoperator")
        async with aiohttp.ClientSession() as http:
            for method, path in (
                ("GET", "/v1/admin/breakers"),
                ("POST", "/v1/admin/breakers/postgres"),
                ("GET", "/v1/admin/degradation"),
                ("PUT", "/v1/admin/degradation"),
            ):
                url = node.http_url + path
                status, body = await _call(http, method, url)
                assert (status, body["error"]["code"]) == (401, ErrorCode.UNAUTHORIZED), (method, path)
                status, body = await _call(http, method, url, headers={"Authorization": f"Bearer {user.access_token}"})
                assert (status, body["error"]["code"]) == (403, ErrorCode.FORBIDDEN), (method, path)
                status, _ = await _call(http, method, url, headers={"Authorization": "Bearer operator-secret-0123456780"})
                assert status == 403
            status, body = await _call(http, "GET", node.http_url + "/v1/admin/breakers", headers=ADMIN)
            assert (status, body) == (200, {"breakers": []})  # embedded: no outbound dependency
            status, body = await _call(http, "PUT", node.http_url + "/v1/admin/degradation", headers=ADMIN, json={"x": 1})
            assert (status, body["error"]["code"]) == (400, ErrorCode.BAD_REQUEST)
            status, body = await _call(
                http, "PUT", node.http_url + "/v1/admin/degradation", headers=ADMIN, json={"read_only": "yes"}
            )
            assert status == 400

    run(scenario())


def test_admin_api_is_off_without_an_admin_token(tmp_path: Path) -> None:
    server = GochatProcess(tmp_path / "data")
    server.start()
    try:

        async def scenario() -> None:
            async with aiohttp.ClientSession() as http:
                status, body = await _call(http, "GET", server.http_url + "/v1/admin/degradation", headers=ADMIN)
                assert (status, body["error"]["code"]) == (403, ErrorCode.FORBIDDEN)
                assert "off" in body["error"]["message"]

        run(scenario())
    finally:
        server.stop()


def test_read_only_switch_as_clients_see_it_and_back(node: GochatProcess) -> None:
    async def scenario() -> None:
        alice, bob = await create_user(node.http_url, "ro_alice"), await create_user(node.http_url, "ro_bob")
        c = await connect(node.ws_url, alice.access_token)
        await c.expect(AuthOk)
        c.send(send_frame(Kind.DIRECT, bob.user_id, b"before", rid=1))
        assert isinstance(await c.expect(SendAck), SendAck)
        async with aiohttp.ClientSession() as http:
            url = node.http_url + "/v1/admin/degradation"
            status, body = await _call(http, "PUT", url, headers=ADMIN, json={"read_only": True})
            assert status == 200 and body["active"] == ["read_only"] and body["manual"]["read_only"] is True
            ev = await c.expect(Event)
            assert (ev.type, ev.value) == (EventType.DEGRADED, 1)
            c.send(send_frame(Kind.DIRECT, bob.user_id, b"refused", rid=2))
            err = await c.expect(Error)
            assert (err.rid, err.code) == (2, ErrorCode.READ_ONLY) and err.retry_after_ms > 0
            late = await connect(node.ws_url, alice.access_token)  # a new session is told at once
            await late.expect(AuthOk)
            assert (await late.expect(Event)).value == 1
            status, ready = await _call(http, "GET", node.http_url + "/readiness")
            assert status == 200 and ready["checks"]["degraded"] == "read_only"
            async with http.get(node.http_url + "/metrics") as r:
                text = await r.text()
            assert 'gochat_degraded{switch="read_only"} 1.0' in text
            status, body = await _call(http, "PUT", url, headers=ADMIN, json={"read_only": None})
            assert status == 200 and body["active"] == []
            assert (await c.expect(Event)).value == 0
            c.send(send_frame(Kind.DIRECT, bob.user_id, b"after", rid=3))
            assert (await c.expect(SendAck)).seq == 2
            c.close()
            late.close()

    run(scenario())


# ---- a switch set through one node applies on every node --------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(Path(tmp_path_factory.mktemp("admin-cluster")), REDIS_URL, env={"GOCHAT_ADMIN_TOKEN": ADMIN_TOKEN})
    try:
        c.start()
        yield c
    finally:
        c.stop()


def test_a_switch_set_on_one_node_applies_on_every_node(cluster: Cluster) -> None:
    a, b, c = cluster.nodes

    async def scenario() -> None:
        sender, peer = await create_user(a.http_url, "sw_sender"), await create_user(a.http_url, "sw_peer")
        clients = [await connect(n.ws_url, sender.access_token) for n in (b, c)]
        for cl in clients:
            await cl.expect(AuthOk)
        async with aiohttp.ClientSession() as http:
            status, breakers = await _call(http, "GET", a.http_url + "/v1/admin/breakers", headers=ADMIN)
            assert status == 200 and {br["name"] for br in breakers["breakers"]} == {"postgres", "redis"}
            assert {br["state"] for br in breakers["breakers"]} == {"closed"}
            start = time.monotonic()
            status, _ = await _call(http, "PUT", a.http_url + "/v1/admin/degradation", headers=ADMIN, json={"read_only": True})
            assert status == 200
            for cl in clients:
                ev = await cl.expect(Event, timeout=10)
                assert (ev.type, ev.value) == (EventType.DEGRADED, 1)
            took = time.monotonic() - start
            for i, cl in enumerate(clients):
                cl.send(send_frame(Kind.DIRECT, peer.user_id, b"x", rid=10 + i))
                assert (await cl.expect(Error)).code == ErrorCode.READ_ONLY
            for n in (b, c):
                status, body = await _call(http, "GET", n.http_url + "/v1/admin/degradation", headers=ADMIN)
                assert body["manual"]["read_only"] is True
            await _call(http, "PUT", c.http_url + "/v1/admin/degradation", headers=ADMIN, json={"read_only": None})
            for cl in clients:
                assert (await cl.expect(Event, timeout=10)).value == 0
            # breakers are per node: forcing A's does not touch B's
            status, snap = await _call(
                http, "POST", a.http_url + "/v1/admin/breakers/redis", headers=ADMIN, json={"action": "force_open"}
            )
            assert status == 200 and snap["state"] == "forced_open"
            status, body = await _call(http, "GET", b.http_url + "/v1/admin/breakers", headers=ADMIN)
            assert {br["state"] for br in body["breakers"]} == {"closed"}
            status, body = await _call(http, "GET", a.http_url + "/v1/admin/degradation", headers=ADMIN)
            assert body["active"] == ["non_core_off"] and body["causes"]["non_core_off"] == ["redis breaker forced_open"]
            status, snap = await _call(
                http, "POST", a.http_url + "/v1/admin/breakers/redis", headers=ADMIN, json={"action": "reset"}
            )
            assert snap["state"] == "closed"
            status, _ = await _call(
                http, "POST", a.http_url + "/v1/admin/breakers/nope", headers=ADMIN, json={"action": "reset"}
            )
            assert status == 404
        print(f"\n[admin e2e] read_only set on A reached B and C in {took * 1000:.0f} ms")
        for cl in clients:
            cl.close()
        await asyncio.sleep(0)

    run(scenario())
