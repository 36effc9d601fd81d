"""gochat.resilience: the circuit breaker (rates over a sliding window, slow calls, half-open
probes, bulkhead, call timeout, forced states, listeners, registry) and the retry policy
(attempts, full jitter, elapsed-time bound, classification from the error table,
``retry_after_ms``, cancellation). Time is a fake clock and a recorded sleep throughout; the
only real waits are the call-timeout tests' few milliseconds."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

import pytest

from gochat.errors import ERRORS, ErrorCode, GochatError, RequestError, UnavailableError
from gochat.resilience import (
    BreakerConfig,
    BreakerOpenError,
    BreakerRegistry,
    BreakerState,
    BulkheadFullError,
    CallTimeoutError,
    CircuitBreaker,
    RetryPolicy,
    is_failure,
    is_retryable,
)
from tests.conftest import run


class Clock:
    """A monotonic clock that moves only when told."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, s: float) -> None:
        self.now += s


_OK = object()


async def hit(b: CircuitBreaker, clock: Clock, exc: BaseException | None = None, took: float = 0.0) -> object:
    """One call through ``b`` that takes ``took`` fake seconds and raises ``exc`` (if any);
    returns what the breaker let out: ``_OK`` or the exception raised."""

    async def body() -> object:
        clock.advance(took)
        if exc is not None:
            raise exc
        return _OK

    try:
        return await b.call(body)
    except Exception as e:
        return e


async def hits(
    b: CircuitBreaker, clock: Clock, n: int, exc: BaseException | None = None, took: float = 0.0
) -> None:
    for _ in range(n):
        await hit(b, clock, exc, took)


def down() -> ConnectionError:
    return ConnectionRefusedError("connection refused")


def make(clock: Clock, **kw: Any) -> CircuitBreaker:
    cfg: dict[str, Any] = {"min_calls": 10, "failure_rate": 0.5, "open_s": 5.0, "half_open_calls": 3}
    cfg.update(kw)
    return CircuitBreaker("pg", BreakerConfig(**cfg), clock=clock)


Change = tuple[str, BreakerState, BreakerState, str]


def record_changes(b: CircuitBreaker) -> list[Change]:
    changes: list[Change] = []
    b.on_change(lambda br, old, new, reason: changes.append((br.name, old, new, reason)))
    return changes


async def open_it(b: CircuitBreaker, clock: Clock) -> None:
    await hits(b, clock, b.config.min_calls, down())
    assert b.state is BreakerState.OPEN


# ---- closed: counting and opening ---------------------------------------------------------------


def test_closed_breaker_passes_results_and_exceptions_through() -> None:
    async def main() -> None:
        clock = Clock()
        b = make(clock)
        assert await b.call(lambda x, y=0: asyncio.sleep(0, x + y), 2, y=3) == 5
        not_found = RequestError(code=ErrorCode.NOT_FOUND)
        assert await hit(b, clock, not_found) is not_found  # unchanged, same object
        refused = down()
        assert await hit(b, clock, refused) is refused
        async with b.guard():
            pass
        assert (b.calls, b.failures, b.in_flight, b.state) == (4, 1, 0, BreakerState.CLOSED)

    run(main())


def test_opens_when_the_failure_rate_reaches_the_threshold() -> None:
    async def main() -> None:
        clock = Clock()
        b = make(clock)
        changes = record_changes(b)
        await hits(b, clock, 5)
        await hits(b, clock, 4, down())
        assert b.state is BreakerState.CLOSED  # 9 calls: below min_calls
        await hit(b, clock, down())  # 5 of 10: at the threshold
        assert b.state is BreakerState.OPEN
        reason = "failure rate 50% over 10 calls in 10s"
        assert changes == [("pg", BreakerState.CLOSED, BreakerState.OPEN, reason)]

        called = False

        async def body() -> None:
            nonlocal called
            called = True

        clock.advance(1.25)
        with pytest.raises(BreakerOpenError) as ei:
            await b.call(body)
        assert not called
        err = ei.value
        assert isinstance(err, UnavailableError) and err.code == ErrorCode.UNAVAILABLE
        assert is_retryable(err)
        assert err.breaker == "pg"
        assert err.retry_after_ms == 3750  # until half-open
        assert b.rejected == 1 and b.calls == 10

    run(main())


def test_stays_closed_below_the_failure_rate() -> None:
    async def main() -> None:
        clock = Clock()
        b = make(clock)
        await hits(b, clock, 6)
        await hits(b, clock, 4, down())  # 40 %
        await hits(b, clock, 30)
        assert b.state is BreakerState.CLOSED and b.failures == 4

    run(main())


def test_no_decision_below_min_calls() -> None:
    async def main() -> None:
        clock = Clock()
        b = make(clock, min_calls=10, failure_rate=0.1)
        await hits(b, clock, 9, down())  # 100 % failures, but only 9 calls
        assert b.state is BreakerState.CLOSED
        await hit(b, clock, down())
        assert b.state is BreakerState.OPEN

    run(main())


