"""Shared fixtures: real ``gochat serve`` processes and users created through the HTTP API."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest

T = TypeVar("T")

_LISTENING = re.compile(r"gochat listening ws=(\S+) http=(\S+)")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on a fresh event loop (no pytest-asyncio needed)."""
    return asyncio.run(coro)


async def drop_redis_keys(url: str, prefix: str) -> int:
    """Delete every key under ``prefix`` (a test's own namespace: the Redis server is shared, so
    never FLUSHALL); how many went."""
    from redis.asyncio import Redis

    r = Redis.from_url(url)
    try:
        keys = [k async for k in r.scan_iter(match=f"{prefix}*", count=1000)]
        return int(await r.delete(*keys)) if keys else 0
    finally:
        await r.aclose()


def restartable_port() -> int:
    """A free loopback TCP port *below* the kernel's ephemeral range, for a server a test stops
    and starts again. With an ephemeral port, a client reconnecting while the server is down
    can be given that very port as its source port and connect to itself (TCP simultaneous
    open); the server then cannot bind it again. Seen as a rare Redis-restart test flake."""
    import random
    import socket

    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


class GochatProcess:
    """A real ``gochat serve`` process on free ports with its own data directory."""

    def __init__(
        self, data_dir: Path, extra_env: dict[str, str] | None = None, name: str | None = None,
        args: list[str] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.extra_env = extra_env or {}
        #: more ``gochat serve`` arguments (``--config FILE``)
        self.args = args or []
        self.ws_port = 0
        self.http_port = 0
        self.ws_url = ""
        self.http_url = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"{name or data_dir.name}-server.log"
        self._log: Any = None

    def start(self, timeout: float = 30.0) -> None:
        env = dict(os.environ)
        env.update({"GOCHAT_LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1"})
        env.update(self.extra_env)
        self._log = open(self.log_path, "ab")
        offset = self.log_path.stat().st_size
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "gochat.cli", "serve",
                "--data-dir", str(self.data_dir),
                "--host", "127.0.0.1",
                "--ws-port", str(self.ws_port),
                "--http-port", str(self.http_port),
                *self.args,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_bytes()[offset:].decode(errors="replace")
            m = _LISTENING.search(text)
            if m:
                self.ws_url, self.http_url = m.group(1), m.group(2)
                self.ws_port = int(self.ws_url.rsplit(":", 1)[1].split("/")[0])
                self.http_port = int(self.http_url.rsplit(":", 1)[1])
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"gochat serve exited with {self.proc.returncode}:\n{text}")
            time.sleep(0.05)
        raise RuntimeError(f"gochat serve did not start in {timeout}s:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no drain, no flush."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait for the drain to finish; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout)
        return self.proc.returncode

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._log is not None:
            self._log.close()


@pytest.fixture
def gochat_server(tmp_path: Path) -> Iterator[GochatProcess]:
    server = GochatProcess(tmp_path / "data")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GochatProcess]:
    """One server for a whole module (tests must use their own users)."""
    server = GochatProcess(tmp_path_factory.mktemp("shared") / "data")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class UserCtx:
    user_id: int
    username: str
    password: str
    access_token: str
    refresh_token: str


_user_counter = itertools.count(1)


async def create_user(http_url: str, name: str, password: str = "correct horse battery") -> UserCtx:
    username = f"{name}{os.getpid()}x{next(_user_counter)}"
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{http_url}/v1/users", json={"username": username, "password": password}) as r:
            assert r.status == 201, await r.text()
            user_id = (await r.json())["user_id"]
        async with http.post(
            f"{http_url}/v1/auth/login", json={"username": username, "password": password}
        ) as r:
            assert r.status == 200, await r.text()
            tokens = await r.json()
    return UserCtx(user_id, username, password, tokens["access_token"], tokens["refresh_token"])


@pytest.fixture
def make_user(gochat_server: GochatProcess) -> Callable[[str], Awaitable[UserCtx]]:
    async def factory(name: str) -> UserCtx:
        return await create_user(gochat_server.http_url, name)

    return factory
