"""A small asyncio TCP proxy that injects faults between a process and its backend (after
asyncpg's ``_testbase/fuzzer.py``), for outage tests against real PostgreSQL / Redis.

Runs on the test's own event loop::

    proxy = TcpProxy("127.0.0.1", 5432)
    await proxy.start()            # proxy.port: connect here instead
    proxy.delay(1.0)               # every chunk, both ways, on every link: 1 s later (so a
                                   # request/response round trip takes 2 s longer)
    proxy.drop()                   # abort (RST) every open connection once; new ones work
    proxy.cut()                    # blackhole: accepts connections, never answers, drops bytes
    proxy.cut(reset=True)          # dead backend: every connection aborted, new ones reset at once
    proxy.flap(4.0)                # cycle: cut (reset) for 2 s, restored for 2 s, ... until restore()
    proxy.restore()                # back to normal: no delay, no cut, no flapping (connections
                                   # that lost bytes in a blackhole are closed)
    await proxy.close()

A *blackhole* models a network partition (the peer is silent: only timeouts notice); a *reset*
models the server going down (connections fail at once); ``drop`` a restart that is over before
anyone reconnects; ``delay`` a slow network or an overloaded backend.

:class:`ProxyThread` runs proxies on an event loop of their own in a daemon thread, so that they
outlive a test's short-lived loops and serve subprocesses (gochat nodes) all along::

    proxies = ProxyThread()
    pg = proxies.add("127.0.0.1", 5432)        # a handle: pg.port, pg.delay(...), pg.cut(...), ...
    ...
    proxies.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["ProxyHandle", "ProxyThread", "TcpProxy"]


class _Link:
    __slots__ = ("client", "poisoned", "tasks", "upstream")

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.tasks: list[asyncio.Task[None]] = []
        #: bytes were dropped on this link: it can never carry a valid stream again
        self.poisoned = False

    def abort(self) -> None:
        for w in (self.client, self.upstream):
            if w is not None:
                _abort(w)
        for t in self.tasks:
            t.cancel()


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with RST rather than FIN (SO_LINGER 0), like a crashed peer."""
    transport = writer.transport
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    transport.abort()


