"""What the client does so that nothing is lost or duplicated across errors and reconnects.

- :class:`Outbox`: every SEND not acknowledged yet, keyed by ``client_msg_id``. It puts a SEND
  on the wire with a fresh rid, retries it after a retryable ERROR (with the server's
  ``retry_after_ms`` or the backoff), re-sends all of them in order on each new connection, and
  fails them when the client closes.
- :class:`Catchup`: the :class:`~gochat.client.state.SeqTracker` and the work that keeps it
  whole: SYNC (after every connection and from :meth:`Client.sync`), and one gap-fill task per
  conversation that fetches the missing seqs with HISTORY and emits them in order.

Both work through the :class:`~gochat.client.transport.Link`; neither knows how connections are
made.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping

from gochat.client.errors import ClientClosedError, ConnectionLostError
from gochat.client.state import Backoff, SeqTracker
from gochat.client.transport import Connection, Link, OutSend, expect, silence
from gochat.client.types import ConversationState, ConvKey, Message
from gochat.errors import ErrorCode, GochatError, RequestError
from gochat.protocol import frames as F
from gochat.protocol.constants import (
    FLAG_MORE,
    FLAG_TRACED,
    HEADER_SIZE,
    MAX_HISTORY_LIMIT,
    SEND_FIXED_SIZE,
    SYNC_ENTRY_SIZE,
    Kind,
)

__all__ = ["Catchup", "Outbox"]

log = logging.getLogger("gochat.client")


class Outbox:
    """Unacknowledged SENDs (see the module docstring)."""

    __slots__ = ("_backoff", "_link", "_max_retries", "sends")

    def __init__(self, link: Link, backoff: Backoff, max_retries: int) -> None:
        self._link = link
        self._backoff = backoff
        self._max_retries = max_retries
        #: client_msg_id -> the SEND, in the order they were first sent
        self.sends: dict[bytes, OutSend] = {}

    def __len__(self) -> int:
        return len(self.sends)

    def __contains__(self, client_msg_id: object) -> bool:
        return client_msg_id in self.sends

    def add(self, kind: int, content_type: int, conv_id: int, client_msg_id: bytes,
            body: bytes, traceparent: bytes = b"") -> OutSend:
        """The SEND for ``client_msg_id``: the one already waiting, or a new one put on the wire
        at once when a connection is up. A ``traceparent`` makes it a TRACED SEND (prefixed)."""
        out = self.sends.get(client_msg_id)
        if out is None:
            link = self._link
            frame = (F.Send(kind, content_type, conv_id, client_msg_id, traceparent + body, flags=FLAG_TRACED)
                     if traceparent else F.Send(kind, content_type, conv_id, client_msg_id, body))
            out = OutSend(frame, link.loop.create_future())
            self.sends[client_msg_id] = out
            conn = link.conn
            if conn is not None and not conn.closed:
                self.transmit(conn, out)
        return out

    def drop(self, out: OutSend) -> None:
        """Stop retrying ``out`` (its sender timed out or was cancelled)."""
        if self.sends.get(out.frame.client_msg_id) is out:
            del self.sends[out.frame.client_msg_id]
        if out.retry is not None:
            out.retry.cancel()
        conn = self._link.conn
        if conn is not None and out.rid:
            conn.sends.pop(out.rid, None)
        if not out.fut.done():
            out.fut.cancel()

    def transmit(self, conn: Connection, out: OutSend) -> None:
        if out.retry is not None:
            out.retry.cancel()
            out.retry = None
        if out.rid:
            conn.sends.pop(out.rid, None)
        rid = self._link.next_rid()
        out.rid = rid
        out.frame.rid = rid
        conn.sends[rid] = out
        conn.send_frame(out.frame)

    def _retransmit(self, out: OutSend) -> None:
        out.retry = None
        conn = self._link.conn
        if conn is not None and not conn.closed and self.sends.get(out.frame.client_msg_id) is out:
            self.transmit(conn, out)

    def acked(self, conn: Connection, rid: int) -> OutSend | None:
        """The SEND a SEND_ACK with ``rid`` on ``conn`` answers, now out of the outbox (its future
        is still to be resolved), or None."""
        out = conn.sends.pop(rid, None)
        if out is None:
            log.debug("SEND_ACK for unknown rid %d", rid)
            return None
        out.rid = 0
        cmid = out.frame.client_msg_id
        if self.sends.get(cmid) is out:
            del self.sends[cmid]
        return out

    def on_error(self, conn: Connection, rid: int, err: GochatError, retry_after_ms: int) -> bool:
        """An ERROR with ``rid`` arrived on ``conn``; False if it does not answer a SEND.

        A retryable error is retried after a delay (up to ``max_send_retries`` times), a fatal
        one leaves the SEND for the next connection, any other fails the send.
        """
        out = conn.sends.pop(rid, None)
        if out is None:
            return False
        out.rid = 0
        if err.spec.retryable and not err.fatal and out.errors < self._max_retries:
            out.errors += 1
            if retry_after_ms:
                delay = self._backoff.spread(retry_after_ms / 1000)
            else:
                delay = self._backoff.base(out.errors - 1)
            out.retry = self._link.loop.call_later(delay, self._retransmit, out)
            return True
        if err.fatal:
            return True  # the connection closes; the send is repeated on the next one
        if self.sends.get(out.frame.client_msg_id) is out:
            del self.sends[out.frame.client_msg_id]
        if not out.fut.done():
            out.fut.set_exception(err)
            silence(out.fut)
        return True

    def resend(self, conn: Connection, frames: list[F.Frame], limit: int) -> None:
        """A new connection: append every waiting SEND, in order and with a fresh rid, to
        ``frames``; fail those larger than the server's frame ``limit``."""
        for out in list(self.sends.values()):
            if HEADER_SIZE + SEND_FIXED_SIZE + len(out.frame.body) > limit:
                del self.sends[out.frame.client_msg_id]
                if not out.fut.done():
                    out.fut.set_exception(RequestError("message exceeds the server's frame limit",
                                                       code=ErrorCode.BODY_TOO_LARGE))
                    silence(out.fut)
                continue
            if out.retry is not None:
                out.retry.cancel()
                out.retry = None
            rid = self._link.next_rid()
            out.rid = rid
            out.frame.rid = rid
            conn.sends[rid] = out
            frames.append(out.frame)

    def fail_all(self, exc: GochatError) -> None:
        """The client closed: every waiting send fails with ``exc``."""
        for out in list(self.sends.values()):
            if out.retry is not None:
                out.retry.cancel()
            if not out.fut.done():
                out.fut.set_exception(exc)
                silence(out.fut)
        self.sends.clear()


