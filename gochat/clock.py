"""Wall-clock time in milliseconds, the unit of every timestamp gochat stores or sends."""

from __future__ import annotations

import time

__all__ = ["now_ms"]


def now_ms() -> int:
    """Milliseconds since the Unix epoch (wall clock)."""
    return time.time_ns() // 1_000_000
