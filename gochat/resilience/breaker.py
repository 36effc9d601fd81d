"""Circuit breaker with a bulkhead and a call timeout, for one event loop.

One :class:`CircuitBreaker` guards one dependency (the PostgreSQL pool, the Redis client)::

    breaker = CircuitBreaker("postgres", BreakerConfig(max_concurrent=64, call_timeout_s=5.0))
    async with breaker.guard():
        await conn.execute(...)
    value = await breaker.call(redis.get, key)          # the same, for one awaitable call

**States.** ``closed``: calls pass and are counted in a sliding window of ``window_s`` seconds
(``buckets`` time buckets; a bucket older than the window is forgotten whole). Once the window
holds at least ``min_calls`` calls, the breaker opens when the share of failures reaches
``failure_rate`` or the share of calls slower than ``slow_call_s`` reaches ``slow_call_rate``.
``open``: every call is refused at once with :class:`BreakerOpenError` (an
:class:`~gochat.errors.UnavailableError`, code 501, ``retry_after_ms`` = time until half-open).
After ``open_s`` the next call finds it ``half_open``: ``half_open_calls`` probe calls are let
through (more are refused); when all of them succeed it closes with an empty window, and the
first probe that fails (or is slow) opens it again for another ``open_s``. ``forced_open`` and
``forced_closed`` are set by an operator (:meth:`~CircuitBreaker.force_open`,
:meth:`~CircuitBreaker.force_closed`) and never change by themselves; :meth:`~CircuitBreaker.reset`
returns to automatic (``closed``, empty window). The time-based step open → half-open happens
lazily, on the next call (or :attr:`~CircuitBreaker.state` read): no timer task. The rates are
judged when a failure or a slow call is recorded, and when a success brings the window to
``min_calls`` (a success only lowers them otherwise). A call admitted under an earlier state
(before the breaker opened; a probe of an earlier half-open) counts in the totals only.

**What is a failure.** ``BreakerConfig.is_failure(exc)``; by default :func:`is_failure`:
``UnavailableError`` and ``OSError`` (``ConnectionError``, ``TimeoutError``) — the dependency
did not answer. Any other exception (NOT_FOUND, a unique violation, a bug in the caller) is
the dependency answering, a success for the breaker. ``asyncio.CancelledError`` from outside
is neither: the call is forgotten. A call still running after ``call_timeout_s`` is cancelled,
counted as a failure and ends in :class:`CallTimeoutError` (a backend that accepts connections
and never answers would otherwise hold every caller).

**Bulkhead.** With ``max_concurrent`` > 0, a call arriving while that many are in flight is
refused at once with :class:`BulkheadFullError` (``retry_after_ms`` small). A refused call is
not counted in the window.

**Cost.** The closed-state path is a few attribute reads, two clock reads, one small guard
object and the two coroutines of ``async with``; no lock, no log call, no allocation per
bucket. Measured by ``test_closed_path_overhead`` (``tests/test_resilience_primitives.py``:
``async with breaker.guard(): await noop()`` minus ``await noop()``, best of 3 × 50k calls,
CPython 3.11 on the development machine): about 0.7 µs per call for :meth:`~CircuitBreaker.guard`,
0.85 µs for :meth:`~CircuitBreaker.call`, the same under uvloop. Of that, the bare ``async with``
of an empty context manager is ~0.28 µs.

Single event loop, no threads: the state is plain attributes, changed only between awaits.

Why no library (pybreaker, aiobreaker, purgatory, circuitbreaker, aiomisc): docs/dependencies.md.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, ParamSpec, TypedDict, TypeVar

from gochat.errors import UnavailableError

__all__ = [
    "BreakerConfig",
    "BreakerOpenError",
    "BreakerRegistry",
    "BreakerSnapshot",
    "BreakerState",
    "BulkheadFullError",
    "CallTimeoutError",
    "ChangeListener",
    "CircuitBreaker",
    "is_failure",
]

log = logging.getLogger("gochat.resilience")

T = TypeVar("T")
P = ParamSpec("P")


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    FORCED_OPEN = "forced_open"
    FORCED_CLOSED = "forced_closed"


_CLOSED: Final = BreakerState.CLOSED
_OPEN: Final = BreakerState.OPEN
_HALF_OPEN: Final = BreakerState.HALF_OPEN
_FORCED_OPEN: Final = BreakerState.FORCED_OPEN
_FORCED_CLOSED: Final = BreakerState.FORCED_CLOSED


class BreakerOpenError(UnavailableError):
    """Refused without trying: the breaker ``breaker`` is open (or half-open with all its probes
    taken). ``retry_after_ms`` says when it is worth trying again."""

    def __init__(self, breaker: str, retry_after_ms: int, message: str = "") -> None:
        super().__init__(message or f"{breaker}: circuit open", retry_after_ms=retry_after_ms)
        self.breaker = breaker


class BulkheadFullError(UnavailableError):
    """Refused without trying: ``max_concurrent`` calls to ``breaker`` are already in flight."""

    def __init__(self, breaker: str, retry_after_ms: int) -> None:
        super().__init__(f"{breaker}: too many calls in flight", retry_after_ms=retry_after_ms)
        self.breaker = breaker


class CallTimeoutError(UnavailableError):
    """The call ran longer than ``call_timeout_s`` and was cancelled (counted as a failure)."""

    def __init__(self, breaker: str, timeout_s: float) -> None:
        super().__init__(f"{breaker}: no answer within {timeout_s:g}s")
        self.breaker = breaker


def is_failure(exc: BaseException) -> bool:
    """The default failure predicate: the dependency did not answer (``UnavailableError``,
    ``OSError`` — so ``ConnectionError`` and ``TimeoutError`` too). Other exceptions are answers."""
    return isinstance(exc, (UnavailableError, OSError))


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """Thresholds of one breaker; the defaults are a starting point, not a tuning."""

    #: length of the sliding window of call outcomes, in seconds
    window_s: float = 10.0
    #: time buckets in the window: the window moves on in steps of ``window_s / buckets``
    buckets: int = 10
    #: no decision while the window holds fewer calls
    min_calls: int = 20
    #: open when failures / calls in the window reach this (0 < rate <= 1)
    failure_rate: float = 0.5
    #: a call taking at least this long is slow (0: no call is slow)
    slow_call_s: float = 2.0
    #: open when slow calls / calls in the window reach this (0 < rate <= 1)
    slow_call_rate: float = 0.8
    #: how long it stays open before letting probes through
    open_s: float = 5.0
    #: probes allowed in half-open; all must succeed to close
    half_open_calls: int = 3
    #: bulkhead: calls in flight beyond this are refused at once (0: unlimited)
    max_concurrent: int = 0
    #: a call running longer is cancelled and counted as a failure (0: no limit)
    call_timeout_s: float = 0.0
    #: ``retry_after_ms`` of a bulkhead refusal and of a refused surplus probe
    busy_retry_after_ms: int = 20
    #: which exceptions count as failures of the dependency
    is_failure: Callable[[BaseException], bool] = field(default=is_failure, repr=False)

    def __post_init__(self) -> None:
        rules = (
            (self.window_s > 0, "window_s must be positive"),
            (self.buckets >= 1 and self.min_calls >= 1, "buckets and min_calls must be at least 1"),
            (0 < self.failure_rate <= 1 and 0 < self.slow_call_rate <= 1, "the rates must be in (0, 1]"),
            (self.half_open_calls >= 1, "half_open_calls must be at least 1"),
            (
                min(self.slow_call_s, self.open_s, self.max_concurrent, self.call_timeout_s,
                    self.busy_retry_after_ms) >= 0,
                "times and limits must not be negative",
            ),
        )
        problems = [text for ok, text in rules if not ok]
        if problems:
            raise ValueError("invalid BreakerConfig: " + "; ".join(problems))


class BreakerSnapshot(TypedDict):
    """What an admin endpoint shows of one breaker (:meth:`CircuitBreaker.snapshot`)."""

    name: str
    state: str
    #: in the sliding window
    window_s: float
    calls: int
    failures: int
    slow: int
    failure_rate: float
    slow_rate: float
    in_flight: int
    #: 0 unless open
    seconds_until_half_open: float
    #: since the breaker was created
    total_calls: int
    total_failures: int
    total_slow: int
    rejected: int
    rejected_bulkhead: int
    state_changes: int


#: ``callback(breaker, old_state, new_state, reason)``, called after every state change
ChangeListener = Callable[["CircuitBreaker", BreakerState, BreakerState, str], None]


class _Guard:
    """One guarded call: what :meth:`CircuitBreaker.guard` returns (use it once)."""

    __slots__ = ("_breaker", "_gen", "_probe", "_start", "_timeout")

    def __init__(self, breaker: CircuitBreaker) -> None:
        self._breaker = breaker
        self._timeout: asyncio.Timeout | None = None

    async def __aenter__(self) -> None:
        b = self._breaker
        if b._state is _CLOSED and b.in_flight < b._max_in_flight:
            b.in_flight += 1  # the fast path of _admit
            self._probe = False
        else:
            self._probe = b._admit()
        self._gen = b._gen
        if b._call_timeout_s:
            try:
                self._timeout = asyncio.timeout(b._call_timeout_s)
                await self._timeout.__aenter__()
            except BaseException:
                b._forget(self)  # e.g. no current task: give the place back
                raise
        self._start = b._clock()

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        b = self._breaker
        if self._timeout is not None:
            try:
                await self._timeout.__aexit__(et, exc, tb)
            except TimeoutError as timeout:
                # our deadline cancelled the body: a failure, whatever the body raised then
                err = CallTimeoutError(b.name, b._call_timeout_s)
                b._done(self, True, err)
                raise err from timeout
        if et is None:
            b._ok(self)
        elif issubclass(et, asyncio.CancelledError):
            b._forget(self)  # cancelled from outside: neither success nor failure
        else:
            assert exc is not None
            b._done(self, b._is_failure(exc), exc)


class CircuitBreaker:
    """See the module docstring. ``clock`` is monotonic seconds (injectable for tests)."""

    __slots__ = (
        "_bucket_end", "_bucket_s", "_call_timeout_s", "_calls", "_clock", "_config", "_epoch", "_failures",
        "_gen", "_is_failure", "_listeners", "_max_in_flight", "_min_calls", "_opened_until",
        "_probes_admitted", "_probes_ok", "_slot", "_slow", "_slow_call_s", "_state", "_w_calls",
        "_w_failures", "_w_slow", "calls", "failures", "in_flight", "name", "rejected", "rejected_bulkhead",
        "slow", "state_changes",
    )

    def __init__(
        self, name: str, config: BreakerConfig | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        cfg = config if config is not None else BreakerConfig()
        self.name = name
        self._config = cfg
        self._clock = clock
        # config values read on every call, copied to slots (one attribute read, not two)
        self._is_failure = cfg.is_failure
        self._max_in_flight = cfg.max_concurrent or sys.maxsize
        self._min_calls = cfg.min_calls
        self._call_timeout_s = cfg.call_timeout_s
        self._slow_call_s = cfg.slow_call_s if cfg.slow_call_s > 0 else math.inf
        self._bucket_s = cfg.window_s / cfg.buckets
        self._state = _CLOSED
        #: bumped on every state change: a call admitted before it does not count after it
        self._gen = 0
        self._opened_until = 0.0
        self._probes_admitted = self._probes_ok = 0
        self._listeners: list[ChangeListener] = []
        # the window: per-bucket counts in a ring, and their sums
        self._calls, self._failures, self._slow = [0] * cfg.buckets, [0] * cfg.buckets, [0] * cfg.buckets
        # slot _slot holds bucket number _epoch: [_epoch * _bucket_s, _bucket_end)
        self._epoch = int(clock() // self._bucket_s)
        self._bucket_end = (self._epoch + 1) * self._bucket_s
        self._slot = self._w_calls = self._w_failures = self._w_slow = 0
        # totals since creation, for metrics
        self.calls = self.failures = self.slow = self.rejected = self.rejected_bulkhead = 0
        self.state_changes = self.in_flight = 0

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self.name!r} {self._state.value}>"

    @property
    def config(self) -> BreakerConfig:
        return self._config

    @property
    def state(self) -> BreakerState:
        """The current state; an open breaker whose ``open_s`` is over turns half-open here."""
        if self._state is _OPEN and self._clock() >= self._opened_until:
            self._to_half_open()
        return self._state

    # ---- guarding calls ---------------------------------------------------------------------

    def guard(self) -> _Guard:
        """``async with breaker.guard(): ...`` runs the body as one call of the dependency.

        Raises :class:`BreakerOpenError` or :class:`BulkheadFullError` on entry (the body does
        not run), :class:`CallTimeoutError` when the body outlives ``call_timeout_s``; any
        other exception of the body passes through unchanged after being counted."""
        return _Guard(self)

    async def call(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """``await fn(*args, **kwargs)`` under :meth:`guard`."""
        async with _Guard(self):
            return await fn(*args, **kwargs)

    def _admit(self) -> bool:
        """Let a call in or raise; True when the call is a half-open probe."""
        probe = False
        if self._state is not _CLOSED:
            probe = self._admit_not_closed()
        if self.in_flight >= self._max_in_flight:
            if probe:
                self._probes_admitted -= 1
            self.rejected_bulkhead += 1
            raise BulkheadFullError(self.name, self._config.busy_retry_after_ms)
        self.in_flight += 1
        return probe

    def _admit_not_closed(self) -> bool:
        state = self._state
        if state is _FORCED_CLOSED:
            return False
        if state is _OPEN:
            now = self._clock()
            if now < self._opened_until:
                self.rejected += 1
                raise BreakerOpenError(self.name, max(1, math.ceil((self._opened_until - now) * 1000)))
            self._to_half_open()
            state = self._state
        if state is _HALF_OPEN:
            if self._probes_admitted < self._config.half_open_calls:
                self._probes_admitted += 1
                return True
            self.rejected += 1
            busy = self._config.busy_retry_after_ms  # the probes' verdict is due soon
            raise BreakerOpenError(self.name, busy, f"{self.name}: circuit half-open, probes in flight")
        # forced open: no end to promise; ask for open_s as the pace of retries
        self.rejected += 1
        pace = max(1, math.ceil(self._config.open_s * 1000))
        raise BreakerOpenError(self.name, pace, f"{self.name}: circuit forced open")

    def _ok(self, g: _Guard) -> None:
        """A call ended without an exception: the hot path (closed, not slow) inline."""
        self.in_flight -= 1
        self.calls += 1
        now = self._clock()
        if now - g._start < self._slow_call_s and self._state is _CLOSED and g._gen == self._gen:
            if now >= self._bucket_end:
                self._advance(now)
            self._calls[self._slot] += 1
            self._w_calls += 1
            # a success lowers the rates: it can only tip the balance by reaching min_calls
            if self._w_calls == self._min_calls and (self._w_failures or self._w_slow):
                self._judge()
        else:
            self._record(g, now, False, None)

    def _done(self, g: _Guard, failed: bool, exc: BaseException) -> None:
        """A call ended with ``exc`` (``failed`` per the failure predicate or the call timeout)."""
        self.in_flight -= 1
        self.calls += 1
        self._record(g, self._clock(), failed, exc)

    def _record(self, g: _Guard, now: float, failed: bool, exc: BaseException | None) -> None:
        took = now - g._start
        slow = took >= self._slow_call_s
        if failed:
            self.failures += 1
        if slow:
            self.slow += 1
        if g._gen != self._gen:
            return  # admitted under an earlier state: its outcome says nothing about this one
        if g._probe:
            self._probe_done(failed, slow, took, exc)
            return
        state = self._state
        if state is not _CLOSED and state is not _FORCED_CLOSED:
            return
        if now >= self._bucket_end:
            self._advance(now)
        slot = self._slot
        self._calls[slot] += 1
        self._w_calls += 1
        if failed:
            self._failures[slot] += 1
            self._w_failures += 1
        if slow:
            self._slow[slot] += 1
            self._w_slow += 1
        if state is _CLOSED and self._w_calls >= self._min_calls:
            self._judge()

    def _forget(self, g: _Guard) -> None:
        """A call cancelled from outside: free its place (and its probe), count nothing."""
        self.in_flight -= 1
        if g._probe and g._gen == self._gen:
            self._probes_admitted -= 1

    def _judge(self) -> None:
        cfg = self._config
        calls = self._w_calls
        if self._w_failures >= cfg.failure_rate * calls:
            self._open(f"failure rate {self._w_failures / calls:.0%} over {calls} calls in {cfg.window_s:g}s")
        elif self._w_slow >= cfg.slow_call_rate * calls:
            self._open(
                f"slow-call rate {self._w_slow / calls:.0%} (>= {cfg.slow_call_s:g}s) "
                f"over {calls} calls in {cfg.window_s:g}s"
            )

    def _probe_done(self, failed: bool, slow: bool, took: float, exc: BaseException | None) -> None:
        if self._state is not _HALF_OPEN:
            return
        if failed:
            self._open(f"probe call failed: {type(exc).__name__}: {exc}")
        elif slow:
            self._open(f"probe call slow ({took:.3g}s)")
        else:
            self._probes_ok += 1
            if self._probes_ok >= self._config.half_open_calls:
                self._set(_CLOSED, f"probes succeeded: {self._probes_ok} of {self._probes_ok}")

    # ---- the window ---------------------------------------------------------------------------

    def _advance(self, now: float) -> None:
        """Move the window's head to the bucket of ``now``, emptying the buckets it passes.
        A clock that went back (only a fake one can) keeps the current bucket."""
        if now < self._bucket_end:
            return
        # at least one bucket on, whatever float rounding says: now is past this bucket's end
        epoch = max(int(now // self._bucket_s), self._epoch + 1)
        steps = epoch - self._epoch
        n = len(self._calls)
        if steps >= n:
            self._clear_window()
        else:
            slot = self._slot
            for _ in range(steps):
                slot = slot + 1 if slot + 1 < n else 0
                self._w_calls -= self._calls[slot]
                self._w_failures -= self._failures[slot]
                self._w_slow -= self._slow[slot]
                self._calls[slot] = self._failures[slot] = self._slow[slot] = 0
            self._slot = slot
        self._epoch = epoch
        self._bucket_end = (epoch + 1) * self._bucket_s

    def _clear_window(self) -> None:
        for counts in (self._calls, self._failures, self._slow):
            counts[:] = [0] * len(counts)
        self._w_calls = self._w_failures = self._w_slow = 0

    # ---- state changes ------------------------------------------------------------------------

    def _open(self, reason: str) -> None:
        self._opened_until = self._clock() + self._config.open_s
        self._set(_OPEN, reason)

    def _to_half_open(self) -> None:
        self._set(_HALF_OPEN, f"open for {self._config.open_s:g}s")

    def _set(self, new: BreakerState, reason: str) -> None:
        old = self._state
        self._state = new
        self._gen += 1
        self._probes_admitted = self._probes_ok = 0
        if new is _CLOSED or new is _FORCED_CLOSED:
            self._clear_window()  # a fresh measurement from here on
        self.state_changes += 1
        level = logging.WARNING if new is _OPEN or new is _FORCED_OPEN else logging.INFO
        log.log(level, "breaker %s: %s -> %s: %s", self.name, old.value, new.value, reason)
        for listener in tuple(self._listeners):
            try:
                listener(self, old, new, reason)
            except Exception:
                log.exception("breaker %s: state listener %r failed", self.name, listener)

    def force_open(self, reason: str = "forced open") -> None:
        """Refuse every call until :meth:`reset` or :meth:`force_closed` (an operator's switch)."""
        if self._state is not _FORCED_OPEN:
            self._set(_FORCED_OPEN, reason)

    def force_closed(self, reason: str = "forced closed") -> None:
        """Let every call through, whatever the failures, until :meth:`reset` or
        :meth:`force_open`. Calls are still counted in the window (see :meth:`snapshot`)."""
        if self._state is not _FORCED_CLOSED:
            self._set(_FORCED_CLOSED, reason)

    def reset(self, reason: str = "reset") -> None:
        """Back to automatic: ``closed`` with an empty window (a change even when closed)."""
        self._set(_CLOSED, reason)

    def on_change(self, callback: ChangeListener) -> Callable[[], None]:
        """Call ``callback(breaker, old_state, new_state, reason)`` after every state change;
        returns a function that unsubscribes it. A listener that raises is logged, not fatal."""
        self._listeners.append(callback)

        def remove() -> None:
            if callback in self._listeners:
                self._listeners.remove(callback)

        return remove

    # ---- for metrics and the admin API ---------------------------------------------------------

    def snapshot(self) -> BreakerSnapshot:
        """The state, the window's counts and rates, the totals (a plain, JSON-ready dict)."""
        state = self.state  # may turn half-open
        now = self._clock()
        self._advance(now)
        calls = self._w_calls
        return BreakerSnapshot(
            name=self.name,
            state=state.value,
            window_s=self._config.window_s,
            calls=calls,
            failures=self._w_failures,
            slow=self._w_slow,
            failure_rate=self._w_failures / calls if calls else 0.0,
            slow_rate=self._w_slow / calls if calls else 0.0,
            in_flight=self.in_flight,
            seconds_until_half_open=max(0.0, self._opened_until - now) if state is _OPEN else 0.0,
            total_calls=self.calls,
            total_failures=self.failures,
            total_slow=self.slow,
            rejected=self.rejected,
            rejected_bulkhead=self.rejected_bulkhead,
            state_changes=self.state_changes,
        )


class BreakerRegistry:
    """The node's breakers by name: created on first use, listed and forced by the admin API."""

    def __init__(
        self, default: BreakerConfig | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.default = default if default is not None else BreakerConfig()
        self._clock = clock
        self._breakers: dict[str, CircuitBreaker] = {}
        self._listeners: list[ChangeListener] = []

    def get(self, name: str, config: BreakerConfig | None = None) -> CircuitBreaker:
        """The breaker called ``name``, created with ``config`` (else the default) on first use.
        A ``config`` that differs from the existing breaker's is a wiring error (ValueError)."""
        breaker = self._breakers.get(name)
        if breaker is None:
            breaker = CircuitBreaker(name, config if config is not None else self.default, clock=self._clock)
            for listener in self._listeners:
                breaker.on_change(listener)
            self._breakers[name] = breaker
        elif config is not None and config != breaker.config:
            raise ValueError(f"breaker {name!r} exists with another config: {breaker.config}")
        return breaker

    def __getitem__(self, name: str) -> CircuitBreaker:
        """An existing breaker (KeyError if none): for the admin API, which must not create one."""
        return self._breakers[name]

    def __contains__(self, name: object) -> bool:
        return name in self._breakers

    def __iter__(self) -> Iterator[CircuitBreaker]:
        return iter(list(self._breakers.values()))

    def __len__(self) -> int:
        return len(self._breakers)

    def on_change(self, callback: ChangeListener) -> None:
        """Subscribe ``callback`` to every breaker, present and future."""
        self._listeners.append(callback)
        for breaker in self._breakers.values():
            breaker.on_change(callback)

    def snapshot(self) -> list[BreakerSnapshot]:
        return [b.snapshot() for b in self._breakers.values()]