def test_a_success_that_reaches_min_calls_can_open_it() -> None:
    async def main() -> None:
        clock = Clock()
        b = make(clock)
        await hits(b, clock, 9, down())
        await hit(b, clock)  # 9 of 10 failed
        assert b.state is BreakerState.OPEN

    run(main())


def test_opens_when_the_slow_call_rate_reaches_the_threshold() -> None:
    async def main() -> None:
        clock = Clock()
        b = make(clock, min_calls=4, slow_call_s=1.0, slow_call_rate=0.5)
        changes = record_changes(b)
        await hits(b, clock, 2, took=0.2)
        await hit(b, clock, took=1.0)  # at slow_call_s: slow
        assert b.state is BreakerState.CLOSED
        await hit(b, clock, took=3.0)
        assert b.state is BreakerState.OPEN
        assert changes[0][3] == "slow-call rate 50% (>= 1s) over 4 calls in 10s"
        assert b.slow == 2 and b.failures == 0

    run(main())


def test_slow_calls_below_the_rate_or_disabled_do_not_open_it() -> None:
    async def main() -> None:
        clock = Clock()
        b = make(clock, min_calls=4, slow_call_s=1.0, slow_call_rate=0.5)
        await hits(b, clock, 3, took=0.1)
        await hit(b, clock, took=2.0)  # 25 %
        assert b.state is BreakerState.CLOSED and b.slow == 1
        off = make(clock, min_calls=4, slow_call_s=0.0, slow_call_rate=0.1)
        await hits(off, clock, 10, took=100.0)
        assert off.state is BreakerState.CLOSED and off.slow == 0

    run(main())


def test_non_failure_exceptions_do_not_open_it() -> None:
    async def main() -> None:
        clock = Clock()
        b = make(clock, min_calls=5, failure_rate=0.2)
        await hits(b, clock, 10, RequestError(code=ErrorCode.NOT_FOUND))
        await hits(b, clock, 10, RequestError("taken", code=ErrorCode.CONFLICT))
        await hits(b, clock, 10, ValueError("a bug in the caller"))
        assert b.state is BreakerState.CLOSED and b.failures == 0 and b.calls == 30

        # a custom predicate decides instead of the default
        picky = make(clock, min_calls=5, failure_rate=0.5, is_failure=lambda e: isinstance(e, KeyError))
        await hits(picky, clock, 5, down())
        assert picky.state is BreakerState.CLOSED
        await hits(picky, clock, 5, KeyError("x"))
        assert picky.state is BreakerState.OPEN

    run(main())


def test_default_failure_predicate() -> None:
    assert is_failure(UnavailableError("down"))
    assert is_failure(ConnectionResetError())
    assert is_failure(TimeoutError())
    assert is_failure(OSError(113, "no route to host"))
    assert not is_failure(RequestError(code=ErrorCode.NOT_FOUND))
    assert not is_failure(GochatError(code=ErrorCode.INTERNAL))
    assert not is_failure(ValueError())


def test_the_window_forgets_old_buckets() -> None:
    async def main() -> None:
        clock = Clock(1000.0)  # a bucket boundary: buckets are 1 s
        b = make(clock, window_s=10.0, buckets=10, min_calls=10, failure_rate=0.5)
        await hits(b, clock, 5, down())  # bucket [1000, 1001)
        clock.advance(5.0)
        await hits(b, clock, 3)  # bucket [1005, 1006)
        assert b.snapshot()["calls"] == 8 and b.snapshot()["failures"] == 5
        clock.advance(4.5)  # now 1009.5: still inside the window
        assert b.snapshot()["calls"] == 8
        clock.advance(0.5)  # 1010: the first bucket left the window
        snap = b.snapshot()
        assert (snap["calls"], snap["failures"]) == (3, 0)
        # the five old failures no longer count: 4 new ones in 10 calls stay below 50 %
        await hits(b, clock, 3)
        await hits(b, clock, 4, down())
        assert b.state is BreakerState.CLOSED
        assert b.snapshot()["calls"] == 10
        clock.advance(60.0)  # past the whole window at once
        assert b.snapshot()["calls"] == 0
        await hits(b, clock, 9, down())
        assert b.state is BreakerState.CLOSED  # 9 calls in the window: below min_calls
        assert b.failures == 18  # the totals remember everything

    run(main())


# ---- open, half-open, probes ---------------------------------------------------------------------


def test_half_open_after_open_s() -> None:
    async def main() -> None:
        clock = Clock()
        b = make(clock, open_s=5.0)
        changes = record_changes(b)
        await open_it(b, clock)
        clock.advance(4.75)
        err = await hit(b, clock)
        assert isinstance(err, BreakerOpenError) and err.retry_after_ms == 250
        assert b.snapshot()["seconds_until_half_open"] == 0.25
        assert b.state is BreakerState.OPEN
        clock.advance(0.25)
        assert b.state is BreakerState.HALF_OPEN
        assert changes[-1] == ("pg", BreakerState.OPEN, BreakerState.HALF_OPEN, "open for 5s")

    run(main())


