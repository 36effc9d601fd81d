"""The client's WebSocket transport: connections, frame decoding, and request/reply by rid.

- :class:`Connection` is one picows WebSocket connection (a ``WSListener``): it reassembles
  fragmented messages, decodes them into frames and hands every frame to its
  :class:`FrameHandler` (the :class:`~gochat.client.Client`); it owns the per-connection
  request tables (``pending`` futures and in-flight SENDs by rid) and the heartbeat state.
- :class:`Link` is the client's side of the wire across connections: the current connection
  and the event that says one is up, the rid counter shared by all of them, the
  authenticated session (AUTH_OK) and the server's frame limit, the closed state, and the
  request/reply matching (:meth:`Link.request` waits for a connection, sends, and repeats an
  idempotent request on the next connection when this one is lost), plus the heartbeat.
- :class:`OutSend` is a SEND on its way: what the outbox (:mod:`gochat.client.recovery`) keeps
  and what a connection matches a SEND_ACK or ERROR to by rid.

Nothing here knows about sequence tracking, gaps or reconnecting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeVar

from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport

from gochat.client.errors import ClientClosedError, ConnectionLostError, error_for
from gochat.client.types import SendAck
from gochat.errors import ErrorCode, GochatError, ProtocolError
from gochat.protocol import decode, encode
from gochat.protocol import frames as F

__all__ = ["Connection", "FrameHandler", "Link", "OutSend", "expect", "silence"]

log = logging.getLogger("gochat.client")

_T = TypeVar("_T")
_MAX_RID: Final = 0xFFFFFFFF


def silence(fut: asyncio.Future[Any]) -> None:
    """Mark a future's exception as retrieved (nobody may await it any more)."""
    fut.add_done_callback(lambda f: f.cancelled() or f.exception())


def expect(reply: Any, cls: type[_T]) -> _T:
    """``reply`` if it is a ``cls`` frame; otherwise raise ProtocolError UNEXPECTED_OP."""
    if not isinstance(reply, cls):
        raise ProtocolError(f"expected {cls.__name__}, got {type(reply).__name__}",
                            code=ErrorCode.UNEXPECTED_OP)
    return reply


@dataclass(eq=False, slots=True)
class OutSend:
    """A SEND waiting for its SEND_ACK (kept across reconnects, keyed by client_msg_id)."""

    frame: F.Send
    fut: asyncio.Future[SendAck]
    rid: int = 0  # rid on the current connection; 0 = not on the wire
    errors: int = 0  # retryable ERRORs so far
    retry: asyncio.TimerHandle | None = None


class FrameHandler(Protocol):
    """What a :class:`Connection` reports to (the client)."""

    def _on_frame(self, conn: Connection, f: Any) -> None: ...

    def _on_disconnected(self, conn: Connection) -> None: ...


class Connection(WSListener):  # type: ignore[misc]
    """One WebSocket connection (picows listener); lives until the socket closes."""

    def __init__(self, client: FrameHandler, url: str, max_frame: int) -> None:
        super().__init__()
        self.client = client
        self.url = url
        self.max_frame = max_frame
        self.transport: WSTransport | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        #: rid -> future of a request's reply frame
        self.pending: dict[int, asyncio.Future[Any]] = {}
        #: rid -> SEND waiting for its ack on this connection
        self.sends: dict[int, OutSend] = {}
        self.auth: F.AuthOk | None = None
        #: connection-level ERROR (rid 0), or the error named by a 4xxx close code
        self.error: GochatError | None = None
        self.close_code = 0
        self.goaway: F.GoAway | None = None
        self.hb_rid = 0
        self.hb_sent = 0.0
        self.last_rx = time.monotonic()
        self.opened = time.monotonic()
        self.tasks: list[asyncio.Task[Any]] = []
        self._frag: bytearray | None = None

    @property
    def closed(self) -> bool:
        return self.done.done()

    # -- picows callbacks ------------------------------------------------------------------

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        self.last_rx = time.monotonic()
        mt = frame.msg_type
        if mt == WSMsgType.BINARY:
            if frame.fin:
                self._on_data(frame.get_payload_as_bytes())
            else:
                self._frag = bytearray(frame.get_payload_as_memoryview())
        elif mt == WSMsgType.CONTINUATION:
            if self._frag is None:
                self._violation("continuation frame without a message")
                return
            self._frag += frame.get_payload_as_memoryview()
            if frame.fin:
                data, self._frag = bytes(self._frag), None
                self._on_data(data)
        elif mt == WSMsgType.CLOSE:
            code = int(frame.get_close_code().value)
            self.close_code = code
            if 4000 <= code < 5000 and self.error is None:
                self.error = error_for(code - 4000, frame.get_close_reason() or "")
            with contextlib.suppress(Exception):
                transport.send_close(WSCloseCode.OK)
            transport.disconnect()
        elif mt == WSMsgType.TEXT:
            self._violation("text message from the server")

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.done.done():
            self.done.set_result(None)
        self.client._on_disconnected(self)

    # -- internals -------------------------------------------------------------------------

    def _violation(self, why: str) -> None:
        log.warning("protocol violation from %s: %s", self.url, why)
        self.error = ProtocolError(why)
        self.abort()

    def _on_data(self, data: bytes) -> None:
        try:
            frames = decode(data, max_frame=self.max_frame)
        except GochatError as e:
            self._violation(f"undecodable message: {e.message}")
            return
        for f in frames:
            try:
                self.client._on_frame(self, f)
            except Exception:  # a bug here must not silently kill the connection
                log.exception("error handling %r", f)

    def send_frame(self, frame: F.Frame) -> None:
        if self.transport is not None and not self.closed:
            self.transport.send(WSMsgType.BINARY, encode(frame))

    def send_frames(self, frames: Sequence[F.Frame], limit: int) -> None:
        """Send several frames, batched into WebSocket messages of at most ``limit`` bytes."""
        if self.transport is None or self.closed:
            return
        batch: list[bytes] = []
        size = 0
        for f in frames:
            b = encode(f)
            if batch and size + len(b) > limit:
                self.transport.send(WSMsgType.BINARY, b"".join(batch))
                batch, size = [], 0
            batch.append(b)
            size += len(b)
        if batch:
            self.transport.send(WSMsgType.BINARY, b"".join(batch))

    def close(self) -> None:
        """Close politely (CLOSE 1000, then the socket)."""
        if self.transport is not None and not self.closed:
            with contextlib.suppress(Exception):
                self.transport.send_close(WSCloseCode.OK)
            self.transport.disconnect()

    def abort(self) -> None:
        """Drop the socket without a close handshake."""
        if self.transport is not None and not self.closed:
            self.transport.disconnect(graceful=False)

    def fail_requests(self) -> None:
        """The socket is gone: fail the waiting requests, take the SENDs off the wire, and
        cancel the connection's tasks (except the calling one)."""
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(ConnectionLostError("connection lost"))
                silence(fut)
        self.pending.clear()
        for out in self.sends.values():
            out.rid = 0
        self.sends.clear()
        for t in self.tasks:
            if t is not asyncio.current_task():
                t.cancel()


