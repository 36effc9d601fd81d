"""What every Redis backend shares: :func:`connect` (the client the seams need), the
``_Client`` base (owned or shared client, operation timeout, outage guard), :func:`cancel_tasks`,
and ``_Subscriber``, the pub/sub reader that survives Redis restarts (registry watch, broker).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any

from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import FullJitterBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gochat.errors import UnavailableError
from gochat.resilience import CircuitBreaker, RetryPolicy
from gochat.resilience.policy import DEFAULT_RETRY

__all__ = ["DEFAULT_PREFIX", "cancel_tasks", "connect"]

log = logging.getLogger("gochat.cluster.redis")

DEFAULT_PREFIX = "gochat:"

#: errors that mean "Redis is not reachable right now" (BusyLoadingError is a ConnectionError)
_DOWN: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ReadOnlyError,
    OSError,
    TimeoutError,
)
_RETRYABLE: tuple[type[BaseException], ...] = (UnavailableError, *_DOWN)


def connect(
    url: str, *, timeout_s: float = 2.0, max_connections: int = 128, retry: RetryPolicy = DEFAULT_RETRY
) -> Redis:
    """A client for the cluster seams: bytes responses, bounded socket timeouts, a blocking pool
    (callers queue for a connection instead of failing), and redis-py's own retry of a command
    on a broken connection set from the node's retry policy (full jitter, same numbers)."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(FullJitterBackoff(cap=retry.max_delay_s, base=retry.base_delay_s), retry.max_attempts - 1),
        health_check_interval=30,
    )
    return Redis.from_pool(pool)


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@contextlib.asynccontextmanager
async def _guard(what: str, timeout_s: float) -> AsyncIterator[None]:
    """Bound an operation in time and map outages to UnavailableError."""
    try:
        async with asyncio.timeout(timeout_s):
            yield
    except _DOWN as exc:
        raise UnavailableError(f"redis unavailable ({what}): {exc or type(exc).__name__}") from exc


@contextlib.asynccontextmanager
async def _guard_with(breaker: CircuitBreaker, what: str, timeout_s: float) -> AsyncIterator[None]:
    """:func:`_guard` through ``breaker``: refused at once while it is open; an outage or a
    timeout counts against it."""
    async with breaker.guard(), _guard(what, timeout_s):
        yield


