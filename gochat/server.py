"""One gochat node: wires store, auth, messaging core, gateway and HTTP API, and runs them.

Embedded defaults need no outside service: SQLite in ``data_dir``, in-process presence and
routing. ``gochat serve`` calls :func:`run`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, cast

from aiohttp import web
from picows import ws_create_server

from gochat._native.fanout import FanoutWriter
from gochat._native.routing import RoutingTable
from gochat.api.http import build_app
from gochat.auth.keys import Algorithm, KeyRing
from gochat.auth.service import AuthService
from gochat.config import Settings
from gochat.errors import ErrorCode
from gochat.gateway.gateway import Gateway
from gochat.ids import IdGenerator
from gochat.messaging.core import MessagingCore
from gochat.messaging.presence import MemoryPresence
from gochat.observability.metrics import Metrics
from gochat.store.sqlite import SQLiteStore

__all__ = ["Server", "run"]

log = logging.getLogger("gochat.server")


class Server:
    """A gochat node. ``await start()``, then ``await stop()`` (drains)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.ids = IdGenerator(settings.node_id)
        self.draining = False
        self.ws_url = ""
        self.http_url = ""
        self._ws_server: asyncio.AbstractServer | None = None
        self._http_runner: web.AppRunner | None = None

    async def start(self) -> None:
        s = self.settings
        data = Path(s.data_dir)
        data.mkdir(parents=True, exist_ok=True)
        self.store = SQLiteStore(data / "gochat.db", node_id=s.node_id, ids=self.ids)
        await self.store.open()
        keyring = KeyRing.load_or_create(data, algorithm=cast(Algorithm, s.jwt_algorithm))
        self.auth = AuthService(
            self.store, keyring, access_ttl_s=s.access_ttl_s, refresh_ttl_s=s.refresh_ttl_s
        )
        await self.auth.start()
        loop = asyncio.get_running_loop()
        self.writer = FanoutWriter(loop)
        self.routing = RoutingTable()
        self.presence = MemoryPresence()
        self.core = MessagingCore(s, self.store, self.routing, self.writer, self.presence, self.ids, self.metrics)
        self.gateway = Gateway(
            s, self.auth, self.core, self.routing, self.writer, self.presence, self.ids, self.metrics
        )
        self.auth.on_revoke(self._revoked)
        self.metrics.attach_data_plane(self.gateway.stats)

        heartbeat = s.heartbeat_ms / 1000
        self._ws_server = await ws_create_server(
            self.gateway.listener_factory,
            s.host,
            s.ws_port,
            enable_auto_ping=True,
            auto_ping_idle_timeout=heartbeat * 2,
            auto_ping_reply_timeout=heartbeat,
            max_frame_size=s.max_frame * 4,
            read_buffer_init_size=4096,
            logger_name="gochat.picows",
            reuse_address=True,
        )
        ws_port = self._ws_server.sockets[0].getsockname()[1]
        self.ws_url = s.public_ws_url or f"ws://{s.host}:{ws_port}/ws"

        self._http_runner = web.AppRunner(build_app(self), access_log=None, handle_signals=False)
        await self._http_runner.setup()
        site = web.TCPSite(self._http_runner, s.host, s.http_port, reuse_address=True)
        await site.start()
        http_port = self._http_runner.addresses[0][1]
        self.http_url = f"http://{s.host}:{http_port}"
        log.info("gochat listening ws=%s http=%s data=%s", self.ws_url, self.http_url, data.resolve())

    def _revoked(self, user_id: int, jti: str) -> None:
        self.gateway.kick_user(user_id, ErrorCode.TOKEN_REVOKED, "logged out", jti)

    def gateways(self) -> list[dict[str, Any]]:
        return [
            {
                "node_id": self.settings.node_id,
                "url": self.ws_url,
                "weight": 100,
                "connections": len(self.gateway.connections),
                "draining": self.draining,
            }
        ]

    async def stop(self) -> None:
        """Drain: GOAWAY to clients, let in-flight sends commit, close listeners and the store."""
        if self.draining:
            return
        self.draining = True
        log.info("gochat draining")
        if self._ws_server is not None:
            self._ws_server.close()
        await self.gateway.drain(timeout=self.settings.drain_timeout_s)
        if self._http_runner is not None:
            await self._http_runner.cleanup()
        await self.store.close()
        log.info("gochat stopped")


async def _serve(settings: Settings) -> None:
    server = Server(settings)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


def run(settings: Settings) -> None:
    """Run a node until SIGINT/SIGTERM (uvloop when available)."""
    logging.basicConfig(
        level=getattr(logging, settings.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    os.umask(0o077)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(_serve(settings))
    else:
        uvloop.run(_serve(settings))
