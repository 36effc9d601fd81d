"""Gateway discovery and client-side load balancing.

``GatewayBalancer`` reads ``GET /v1/gateways`` from any node's HTTP API and picks a WebSocket
endpoint by strategy:

- ``round_robin``: each healthy gateway in turn;
- ``weighted``: smooth weighted round robin (nginx's algorithm) on the announced weights;
- ``least_connections``: the gateway with the fewest connections per unit of weight, counting
  the connections this balancer itself just opened so a burst of clients does not all land on
  the same node before the registry catches up.

A gateway that fails to connect is quarantined (skipped) for ``quarantine_s`` and re-admitted
afterwards; a draining gateway is never picked. The list is refreshed every ``refresh_s`` and
immediately after a failure.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import aiohttp

from gochat.client.errors import ConnectionLostError

__all__ = ["Gateway", "GatewayBalancer", "Strategy"]

log = logging.getLogger("gochat.client.discovery")

Strategy = Literal["round_robin", "weighted", "least_connections"]


@dataclass(slots=True)
class Gateway:
    url: str
    weight: int = 100
    connections: int = 0
    node_id: str = ""
    #: smooth-weighted-round-robin state
    current: int = 0
    #: connections this balancer opened since the last refresh
    picked: int = 0


class GatewayBalancer:
    def __init__(
        self,
        http_urls: str | Sequence[str],
        strategy: Strategy = "least_connections",
        *,
        refresh_s: float = 5.0,
        quarantine_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        timeout_s: float = 3.0,
    ) -> None:
        if strategy not in ("round_robin", "weighted", "least_connections"):
            raise ValueError(f"unknown strategy {strategy!r}")
        self.http_urls = [http_urls] if isinstance(http_urls, str) else list(http_urls)
        if not self.http_urls:
            raise ValueError("at least one HTTP URL is required")
        self.strategy = strategy
        self.refresh_s = refresh_s
        self.quarantine_s = quarantine_s
        self.clock = clock
        self.timeout_s = timeout_s
        self.gateways: list[Gateway] = []
        self._quarantine: dict[str, float] = {}
        self._refreshed = float("-inf")
        self._rr = 0

    # ---- discovery ---------------------------------------------------------------------------
    async def refresh(self) -> list[Gateway]:
        """Fetch the live gateways from the first HTTP API that answers."""
        last: Exception | None = None
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            for base in list(self.http_urls):
                try:
                    async with http.get(f"{base.rstrip('/')}/v1/gateways") as r:
                        r.raise_for_status()
                        body = await r.json()
                except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                    last = exc
                    continue
                self.set_gateways(body.get("gateways", []))
                # learn every node's HTTP API, so discovery survives the loss of the first one
                for g in body.get("gateways", []):
                    url = g.get("http_url")
                    if url and url not in self.http_urls:
                        self.http_urls.append(url)
                return self.gateways
        raise ConnectionLostError(f"no gateway directory answered: {last!r}")

    def set_gateways(self, entries: Sequence[dict[str, object]]) -> None:
        """Replace the gateway list (keeping balancing state of gateways that stay)."""
        old = {g.url: g for g in self.gateways}
        fresh = []
        for e in entries:
            if e.get("draining"):
                continue
            url = str(e["url"])
            g = old.get(url) or Gateway(url)
            g.weight = max(1, int(e.get("weight", 100)))  # type: ignore[call-overload]
            g.connections = int(e.get("connections", 0))  # type: ignore[call-overload]
            g.node_id = str(e.get("node_id", ""))
            g.picked = 0
            fresh.append(g)
        self.gateways = fresh
        self._refreshed = self.clock()

    # ---- health --------------------------------------------------------------------------------
    def report_failure(self, url: str) -> None:
        self._quarantine[url] = self.clock() + self.quarantine_s
        self._refreshed = float("-inf")  # look again before the next pick

    def report_success(self, url: str) -> None:
        self._quarantine.pop(url, None)

    def healthy(self) -> list[Gateway]:
        now = self.clock()
        ok = [g for g in self.gateways if self._quarantine.get(g.url, 0.0) <= now]
        return ok or list(self.gateways)  # all quarantined: try them anyway

    # ---- picking -------------------------------------------------------------------------------
    async def pick(self) -> str:
        if self.clock() - self._refreshed >= self.refresh_s or not self.gateways:
            try:
                await self.refresh()
            except ConnectionLostError:
                if not self.gateways:
                    raise
                log.info("gateway refresh failed; using the last known list")
        return self.choose()

    def choose(self) -> str:
        """Pick from the current list without I/O."""
        candidates = self.healthy()
        if not candidates:
            raise ConnectionLostError("no gateways known")
        if self.strategy == "round_robin":
            g = candidates[self._rr % len(candidates)]
            self._rr += 1
        elif self.strategy == "weighted":
            total = sum(c.weight for c in candidates)
            for c in candidates:
                c.current += c.weight
            g = max(candidates, key=lambda c: c.current)
            g.current -= total
        else:
            g = min(candidates, key=lambda c: ((c.connections + c.picked) / c.weight, c.url))
        g.picked += 1
        return g.url
