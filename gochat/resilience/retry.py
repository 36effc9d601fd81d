"""Retries with capped, fully jittered exponential backoff, bounded by attempts and by time.

A :class:`RetryPolicy` is a frozen value: build one per dependency (from configuration) and
call :meth:`RetryPolicy.run` with a zero-argument coroutine function::

    policy = RetryPolicy(max_attempts=3, base_delay_s=0.05, max_delay_s=1.0, max_elapsed_s=2.0)
    row = await policy.run(lambda: store.get_user(uid), what="get_user")

Rules:

* at most ``max_attempts`` tries in all (the first one included);
* the wait before retry ``n`` (``n = 0`` before the second try) is
  ``uniform(0, min(max_delay_s, base_delay_s * 2**n))``, AWS's "full jitter": callers that
  failed together do not come back together;
* a :class:`~gochat.errors.GochatError`'s ``retry_after_ms`` is a lower bound for that wait
  (the server said when to come back: a rate limit, an open circuit breaker);
* no attempt starts later than ``max_elapsed_s`` after the first one started: a wait that
  would cross that line is not slept, the last error is raised at once;
* only what :attr:`RetryPolicy.retryable` accepts is retried (default :func:`is_retryable`:
  the error table's ``retryable`` flag for gochat's own errors, plus ``OSError`` — which covers
  ``ConnectionError`` and ``TimeoutError``); everything else is raised at once, and
  ``asyncio.CancelledError`` (and any other ``BaseException`` that is not an ``Exception``)
  is never caught at all.

Only a request that is safe to repeat should be retried: a write that may have been applied
before the connection broke needs idempotency (a client message id) first.

Why no library (tenacity, backoff): see ``docs/dependencies.md``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random as _random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from gochat.errors import ERRORS, GochatError

__all__ = ["Backoff", "RetryPolicy", "is_retryable"]

log = logging.getLogger("gochat.resilience")

T = TypeVar("T")

# 2.0 ** 1024 overflows a float; any exponent past this caps at max_delay_s anyway
_MAX_EXPONENT = 60


def is_retryable(exc: BaseException) -> bool:
    """Whether ``exc`` is worth another try: a :class:`GochatError` whose code the error table
    marks retryable (UNAVAILABLE, OVERLOADED, RATE_LIMITED, ...; not NOT_FOUND, CONFLICT, ...),
    or an ``OSError`` (``ConnectionError``, ``TimeoutError``: the network, not the request).
    Anything else — a ``ValueError``, a programming error, ``asyncio.CancelledError`` — is not."""
    if isinstance(exc, GochatError):
        return ERRORS[exc.code].retryable
    return isinstance(exc, OSError)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently to retry one kind of call. See the module docstring."""

    #: tries in all, the first one included (1 = no retry)
    max_attempts: int = 3
    #: the backoff's first cap: the wait before the second try is at most this
    base_delay_s: float = 0.05
    #: no single wait is longer (unless a ``retry_after_ms`` asks for more)
    max_delay_s: float = 1.0
    #: no attempt starts later than this after the first one started (``math.inf``: no bound)
    max_elapsed_s: float = 5.0
    #: which exceptions are retried
    retryable: Callable[[BaseException], bool] = field(default=is_retryable, repr=False)
    #: uniform in [0, 1); injectable so that tests can pin the jitter
    random: Callable[[], float] = field(default=_random.random, compare=False, repr=False)
    sleep: Callable[[float], Awaitable[None]] = field(default=asyncio.sleep, compare=False, repr=False)
    #: monotonic seconds
    clock: Callable[[], float] = field(default=time.monotonic, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {self.max_attempts}")
        if not 0 <= self.base_delay_s <= self.max_delay_s:
            raise ValueError(
                f"need 0 <= base_delay_s <= max_delay_s, got {self.base_delay_s} and {self.max_delay_s}"
            )
        if not self.max_elapsed_s > 0:
            raise ValueError(f"max_elapsed_s must be positive, not {self.max_elapsed_s}")

    @classmethod
    def none(cls) -> RetryPolicy:
        """One attempt, no retry: for callers that take a policy but must not repeat the call."""
        return cls(max_attempts=1, base_delay_s=0.0, max_delay_s=0.0, max_elapsed_s=math.inf)

    def delay(self, attempt: int) -> float:
        """The jittered wait before retry ``attempt`` (0 for the wait before the second try):
        uniform in ``[0, min(max_delay_s, base_delay_s * 2**attempt))``."""
        cap = self.max_delay_s
        if attempt < _MAX_EXPONENT:
            cap = min(cap, self.base_delay_s * 2.0**attempt)
        return self.random() * cap

    def backoff(self) -> Backoff:
        """The policy's delays for a loop that retries until it succeeds (a reconnect, a stream
        reader): the same schedule, never giving up."""
        return Backoff(self)

    async def run(
        self,
        fn: Callable[[], Awaitable[T]],
        *,
        what: str = "",
        on_retry: Callable[[int, BaseException, float], None] | None = None,
    ) -> T:
        """``await fn()``, retried within this policy's limits; the result of the first success.

        Raises the last exception when it is not retryable, when the attempts are used up or
        when the next wait would end past ``max_elapsed_s``. ``on_retry(attempt, exc, delay)``
        is called before each wait: ``attempt`` is the number (from 1) of the try that failed,
        ``delay`` the seconds about to be slept. ``what`` names the call in the DEBUG log line
        written per retry."""
        clock = self.clock
        start = clock()
        attempt = 1
        while True:
            try:
                return await fn()
            except Exception as exc:
                # only Exception: CancelledError, KeyboardInterrupt, SystemExit pass untouched
                if attempt >= self.max_attempts or not self.retryable(exc):
                    raise
                wait = self.delay(attempt - 1)
                if isinstance(exc, GochatError) and exc.retry_after_ms > 0:
                    wait = max(wait, exc.retry_after_ms / 1000.0)
                if clock() - start + wait > self.max_elapsed_s:
                    raise
                log.debug(
                    "retry %d/%d of %s in %.3fs after %r",
                    attempt, self.max_attempts - 1, what or "call", wait, exc,
                )
                if on_retry is not None:
                    on_retry(attempt, exc, wait)
            await self.sleep(wait)
            attempt += 1


class Backoff:
    """Successive waits of a retry-until-it-works loop (:meth:`RetryPolicy.backoff`):
    ``next()`` after each failure, ``reset()`` after a success."""

    __slots__ = ("attempt", "policy")

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.attempt = 0

    def next(self) -> float:
        wait = self.policy.delay(self.attempt)
        self.attempt = min(self.attempt + 1, _MAX_EXPONENT)
        return wait

    def reset(self) -> None:
        self.attempt = 0
