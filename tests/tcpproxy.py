"""A small asyncio TCP proxy that can cut and restore the link (after asyncpg's
``_testbase/fuzzer.py``), for outage tests against real PostgreSQL / Redis.

Runs on the test's own event loop::

    proxy = TcpProxy("127.0.0.1", 5432)
    await proxy.start()            # proxy.port: connect here instead
    proxy.cut()                    # blackhole: bytes are dropped, new connections hang
    proxy.cut(reset=True)          # reset: every connection is aborted, new ones refused
    proxy.restore()                # back to normal (connections alive during the cut are closed)
    await proxy.close()

A *blackhole* models a network partition (the peer is silent: only timeouts notice); a *reset*
models the server going down (connections fail at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

__all__ = ["TcpProxy"]


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
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._restored = asyncio.Event()
        self._restored.set()

    @property
    def connections(self) -> int:
        return len(self._links)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.listen_host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.abort()
        self._links.clear()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def cut(self, *, reset: bool = False) -> None:
        """Stop carrying bytes. ``reset``: abort every connection now and refuse new ones;
        otherwise silently drop everything (a partition)."""
        self._restored.clear()
        if reset:
            self.resetting = True
            for link in list(self._links):
                link.abort()
            self._links.clear()
        else:
            self.blackholed = True
            for link in self._links:
                link.poisoned = True

    def restore(self) -> None:
        """Carry bytes again. Links that lost bytes during a blackhole are closed (their
        streams are corrupt); clients reconnect."""
        self.blackholed = False
        self.resetting = False
        for link in [lnk for lnk in self._links if lnk.poisoned]:
            link.abort()
            self._links.discard(link)
        self._restored.set()

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
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                    return
                if self.blackholed or link.poisoned:
                    link.poisoned = True
                    continue  # dropped on the floor
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            return
