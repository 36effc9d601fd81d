"""Client-side load balancing over the gateway directory."""

from __future__ import annotations

from collections import Counter

import pytest

from gochat.client.discovery import GatewayBalancer
from gochat.client.errors import ConnectionLostError
from tests.conftest import GochatProcess, run

GWS = [
    {"url": "ws://a/ws", "weight": 100, "connections": 10},
    {"url": "ws://b/ws", "weight": 300, "connections": 10},
    {"url": "ws://c/ws", "weight": 100, "connections": 0},
    {"url": "ws://d/ws", "weight": 100, "connections": 0, "draining": True},
]


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _balancer(strategy: str, clock: FakeClock | None = None) -> GatewayBalancer:
    b = GatewayBalancer("http://unused", strategy, clock=clock or FakeClock(), refresh_s=1e9)  # type: ignore[arg-type]
    b.set_gateways(GWS)
    return b


def test_round_robin_cycles_and_skips_draining() -> None:
    b = _balancer("round_robin")
    assert [b.choose() for _ in range(6)] == ["ws://a/ws", "ws://b/ws", "ws://c/ws"] * 2


def test_weighted_follows_weights() -> None:
    b = _balancer("weighted")
    counts = Counter(b.choose() for _ in range(500))
    assert counts == {"ws://a/ws": 100, "ws://b/ws": 300, "ws://c/ws": 100}


def test_least_connections_counts_own_picks() -> None:
    b = _balancer("least_connections")
    picks = [b.choose() for _ in range(30)]
    # c starts empty, then the load evens out in proportion to the weights
    assert picks[0] == "ws://c/ws"
    counts = Counter(picks)
    assert counts["ws://b/ws"] > counts["ws://a/ws"]


def test_failed_gateway_is_quarantined_then_readmitted() -> None:
    clock = FakeClock()
    b = _balancer("round_robin", clock)
    b.report_failure("ws://b/ws")
    assert "ws://b/ws" not in {b.choose() for _ in range(10)}
    clock.t += 11
    assert "ws://b/ws" in {b.choose() for _ in range(10)}
    # every gateway quarantined: still try them rather than give up
    for g in ("ws://a/ws", "ws://b/ws", "ws://c/ws"):
        b.report_failure(g)
    assert b.choose()


def test_unknown_strategy() -> None:
    with pytest.raises(ValueError):
        GatewayBalancer("http://x", "random")  # type: ignore[arg-type]


def test_discovers_from_a_real_node(shared_server: GochatProcess) -> None:
    async def scenario() -> None:
        b = GatewayBalancer(["http://127.0.0.1:1", shared_server.http_url], "round_robin")
        assert await b.pick() == shared_server.ws_url
        nobody = GatewayBalancer("http://127.0.0.1:1", timeout_s=1)
        with pytest.raises(ConnectionLostError):
            await nobody.pick()

    run(scenario())