class Link:
    """The client's side of the wire across connections (see the module docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, request_timeout: float, max_frame: int) -> None:
        self.loop = loop
        #: default timeout of a request (``Client.request_timeout``)
        self.request_timeout = request_timeout
        #: the authenticated connection in use, None while (re)connecting
        self.conn: Connection | None = None
        #: set while ``conn`` is up (or once closed, to wake the waiters)
        self.ready = asyncio.Event()
        self.closed = False
        #: the error that closed the client, if it was not closed on purpose
        self.fatal: GochatError | None = None
        #: the last AUTH_OK
        self.auth: F.AuthOk | None = None
        #: the largest frame the server accepts (from AUTH_OK; the client's setting before)
        self.server_max_frame = max_frame
        self._rid = 0

    def closed_error(self) -> GochatError:
        return self.fatal or ClientClosedError("client closed")

    def next_rid(self) -> int:
        self._rid = self._rid % _MAX_RID + 1
        return self._rid

    async def wait_ready(self, timeout: float | None) -> Connection:
        """The current connection, waiting up to ``timeout`` for one."""
        deadline = None if timeout is None else self.loop.time() + timeout
        while True:
            if self.closed:
                raise self.closed_error()
            conn = self.conn
            if conn is not None and not conn.closed:
                return conn
            if conn is None:
                self.ready.clear()
            remaining = None if deadline is None else max(deadline - self.loop.time(), 0.0)
            if remaining == 0.0:
                raise TimeoutError("not connected")
            try:
                await asyncio.wait_for(self.ready.wait(), remaining)
            except TimeoutError:
                raise TimeoutError("not connected") from None

    async def request_on(self, conn: Connection, frame: F.Frame, timeout: float | None) -> Any:
        """Send ``frame`` on ``conn`` with a new rid and return the reply frame."""
        if conn.closed:
            raise ConnectionLostError("connection closed")
        rid = self.next_rid()
        frame.rid = rid
        fut: asyncio.Future[Any] = self.loop.create_future()
        conn.pending[rid] = fut
        try:
            conn.send_frame(frame)
            return await asyncio.wait_for(fut, timeout)
        finally:
            conn.pending.pop(rid, None)

    async def request(self, frame: F.Frame, *, retry: bool, timeout: float | None = None) -> Any:
        """Send ``frame`` on the current connection (waiting for one) and return the reply.

        ``retry``: the request is idempotent; repeat it on the next connection if the current
        one is lost before the reply.
        """
        t = self.request_timeout if timeout is None else timeout
        deadline = self.loop.time() + t
        while True:
            conn = await self.wait_ready(max(deadline - self.loop.time(), 0.0))
            try:
                return await self.request_on(conn, frame, max(deadline - self.loop.time(), 0.001))
            except ConnectionLostError:
                if not retry or self.closed:
                    raise
                if self.loop.time() >= deadline:
                    raise TimeoutError("request timed out (connection lost)") from None

    async def heartbeat(self, conn: Connection, interval: float | None) -> None:
        """PING ``conn`` every ``interval`` seconds (default: half the server's heartbeat); a
        PING unanswered for twice that, with nothing else received, aborts the connection."""
        hb_ms = conn.auth.heartbeat_ms if conn.auth is not None else 0
        interval = interval or (hb_ms / 2000 if hb_ms else 15.0)
        timeout = 2 * interval
        while not conn.closed:
            await asyncio.sleep(interval)
            if conn.closed:
                return
            now = time.monotonic()
            if conn.hb_rid and now - conn.hb_sent > timeout and now - conn.last_rx > timeout:
                log.warning("no PONG from %s within %.1fs: connection is dead", conn.url, timeout)
                conn.error = conn.error or ConnectionLostError("heartbeat timeout")
                conn.abort()
                return
            if not conn.hb_rid:
                conn.hb_rid = self.next_rid()
                conn.hb_sent = now
                conn.send_frame(F.Ping(b"", rid=conn.hb_rid))