def test_a_call_after_open_s_is_a_probe_without_reading_state_first() -> None:
    async def main() -> None:
        clock = Clock()
        b = make(clock, half_open_calls=1)
        changes = record_changes(b)
        await open_it(b, clock)
        clock.advance(5.0)
        assert await hit(b, clock) is _OK
        assert [c[2] for c in changes] == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]

    run(main())


def test_closes_after_half_open_calls_successes() -> None:
    async def main() -> None:
        clock = Clock()
        b = make(clock, half_open_calls=3)
        changes = record_changes(b)
        await open_it(b, clock)
        clock.advance(5.0)
        await hits(b, clock, 2)
        assert b.state is BreakerState.HALF_OPEN
        await hit(b, clock, RequestError(code=ErrorCode.NOT_FOUND))  # an answer: a success
        assert b.state is BreakerState.CLOSED
        assert changes[-1] == ("pg", BreakerState.HALF_OPEN, BreakerState.CLOSED, "probes succeeded: 3 of 3")
        snap = b.snapshot()
        assert (snap["calls"], snap["failures"]) == (0, 0)  # a fresh window
        await hits(b, clock, 9, down())
        assert b.state is BreakerState.CLOSED  # the old failures are gone: 9 < min_calls

    run(main())


def test_a_failed_probe_opens_it_again() -> None:
    async def main() -> None:
        clock = Clock()
        b = make(clock, half_open_calls=3)
        changes = record_changes(b)
        await open_it(b, clock)
        clock.advance(5.0)
        await hit(b, clock)
        await hit(b, clock, down())
        assert b.state is BreakerState.OPEN
        assert changes[-1][1:3] == (BreakerState.HALF_OPEN, BreakerState.OPEN)
        assert changes[-1][3] == "probe call failed: ConnectionRefusedError: connection refused"
        err = await hit(b, clock)
        assert isinstance(err, BreakerOpenError) and err.retry_after_ms == 5000  # a full open_s again
        clock.advance(5.0)
        await hits(b, clock, 3)
        assert b.state is BreakerState.CLOSED

    run(main())


def test_a_slow_probe_opens_it_again() -> None:
    async def main() -> None:
        clock = Clock()
        b = make(clock, slow_call_s=1.0)
        changes = record_changes(b)
        await open_it(b, clock)
        clock.advance(5.0)
        assert await hit(b, clock, took=1.5) is _OK  # the caller still gets its answer
        assert b.state is BreakerState.OPEN
        assert changes[-1][3] == "probe call slow (1.5s)"

    run(main())


def test_probes_beyond_half_open_calls_are_refused() -> None:
    async def main() -> None:
        clock = Clock()
        b = make(clock, half_open_calls=2, busy_retry_after_ms=25)
        await open_it(b, clock)
        clock.advance(5.0)
        gate = asyncio.Event()

        async def probe() -> None:
            async with b.guard():
                await gate.wait()

        probes = [asyncio.create_task(probe()) for _ in range(2)]
        await asyncio.sleep(0)
        assert b.in_flight == 2
        err = await hit(b, clock)
        assert isinstance(err, BreakerOpenError) and err.retry_after_ms == 25
        assert "probes in flight" in err.message
        assert b.state is BreakerState.HALF_OPEN
        gate.set()
        await asyncio.gather(*probes)
        assert b.state is BreakerState.CLOSED

    run(main())


def test_a_cancelled_probe_frees_its_place() -> None:
    async def main() -> None:
        clock = Clock()
        b = make(clock, half_open_calls=1)
        await open_it(b, clock)
        clock.advance(5.0)
        task = asyncio.create_task(b.call(asyncio.sleep, 3600))
        await asyncio.sleep(0)
        assert isinstance(await hit(b, clock), BreakerOpenError)  # the one probe is taken
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert b.state is BreakerState.HALF_OPEN  # a cancellation is no verdict
        assert await hit(b, clock) is _OK
        assert b.state is BreakerState.CLOSED

    run(main())


def test_calls_admitted_before_a_state_change_do_not_count_after_it() -> None:
    async def main() -> None:
        clock = Clock()
        b = make(clock, half_open_calls=2)
        gates = [asyncio.Event() for _ in range(4)]

        async def late_failure(gate: asyncio.Event) -> None:
            async with b.guard():
                await gate.wait()
                raise down()

        old_calls = [asyncio.create_task(late_failure(gates[i])) for i in range(2)]
        await asyncio.sleep(0)
        await open_it(b, clock)
        clock.advance(5.0)
        old_probe = asyncio.create_task(late_failure(gates[2]))  # a probe of this half-open
        await asyncio.sleep(0)
        assert b.state is BreakerState.HALF_OPEN
        gates[0].set()  # a call from the closed state fails now: no probe, no re-opening
        with pytest.raises(ConnectionError):
            await old_calls[0]
        assert b.state is BreakerState.HALF_OPEN and b.in_flight == 2
        assert b.failures == 11  # but the totals count it
        await hits(b, clock, 2, down())  # the second probe fails: open again
        assert b.state is BreakerState.OPEN
        clock.advance(5.0)
        await hits(b, clock, 1)
        assert b.state is BreakerState.HALF_OPEN
        gates[2].set()  # the probe of the earlier half-open fails: it is no probe of this one
        with pytest.raises(ConnectionError):
            await old_probe
        assert b.state is BreakerState.HALF_OPEN
        await hits(b, clock, 1)
        assert b.state is BreakerState.CLOSED
        gates[1].set()  # an old failure does not land in the new window either
        with pytest.raises(ConnectionError):
            await old_calls[1]
        assert b.snapshot()["failures"] == 0 and b.in_flight == 0

    run(main())


