"""Resilience primitives for calls to the node's dependencies (PostgreSQL, Redis).

* :class:`CircuitBreaker` (with :class:`BreakerConfig`, :class:`BreakerRegistry`): stop
  calling a dependency that fails or hangs, let a few probes through after a pause, and cap
  the calls in flight (bulkhead) and their duration (call timeout);
* :class:`RetryPolicy`: retry what the error table (or ``OSError``) calls retryable, with
  capped full-jitter exponential backoff, bounded by attempts and elapsed time.

Both are for one asyncio event loop and take an injectable monotonic clock for tests.
"""

from gochat.resilience.breaker import (
    BreakerConfig,
    BreakerOpenError,
    BreakerRegistry,
    BreakerSnapshot,
    BreakerState,
    BulkheadFullError,
    CallTimeoutError,
    ChangeListener,
    CircuitBreaker,
    is_failure,
)
from gochat.resilience.retry import Backoff, RetryPolicy, is_retryable

__all__ = [
    "Backoff",
    "BreakerConfig",
    "BreakerOpenError",
    "BreakerRegistry",
    "BreakerSnapshot",
    "BreakerState",
    "BulkheadFullError",
    "CallTimeoutError",
    "ChangeListener",
    "CircuitBreaker",
    "RetryPolicy",
    "is_failure",
    "is_retryable",
]
