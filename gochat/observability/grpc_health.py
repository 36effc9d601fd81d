"""The standard gRPC health service (``grpc.health.v1.Health``, Check and Watch).

For orchestrators that probe over gRPC. Optional: install ``gochat[grpc]`` and set
``grpc_health_port``. The service reports, for the overall server (service name ``""``) and for
``"gochat"``, SERVING while the node is ready (store and Redis reachable, not draining) and
NOT_SERVING otherwise; the status is re-evaluated every ``interval_s`` and set to NOT_SERVING
at once when the drain starts, so Watch streams see the change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["GrpcHealth"]

log = logging.getLogger("gochat.grpc_health")

SERVICES = ("", "gochat")


class GrpcHealth:
    def __init__(self, host: str, port: int, ready: Callable[[], Awaitable[bool]], interval_s: float = 2.0) -> None:
        self.host = host
        self.port = port
        self.ready = ready
        self.interval_s = interval_s
        self._server: Any = None
        self._servicer: Any = None
        self._pb2: Any = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Start serving; returns the bound port."""
        try:
            import grpc
            from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise RuntimeError("the gRPC health service needs: pip install 'gochat[grpc]'") from exc
        server = grpc.aio.server()
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        self.port = server.add_insecure_port(f"{self.host}:{self.port}")
        await server.start()
        self._server, self._servicer = server, servicer
        self._pb2 = health_pb2
        await self._update()
        self._task = asyncio.get_running_loop().create_task(self._loop())
        log.info("gRPC health service on %s:%d", self.host, self.port)
        return self.port

    async def _update(self, force_down: bool = False) -> None:
        ok = False if force_down else await self.ready()
        status = self._pb2.HealthCheckResponse.SERVING if ok else self._pb2.HealthCheckResponse.NOT_SERVING
        for name in SERVICES:
            await self._servicer.set(name, status)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self._update()
            except Exception:
                log.exception("health update failed")

    async def draining(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._servicer is not None:
            await self._update(force_down=True)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._server is not None:
            await self._server.stop(grace=1.0)