# ---- bulkhead and call timeout -------------------------------------------------------------------


def test_bulkhead_refuses_beyond_max_concurrent_and_releases_on_every_exit() -> None:
    async def main() -> None:
        clock = Clock()
        b = make(clock, max_concurrent=2, busy_retry_after_ms=20)
        gate = asyncio.Event()

        async def blocked(exc: BaseException | None) -> None:
            async with b.guard():
                await gate.wait()
                if exc is not None:
                    raise exc

        t1 = asyncio.create_task(blocked(RequestError(code=ErrorCode.NOT_FOUND)))
        t2 = asyncio.create_task(blocked(None))
        await asyncio.sleep(0)
        assert b.in_flight == 2
        err = await hit(b, clock)
        assert isinstance(err, BulkheadFullError) and isinstance(err, UnavailableError)
        assert err.code == ErrorCode.UNAVAILABLE and err.retry_after_ms == 20 and err.breaker == "pg"
        assert b.rejected_bulkhead == 1 and b.rejected == 0
        assert b.snapshot()["calls"] == 0  # a refusal is not a call of the dependency

        t2.cancel()  # cancellation releases its place
        with pytest.raises(asyncio.CancelledError):
            await t2
        assert b.in_flight == 1
        assert await hit(b, clock) is _OK
        gate.set()  # an exception releases its place
        with pytest.raises(RequestError):
            await t1
        assert b.in_flight == 0
        assert b.calls == 2  # t1 and the successful hit; the cancelled t2 counts as nothing

    run(main())


def test_bulkhead_refusal_in_half_open_does_not_use_up_a_probe() -> None:
    async def main() -> None:
        clock = Clock()
        b = make(clock, min_calls=1, failure_rate=1.0, max_concurrent=2, half_open_calls=2)
        stale_gate, fail_gate, probe_gate = asyncio.Event(), asyncio.Event(), asyncio.Event()

        async def blocked(gate: asyncio.Event, exc: BaseException | None = None) -> None:
            async with b.guard():
                await gate.wait()
                if exc is not None:
                    raise exc

        stale = asyncio.create_task(blocked(stale_gate))
        failing = asyncio.create_task(blocked(fail_gate, down()))
        await asyncio.sleep(0)
        fail_gate.set()
        with pytest.raises(ConnectionError):
            await failing
        assert b.state is BreakerState.OPEN and b.in_flight == 1  # the stale call still runs
        clock.advance(5.0)
        probe = asyncio.create_task(blocked(probe_gate))
        await asyncio.sleep(0)
        assert b.state is BreakerState.HALF_OPEN and b.in_flight == 2
        assert isinstance(await hit(b, clock), BulkheadFullError)  # took the 2nd probe, gave it back
        stale_gate.set()
        probe_gate.set()
        await asyncio.gather(stale, probe)
        assert b.state is BreakerState.HALF_OPEN  # 1 of 2 probes
        assert await hit(b, clock) is _OK  # the 2nd probe place is free again
        assert b.state is BreakerState.CLOSED

    run(main())


def test_call_timeout_cancels_counts_a_failure_and_raises_unavailable() -> None:
    async def main() -> None:
        clock = Clock()
        b = make(clock, min_calls=2, failure_rate=0.6, call_timeout_s=0.005)
        cancelled = False

        async def hangs() -> None:
            nonlocal cancelled
            try:
                await asyncio.sleep(3600)  # a backend that accepted and never answers
            except asyncio.CancelledError:
                cancelled = True
                raise

        assert await b.call(asyncio.sleep, 0, "fast") == "fast"  # within the limit: untouched
        with pytest.raises(CallTimeoutError) as ei:
            await b.call(hangs)
        err = ei.value
        assert cancelled
        assert isinstance(err, UnavailableError) and err.code == ErrorCode.UNAVAILABLE
        assert is_retryable(err) and err.breaker == "pg"
        assert isinstance(err.__cause__, TimeoutError)
        assert (b.calls, b.failures, b.in_flight) == (2, 1, 0)
        assert b.state is BreakerState.CLOSED  # 1 of 2 < 60 %
        with pytest.raises(CallTimeoutError):
            async with b.guard():
                await asyncio.sleep(3600)
        assert b.state is BreakerState.OPEN  # 2 of 3

    run(main())