class Catchup:
    """Seq tracking, SYNC and gap filling (see the module docstring)."""

    __slots__ = ("_emit", "_link", "_outbox", "_resync", "_resync_again", "fills", "tracker")

    def __init__(self, link: Link, tracker: SeqTracker, outbox: Outbox,
                 emit: Callable[[Iterable[Message]], None]) -> None:
        self._link = link
        self.tracker = tracker
        self._outbox = outbox
        self._emit = emit
        #: conversation -> its running gap-fill task
        self.fills: dict[ConvKey, asyncio.Task[None]] = {}
        #: the SYNC an EVENT RESYNC asked for, and whether another came in meanwhile
        self._resync: asyncio.Task[None] | None = None
        self._resync_again = False

    def resync_soon(self, conn: Connection) -> None:
        """EVENT RESYNC (pushes may have been lost between server nodes): SYNC on ``conn`` in
        the background; one at a time, and once more if asked again while it runs."""
        if self._resync is not None and not self._resync.done():
            self._resync_again = True
            return
        self._resync = self._link.loop.create_task(self._resync_run(conn))

    async def _resync_run(self, conn: Connection) -> None:
        while True:
            self._resync_again = False
            try:
                await self.sync_on(conn, self._link.request_timeout)
            except GochatError as e:  # a lost connection SYNCs again on the next one anyway
                log.info("SYNC after RESYNC failed: %r", e)
                return
            if not self._resync_again:
                return

    def _tasks(self) -> list[asyncio.Task[None]]:
        return [*self.fills.values(), *([self._resync] if self._resync is not None else [])]

    def cancel(self) -> None:
        for t in self._tasks():
            t.cancel()

    async def close(self) -> None:
        """Cancel the gap fills (and a RESYNC's SYNC) and wait for them to end."""
        tasks = self._tasks()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t

    async def sync(self, known: Mapping[ConvKey, int] | None,
                   timeout: float | None) -> list[ConversationState]:
        """:meth:`Client.sync`: declare ``known``, SYNC (on the next connection if this one is
        lost), then wait for the gap fills of the conversations reported."""
        link = self._link
        if known:
            for key, seq in known.items():
                self._emit(self.tracker.set_position(key, seq))
        wait = link.request_timeout if timeout is None else timeout
        deadline = link.loop.time() + wait
        while True:
            conn = await link.wait_ready(max(deadline - link.loop.time(), 0.0))
            try:
                states = await self.sync_on(conn, max(deadline - link.loop.time(), 0.001))
                break
            except ConnectionLostError:
                if link.closed or link.loop.time() >= deadline:
                    raise
        tasks = [t for k in {s.key for s in states} if (t := self.fills.get(k)) is not None]
        if tasks:
            remaining = max(deadline - link.loop.time(), 0.001)
            await asyncio.wait([asyncio.shield(t) for t in tasks], timeout=remaining)
        return states

    async def sync_on(self, conn: Connection, timeout: float | None, *,
                      baseline: bool = False) -> list[ConversationState]:
        """SYNC with the tracked positions on ``conn``; note the results and start gap fills.

        With ``baseline`` the tracker is empty and the result is taken as already seen.
        """
        tracker = self.tracker
        positions = [(k, s) for k, s in tracker.positions().items() if k[0] != Kind.ROOM]
        per_frame = max(1, min(0xFFFF, (self._link.server_max_frame - HEADER_SIZE - 2) // SYNC_ENTRY_SIZE))
        chunks = [positions[i:i + per_frame] for i in range(0, len(positions), per_frame)] or [[]]
        all_sent = {k for k, _ in positions}
        states: dict[ConvKey, ConversationState] = {}
        for chunk in chunks:
            frame = F.Sync([F.SyncEntry(k[0], k[1], s) for k, s in chunk])
            reply = expect(await self._link.request_on(conn, frame, timeout), F.SyncResult)
            sent = {k for k, _ in chunk}
            for e in reply.entries:
                key = (e.kind, e.conv_id)
                # a conversation in another chunk was reported only because this chunk did
                # not mention it; its own chunk's answer is authoritative
                if key in sent or key not in all_sent:
                    states[key] = ConversationState(e.kind, e.conv_id, e.last_seq, e.read_seq)
        result = list(states.values())
        if baseline:
            tracker.set_baseline((s.key, s.last_seq) for s in result)
        else:
            for s in result:
                tracker.note_last_seq(s.key, s.last_seq)
        for key in tracker.gaps():
            self.schedule(key, 0.0)
        return result

    def schedule(self, key: ConvKey, delay: float) -> None:
        """Fill the gap of ``key`` after ``delay`` seconds, unless a fill is already running."""
        t = self.fills.get(key)
        if t is not None and not t.done():
            return
        if self._link.closed:
            return
        self.fills[key] = asyncio.create_task(self._fill(key, delay), name=f"gochat-fill-{key}")

    async def _fill(self, key: ConvKey, delay: float) -> None:
        """Fetch HISTORY until ``key`` has no gap; emit the recovered messages in order."""
        link = self._link
        tracker = self.tracker
        try:
            if delay > 0:
                await asyncio.sleep(delay)
            stalls = 0
            while not link.closed:
                start = tracker.gap(key)
                if start is None:
                    return
                target = tracker.target(key) or start
                limit = max(1, min(MAX_HISTORY_LIMIT, target - start + 1))
                try:
                    conn = await link.wait_ready(None)
                    reply = expect(
                        await link.request_on(conn, F.History(key[0], key[1], start, limit),
                                              link.request_timeout),
                        F.HistoryResult)
                except (ConnectionLostError, TimeoutError):
                    continue  # wait for the next connection
                except ClientClosedError:
                    return
                except GochatError as e:
                    if link.closed:
                        return
                    log.warning("cannot fill the gap of %s from seq %d: %r", key, start, e)
                    while tracker.gap(key) is not None:
                        self._emit(tracker.skip_gap(key))
                    return
                me = link.auth.user_id if link.auth is not None else 0
                for rec in sorted(reply.messages, key=lambda r: r.seq):
                    m = Message.from_record(rec)
                    own = m.sender_id == me and m.client_msg_id in self._outbox
                    self._emit(tracker.on_message(m, emit=not own))
                if (tracker.position(key) or 0) < start:
                    stalls += 1
                    if stalls >= 2 or not (reply.flags & FLAG_MORE):
                        log.warning("HISTORY of %s has no seq %d; skipping the gap", key, start)
                        self._emit(tracker.skip_gap(key))
                        stalls = 0
                else:
                    stalls = 0
        finally:
            if self.fills.get(key) is asyncio.current_task():
                del self.fills[key]
