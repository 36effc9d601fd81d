"""Slow statements of a store: fingerprints, counts, the top N, a rate-limited log.

The stores time every statement they run (``gochat/store/sqlite/timing.py``,
``gochat/store/postgres/timing.py``): one monotonic clock read when a statement starts and one
comparison with :attr:`SlowQueryLog.threshold_s`; nothing is allocated for a fast statement.
Only a statement at or above the threshold reaches :meth:`SlowQueryLog.record`, which

* normalizes its SQL into a **fingerprint** (:func:`fingerprint`: literals and parameters
  replaced by ``?``, lists collapsed, comments dropped, schema qualifiers dropped, whitespace
  collapsed, lower case) and a stable short hash of it (16 hex digits, BLAKE2b);
* counts it (``gochat_slow_queries_total{store}``, ``gochat_slow_query_seconds_total{store}``)
  and per fingerprint (count, total, max, last seen) in a bounded table whose top N by total
  time ``GET /v1/admin/slow-queries`` lists;
* logs a WARNING ``gochat.slow_query``: a fingerprint's first slow statement at once, later
  ones at most once a minute per fingerprint (with how many there were meanwhile), and at most
  ``log_burst`` lines a minute in all;
* hands a new fingerprint to :attr:`SlowQueryLog.on_new` (PostgreSQL: its plan shape is
  fetched in the background with ``EXPLAIN``, never on the statement's path, and shown next to
  the fingerprint once known).

Statements whose SQL starts with :data:`INTERNAL` (the plan sampler's own) are never recorded.
Thread-safe: SQLite reports from its reader and writer threads.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from gochat.clock import now_ms

__all__ = ["INTERNAL", "QueryStats", "SlowQueryLog", "fingerprint", "normalize_sql"]

log = logging.getLogger("gochat.slow_query")

#: a comment that marks gochat's own diagnostic statements (never recorded)
INTERNAL: Final = "/* gochat:internal */ "

_COMMENT = re.compile(r"--[^\n]*|/\*.*?\*/", re.S)
_STRING = re.compile(r"(?:\b[EeXxBb])?'(?:[^']|'')*'")
_QUALIFIER = re.compile(r'"(?:[^"]|"")*"\s*\.\s*')  # "schema".table → table
_PARAM = re.compile(r"\$\d+|\?\d*")
_NUMBER = re.compile(r"(?<![\w$.])\d+(?:\.\d+)?(?:[eE][-+]?\d+)?\b")
_SPACE = re.compile(r"\s+")
_OPEN, _CLOSE, _COMMA = re.compile(r"([(\[]) "), re.compile(r" ([)\]])"), re.compile(r" ?, ?")
_LIST = re.compile(r"\((?:\?, )+\?\)")  # (?, ?, ?) → (?+)
_ROWS = re.compile(r"\(\?\+?\)(?:, \(\?\+?\))+")  # (?+), (?+), … → (?+), …
_ARRAY = re.compile(r"\[(?:\?, )*\?\]")
_LINE: Final = "slow %s statement %s: %.1f ms%s (threshold %g ms; %d slow so far, max %.1f ms; plan %s)%s: %s"
_CACHE_MAX: Final = 4096
#: characters of a normalized statement kept (and listed by the admin API)
_STATEMENT_MAX: Final = 2000


def normalize_sql(sql: str) -> str:
    """The statement with its values taken out, as one line: comments dropped, string and
    number literals and parameters (``$1``, ``?``) replaced by ``?``, a list of them by
    ``(?+)`` and a run of such rows by ``(?+), …``, ``"schema".`` qualifiers dropped (a
    fingerprint is the same whatever the schema), whitespace collapsed, lower case."""
    s = _COMMENT.sub(" ", sql)
    s = _STRING.sub("?", s)
    s = _QUALIFIER.sub("", s)
    s = _PARAM.sub("?", s)
    s = _NUMBER.sub("?", s)
    s = _SPACE.sub(" ", s).strip().lower()
    s = _COMMA.sub(", ", _CLOSE.sub(r"\1", _OPEN.sub(r"\1", s)))
    s = _LIST.sub("(?+)", s)
    s = _ROWS.sub("(?+), …", s)
    s = _ARRAY.sub("[?+]", s)
    return s


def fingerprint(sql: str) -> tuple[str, str]:
    """(hash, normalized SQL): the hash is 16 hex digits of BLAKE2b over the normalized text,
    the same in every process and release that normalizes alike."""
    text = normalize_sql(sql)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest(), text


@dataclass(slots=True)
class QueryStats:
    """What the log knows about one fingerprint."""

    fingerprint: str
    statement: str
    count: int = 0
    total_s: float = 0.0
    max_s: float = 0.0
    last_seen_ms: int = 0
    #: slow statements that ended in an error (a timeout, a cancellation, a failure)
    failed: int = 0
    #: PostgreSQL: the plan's shape (EXPLAIN, fetched in the background), its hash, or why not
    plan: str | None = None
    plan_fingerprint: str | None = None
    # rate-limited logging
    next_log: float = 0.0
    unlogged: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "statement": self.statement,
            "count": self.count,
            "total_ms": round(self.total_s * 1000, 3),
            "mean_ms": round(self.total_s * 1000 / self.count, 3) if self.count else 0.0,
            "max_ms": round(self.max_s * 1000, 3),
            "last_seen_ms": self.last_seen_ms,
            "failed": self.failed,
            "plan": self.plan,
            "plan_fingerprint": self.plan_fingerprint,
        }


class SlowQueryLog:
    """The slow statements of one store (``store``: ``sqlite`` or ``postgres``).

    ``threshold_ms``: a statement that takes this long or longer is slow (0: every statement,
    for debugging). ``capacity``: fingerprints kept; a new one beyond it evicts the one with the
    least total time. ``log_interval_s``: per fingerprint, at most one WARNING this often after
    the first; ``log_burst``: at most this many WARNING lines per ``log_interval_s`` in all."""

    def __init__(
        self,
        store: str,
        threshold_ms: float = 100.0,
        *,
        capacity: int = 500,
        log_interval_s: float = 60.0,
        log_burst: int = 20,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.store = store
        #: read on every statement (by the stores' timing code): seconds
        self.threshold_s = 0.0
        self.set_threshold_ms(threshold_ms)
        self.capacity = capacity
        self.log_interval_s = log_interval_s
        self.log_burst = log_burst
        #: slow statements recorded, and their seconds (exported as counters)
        self.count = 0
        self.seconds = 0.0
        #: fingerprints evicted to stay within ``capacity``
        self.evicted = 0
        #: called (outside the lock) with (fingerprint, sql) for each new fingerprint
        self.on_new: Callable[[str, str], None] | None = None
        self._stats: dict[str, QueryStats] = {}
        self._normalized: dict[str, tuple[str, str]] = {}
        self._lock = threading.Lock()
        self._window_start = 0.0
        self._window_lines = 0
        self._suppressed = 0

    @property
    def threshold_ms(self) -> float:
        return self.threshold_s * 1000

    def set_threshold_ms(self, threshold_ms: float) -> None:
        if not threshold_ms >= 0:
            raise ValueError("threshold_ms must be >= 0")
        self.threshold_s = threshold_ms / 1000

    def _fingerprint(self, sql: str) -> tuple[str, str]:
        known = self._normalized.get(sql)
        if known is None:
            if len(self._normalized) >= _CACHE_MAX:
                self._normalized.clear()
            known = self._normalized[sql] = fingerprint(sql)
        return known

    def record(self, sql: str, seconds: float, *, failed: bool = False) -> None:
        """One slow statement (the caller compared ``seconds`` with the threshold)."""
        if sql.startswith(INTERNAL):
            return
        now = time.monotonic()
        line: tuple[Any, ...] | None = None  # the WARNING's arguments, when one is due
        new = False
        with self._lock:
            fp, text = self._fingerprint(sql)
            self.count += 1
            self.seconds += seconds
            st = self._stats.get(fp)
            if st is None:
                if len(self._stats) >= self.capacity:
                    victim = min(self._stats.values(), key=lambda s: s.total_s)
                    del self._stats[victim.fingerprint]
                    self.evicted += 1
                st = self._stats[fp] = QueryStats(fp, text[:_STATEMENT_MAX])
                new = True
            st.count += 1
            st.total_s += seconds
            st.max_s = max(st.max_s, seconds)
            st.last_seen_ms = now_ms()
            st.failed += failed
            if now >= st.next_log:
                if now - self._window_start >= self.log_interval_s:
                    self._window_start, self._window_lines = now, 0
                if self._window_lines < self.log_burst:
                    self._window_lines += 1
                    st.next_log = now + self.log_interval_s
                    skipped = (
                        f" [{st.unlogged} more of it and {self._suppressed} other lines not logged since]"
                        if st.unlogged or self._suppressed
                        else ""
                    )
                    line = (
                        self.store, fp, seconds * 1000, " (failed)" if failed else "", self.threshold_ms,
                        st.count, st.max_s * 1000, st.plan_fingerprint or "-", skipped, st.statement[:500],
                    )
                    st.unlogged = 0
                    self._suppressed = 0
                else:
                    self._suppressed += 1
                    st.unlogged += 1
            else:
                st.unlogged += 1
        if line is not None:
            log.warning(_LINE, *line)
        on_new = self.on_new
        if new and on_new is not None:
            try:
                on_new(fp, sql)
            except Exception:  # pragma: no cover - diagnostics must never break a statement
                log.exception("slow-query plan request failed")

    def set_plan(self, fp: str, plan: str, plan_fingerprint: str | None) -> None:
        """The plan shape of a fingerprint (PostgreSQL), or why there is none."""
        with self._lock:
            st = self._stats.get(fp)
            if st is not None:
                st.plan, st.plan_fingerprint = plan, plan_fingerprint

    def get(self, fp: str) -> QueryStats | None:
        with self._lock:
            return self._stats.get(fp)

    def top(self, n: int = 20) -> list[dict[str, Any]]:
        """The ``n`` fingerprints with the most total time, most first."""
        with self._lock:
            ranked = sorted(self._stats.values(), key=lambda s: (-s.total_s, -s.count, s.fingerprint))
            return [s.as_dict() for s in ranked[: max(n, 0)]]

    def snapshot(self, n: int = 20) -> dict[str, Any]:
        """What ``GET /v1/admin/slow-queries`` answers."""
        top = self.top(n)
        with self._lock:
            return {
                "store": self.store,
                "threshold_ms": self.threshold_ms,
                "slow_statements": self.count,
                "slow_seconds": round(self.seconds, 6),
                "fingerprints": len(self._stats),
                "evicted": self.evicted,
                "queries": top,
            }

    def clear(self) -> None:
        with self._lock:
            self._stats.clear()