def test_call_timeout_leaves_an_outer_cancellation_alone() -> None:
    async def main() -> None:
        clock = Clock()
        b = make(clock, call_timeout_s=10.0)
        task = asyncio.create_task(b.call(asyncio.sleep, 3600))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (b.calls, b.failures, b.in_flight) == (0, 0, 0)

    run(main())


def test_outside_cancellation_counts_as_neither_success_nor_failure() -> None:
    async def main() -> None:
        clock = Clock()
        b = make(clock, min_calls=1, failure_rate=0.5)
        task = asyncio.create_task(b.call(asyncio.sleep, 3600))
        await asyncio.sleep(0)
        assert b.in_flight == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (b.calls, b.failures, b.in_flight) == (0, 0, 0)
        assert b.snapshot()["calls"] == 0
        await hit(b, clock, down())
        assert b.state is BreakerState.OPEN  # 1 of 1: the cancelled call did not dilute it

    run(main())


# ---- forced states, reset, listeners, snapshot ----------------------------------------------------


def test_forced_open_refuses_everything_and_does_not_change_by_itself() -> None:
    async def main() -> None:
        clock = Clock()
        b = make(clock)
        changes = record_changes(b)
        b.force_open("maintenance")
        assert b.state is BreakerState.FORCED_OPEN
        err = await hit(b, clock)
        assert isinstance(err, BreakerOpenError) and "forced open" in err.message
        clock.advance(3600.0)
        assert b.state is BreakerState.FORCED_OPEN
        assert isinstance(await hit(b, clock), BreakerOpenError)
        assert b.rejected == 2 and b.calls == 0
        b.reset()
        assert b.state is BreakerState.CLOSED
        assert await hit(b, clock) is _OK
        assert changes == [
            ("pg", BreakerState.CLOSED, BreakerState.FORCED_OPEN, "maintenance"),
            ("pg", BreakerState.FORCED_OPEN, BreakerState.CLOSED, "reset"),
        ]

    run(main())


def test_forced_closed_lets_everything_through_and_reset_returns_to_automatic() -> None:
    async def main() -> None:
        clock = Clock()
        b = make(clock)
        await open_it(b, clock)
        b.force_closed()
        assert b.state is BreakerState.FORCED_CLOSED
        await hits(b, clock, 30, down())
        assert b.state is BreakerState.FORCED_CLOSED
        snap = b.snapshot()
        assert snap["state"] == "forced_closed"
        assert (snap["calls"], snap["failures"], snap["failure_rate"]) == (30, 30, 1.0)  # still measured
        b.reset()
        assert b.state is BreakerState.CLOSED and b.snapshot()["calls"] == 0
        await hits(b, clock, 9, down())
        assert b.state is BreakerState.CLOSED
        await hit(b, clock, down())
        assert b.state is BreakerState.OPEN

    run(main())


def test_listeners_get_every_change_with_its_reason_and_state_changes_are_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        clock = Clock()
        b = make(clock, half_open_calls=1)
        seen: list[Change] = []

        def broken(*_: object) -> None:
            raise RuntimeError("a bad listener")

        b.on_change(broken)  # logged, does not break the breaker or the other listeners
        unsubscribe = b.on_change(lambda br, old, new, why: seen.append((br.name, old, new, why)))
        await open_it(b, clock)
        clock.advance(5.0)
        await hit(b, clock)
        assert [(old.value, new.value) for _, old, new, _ in seen] == [
            ("closed", "open"), ("open", "half_open"), ("half_open", "closed"),
        ]
        assert b.state_changes == 3
        unsubscribe()
        unsubscribe()  # twice is harmless
        b.force_open()
        assert len(seen) == 3 and b.state_changes == 4

    with caplog.at_level(logging.INFO, logger="gochat.resilience"):
        run(main())
    changes = [(r.levelno, r.getMessage()) for r in caplog.records if "->" in r.getMessage()]
    assert changes == [
        (logging.WARNING, "breaker pg: closed -> open: failure rate 100% over 10 calls in 10s"),
        (logging.INFO, "breaker pg: open -> half_open: open for 5s"),
        (logging.INFO, "breaker pg: half_open -> closed: probes succeeded: 1 of 1"),
        (logging.WARNING, "breaker pg: closed -> forced_open: forced open"),
    ]
    assert any("state listener" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)