class TcpProxy:
    def __init__(self, backend_host: str, backend_port: int, *, listen_host: str = "127.0.0.1") -> None:
        self.backend_host = backend_host
        self.backend_port = backend_port
        self.listen_host = listen_host
        self.port = 0
        self.blackholed = False
        self.resetting = False
        #: seconds added to every chunk in each direction (0: none)
        self.delay_s = 0.0
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._restored = asyncio.Event()
        self._restored.set()
        self._flapper: asyncio.Task[None] | None = None

    @property
    def connections(self) -> int:
        return len(self._links)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.listen_host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self._stop_flapping()
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.abort()
        self._links.clear()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    # ---- faults --------------------------------------------------------------------------------

    def delay(self, seconds: float) -> None:
        """Hold every chunk ``seconds`` before passing it on, in both directions, on the links
        open now and on new ones (order is kept; throughput is not limited). 0 turns it off."""
        self.delay_s = max(0.0, seconds)

    def drop(self) -> None:
        """Abort (RST) every open connection once; new connections are carried as usual."""
        for link in list(self._links):
            link.abort()
        self._links.clear()

    def cut(self, *, reset: bool = False) -> None:
        """Stop carrying bytes. ``reset``: abort every connection now and refuse new ones;
        otherwise silently drop everything (a partition)."""
        self._restored.clear()
        if reset:
            self.resetting = True
            self.drop()
        else:
            self.blackholed = True
            for link in self._links:
                link.poisoned = True

    def restore(self) -> None:
        """Back to normal: no cut, no delay, no flapping. Links that lost bytes during a
        blackhole are closed (their streams are corrupt); clients reconnect."""
        self._stop_flapping()
        self._uncut()
        self.delay_s = 0.0

    def flap(self, period_s: float, *, reset: bool = True, down_fraction: float = 0.5) -> None:
        """Cycle until :meth:`restore`: cut (``reset`` or blackhole) for ``down_fraction`` of
        ``period_s``, then carry bytes for the rest of it. Starts with the cut. Needs a running
        loop (call it on the proxy's loop)."""
        self._stop_flapping()
        down = period_s * down_fraction

        async def cycle() -> None:
            while True:
                self.cut(reset=reset)
                await asyncio.sleep(down)
                self._uncut()
                await asyncio.sleep(period_s - down)

        self._flapper = asyncio.get_running_loop().create_task(cycle())

    @property
    def flapping(self) -> bool:
        return self._flapper is not None

    def _stop_flapping(self) -> None:
        if self._flapper is not None:
            self._flapper.cancel()
            self._flapper = None

    def _uncut(self) -> None:
        self.blackholed = False
        self.resetting = False
        for link in [lnk for lnk in self._links if lnk.poisoned]:
            link.abort()
            self._links.discard(link)
        self._restored.set()

    # ---- carrying bytes ----------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.resetting:
            _abort(writer)
            return
        link = _Link(writer)
        self._links.add(link)
        try:
            if self.blackholed:
                # A partition: the client's connect succeeds (the proxy is local) but nothing
                # ever answers. Swallow its bytes until the link is restored, then close.
                link.poisoned = True
                drain = asyncio.ensure_future(self._swallow(reader))
                link.tasks.append(drain)
                await self._restored.wait()
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(self.backend_host, self.backend_port)
            except OSError:
                return
            if link not in self._links:  # dropped while connecting
                _abort(up_writer)
                return
            link.upstream = up_writer
            t1 = asyncio.ensure_future(self._pump(reader, up_writer, link))
            t2 = asyncio.ensure_future(self._pump(up_reader, writer, link))
            link.tasks += [t1, t2]
            await asyncio.wait([t1, t2], return_when=asyncio.FIRST_COMPLETED)
        finally:
            link.abort()
            self._links.discard(link)

    async def _swallow(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while await reader.read(65536):
                pass

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link) -> None:
        """Carry one direction. Chunks go through a queue with the time each is due, so a
        delay holds every chunk for that long without slowing the reading of the next ones."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue()
        sender = loop.create_task(self._send(queue, writer, link))
        link.tasks.append(sender)
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    queue.put_nowait((loop.time() + self.delay_s, None))
                    await sender  # the bytes before the EOF go out first
                    return
                if self.blackholed or link.poisoned:
                    link.poisoned = True
                    continue  # dropped on the floor
                queue.put_nowait((loop.time() + self.delay_s, data))
        except (OSError, asyncio.IncompleteReadError):
            return
        finally:
            sender.cancel()

    async def _send(self, queue: asyncio.Queue[tuple[float, bytes | None]], writer: asyncio.StreamWriter,
                    link: _Link) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                due, data = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if data is None:
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                    return
                if self.blackholed or link.poisoned:
                    link.poisoned = True
                    continue
                writer.write(data)
                await writer.drain()
        except OSError:
            return


class ProxyHandle:
    """A :class:`TcpProxy` living on a :class:`ProxyThread`'s loop, driven from any thread: each
    method runs there and returns once it has been applied."""

    def __init__(self, owner: ProxyThread, proxy: TcpProxy) -> None:
        self._owner = owner
        self.proxy = proxy

    @property
    def port(self) -> int:
        return self.proxy.port

    @property
    def url_host(self) -> str:
        return f"{self.proxy.listen_host}:{self.proxy.port}"

    def delay(self, seconds: float) -> None:
        self._owner.call(self.proxy.delay, seconds)

    def drop(self) -> None:
        self._owner.call(self.proxy.drop)

    def cut(self, *, reset: bool = False) -> None:
        self._owner.call(self.proxy.cut, reset=reset)

    def flap(self, period_s: float, *, reset: bool = True, down_fraction: float = 0.5) -> None:
        self._owner.call(self.proxy.flap, period_s, reset=reset, down_fraction=down_fraction)

    def restore(self) -> None:
        self._owner.call(self.proxy.restore)


class ProxyThread:
    """Proxies on an event loop of their own, in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="tcpproxy", daemon=True)
        self.thread.start()
        self.proxies: list[TcpProxy] = []

    def add(self, backend_host: str, backend_port: int) -> ProxyHandle:
        proxy = TcpProxy(backend_host, backend_port)
        asyncio.run_coroutine_threadsafe(proxy.start(), self.loop).result(5)
        self.proxies.append(proxy)
        return ProxyHandle(self, proxy)

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` on the proxies' loop; its result."""

        async def run() -> Any:
            return fn(*args, **kwargs)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(5)

    def close(self) -> None:
        for proxy in self.proxies:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(proxy.close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
