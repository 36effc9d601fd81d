"""The gochat asyncio client: one logical session over picows WebSocket connections.

:class:`Client` keeps a single logical session alive across connections: it reconnects with
exponential backoff and jitter, re-authenticates (asking a token callable for a fresh token),
re-subscribes rooms, re-sends every unacknowledged SEND with its original ``client_msg_id``,
and resumes with SYNC + HISTORY so that the application sees every message exactly once and in
seq order per conversation. See ``docs/client.md``.

This module holds the public :class:`Client` (its API, its lifecycle, and the dispatch of
incoming frames), :func:`new_client_msg_id` and :data:`NEWEST`; it re-exports :data:`Item` and
:data:`TokenArg`. The client is composed of:

- :mod:`gochat.client.options`: the settings (:class:`~gochat.client.options.ClientOptions`)
  and the reconnect backoff;
- :mod:`gochat.client.credentials`: the token for each connection attempt;
- :mod:`gochat.client.transport`: the WebSocket connection (picows listener, frame decoding)
  and request/reply matching by rid (:class:`~gochat.client.transport.Link`);
- :mod:`gochat.client.recovery`: the outbox of unacknowledged sends with retry, and seq
  tracking with SYNC and HISTORY gap fill;
- :mod:`gochat.client.supervisor`: the connect / restore / reconnect loop;
- :mod:`gochat.client.stream`: the queue of items the application reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Final

import orjson

from gochat.client.credentials import TokenArg, TokenProvider
from gochat.client.discovery import GatewayBalancer
from gochat.client.errors import ClientClosedError, error_for
from gochat.client.options import ClientOptions
from gochat.client.recovery import Catchup, Outbox
from gochat.client.state import SeqTracker
from gochat.client.stream import EventStream, Item
from gochat.client.supervisor import Supervisor
from gochat.client.transport import Connection, Link, expect
from gochat.client.types import (
    ConversationState,
    ConvKey,
    Event,
    HistoryResult,
    Message,
    SendAck,
)
from gochat.clock import now_ms
from gochat.errors import ErrorCode, GochatError, ProtocolError, RequestError
from gochat.protocol import frames as F
from gochat.protocol.constants import (
    CLIENT_MSG_ID_SIZE,
    DEFAULT_MAX_FRAME,
    FLAG_BACKWARD,
    FLAG_DUPLICATE,
    FLAG_MORE,
    FLAG_PARTIAL,
    FLAG_STOPPED,
    HEADER_SIZE,
    MAX_HISTORY_LIMIT,
    MAX_METHOD,
    SEND_FIXED_SIZE,
    ContentType,
    EventType,
    Kind,
)
from gochat.protocol.traceparent import parse_traceparent

__all__ = ["NEWEST", "Client", "Item", "TokenArg", "new_client_msg_id"]

log = logging.getLogger("gochat.client")

#: Largest seq to ask a backward HISTORY for "the newest messages" (fits a signed 64-bit store).
NEWEST: Final = (1 << 63) - 1


def new_client_msg_id() -> bytes:
    """A fresh ``client_msg_id``: a UUIDv7 (RFC 9562), 48 bits of Unix milliseconds then 74
    random bits. Time-ordered ids keep the server's dedup index (sender, client_msg_id) a
    mostly-appending b-tree instead of one random page write per message."""
    value = (now_ms() & 0xFFFF_FFFF_FFFF) << 80 | int.from_bytes(os.urandom(10), "big")
    value = value & ~(0xF << 76) | 0x7 << 76  # version 7
    value = value & ~(0x3 << 62) | 0x2 << 62  # variant 10
    return value.to_bytes(16, "big")


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
        balancer: GatewayBalancer | None = None
        if isinstance(urls, GatewayBalancer):
            # discovery: URLs come from GET /v1/gateways, picked by the balancer's strategy
            balancer, urls = urls, ["(discovered)"]
        if not urls:
            raise ValueError("at least one URL is required")
        url_list = list(urls)
        tokens = TokenProvider(token)
        options = ClientOptions(
            reconnect=reconnect, backoff_initial=backoff_initial, backoff_max=backoff_max,
            request_timeout=request_timeout, max_frame=max_frame, connect_timeout=connect_timeout,
            heartbeat_interval=heartbeat_interval, gap_fill_delay=gap_fill_delay,
            max_send_retries=max_send_retries, on_state=on_state)
        backoff = options.backoff()
        self._gap_fill_delay = gap_fill_delay
        self._on_state = on_state
        self._last_goaway: F.GoAway | None = None

        self._loop = asyncio.get_running_loop()
        self._link = link = Link(self._loop, request_timeout, max_frame)
        self._task: asyncio.Task[None] | None = None
        self._stream = EventStream(link)
        self._outbox = Outbox(link, backoff, max_send_retries)
        self._rooms: set[int] = set()
        resume_map = dict(resume) if resume is not None else None
        self._tracker = SeqTracker(resume_map.items() if resume_map else (),
                                   complete=resume_map is not None)
        self._catchup = Catchup(link, self._tracker, self._outbox, self._stream.emit)
        self._sup = Supervisor(self, link, url_list, balancer, tokens, options, backoff,
                               self._outbox, self._catchup, self._rooms,
                               baseline=resume_map is None, shutdown=self._shutdown,
                               notify=self._notify)

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
        self._task = asyncio.create_task(self._sup.run(first), name="gochat-client")
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
        sup = self._task
        if sup is not None and sup is not asyncio.current_task():
            if not sup.done():
                sup.cancel()
            with contextlib.suppress(BaseException):
                await sup
        await self._catchup.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def _shutdown(self, error: GochatError | None) -> None:
        """Stop everything now (synchronous part of close and of fatal errors)."""
        link = self._link
        if link.closed:
            return
        link.closed = True
        if error is not None:
            link.fatal = error
        exc: GochatError = error or ClientClosedError("client closed")
        conn = link.conn
        link.conn = None
        if conn is not None:
            conn.close()
        link.ready.set()  # wake waiters: they see closed
        self._outbox.fail_all(exc)
        self._catchup.cancel()
        self._stream.end()
        self._notify("closed")

    # ------------------------------------------------------------------------------------
    # properties
    # ------------------------------------------------------------------------------------

    @property
    def request_timeout(self) -> float:
        """Default timeout of every request except :meth:`send` (settable)."""
        return self._link.request_timeout

    @request_timeout.setter
    def request_timeout(self, value: float) -> None:
        self._link.request_timeout = value

    @property
    def user_id(self) -> int:
        """The authenticated user's id."""
        return self._link.auth.user_id if self._link.auth is not None else 0

    @property
    def session_id(self) -> int:
        """The id of the current server session (changes on every reconnect)."""
        return self._link.auth.session_id if self._link.auth is not None else 0

    @property
    def heartbeat_ms(self) -> int:
        return self._link.auth.heartbeat_ms if self._link.auth is not None else 0

    @property
    def max_frame(self) -> int:
        """The largest frame the server accepts (from AUTH_OK)."""
        return self._link.server_max_frame

    @property
    def connected(self) -> bool:
        """True while an authenticated connection is up."""
        return self._link.conn is not None and not self._link.closed

    @property
    def closed(self) -> bool:
        return self._link.closed

    @property
    def url(self) -> str | None:
        """The URL of the current connection."""
        conn = self._link.conn
        return conn.url if conn is not None else None

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
        return await self._stream.next(timeout)

    def pending_events(self) -> int:
        """Items queued in the event stream."""
        return len(self._stream)

    def _notify(self, state: str) -> None:
        if self._on_state is not None:
            try:
                self._on_state(state)
            except Exception:
                log.exception("on_state callback failed")

    # ------------------------------------------------------------------------------------
    # requests
    # ------------------------------------------------------------------------------------

    async def send(
        self,
        kind: int,
        conv_id: int,
        body: bytes | str,
        *,
        content_type: int | None = None,
        client_msg_id: bytes | None = None,
        timeout: float | None = None,
        traceparent: str | bytes | None = None,
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

        ``traceparent`` (a W3C ``traceparent``, version 00) sends the SEND with the TRACED flag:
        a server with tracing on records the message's spans as children of that span when its
        sampled flag is set (docs/protocol.md, "Traced SEND"). ValueError if it is malformed.

        :raises RequestError: not a member (NOT_MEMBER), body empty or too large, ...
        :raises ClientClosedError: the client was closed before the ack.
        """
        if self._link.closed:
            raise self._link.closed_error()
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
        tp = traceparent.encode("ascii") if isinstance(traceparent, str) else bytes(traceparent or b"")
        if traceparent is not None and parse_traceparent(tp) is None:
            raise ValueError("traceparent must be a W3C traceparent of version 00 (55 characters)")
        if HEADER_SIZE + SEND_FIXED_SIZE + len(tp) + len(data) > self._link.server_max_frame:
            raise RequestError(f"message of {len(data)} bytes exceeds the frame limit",
                               code=ErrorCode.BODY_TOO_LARGE)
        out = self._outbox.add(int(kind), int(ct), conv_id, cmid, data, tp)
        try:
            if timeout is None:
                return await asyncio.shield(out.fut)
            return await asyncio.wait_for(asyncio.shield(out.fut), timeout)
        except (asyncio.CancelledError, TimeoutError):
            self._outbox.drop(out)
            raise

    async def sync(self, known: Mapping[ConvKey, int] | None = None, *,
                   timeout: float | None = None) -> list[ConversationState]:
        """Resynchronise: SYNC, then fetch every missed message with HISTORY into the stream.

        ``known`` declares positions the application has seen (``{(kind, conv_id): seq}``),
        overriding what the client tracked (a lower seq makes the messages after it be emitted
        again). The client does this by itself after every reconnect; call it to catch up from
        saved positions. Returns the SYNC_RESULT: every conversation with messages after the
        positions sent. When it returns, the recovered messages are in the event stream.
        """
        return await self._catchup.sync(known, timeout)

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
        reply = expect(await self._link.request(frame, retry=True, timeout=timeout), F.HistoryResult)
        msgs = [Message.from_record(r) for r in reply.messages]
        for m in sorted(msgs, key=lambda m: m.seq):
            self._stream.emit(self._tracker.mark_seen(m))
        return HistoryResult(
            reply.kind, reply.conv_id, msgs, bool(reply.flags & FLAG_MORE), bool(reply.flags & FLAG_PARTIAL)
        )

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
        expect(await self._link.request(F.Read(int(kind), conv_id, seq), retry=True), F.ReadOk)

    async def subscribe(self, room_id: int) -> None:
        """Join room ``room_id``'s broadcast (re-subscribed automatically after reconnects)."""
        self._rooms.add(room_id)
        try:
            expect(await self._link.request(F.Subscribe(room_id), retry=True), F.SubscribeOk)
        except BaseException:
            self._rooms.discard(room_id)
            raise

    async def unsubscribe(self, room_id: int) -> None:
        """Leave room ``room_id``'s broadcast."""
        self._rooms.discard(room_id)
        expect(await self._link.request(F.Unsubscribe(room_id), retry=True), F.UnsubscribeOk)

    async def typing(self, kind: int, conv_id: int, stopped: bool = False) -> None:
        """Announce typing (or that it stopped); best effort, dropped while disconnected."""
        conn = self._link.conn
        if conn is not None and not conn.closed:
            conn.send_frame(F.Typing(int(kind), conv_id, rid=self._link.next_rid(),
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
        reply = expect(await self._link.request(F.Call(method, body), retry=False, timeout=timeout),
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
        expect(await self._link.request(F.Ping(b"ping"), retry=True, timeout=timeout), F.Pong)
        return time.perf_counter() - t0

    # ------------------------------------------------------------------------------------
    # incoming frames (called by the Connection; the hot path)
    # ------------------------------------------------------------------------------------

    def _on_frame(self, conn: Connection, f: Any) -> None:
        if isinstance(f, F.Deliver):
            self._on_message(Message.from_record(f.message))
        elif isinstance(f, F.SendAck):
            self._on_send_ack(conn, f)
        elif isinstance(f, F.Event):
            if f.type == EventType.RESYNC:
                self._catchup.resync_soon(conn)
            self._stream.emit((Event.from_frame(f),))
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
        self._stream.emit(self._tracker.on_message(m))
        if m.seq and self._tracker.gap(m.key) is not None:
            self._catchup.schedule(m.key, self._gap_fill_delay)

    def _on_send_ack(self, conn: Connection, f: F.SendAck) -> None:
        out = self._outbox.acked(conn, f.rid)
        if out is None:
            return
        key = (f.kind, f.conv_id)
        self._stream.emit(self._tracker.on_own(key, f.seq))
        if f.seq and self._tracker.gap(key) is not None:
            self._catchup.schedule(key, self._gap_fill_delay)
        if not out.fut.done():
            out.fut.set_result(SendAck(f.kind, f.conv_id, f.seq, f.msg_id, f.ts_ms,
                                       out.frame.client_msg_id, bool(f.flags & FLAG_DUPLICATE)))

    def _on_error(self, conn: Connection, f: F.Error) -> None:
        err = error_for(f.code, f.message, f.retry_after_ms)
        if not f.rid:
            log.warning("connection error from %s: %r", conn.url, err)
            conn.error = err
            return
        if self._outbox.on_error(conn, f.rid, err, f.retry_after_ms):
            return
        if f.rid == conn.hb_rid:
            conn.hb_rid = 0
            return
        fut = conn.pending.pop(f.rid, None)
        if fut is not None and not fut.done():
            fut.set_exception(err)
        if err.fatal:
            conn.error = err

    def _on_disconnected(self, conn: Connection) -> None:
        """picows callback (via the listener): fail this connection's requests."""
        log.info("disconnected from %s (close code %d)", conn.url, conn.close_code)
        self._sup.lost(conn)
        conn.fail_requests()
