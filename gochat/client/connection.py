"""The gochat asyncio client: one logical session over picows WebSocket connections.

:class:`Client` keeps a single logical session alive across connections: it reconnects with
exponential backoff and jitter, re-authenticates (asking a token callable for a fresh token),
re-subscribes rooms, re-sends every unacknowledged SEND with its original ``client_msg_id``,
and resumes with SYNC + HISTORY so that the application sees every message exactly once and in
seq order per conversation. See ``docs/client.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, TypeVar

import orjson
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from gochat.client.discovery import GatewayBalancer
from gochat.client.errors import (
    ClientClosedError,
    ConnectionLostError,
    error_for,
    is_auth_fatal,
)
from gochat.client.state import Backoff, SeqTracker
from gochat.client.types import (
    ConversationState,
    ConvKey,
    Event,
    HistoryResult,
    Message,
    SendAck,
)
from gochat.errors import AuthError, ErrorCode, GochatError, ProtocolError, RequestError
from gochat.protocol import decode, encode
from gochat.protocol import frames as F
from gochat.protocol.constants import (
    CLIENT_MSG_ID_SIZE,
    DEFAULT_MAX_FRAME,
    FLAG_BACKWARD,
    FLAG_DUPLICATE,
    FLAG_MORE,
    FLAG_STOPPED,
    HEADER_SIZE,
    MAX_HISTORY_LIMIT,
    MAX_METHOD,
    SEND_FIXED_SIZE,
    SYNC_ENTRY_SIZE,
    ContentType,
    Kind,
)

__all__ = ["Client", "Item", "TokenArg", "new_client_msg_id"]

log = logging.getLogger("gochat.client")

#: What :meth:`Client.connect` accepts as a token: a string, or an async callable returning one.
TokenArg = str | Callable[[], Awaitable[str]]
#: What the event stream yields.
Item = Message | Event

_T = TypeVar("_T")
_MAX_RID: Final = 0xFFFFFFFF
#: Largest seq to ask a backward HISTORY for "the newest messages" (fits a signed 64-bit store).
NEWEST: Final = (1 << 63) - 1
_CLOSED: Final = object()



def new_client_msg_id() -> bytes:
    """A fresh ``client_msg_id``: a UUIDv7 (RFC 9562), 48 bits of Unix milliseconds then 74
    random bits. Time-ordered ids keep the server's dedup index (sender, client_msg_id) a
    mostly-appending b-tree instead of one random page write per message."""
    ms = time.time_ns() // 1_000_000
    value = (ms & 0xFFFF_FFFF_FFFF) << 80 | int.from_bytes(os.urandom(10), "big")
    value = value & ~(0xF << 76) | 0x7 << 76  # version 7
    value = value & ~(0x3 << 62) | 0x2 << 62  # variant 10
    return value.to_bytes(16, "big")

class _AuthRejected(Exception):
    """Internal: authentication failed and no new token is available (fatal)."""

    def __init__(self, error: GochatError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass(eq=False, slots=True)
class _OutSend:
    """A SEND waiting for its SEND_ACK (kept across reconnects, keyed by client_msg_id)."""

    frame: F.Send
    fut: asyncio.Future[SendAck]
    rid: int = 0  # rid on the current connection; 0 = not on the wire
    errors: int = 0  # retryable ERRORs so far
    retry: asyncio.TimerHandle | None = None


class _Connection(WSListener):  # type: ignore[misc]
    """One WebSocket connection (picows listener); lives until the socket closes."""

    def __init__(self, client: Client, url: str, max_frame: int) -> None:
        super().__init__()
        self.client = client
        self.url = url
        self.max_frame = max_frame
        self.transport: WSTransport | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        #: rid -> future of a request's reply frame
        self.pending: dict[int, asyncio.Future[Any]] = {}
        #: rid -> SEND waiting for its ack on this connection
        self.sends: dict[int, _OutSend] = {}
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


class Client:
    """An asyncio gochat client. Create it with :meth:`connect`::

        async with await Client.connect("ws://127.0.0.1:8700/ws", token) as client:
            ack = await client.send(Kind.DIRECT, bob_id, "hi")
            async for item in client:
                ...

    The event stream (``async for`` / :meth:`next_event`) yields :class:`Message` (DELIVER, and
    messages recovered after a reconnect or a seq gap) and :class:`Event` objects, in arrival
    order, every message exactly once and in seq order per conversation. Messages this client
    sent itself are reported by :meth:`send` (its :class:`SendAck`), not by the stream; messages
    sent from the user's other devices are in the stream.

    Every method is a coroutine safe to call from several tasks at once; requests carry their
    own rids and complete independently.
    """

    def __init__(
        self,
        urls: Sequence[str] | GatewayBalancer,
        token: TokenArg,
        *,
        reconnect: bool = True,
        backoff_initial: float = 0.2,
        backoff_max: float = 10.0,
        request_timeout: float = 10.0,
        max_frame: int = DEFAULT_MAX_FRAME,
        connect_timeout: float | None = None,
        resume: Mapping[ConvKey, int] | None = None,
        heartbeat_interval: float | None = None,
        gap_fill_delay: float = 0.1,
        max_send_retries: int = 8,
        on_state: Callable[[str], None] | None = None,
    ) -> None:
        """Use :meth:`connect`; the constructor does no I/O."""
        self._balancer: GatewayBalancer | None = None
        if isinstance(urls, GatewayBalancer):
            # discovery: URLs come from GET /v1/gateways, picked by the balancer's strategy
            self._balancer, urls = urls, ["(discovered)"]
        if not urls:
            raise ValueError("at least one URL is required")
        self._urls = list(urls)
        self._url_idx = 0
        if isinstance(token, str):
            self._token_str: str | None = token
            self._token_fn: Callable[[], Awaitable[str]] | None = None
        else:
            self._token_str = None
            self._token_fn = token
        self._next_token: str | None = None
        self._reconnect = reconnect
        self._backoff = Backoff(backoff_initial, max(backoff_max, backoff_initial))
        self.request_timeout = request_timeout
        self._max_frame = max_frame
        self._connect_timeout = request_timeout if connect_timeout is None else connect_timeout
        self._heartbeat_interval = heartbeat_interval
        self._gap_fill_delay = gap_fill_delay
        self._max_send_retries = max_send_retries
        self._on_state = on_state

        self._loop = asyncio.get_running_loop()
        self._rid = 0
        self._conn: _Connection | None = None
        self._ready = asyncio.Event()
        self._closed = False
        self._fatal: GochatError | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._outbox: dict[bytes, _OutSend] = {}
        self._rooms: set[int] = set()
        self._fills: dict[ConvKey, asyncio.Task[None]] = {}
        self._resume = dict(resume) if resume is not None else None
        self._tracker = SeqTracker(self._resume.items() if self._resume else (),
                                   complete=self._resume is not None)
        self._auth: F.AuthOk | None = None
        self._server_max_frame = max_frame
        self._last_goaway: F.GoAway | None = None

    # ------------------------------------------------------------------------------------
    # lifecycle
    # ------------------------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        url: str | Sequence[str] | GatewayBalancer,
        token: TokenArg,
        *,
        reconnect: bool = True,
        backoff_initial: float = 0.2,
        backoff_max: float = 10.0,
        request_timeout: float = 10.0,
        max_frame: int = DEFAULT_MAX_FRAME,
        connect_timeout: float | None = None,
        resume: Mapping[ConvKey, int] | None = None,
        heartbeat_interval: float | None = None,
        gap_fill_delay: float = 0.1,
        max_send_retries: int = 8,
        on_state: Callable[[str], None] | None = None,
    ) -> Client:
        """Connect, authenticate and start the session; returns once it is usable.

        :param url: a WebSocket URL, or several: they are tried in order, moving to the next
            one on every failure (round-robin).
        :param token: an access token, or an async callable returning one. The callable is
            asked before every connection attempt, so it can refresh tokens; when the server
            rejects a token (errors 200-202) it is asked again (after ``invalidate(token)`` if
            it has such a method) and the client gives up only if it returns the same token.
        :param reconnect: reconnect after a lost connection (and keep trying the first
            connection until ``connect_timeout``). With False a lost connection closes the
            client.
        :param backoff_initial: first reconnect delay in seconds; doubles per failed attempt
            up to ``backoff_max``, with up to 50 % random jitter.
        :param request_timeout: default timeout of every request except :meth:`send`.
        :param max_frame: the largest frame accepted before the server announces its own limit
            (and the floor of the limit afterwards).
        :param connect_timeout: how long the first connection may take, retries included
            (default ``request_timeout``).
        :param resume: ``{(kind, conv_id): seq}`` the application has already seen (for
            example saved from :meth:`positions` by a previous run). Messages after those seqs
            are fetched and emitted; conversations not listed are fetched from seq 1. Without
            it, everything stored before the connection counts as history: the stream starts
            with what arrives afterwards (and :meth:`history` reads the past).
        :param heartbeat_interval: seconds between client PINGs (default: half the server's
            ``heartbeat_ms``). A PING unanswered for twice this long, with nothing else received
            meanwhile, counts as a dead connection.
        :param gap_fill_delay: how long a seq gap may stay open before HISTORY fills it, so
            that replies crossing on the wire do not cause needless fetches.
        :param max_send_retries: how often a SEND answered by a retryable ERROR (rate limited,
            unavailable, overloaded) is retried before :meth:`send` raises.
        :param on_state: called with ``"connected"``, ``"disconnected"`` and ``"closed"``.
        :raises AuthError: the token was rejected.
        :raises ConnectionLostError: no server could be reached within ``connect_timeout``.
        """
        urls: Sequence[str] | GatewayBalancer = (
            [url] if isinstance(url, str) else url if isinstance(url, GatewayBalancer) else list(url)
        )
        self = cls(urls, token, reconnect=reconnect, backoff_initial=backoff_initial,
                   backoff_max=backoff_max, request_timeout=request_timeout, max_frame=max_frame,
                   connect_timeout=connect_timeout, resume=resume,
                   heartbeat_interval=heartbeat_interval, gap_fill_delay=gap_fill_delay,
                   max_send_retries=max_send_retries, on_state=on_state)
        first: asyncio.Future[None] = self._loop.create_future()
        self._supervisor = asyncio.create_task(self._run(first), name="gochat-client")
        try:
            await first
        except BaseException:
            await self.close()
            raise
        return self

    async def close(self) -> None:
        """Close the session: pending sends and requests fail with :class:`ClientClosedError`,
        the event stream ends after the items already queued. Safe to call more than once."""
        self._shutdown(None)
        sup = self._supervisor
        if sup is not None and sup is not asyncio.current_task():
            if not sup.done():
                sup.cancel()
            with contextlib.suppress(BaseException):
                await sup
        tasks = list(self._fills.values())
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def _shutdown(self, error: GochatError | None) -> None:
        """Stop everything now (synchronous part of close and of fatal errors)."""
        if self._closed:
            return
        self._closed = True
        if error is not None:
            self._fatal = error
        exc: GochatError = error or ClientClosedError("client closed")
        conn = self._conn
        self._conn = None
        if conn is not None:
            conn.close()
        self._ready.set()  # wake waiters: they see _closed
        for out in list(self._outbox.values()):
            if out.retry is not None:
                out.retry.cancel()
            if not out.fut.done():
                out.fut.set_exception(exc)
                _silence(out.fut)
        self._outbox.clear()
        for t in self._fills.values():
            t.cancel()
        self._queue.put_nowait(_CLOSED)
        self._notify("closed")

    def _closed_error(self) -> GochatError:
        return self._fatal or ClientClosedError("client closed")

    # ------------------------------------------------------------------------------------
    # properties
    # ------------------------------------------------------------------------------------

    @property
    def user_id(self) -> int:
        """The authenticated user's id."""
        return self._auth.user_id if self._auth is not None else 0

    @property
    def session_id(self) -> int:
        """The id of the current server session (changes on every reconnect)."""
        return self._auth.session_id if self._auth is not None else 0

    @property
    def heartbeat_ms(self) -> int:
        return self._auth.heartbeat_ms if self._auth is not None else 0

    @property
    def max_frame(self) -> int:
        """The largest frame the server accepts (from AUTH_OK)."""
        return self._server_max_frame

    @property
    def connected(self) -> bool:
        """True while an authenticated connection is up."""
        return self._conn is not None and not self._closed

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def url(self) -> str | None:
        """The URL of the current connection."""
        return self._conn.url if self._conn is not None else None

    @property
    def last_goaway(self) -> F.GoAway | None:
        """The last GOAWAY received (``code``, ``retry_after_ms``, ``url``, ``reason``), if any."""
        return self._last_goaway

    @property
    def unacknowledged(self) -> int:
        """Sends still waiting for their SEND_ACK."""
        return len(self._outbox)

    def positions(self) -> dict[ConvKey, int]:
        """``{(kind, conv_id): seq}`` up to which the application has seen every message; pass it
        as ``resume=`` to a later :meth:`connect` to continue where this session stopped."""
        return self._tracker.positions()

    # ------------------------------------------------------------------------------------
    # event stream
    # ------------------------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[Item]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Item]:
        while True:
            try:
                yield await self.next_event()
            except ClientClosedError:
                return

    async def next_event(self, timeout: float | None = None) -> Item:
        """The next :class:`Message` or :class:`Event`.

        :raises TimeoutError: nothing arrived within ``timeout`` seconds.
        :raises ClientClosedError: the client is closed and every queued item was consumed (or
            the fatal error that closed it, e.g. :class:`AuthError`).
        """
        if self._queue.empty() and self._closed:
            raise self._closed_error()
        if timeout is None:
            item = await self._queue.get()
        else:
            item = await asyncio.wait_for(self._queue.get(), timeout)
        if item is _CLOSED:
            self._queue.put_nowait(_CLOSED)
            raise self._closed_error()
        return item  # type: ignore[no-any-return]

    def pending_events(self) -> int:
        """Items queued in the event stream."""
        return self._queue.qsize()

    def _emit(self, items: Iterable[Item]) -> None:
        for it in items:
            self._queue.put_nowait(it)

    def _notify(self, state: str) -> None:
        if self._on_state is not None:
            try:
                self._on_state(state)
            except Exception:
                log.exception("on_state callback failed")

    # ------------------------------------------------------------------------------------
    # requests
    # ------------------------------------------------------------------------------------

    def _next_rid(self) -> int:
        self._rid = self._rid % _MAX_RID + 1
        return self._rid

    async def _wait_ready(self, timeout: float | None) -> _Connection:
        deadline = None if timeout is None else self._loop.time() + timeout
        while True:
            if self._closed:
                raise self._closed_error()
            conn = self._conn
            if conn is not None and not conn.closed:
                return conn
            if conn is None:
                self._ready.clear()
            remaining = None if deadline is None else max(deadline - self._loop.time(), 0.0)
            if remaining == 0.0:
                raise TimeoutError("not connected")
            try:
                await asyncio.wait_for(self._ready.wait(), remaining)
            except TimeoutError:
                raise TimeoutError("not connected") from None

    async def _request_on(self, conn: _Connection, frame: F.Frame, timeout: float | None) -> Any:
        if conn.closed:
            raise ConnectionLostError("connection closed")
        rid = self._next_rid()
        frame.rid = rid
        fut: asyncio.Future[Any] = self._loop.create_future()
        conn.pending[rid] = fut
        try:
            conn.send_frame(frame)
            return await asyncio.wait_for(fut, timeout)
        finally:
            conn.pending.pop(rid, None)

    async def _request(self, frame: F.Frame, *, retry: bool, timeout: float | None = None) -> Any:
        """Send ``frame`` on the current connection (waiting for one) and return the reply.

        ``retry``: the request is idempotent; repeat it on the next connection if the current
        one is lost before the reply.
        """
        t = self.request_timeout if timeout is None else timeout
        deadline = self._loop.time() + t
        while True:
            conn = await self._wait_ready(max(deadline - self._loop.time(), 0.0))
            try:
                return await self._request_on(conn, frame, max(deadline - self._loop.time(), 0.001))
            except ConnectionLostError:
                if not retry or self._closed:
                    raise
                if self._loop.time() >= deadline:
                    raise TimeoutError("request timed out (connection lost)") from None

    @staticmethod
    def _expect(reply: Any, cls: type[_T]) -> _T:
        if not isinstance(reply, cls):
            raise ProtocolError(f"expected {cls.__name__}, got {type(reply).__name__}",
                                code=ErrorCode.UNEXPECTED_OP)
        return reply

    async def send(
        self,
        kind: int,
        conv_id: int,
        body: bytes | str,
        *,
        content_type: int | None = None,
        client_msg_id: bytes | None = None,
        timeout: float | None = None,
    ) -> SendAck:
        """Send a message and wait until the server has stored it.

        A ``str`` body is sent UTF-8 encoded with content type TEXT, ``bytes`` with BINARY,
        unless ``content_type`` says otherwise. ``client_msg_id`` (16 bytes) defaults to a
        fresh UUID4; sending again with the same id never creates a second message.

        The send survives reconnects: it is re-sent with the same ``client_msg_id`` on every
        new connection until acknowledged, and resolves with the original ack (``duplicate``
        set when the server had already stored it). ``timeout`` (default: none) bounds the
        whole wait; on timeout or cancellation the client stops retrying, and the message may
        or may not have been stored (retry with the same ``client_msg_id`` to find out).

        :raises RequestError: not a member (NOT_MEMBER), body empty or too large, ...
        :raises ClientClosedError: the client was closed before the ack.
        """
        if self._closed:
            raise self._closed_error()
        if isinstance(body, str):
            data = body.encode("utf-8")
            ct = ContentType.TEXT if content_type is None else content_type
        else:
            data = bytes(body)
            ct = ContentType.BINARY if content_type is None else content_type
        if kind not in (Kind.DIRECT, Kind.GROUP, Kind.ROOM):
            raise ValueError(f"invalid conversation kind {kind}")
        if not 0 <= ct <= 255:
            raise ValueError(f"invalid content type {ct}")
        cmid = new_client_msg_id() if client_msg_id is None else bytes(client_msg_id)
        if len(cmid) != CLIENT_MSG_ID_SIZE:
            raise ValueError("client_msg_id must be 16 bytes")
        if HEADER_SIZE + SEND_FIXED_SIZE + len(data) > self._server_max_frame:
            raise RequestError(f"message of {len(data)} bytes exceeds the frame limit",
                               code=ErrorCode.BODY_TOO_LARGE)
        out = self._outbox.get(cmid)
        if out is None:
            out = _OutSend(F.Send(int(kind), int(ct), conv_id, cmid, data), self._loop.create_future())
            self._outbox[cmid] = out
            conn = self._conn
            if conn is not None and not conn.closed:
                self._transmit(conn, out)
        try:
            if timeout is None:
                return await asyncio.shield(out.fut)
            return await asyncio.wait_for(asyncio.shield(out.fut), timeout)
        except (asyncio.CancelledError, TimeoutError):
            self._drop_send(out)
            raise

    def _drop_send(self, out: _OutSend) -> None:
        if self._outbox.get(out.frame.client_msg_id) is out:
            del self._outbox[out.frame.client_msg_id]
        if out.retry is not None:
            out.retry.cancel()
        conn = self._conn
        if conn is not None and out.rid:
            conn.sends.pop(out.rid, None)
        if not out.fut.done():
            out.fut.cancel()

    def _transmit(self, conn: _Connection, out: _OutSend) -> None:
        if out.retry is not None:
            out.retry.cancel()
            out.retry = None
        if out.rid:
            conn.sends.pop(out.rid, None)
        rid = self._next_rid()
        out.rid = rid
        out.frame.rid = rid
        conn.sends[rid] = out
        conn.send_frame(out.frame)

    def _retransmit(self, out: _OutSend) -> None:
        out.retry = None
        conn = self._conn
        if conn is not None and not conn.closed and self._outbox.get(out.frame.client_msg_id) is out:
            self._transmit(conn, out)

    async def sync(self, known: Mapping[ConvKey, int] | None = None, *,
                   timeout: float | None = None) -> list[ConversationState]:
        """Resynchronise: SYNC, then fetch every missed message with HISTORY into the stream.

        ``known`` declares positions the application has seen (``{(kind, conv_id): seq}``),
        overriding what the client tracked (a lower seq makes the messages after it be emitted
        again). The client does this by itself after every reconnect; call it to catch up from
        saved positions. Returns the SYNC_RESULT: every conversation with messages after the
        positions sent. When it returns, the recovered messages are in the event stream.
        """
        if known:
            for key, seq in known.items():
                self._emit(self._tracker.set_position(key, seq))
        wait = self.request_timeout if timeout is None else timeout
        deadline = self._loop.time() + wait
        while True:
            conn = await self._wait_ready(max(deadline - self._loop.time(), 0.0))
            try:
                states = await self._sync_on(conn, max(deadline - self._loop.time(), 0.001))
                break
            except ConnectionLostError:
                if self._closed or self._loop.time() >= deadline:
                    raise
        tasks = [t for k in {s.key for s in states} if (t := self._fills.get(k)) is not None]
        if tasks:
            remaining = max(deadline - self._loop.time(), 0.001)
            await asyncio.wait([asyncio.shield(t) for t in tasks], timeout=remaining)
        return states

    async def _sync_on(self, conn: _Connection, timeout: float | None, *,
                       baseline: bool = False) -> list[ConversationState]:
        """SYNC with the tracked positions on ``conn``; note the results and start gap fills.

        With ``baseline`` the tracker is empty and the result is taken as already seen.
        """
        positions = [(k, s) for k, s in self._tracker.positions().items() if k[0] != Kind.ROOM]
        per_frame = max(1, min(0xFFFF, (self._server_max_frame - HEADER_SIZE - 2) // SYNC_ENTRY_SIZE))
        chunks = [positions[i:i + per_frame] for i in range(0, len(positions), per_frame)] or [[]]
        all_sent = {k for k, _ in positions}
        states: dict[ConvKey, ConversationState] = {}
        for chunk in chunks:
            frame = F.Sync([F.SyncEntry(k[0], k[1], s) for k, s in chunk])
            reply = self._expect(await self._request_on(conn, frame, timeout), F.SyncResult)
            sent = {k for k, _ in chunk}
            for e in reply.entries:
                key = (e.kind, e.conv_id)
                # a conversation in another chunk was reported only because this chunk did
                # not mention it; its own chunk's answer is authoritative
                if key in sent or key not in all_sent:
                    states[key] = ConversationState(e.kind, e.conv_id, e.last_seq, e.read_seq)
        result = list(states.values())
        if baseline:
            self._tracker.set_baseline((s.key, s.last_seq) for s in result)
        else:
            for s in result:
                self._tracker.note_last_seq(s.key, s.last_seq)
        for key in self._tracker.gaps():
            self._schedule_fill(key, 0.0)
        return result

    async def history(self, kind: int, conv_id: int, from_seq: int = 1, limit: int = 100,
                      backward: bool = False, *, timeout: float | None = None) -> HistoryResult:
        """One page of stored messages.

        Forward: up to ``limit`` messages from ``from_seq`` on. Backward: the newest ``limit``
        messages at or below ``from_seq`` (use :data:`NEWEST` for the latest), still returned in
        ascending seq order as the server sends them. ``more`` is set when the server has more
        in that direction. Messages returned here count as seen: the stream will not emit them.
        """
        if not 1 <= limit <= MAX_HISTORY_LIMIT:
            raise ValueError(f"limit must be 1..{MAX_HISTORY_LIMIT}")
        frame = F.History(int(kind), conv_id, from_seq, limit, flags=FLAG_BACKWARD if backward else 0)
        reply = self._expect(await self._request(frame, retry=True, timeout=timeout), F.HistoryResult)
        msgs = [Message.from_record(r) for r in reply.messages]
        for m in sorted(msgs, key=lambda m: m.seq):
            self._emit(self._tracker.mark_seen(m))
        return HistoryResult(reply.kind, reply.conv_id, msgs, bool(reply.flags & FLAG_MORE))

    async def fetch_all(self, kind: int, conv_id: int, after_seq: int = 0, *,
                        page: int = MAX_HISTORY_LIMIT) -> list[Message]:
        """Every stored message of the conversation with ``seq > after_seq``, paging through
        HISTORY until MORE is clear."""
        out: list[Message] = []
        nxt = after_seq + 1
        while True:
            res = await self.history(kind, conv_id, nxt, page)
            out.extend(res.messages)
            if not res.more or not res.messages:
                return out
            nxt = res.messages[-1].seq + 1

    async def read(self, kind: int, conv_id: int, seq: int) -> None:
        """Store the read position (never moves backwards); others get EVENT READ."""
        self._expect(await self._request(F.Read(int(kind), conv_id, seq), retry=True), F.ReadOk)

    async def subscribe(self, room_id: int) -> None:
        """Join room ``room_id``'s broadcast (re-subscribed automatically after reconnects)."""
        self._rooms.add(room_id)
        try:
            self._expect(await self._request(F.Subscribe(room_id), retry=True), F.SubscribeOk)
        except BaseException:
            self._rooms.discard(room_id)
            raise

    async def unsubscribe(self, room_id: int) -> None:
        """Leave room ``room_id``'s broadcast."""
        self._rooms.discard(room_id)
        self._expect(await self._request(F.Unsubscribe(room_id), retry=True), F.UnsubscribeOk)

    async def typing(self, kind: int, conv_id: int, stopped: bool = False) -> None:
        """Announce typing (or that it stopped); best effort, dropped while disconnected."""
        conn = self._conn
        if conn is not None and not conn.closed:
            conn.send_frame(F.Typing(int(kind), conv_id, rid=self._next_rid(),
                                     flags=FLAG_STOPPED if stopped else 0))

    async def call(self, method: str, payload: Mapping[str, Any] | None = None, *,
                   timeout: float | None = None) -> dict[str, Any]:
        """Invoke a server method (``group.create``, ``conversation.list``, ...) and return
        its JSON result. Not retried across reconnects: a lost connection raises
        :class:`ConnectionLostError`.
        """
        if not 1 <= len(method.encode()) <= MAX_METHOD:
            raise ValueError("method name must be 1..64 bytes")
        body = orjson.dumps(dict(payload)) if payload else b""
        reply = self._expect(await self._request(F.Call(method, body), retry=False, timeout=timeout),
                             F.CallResult)
        if not reply.payload:
            return {}
        try:
            result = orjson.loads(reply.payload)
        except orjson.JSONDecodeError as e:
            raise ProtocolError("CALL_RESULT is not JSON", code=ErrorCode.BAD_BODY) from e
        return result if isinstance(result, dict) else {"result": result}

    async def ping(self, *, timeout: float | None = None) -> float:
        """Round-trip a PING; returns the time in seconds."""
        t0 = time.perf_counter()
        self._expect(await self._request(F.Ping(b"ping"), retry=True, timeout=timeout), F.Pong)
        return time.perf_counter() - t0

    # ------------------------------------------------------------------------------------
    # incoming frames
    # ------------------------------------------------------------------------------------

    def _on_frame(self, conn: _Connection, f: Any) -> None:
        if isinstance(f, F.Deliver):
            self._on_message(Message.from_record(f.message))
        elif isinstance(f, F.SendAck):
            self._on_send_ack(conn, f)
        elif isinstance(f, F.Event):
            self._emit((Event.from_frame(f),))
        elif isinstance(f, F.Error):
            self._on_error(conn, f)
        elif isinstance(f, F.GoAway):
            log.info("GOAWAY from %s: code %d retry after %d ms url %r: %s",
                     conn.url, f.code, f.retry_after_ms, f.url, f.reason)
            conn.goaway = f
            self._last_goaway = f
            conn.close()
        elif isinstance(f, F.Pong) and f.rid and f.rid == conn.hb_rid:
            conn.hb_rid = 0
        else:
            fut = conn.pending.pop(f.rid, None) if f.rid else None
            if fut is not None and not fut.done():
                fut.set_result(f)
            else:
                log.debug("unsolicited %r", f)

    def _on_message(self, m: Message) -> None:
        self._emit(self._tracker.on_message(m))
        if m.seq and self._tracker.gap(m.key) is not None:
            self._schedule_fill(m.key, self._gap_fill_delay)

    def _on_send_ack(self, conn: _Connection, f: F.SendAck) -> None:
        out = conn.sends.pop(f.rid, None)
        if out is None:
            log.debug("SEND_ACK for unknown rid %d", f.rid)
            return
        out.rid = 0
        cmid = out.frame.client_msg_id
        if self._outbox.get(cmid) is out:
            del self._outbox[cmid]
        key = (f.kind, f.conv_id)
        self._emit(self._tracker.on_own(key, f.seq))
        if f.seq and self._tracker.gap(key) is not None:
            self._schedule_fill(key, self._gap_fill_delay)
        if not out.fut.done():
            out.fut.set_result(SendAck(f.kind, f.conv_id, f.seq, f.msg_id, f.ts_ms, cmid,
                                       bool(f.flags & FLAG_DUPLICATE)))

    def _on_error(self, conn: _Connection, f: F.Error) -> None:
        err = error_for(f.code, f.message, f.retry_after_ms)
        if not f.rid:
            log.warning("connection error from %s: %r", conn.url, err)
            conn.error = err
            return
        out = conn.sends.pop(f.rid, None)
        if out is not None:
            out.rid = 0
            if err.spec.retryable and not err.fatal and out.errors < self._max_send_retries:
                out.errors += 1
                if f.retry_after_ms:
                    delay = self._backoff.spread(f.retry_after_ms / 1000)
                else:
                    delay = self._backoff.base(out.errors - 1)
                out.retry = self._loop.call_later(delay, self._retransmit, out)
                return
            if err.fatal:
                return  # the connection closes; the send is repeated on the next one
            if self._outbox.get(out.frame.client_msg_id) is out:
                del self._outbox[out.frame.client_msg_id]
            if not out.fut.done():
                out.fut.set_exception(err)
                _silence(out.fut)
            return
        if f.rid == conn.hb_rid:
            conn.hb_rid = 0
            return
        fut = conn.pending.pop(f.rid, None)
        if fut is not None and not fut.done():
            fut.set_exception(err)
        if err.fatal:
            conn.error = err

    # ------------------------------------------------------------------------------------
    # gap filling
    # ------------------------------------------------------------------------------------

    def _schedule_fill(self, key: ConvKey, delay: float) -> None:
        t = self._fills.get(key)
        if t is not None and not t.done():
            return
        if self._closed:
            return
        self._fills[key] = asyncio.create_task(self._fill(key, delay), name=f"gochat-fill-{key}")

    async def _fill(self, key: ConvKey, delay: float) -> None:
        """Fetch HISTORY until ``key`` has no gap; emit the recovered messages in order."""
        try:
            if delay > 0:
                await asyncio.sleep(delay)
            stalls = 0
            while not self._closed:
                start = self._tracker.gap(key)
                if start is None:
                    return
                target = self._tracker.target(key) or start
                limit = max(1, min(MAX_HISTORY_LIMIT, target - start + 1))
                try:
                    conn = await self._wait_ready(None)
                    reply = self._expect(
                        await self._request_on(conn, F.History(key[0], key[1], start, limit),
                                               self.request_timeout),
                        F.HistoryResult)
                except (ConnectionLostError, TimeoutError):
                    continue  # wait for the next connection
                except ClientClosedError:
                    return
                except GochatError as e:
                    if self._closed:
                        return
                    log.warning("cannot fill the gap of %s from seq %d: %r", key, start, e)
                    while self._tracker.gap(key) is not None:
                        self._emit(self._tracker.skip_gap(key))
                    return
                me = self.user_id
                for rec in sorted(reply.messages, key=lambda r: r.seq):
                    m = Message.from_record(rec)
                    own = m.sender_id == me and m.client_msg_id in self._outbox
                    self._emit(self._tracker.on_message(m, emit=not own))
                if (self._tracker.position(key) or 0) < start:
                    stalls += 1
                    if stalls >= 2 or not (reply.flags & FLAG_MORE):
                        log.warning("HISTORY of %s has no seq %d; skipping the gap", key, start)
                        self._emit(self._tracker.skip_gap(key))
                        stalls = 0
                else:
                    stalls = 0
        finally:
            if self._fills.get(key) is asyncio.current_task():
                del self._fills[key]

    # ------------------------------------------------------------------------------------
    # connection management
    # ------------------------------------------------------------------------------------

    async def _get_token(self) -> str:
        if self._next_token is not None:
            tok, self._next_token = self._next_token, None
            return tok
        if self._token_fn is not None:
            try:
                return await self._token_fn()
            except AuthError as e:  # e.g. the password is wrong: retrying cannot help
                raise _AuthRejected(e) from e
        assert self._token_str is not None
        return self._token_str

    async def _token_rejected(self, token: str, err: GochatError) -> None:
        """``token`` was refused with an auth-fatal error: get a new one or give up."""
        if self._token_fn is None:
            raise _AuthRejected(err)
        invalidate = getattr(self._token_fn, "invalidate", None)
        if callable(invalidate):
            invalidate(token)
        try:
            new = await self._token_fn()
        except GochatError as e:
            if isinstance(e, AuthError):
                raise _AuthRejected(e) from e
            raise
        if new == token:
            raise _AuthRejected(err)
        self._next_token = new

    async def _open(self, url: str) -> tuple[_Connection, str]:
        """Connect to ``url`` and authenticate; returns the connection and the token used."""
        token = await self._get_token()
        conn = _Connection(self, url, max(self._max_frame, self._server_max_frame))
        await asyncio.wait_for(
            ws_connect(lambda: conn, url, websocket_handshake_timeout=self.request_timeout,
                       enable_auto_ping=False, logger_name="gochat.client.ws"),
            self.request_timeout)
        try:
            reply = await self._request_on(conn, F.Auth(token), self.request_timeout)
            conn.auth = self._expect(reply, F.AuthOk)
        except BaseException as e:
            conn.abort()
            err = e if isinstance(e, GochatError) and not isinstance(e, ConnectionLostError) else conn.error
            if err is not None and 200 <= err.code < 300:
                await self._token_rejected(token, err)
                raise err from None
            raise
        return conn, token

    async def _run(self, first: asyncio.Future[None]) -> None:
        """The supervisor: connect, serve, reconnect — until closed or a fatal error."""
        deadline = self._loop.time() + self._connect_timeout
        delay = 0.0
        url_hint: str | None = None
        last_error: BaseException | None = None
        try:
            while not self._closed:
                if delay > 0:
                    await asyncio.sleep(delay)
                delay = 0.0
                url = url_hint or self._urls[self._url_idx]
                url_hint = None
                try:
                    if self._balancer is not None and url == self._urls[self._url_idx]:
                        url = await self._balancer.pick()
                    conn, token = await self._open(url)
                except _AuthRejected as e:
                    self._fail(e.error, first)
                    return
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    last_error = e
                    log.info("connecting to %s failed: %r", url, e)
                    if self._balancer is not None:
                        self._balancer.report_failure(url)
                    self._url_idx = (self._url_idx + 1) % len(self._urls)
                    if isinstance(e, GochatError) and 200 <= e.code < 300 and self._next_token is not None:
                        continue  # retry at once with the new token
                    if not first.done() and (not self._reconnect or self._loop.time() >= deadline):
                        err = e if isinstance(e, GochatError) else ConnectionLostError(f"cannot connect to {url}: {e!r}")
                        self._fail(err, first, cause=e)
                        return
                    delay = self._backoff.next()
                    if isinstance(e, GochatError) and e.retry_after_ms:
                        delay = max(delay, e.retry_after_ms / 1000)
                    if not first.done():
                        delay = min(delay, max(deadline - self._loop.time(), 0.0))
                    continue

                if self._balancer is not None:
                    self._balancer.report_success(url)
                await self._established(conn, first)
                await asyncio.shield(conn.done)
                self._lost(conn)
                if self._closed:
                    return
                if not first.done() and (not self._reconnect or self._loop.time() >= deadline):
                    self._fail(conn.error or ConnectionLostError("connection lost while connecting"), first)
                    return
                if self._loop.time() - conn.opened >= max(1.0, self._backoff.initial * 4):
                    self._backoff.reset()
                lost_err = conn.error
                ga = conn.goaway
                if ga is not None and is_auth_fatal(ga.code):
                    lost_err = lost_err or error_for(ga.code, ga.reason)
                if lost_err is not None and is_auth_fatal(lost_err.code):
                    try:
                        await self._token_rejected(token, lost_err)
                    except _AuthRejected as e:
                        self._fail(e.error, first)
                        return
                    except Exception as e:  # token callable failed: keep trying
                        log.info("token refresh failed: %r", e)
                if not self._reconnect and first.done():
                    self._fail(ConnectionLostError("connection lost"), first)
                    return
                if ga is not None:
                    delay = ga.retry_after_ms / 1000
                    if ga.url:
                        url_hint = ga.url
                    else:
                        self._url_idx = (self._url_idx + 1) % len(self._urls)
                else:
                    delay = self._backoff.next()
                    if lost_err is not None and lost_err.retry_after_ms:
                        delay = max(delay, lost_err.retry_after_ms / 1000)
        except asyncio.CancelledError:
            if not first.done():
                first.set_exception(ClientClosedError("client closed while connecting"))
            raise
        finally:
            if not first.done():
                first.set_exception(ConnectionLostError(f"not connected: {last_error!r}"))

    def _fail(self, err: GochatError, first: asyncio.Future[None], cause: BaseException | None = None) -> None:
        log.warning("gochat client giving up: %r", err)
        if cause is not None and cause is not err:
            err.__cause__ = cause
        if not first.done():
            first.set_exception(err)
        self._shutdown(err)

    async def _established(self, conn: _Connection, first: asyncio.Future[None]) -> None:
        """A connection is authenticated: restore the session on it."""
        auth = conn.auth
        assert auth is not None
        self._auth = auth
        if auth.max_frame:
            self._server_max_frame = auth.max_frame
            conn.max_frame = max(self._max_frame, auth.max_frame)
        log.info("connected to %s as user %d (session %d)", conn.url, auth.user_id, auth.session_id)
        # rooms first, then unacknowledged sends in their original order; all before any new
        # request so ordering per conversation is kept
        frames: list[F.Frame] = []
        for room in sorted(self._rooms):
            rid = self._next_rid()
            fut: asyncio.Future[Any] = self._loop.create_future()
            fut.add_done_callback(self._resubscribed(room))
            conn.pending[rid] = fut
            frames.append(F.Subscribe(room, rid=rid))
        limit = self._server_max_frame
        for out in list(self._outbox.values()):
            if HEADER_SIZE + SEND_FIXED_SIZE + len(out.frame.body) > limit:
                del self._outbox[out.frame.client_msg_id]
                if not out.fut.done():
                    out.fut.set_exception(RequestError("message exceeds the server's frame limit",
                                                       code=ErrorCode.BODY_TOO_LARGE))
                    _silence(out.fut)
                continue
            if out.retry is not None:
                out.retry.cancel()
                out.retry = None
            rid = self._next_rid()
            out.rid = rid
            out.frame.rid = rid
            conn.sends[rid] = out
            frames.append(out.frame)
        if frames:
            conn.send_frames(frames, limit)
        self._conn = conn
        self._ready.set()
        conn.tasks.append(asyncio.create_task(self._heartbeat(conn), name="gochat-heartbeat"))
        if first.done():
            conn.tasks.append(asyncio.create_task(self._resync(conn), name="gochat-resync"))
            self._notify("connected")
            return
        try:
            await self._sync_on(conn, self.request_timeout, baseline=self._resume is None)
        except (ConnectionLostError, TimeoutError) as e:
            log.info("initial SYNC failed: %r", e)
            conn.abort()
            return
        except GochatError as e:
            self._fail(e, first)
            return
        first.set_result(None)
        self._notify("connected")

    def _resubscribed(self, room: int) -> Callable[[asyncio.Future[Any]], None]:
        def done(fut: asyncio.Future[Any]) -> None:
            if fut.cancelled():
                return
            exc = fut.exception()
            if isinstance(exc, GochatError) and not isinstance(exc, ConnectionLostError):
                log.warning("re-subscribing room %d failed: %r", room, exc)
                self._rooms.discard(room)
        return done

    async def _resync(self, conn: _Connection) -> None:
        try:
            await self._sync_on(conn, self.request_timeout)
        except (ConnectionLostError, TimeoutError, ClientClosedError):
            pass
        except GochatError as e:
            log.warning("SYNC after reconnect failed: %r", e)

    def _lost(self, conn: _Connection) -> None:
        if self._conn is conn:
            self._conn = None
            if not self._closed:
                self._ready.clear()
                self._notify("disconnected")

    def _on_disconnected(self, conn: _Connection) -> None:
        """picows callback (via the listener): fail this connection's requests."""
        log.info("disconnected from %s (close code %d)", conn.url, conn.close_code)
        self._lost(conn)
        for fut in conn.pending.values():
            if not fut.done():
                fut.set_exception(ConnectionLostError("connection lost"))
                _silence(fut)
        conn.pending.clear()
        for out in conn.sends.values():
            out.rid = 0
        conn.sends.clear()
        for t in conn.tasks:
            if t is not asyncio.current_task():
                t.cancel()

    async def _heartbeat(self, conn: _Connection) -> None:
        hb_ms = conn.auth.heartbeat_ms if conn.auth is not None else 0
        interval = self._heartbeat_interval or (hb_ms / 2000 if hb_ms else 15.0)
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
                conn.hb_rid = self._next_rid()
                conn.hb_sent = now
                conn.send_frame(F.Ping(b"", rid=conn.hb_rid))


def _silence(fut: asyncio.Future[Any]) -> None:
    """Mark a future's exception as retrieved (nobody may await it any more)."""
    fut.add_done_callback(lambda f: f.cancelled() or f.exception())