def test_snapshot() -> None:
    async def main() -> None:
        clock = Clock()
        b = make(clock, slow_call_s=1.0, slow_call_rate=1.0, min_calls=100)
        await hits(b, clock, 2)
        await hit(b, clock, down(), took=2.0)
        await hit(b, clock, took=1.0)
        assert b.snapshot() == {
            "name": "pg",
            "state": "closed",
            "window_s": 10.0,
            "calls": 4,
            "failures": 1,
            "slow": 2,
            "failure_rate": 0.25,
            "slow_rate": 0.5,
            "in_flight": 0,
            "seconds_until_half_open": 0.0,
            "total_calls": 4,
            "total_failures": 1,
            "total_slow": 2,
            "rejected": 0,
            "rejected_bulkhead": 0,
            "state_changes": 0,
        }
        b.force_open()
        await hit(b, clock)
        snap = b.snapshot()
        assert (snap["state"], snap["rejected"], snap["state_changes"]) == ("forced_open", 1, 1)
        assert repr(b) == "<CircuitBreaker 'pg' forced_open>"

    run(main())


def test_registry_creates_on_first_use_lists_and_finds_by_name() -> None:
    async def main() -> None:
        clock = Clock()
        reg = BreakerRegistry(BreakerConfig(min_calls=2, failure_rate=0.5), clock=clock)
        seen: list[str] = []
        reg.on_change(lambda br, old, new, why: seen.append(f"{br.name}:{new.value}"))
        pg = reg.get("postgres")
        assert reg.get("postgres") is pg and pg.config == reg.default
        redis_cfg = BreakerConfig(min_calls=5, max_concurrent=8)
        redis = reg.get("redis", redis_cfg)
        assert reg.get("redis", redis_cfg) is redis and reg.get("redis") is redis
        with pytest.raises(ValueError, match="another config"):
            reg.get("redis", BreakerConfig(min_calls=6))
        assert [b.name for b in reg] == ["postgres", "redis"] and len(reg) == 2
        assert "redis" in reg and "nats" not in reg
        assert reg["redis"] is redis
        with pytest.raises(KeyError):
            reg["nats"]  # lookup by the admin API creates nothing
        assert len(reg) == 2
        reg["redis"].force_open()
        await hits(pg, clock, 2, down())  # registry listeners reach breakers made before...
        reg.get("later").force_closed()  # ...and after they were added
        assert seen == ["redis:forced_open", "postgres:open", "later:forced_closed"]
        assert [s["state"] for s in reg.snapshot()] == ["open", "forced_open", "forced_closed"]

    run(main())


def test_breaker_config_is_validated() -> None:
    for bad in (
        {"window_s": 0},
        {"buckets": 0},
        {"min_calls": 0},
        {"failure_rate": 0},
        {"failure_rate": 1.5},
        {"slow_call_rate": 0},
        {"slow_call_s": -1},
        {"open_s": -1},
        {"half_open_calls": 0},
        {"max_concurrent": -1},
        {"call_timeout_s": -0.1},
        {"busy_retry_after_ms": -1},
    ):
        with pytest.raises(ValueError, match="invalid BreakerConfig"):
            BreakerConfig(**bad)
    assert BreakerConfig(failure_rate=1.0, slow_call_rate=1.0, open_s=0).open_s == 0


def test_closed_path_overhead() -> None:
    """The cost a breaker adds to a call in the closed state (the number quoted in
    gochat/resilience/breaker.py's docstring): ``async with breaker.guard(): await noop()``
    minus ``await noop()``, best of 3 runs of 50k calls. Measured on the development machine
    (CPython 3.11, asyncio): ~0.7 µs for guard(), ~0.83 µs for call(); with uvloop the same.
    The bound asserted is loose (a loaded CI machine), meant to catch an accidental slow path
    (a lock, a log call, an allocation per bucket), not to benchmark."""

    async def noop() -> None:
        return None

    async def main() -> tuple[float, float]:
        b = CircuitBreaker("bench", BreakerConfig(max_concurrent=1000))
        n = 50_000
        best_guard = best_call = math.inf
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(n):
                await noop()
            base = time.perf_counter() - t0
            t0 = time.perf_counter()
            for _ in range(n):
                async with b.guard():
                    await noop()
            best_guard = min(best_guard, (time.perf_counter() - t0 - base) / n)
            t0 = time.perf_counter()
            for _ in range(n):
                await b.call(noop)
            best_call = min(best_call, (time.perf_counter() - t0 - base) / n)
        assert b.calls == 6 * n and b.in_flight == 0
        return best_guard, best_call

    per_guard, per_call = run(main())
    print(f"breaker closed-path overhead: guard {per_guard * 1e6:.2f} µs, call {per_call * 1e6:.2f} µs")
    assert per_guard < 20e-6 and per_call < 20e-6


# ---- retry ------------------------------------------------------------------------------------------


class Script:
    """``fn`` for RetryPolicy.run: raises the given exceptions in turn, then returns "done";
    every call and every sleep moves a fake clock (``call_s``; the slept seconds)."""

    def __init__(self, *outcomes: BaseException, call_s: float = 0.0) -> None:
        self.outcomes = list(outcomes)
        self.calls = 0
        self.sleeps: list[float] = []
        self.clock = Clock(0.0)
        self.call_s = call_s

    async def __call__(self) -> str:
        self.calls += 1
        self.clock.advance(self.call_s)
        if self.outcomes:
            raise self.outcomes.pop(0)
        return "done"

    async def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.clock.advance(s)

    def policy(self, **kw: Any) -> RetryPolicy:
        defaults: dict[str, Any] = {
            "max_attempts": 5, "base_delay_s": 0.1, "max_delay_s": 1.0, "max_elapsed_s": 100.0,
            "random": lambda: 0.5,
        }
        defaults.update(kw)
        return RetryPolicy(sleep=self.sleep, clock=self.clock, **defaults)