async def _wait_event(event: asyncio.Event, timeout_s: float) -> None:
    """``event.wait()`` for at most ``timeout_s`` (asyncio.timeout: Python 3.11's wait_for can
    swallow a cancellation that races with the inner wait finishing)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await event.wait()


async def cancel_tasks(tasks: Iterable[asyncio.Task[Any] | None], timeout_s: float = 5.0) -> None:
    """Cancel background tasks and wait (bounded) until they are done; their errors are
    dropped, a cancellation of the caller is not.

    A task still running a moment after its cancel is cancelled again: redis-py can swallow
    a cancellation that lands while a command completes (the command returns normally), and
    the task's loop then goes on as if nothing happened (seen when every node of a cluster
    stopped at once: the registry watch outlived close() by seconds)."""
    live = [t for t in tasks if t is not None and not t.done()]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while live:
        for t in live:
            t.cancel()
        left = deadline - loop.time()
        if left <= 0:
            break
        _, pending = await asyncio.wait(live, timeout=min(left, 0.2))
        live = list(pending)


class _Client:
    """Holds the Redis client (owned when built from a URL) and the operation timeout."""

    def __init__(self, redis: Redis | str, prefix: str, timeout_s: float) -> None:
        if isinstance(redis, str):
            self.redis = connect(redis, timeout_s=timeout_s)
            self._owned = True
        else:
            if redis.connection_pool.connection_kwargs.get("decode_responses"):
                raise ValueError("the cluster seams need a Redis client without decode_responses")
            self.redis = redis
            self._owned = False
        self.prefix = prefix
        self.timeout_s = timeout_s
        #: bound for one public operation: socket timeout plus the retry
        self.op_timeout_s = 2 * timeout_s + 1.0

    #: the node's Redis circuit breaker, shared by every backend on one client, and its retry
    #: policy (:func:`gochat.cluster.backends.redis_backends` sets both); None: no breaker
    breaker: CircuitBreaker | None = None
    retry: RetryPolicy = DEFAULT_RETRY

    def guard(self, what: str) -> contextlib.AbstractAsyncContextManager[None]:
        breaker = self.breaker
        if breaker is None:
            return _guard(what, self.op_timeout_s)
        return _guard_with(breaker, what, self.op_timeout_s)

    async def _close_client(self) -> None:
        if self._owned:
            with contextlib.suppress(Exception):
                await self.redis.aclose()


class _Subscriber:
    """A pub/sub reader that survives Redis restarts.

    It owns a dedicated connection (cloned from the client's settings, without retries, so a
    broken connection surfaces at once), pings it when idle to notice half-open sockets, and on
    any connection loss reconnects with exponential backoff and subscribes again by itself.
    """

    def __init__(
        self,
        client: Redis,
        channels: Sequence[str],
        on_message: Callable[[bytes, bytes], None],
        *,
        name: str,
        timeout_s: float,
        ping_s: float = 5.0,
        retry: RetryPolicy = DEFAULT_RETRY,
        on_resubscribe: Callable[[], None] | None = None,
    ) -> None:
        base = client.connection_pool
        kwargs = dict(base.connection_kwargs)
        kwargs["retry"] = Retry(NoBackoff(), 0)
        kwargs["socket_timeout"] = timeout_s
        kwargs["socket_connect_timeout"] = timeout_s
        kwargs.pop("health_check_interval", None)
        kwargs["decode_responses"] = False
        self._pool = ConnectionPool(connection_class=base.connection_class, max_connections=4, **kwargs)
        self._client = Redis(connection_pool=self._pool)
        self.channels = list(channels)
        self._on_message = on_message
        self._on_resubscribe = on_resubscribe
        self.name = name
        self.timeout_s = timeout_s
        self.ping_s = ping_s
        self.retry = retry
        #: times the reader reconnected and subscribed again after losing its connection
        self.resubscribes = 0
        self._ps: PubSub | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Subscribe (confirmed by the server before this returns) and start reading."""
        self._ps = await self._subscribe()
        self._task = asyncio.create_task(self._run(), name=f"redis-sub-{self.name}")

    async def start_in_background(self) -> None:
        """Like :meth:`start`, but keep trying in the background while Redis is down."""
        try:
            await self.start()
        except UnavailableError as exc:
            log.warning("%s: cannot subscribe yet (%s); retrying in the background", self.name, exc)
            self._task = asyncio.create_task(self._run(), name=f"redis-sub-{self.name}")

    def _deliver(self, channel: bytes, data: bytes) -> None:
        try:
            self._on_message(channel, data)
        except Exception:
            log.exception("%s: message callback failed", self.name)

    async def _subscribe(self) -> PubSub:
        ps = self._client.pubsub()
        try:
            async with _guard(f"subscribe {self.name}", self.timeout_s * 2):
                await ps.subscribe(*self.channels)
                confirmed: set[str] = set()
                while len(confirmed) < len(self.channels):
                    msg = await ps.get_message(timeout=self.timeout_s)
                    if msg is None:
                        raise RedisTimeoutError("no subscribe confirmation")
                    if msg["type"] == "subscribe":
                        confirmed.add(_s(msg["channel"]))
                    elif msg["type"] == "message":
                        self._deliver(msg["channel"], msg["data"])
        except BaseException:
            await self._drop(ps)
            raise
        return ps

    async def _drop(self, ps: PubSub | None) -> None:
        if ps is not None:
            with contextlib.suppress(Exception):
                await ps.aclose()  # type: ignore[no-untyped-call]
        with contextlib.suppress(Exception):
            await self._pool.disconnect()

    async def _read(self, ps: PubSub) -> None:
        loop = asyncio.get_running_loop()
        last_rx = loop.time()
        ping_sent: float | None = None
        while True:
            msg = await ps.get_message(timeout=min(1.0, self.ping_s))
            now = loop.time()
            if msg is None:
                if ping_sent is not None:
                    if now - ping_sent > self.timeout_s:
                        raise RedisConnectionError("pub/sub connection did not answer a ping")
                elif now - last_rx >= self.ping_s:
                    await ps.ping()
                    ping_sent = now
                continue
            last_rx, ping_sent = now, None
            if msg["type"] == "message":
                self._deliver(msg["channel"], msg["data"])

    async def _run(self) -> None:
        while True:
            ps = self._ps
            if ps is not None:
                try:
                    await self._read(ps)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("%s: lost the redis pub/sub connection (%r); re-subscribing", self.name, exc)
                await self._drop(ps)
                self._ps = None
            backoff = self.retry.backoff()
            while self._ps is None:
                await asyncio.sleep(backoff.next())
                try:
                    self._ps = await self._subscribe()
                except _RETRYABLE as exc:
                    log.debug("%s: re-subscribe failed (%r)", self.name, exc)
                except Exception as exc:
                    # Anything else from a half-restarted Redis (or redis-py on a dying
                    # connection) must not end this task: without it the node never hears
                    # its channels again.
                    log.warning("%s: re-subscribe failed (%r)", self.name, exc)
            self.resubscribes += 1
            log.warning("%s: re-subscribed to %s", self.name, ", ".join(self.channels))
            if self._on_resubscribe is not None:
                try:
                    self._on_resubscribe()
                except Exception:  # a failing reaction must not end the reader
                    log.exception("%s: on_resubscribe failed", self.name)

    async def close(self) -> None:
        await cancel_tasks([self._task])
        self._task = None
        await self._drop(self._ps)
        self._ps = None
