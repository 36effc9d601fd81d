"""The node's one retry policy and its breakers' configuration, from :class:`~gochat.config.Settings`.

Every server-side retry (PostgreSQL reads on a dead connection, Redis reconnects and stream
readers, event handlers and publishes) takes its numbers from :func:`retry_policy`; every
breaker from :func:`breaker_config`. Nothing else in the server holds a retry constant.
"""

from __future__ import annotations

from gochat.config import Settings
from gochat.errors import ErrorCode, GochatError, UnavailableError
from gochat.resilience.breaker import BreakerConfig, BreakerOpenError, BulkheadFullError
from gochat.resilience.retry import RetryPolicy

__all__ = ["DEFAULT_RETRY", "breaker_config", "dependency_failure", "retry_policy"]

#: the policy's defaults (the Settings defaults), for parts built without settings (tests, tools)
DEFAULT_RETRY = RetryPolicy(max_attempts=3, base_delay_s=0.05, max_delay_s=2.0, max_elapsed_s=5.0)


def retry_policy(s: Settings) -> RetryPolicy:
    return RetryPolicy(
        max_attempts=s.retry_max_attempts,
        base_delay_s=s.retry_base_delay_ms / 1000,
        max_delay_s=s.retry_max_delay_ms / 1000,
        max_elapsed_s=s.retry_max_elapsed_ms / 1000,
    )


def dependency_failure(exc: BaseException) -> bool:
    """What counts against a dependency's breaker: it was unreachable, broke the connection or
    timed out. Not: a request the dependency refused on its merits (a conflict), the node's own
    backpressure (OVERLOADED), or another breaker's refusal."""
    if isinstance(exc, BreakerOpenError | BulkheadFullError):
        return False
    if isinstance(exc, GochatError):
        return isinstance(exc, UnavailableError) and exc.code == ErrorCode.UNAVAILABLE
    return isinstance(exc, OSError)


def breaker_config(s: Settings) -> BreakerConfig:
    return BreakerConfig(
        window_s=s.breaker_window_s,
        min_calls=s.breaker_min_calls,
        failure_rate=s.breaker_failure_rate,
        slow_call_s=s.breaker_slow_call_ms / 1000,
        slow_call_rate=s.breaker_slow_call_rate,
        open_s=s.breaker_open_s,
        half_open_calls=s.breaker_half_open_calls,
        max_concurrent=s.breaker_max_concurrent,
        is_failure=dependency_failure,
    )