def test_retries_until_success_within_max_attempts() -> None:
    s = Script(ConnectionResetError(), UnavailableError("down"))
    assert run(s.policy(max_attempts=3).run(s)) == "done"
    assert s.calls == 3 and s.sleeps == [0.05, 0.1]


def test_gives_up_after_max_attempts_with_the_last_exception() -> None:
    errors = [ConnectionResetError(f"#{i}") for i in range(5)]
    s = Script(*errors)
    with pytest.raises(ConnectionResetError) as ei:
        run(s.policy(max_attempts=4).run(s))
    assert ei.value is errors[3]
    assert s.calls == 4 and len(s.sleeps) == 3


def test_none_policy_tries_once() -> None:
    s = Script(ConnectionResetError())
    policy = RetryPolicy.none()
    with pytest.raises(ConnectionResetError):
        run(RetryPolicy(max_attempts=1, sleep=s.sleep).run(s))
    assert s.calls == 1 and s.sleeps == []
    assert policy.max_attempts == 1
    assert run(policy.run(Script())) == "done"


def test_full_jitter_bounds() -> None:
    """delay(n) = uniform(0, min(max_delay_s, base_delay_s * 2**n)): the random number scales
    the cap, whose growth doubles per retry until max_delay_s."""
    caps = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    for r in (0.0, 0.25, 0.999999):
        p = RetryPolicy(base_delay_s=0.1, max_delay_s=1.0, random=lambda r=r: r)
        assert [p.delay(n) for n in range(6)] == pytest.approx([r * c for c in caps])
    top = RetryPolicy(base_delay_s=0.1, max_delay_s=1.0, random=lambda: 0.999999)
    assert top.delay(10_000) == 0.999999  # capped; no overflow far out
    import random

    rng = random.Random(7)
    p = RetryPolicy(base_delay_s=0.1, max_delay_s=1.0, random=rng.random)
    for n in range(8):
        samples = [p.delay(n) for _ in range(200)]
        cap = min(1.0, 0.1 * 2**n)
        assert all(0 <= d < cap for d in samples)
        assert max(samples) > 0.8 * cap and min(samples) < 0.2 * cap  # spread over the whole range
    s = Script(*[OSError()] * 6)
    with pytest.raises(OSError):
        run(s.policy(max_attempts=6, random=lambda: 1.0).run(s))
    assert s.sleeps == pytest.approx(caps[:5])


def test_max_elapsed_stops_without_sleeping_past_it() -> None:
    # calls take 1 s, waits 0.05, 0.1, 0.2, ...: t=1 fail, sleep to 1.05, t=2.05 fail, sleep to
    # 2.15, t=3.15 fail; the next wait (0.2) would start an attempt at 3.35 > 3.3: give up.
    s = Script(*[TimeoutError()] * 10, call_s=1.0)
    with pytest.raises(TimeoutError):
        run(s.policy(max_attempts=10, max_elapsed_s=3.3).run(s))
    assert s.calls == 3 and s.sleeps == pytest.approx([0.05, 0.1])
    assert s.clock.now == pytest.approx(3.15)
    # the first attempt's own duration counts too
    s = Script(TimeoutError(), call_s=5.0)
    with pytest.raises(TimeoutError):
        run(s.policy(max_elapsed_s=5.0).run(s))
    assert s.calls == 1 and s.sleeps == []


def test_non_retryable_errors_are_raised_at_once() -> None:
    for exc in (
        ValueError("bad"),
        KeyError("k"),
        RequestError(code=ErrorCode.NOT_FOUND),
        RequestError("taken", code=ErrorCode.CONFLICT),
        GochatError(code=ErrorCode.FORBIDDEN),
    ):
        s = Script(exc)
        with pytest.raises(type(exc)) as ei:
            run(s.policy().run(s))
        assert ei.value is exc and s.calls == 1 and s.sleeps == []
    # a custom classifier replaces the default one
    s = Script(ValueError(), ValueError())
    assert run(s.policy(retryable=lambda e: isinstance(e, ValueError)).run(s)) == "done"
    assert s.calls == 3


