"""The client's connection supervisor: the loop that connects, serves and reconnects.

:class:`Supervisor` picks the URL (round-robin, a GOAWAY's ``url``, or a
:class:`~gochat.client.discovery.GatewayBalancer`), opens a
:class:`~gochat.client.transport.Connection` and authenticates on it (asking the
:class:`~gochat.client.credentials.TokenProvider` again when a token is refused), restores the
session on each new connection (rooms re-subscribed, the outbox re-sent, SYNC), starts the
heartbeat, and after a loss waits with backoff (or a GOAWAY's ``retry_after_ms``) before the
next attempt, until the client closes or gives up with a fatal error.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from picows import ws_connect

from gochat.client.credentials import AuthRejected, TokenProvider
from gochat.client.discovery import GatewayBalancer
from gochat.client.errors import (
    ClientClosedError,
    ConnectionLostError,
    error_for,
    is_auth_fatal,
)
from gochat.client.options import ClientOptions
from gochat.client.recovery import Catchup, Outbox
from gochat.client.state import Backoff
from gochat.client.transport import Connection, FrameHandler, Link, expect
from gochat.errors import GochatError
from gochat.protocol import frames as F

__all__ = ["Supervisor"]

log = logging.getLogger("gochat.client")


class Supervisor:
    """Connects, restores the session, reconnects (see the module docstring)."""

    def __init__(
        self,
        handler: FrameHandler,
        link: Link,
        urls: list[str],
        balancer: GatewayBalancer | None,
        tokens: TokenProvider,
        options: ClientOptions,
        backoff: Backoff,
        outbox: Outbox,
        catchup: Catchup,
        rooms: set[int],
        *,
        baseline: bool,
        shutdown: Callable[[GochatError | None], None],
        notify: Callable[[str], None],
    ) -> None:
        self._handler = handler
        self._link = link
        self._urls = urls
        self._url_idx = 0
        self._balancer = balancer
        self._tokens = tokens
        self._reconnect = options.reconnect
        self._max_frame = options.max_frame
        self._connect_timeout = options.first_connect_timeout
        self._heartbeat_interval = options.heartbeat_interval
        self._backoff = backoff
        self._outbox = outbox
        self._catchup = catchup
        self._rooms = rooms
        #: no ``resume``: the first SYNC's result counts as already seen
        self._baseline = baseline
        self._shutdown = shutdown
        self._notify = notify

    async def _open(self, url: str) -> tuple[Connection, str]:
        """Connect to ``url`` and authenticate; returns the connection and the token used."""
        link = self._link
        token = await self._tokens.get()
        conn = Connection(self._handler, url, max(self._max_frame, link.server_max_frame))
        await asyncio.wait_for(
            ws_connect(lambda: conn, url, websocket_handshake_timeout=link.request_timeout,
                       enable_auto_ping=False, logger_name="gochat.client.ws"),
            link.request_timeout)
        try:
            reply = await link.request_on(conn, F.Auth(token), link.request_timeout)
            conn.auth = expect(reply, F.AuthOk)
        except BaseException as e:
            conn.abort()
            err = e if isinstance(e, GochatError) and not isinstance(e, ConnectionLostError) else conn.error
            if err is not None and 200 <= err.code < 300:
                await self._tokens.rejected(token, err)
                raise err from None
            raise
        return conn, token

    async def run(self, first: asyncio.Future[None]) -> None:
        """The supervisor: connect, serve, reconnect — until closed or a fatal error.

        ``first`` resolves once the first connection is usable, or fails with the reason none
        will be.
        """
        link = self._link
        loop = link.loop
        deadline = loop.time() + self._connect_timeout
        delay = 0.0
        url_hint: str | None = None
        last_error: BaseException | None = None
        try:
            while not link.closed:
                if delay > 0:
                    await asyncio.sleep(delay)
                delay = 0.0
                url = url_hint or self._urls[self._url_idx]
                url_hint = None
                try:
                    if self._balancer is not None and url == self._urls[self._url_idx]:
                        url = await self._balancer.pick()
                    conn, token = await self._open(url)
                except AuthRejected as e:
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
                    if isinstance(e, GochatError) and 200 <= e.code < 300 and self._tokens.has_next:
                        continue  # retry at once with the new token
                    if not first.done() and (not self._reconnect or loop.time() >= deadline):
                        err = e if isinstance(e, GochatError) else ConnectionLostError(f"cannot connect to {url}: {e!r}")
                        self._fail(err, first, cause=e)
                        return
                    delay = self._backoff.next()
                    if isinstance(e, GochatError) and e.retry_after_ms:
                        delay = max(delay, e.retry_after_ms / 1000)
                    if not first.done():
                        delay = min(delay, max(deadline - loop.time(), 0.0))
                    continue

                if self._balancer is not None:
                    self._balancer.report_success(url)
                await self._established(conn, first)
                await asyncio.shield(conn.done)
                self.lost(conn)
                if link.closed:
                    return
                if not first.done() and (not self._reconnect or loop.time() >= deadline):
                    self._fail(conn.error or ConnectionLostError("connection lost while connecting"), first)
                    return
                if loop.time() - conn.opened >= max(1.0, self._backoff.initial * 4):
                    self._backoff.reset()
                lost_err = conn.error
                ga = conn.goaway
                if ga is not None and is_auth_fatal(ga.code):
                    lost_err = lost_err or error_for(ga.code, ga.reason)
                if lost_err is not None and is_auth_fatal(lost_err.code):
                    try:
                        await self._tokens.rejected(token, lost_err)
                    except AuthRejected as e:
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

    async def _established(self, conn: Connection, first: asyncio.Future[None]) -> None:
        """A connection is authenticated: restore the session on it."""
        link = self._link
        auth = conn.auth
        assert auth is not None
        link.auth = auth
        if auth.max_frame:
            link.server_max_frame = auth.max_frame
            conn.max_frame = max(self._max_frame, auth.max_frame)
        log.info("connected to %s as user %d (session %d)", conn.url, auth.user_id, auth.session_id)
        # rooms first, then unacknowledged sends in their original order; all before any new
        # request so ordering per conversation is kept
        frames: list[F.Frame] = []
        for room in sorted(self._rooms):
            rid = link.next_rid()
            fut: asyncio.Future[Any] = link.loop.create_future()
            fut.add_done_callback(self._resubscribed(room))
            conn.pending[rid] = fut
            frames.append(F.Subscribe(room, rid=rid))
        limit = link.server_max_frame
        self._outbox.resend(conn, frames, limit)
        if frames:
            conn.send_frames(frames, limit)
        link.conn = conn
        link.ready.set()
        conn.tasks.append(asyncio.create_task(link.heartbeat(conn, self._heartbeat_interval),
                                              name="gochat-heartbeat"))
        if first.done():
            conn.tasks.append(asyncio.create_task(self._resync(conn), name="gochat-resync"))
            self._notify("connected")
            return
        try:
            await self._catchup.sync_on(conn, link.request_timeout, baseline=self._baseline)
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

    async def _resync(self, conn: Connection) -> None:
        try:
            await self._catchup.sync_on(conn, self._link.request_timeout)
        except (ConnectionLostError, TimeoutError, ClientClosedError):
            pass
        except GochatError as e:
            log.warning("SYNC after reconnect failed: %r", e)

    def lost(self, conn: Connection) -> None:
        """``conn`` is gone: it is no longer the client's connection."""
        link = self._link
        if link.conn is conn:
            link.conn = None
            if not link.closed:
                link.ready.clear()
                self._notify("disconnected")