def test_classification_follows_the_error_table() -> None:
    assert is_retryable(UnavailableError("down"))
    assert is_retryable(GochatError(code=ErrorCode.UNAVAILABLE))
    assert is_retryable(GochatError(code=ErrorCode.OVERLOADED))
    assert is_retryable(RequestError(code=ErrorCode.RATE_LIMITED))
    assert not is_retryable(RequestError(code=ErrorCode.NOT_FOUND))
    assert not is_retryable(GochatError(code=ErrorCode.UNAUTHORIZED))
    for code, spec in ERRORS.items():
        assert is_retryable(GochatError(code=code)) is spec.retryable, code
    # a code made retryable by its class still follows the table, not the class
    assert not is_retryable(UnavailableError("overloaded?", code=ErrorCode.NOT_FOUND))
    retryable: list[BaseException] = [ConnectionError(), ConnectionRefusedError(), TimeoutError(), OSError()]
    retryable += [BreakerOpenError("pg", 5), BulkheadFullError("pg", 5), CallTimeoutError("pg", 1)]
    for exc in retryable:
        assert is_retryable(exc), exc
    not_retryable = (ValueError(), RuntimeError(), AssertionError(), asyncio.CancelledError(), SystemExit())
    for exc in not_retryable:
        assert not is_retryable(exc), exc


def test_retry_after_ms_is_a_lower_bound_for_the_wait() -> None:
    def errors() -> list[GochatError]:
        limited = RequestError(code=ErrorCode.RATE_LIMITED, retry_after_ms=300)
        return [limited, UnavailableError(retry_after_ms=10)]

    s = Script(*errors())
    assert run(s.policy(random=lambda: 0.0).run(s)) == "done"
    # 0.3 s asked for over a jitter of 0 (or 0.1), then 10 ms over 0 but not over 0.2
    s2 = Script(*errors())
    assert run(s2.policy(random=lambda: 1.0).run(s2)) == "done"
    assert s.sleeps == pytest.approx([0.3, 0.01]) and s2.sleeps == pytest.approx([0.3, 0.2])


def test_retries_wait_for_an_open_breaker_or_give_up_when_it_is_too_far() -> None:
    """BreakerOpenError says when to come back: a policy whose time runs out before that gives
    up at once instead of sleeping in vain; one with time enough waits and gets through."""

    async def main() -> None:
        s = Script()
        b = make(s.clock, min_calls=1, open_s=30.0, half_open_calls=1)
        await hit(b, s.clock, down())

        async def through_breaker() -> str:
            return await b.call(s)

        with pytest.raises(BreakerOpenError):
            await s.policy(max_elapsed_s=10.0).run(through_breaker)
        assert s.calls == 0 and s.sleeps == []
        assert await s.policy(max_elapsed_s=60.0, max_attempts=2).run(through_breaker) == "done"
        assert s.calls == 1 and s.sleeps == [30.0]
        assert b.state is BreakerState.CLOSED

    run(main())


def test_cancelled_error_is_never_retried() -> None:
    s = Script(asyncio.CancelledError(), call_s=0.0)
    with pytest.raises(asyncio.CancelledError):
        run(s.policy(retryable=lambda e: True).run(s))
    assert s.calls == 1 and s.sleeps == []

    async def cancelled_while_waiting() -> None:
        waiting = asyncio.Event()

        async def sleep(_: float) -> None:
            waiting.set()
            await asyncio.sleep(3600)

        s = Script(ConnectionResetError())
        task = asyncio.create_task(RetryPolicy(sleep=sleep).run(s))
        await waiting.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert s.calls == 1

    run(cancelled_while_waiting())


def test_on_retry_and_the_debug_line(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[tuple[int, BaseException, float]] = []
    e1, e2 = ConnectionResetError("one"), ConnectionResetError("two")
    s = Script(e1, e2)
    with caplog.at_level(logging.DEBUG, logger="gochat.resilience"):
        run(s.policy().run(s, what="get_user", on_retry=lambda n, e, d: seen.append((n, e, d))))
    assert seen == [(1, e1, 0.05), (2, e2, 0.1)]
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert lines == [
        "retry 1/4 of get_user in 0.050s after ConnectionResetError('one')",
        "retry 2/4 of get_user in 0.100s after ConnectionResetError('two')",
    ]


def test_retry_policy_is_a_validated_frozen_value() -> None:
    async def nap(_: float) -> None:
        return None

    p = RetryPolicy(max_attempts=4, base_delay_s=0.01, max_delay_s=0.5, max_elapsed_s=2.0)
    assert p == RetryPolicy(max_attempts=4, base_delay_s=0.01, max_delay_s=0.5, max_elapsed_s=2.0, sleep=nap,
                            clock=lambda: 0.0, random=lambda: 0.0)
    assert repr(p) == "RetryPolicy(max_attempts=4, base_delay_s=0.01, max_delay_s=0.5, max_elapsed_s=2.0)"
    with pytest.raises(AttributeError):
        p.max_attempts = 9  # type: ignore[misc]
    for bad in (
        {"max_attempts": 0},
        {"base_delay_s": -1.0},
        {"base_delay_s": 2.0, "max_delay_s": 1.0},
        {"max_elapsed_s": 0.0},
    ):
        with pytest.raises(ValueError):
            RetryPolicy(**bad)
    assert RetryPolicy(max_elapsed_s=math.inf).max_elapsed_s == math.inf

