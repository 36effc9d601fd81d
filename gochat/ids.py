"""Snowflake-style 64-bit ids (``msg_id``).

Layout, most significant bit first (63 bits used, so every id is a positive signed 64-bit
integer and fits SQLite ``INTEGER`` and PostgreSQL ``bigint``)::

    0 | 41-bit milliseconds since 2025-01-01T00:00:00Z | 10-bit node id | 12-bit sequence

Ids from one generator are strictly increasing. Ids from different generators never collide
as long as their node ids differ: a process must share *one* generator per node id (pass it to
the store with ``SQLiteStore(..., ids=gen)``). The 41-bit timestamp lasts until 2094.

Clock steps backwards (NTP, VM migration) never produce a smaller or repeated id: the
generator *borrows* its last timestamp and keeps counting the sequence, and when the 4096
sequence values of a millisecond are used up it moves on to the next millisecond (waiting for
the real clock when the clock is sane, borrowing one millisecond ahead when the clock is
behind). The store seeds a new generator with the largest id it has stored
(:meth:`IdGenerator.observe`), so a restart with a clock that went back does not reuse
ids either.

User and conversation ids are *not* snowflakes: they are SQLite rowids (``AUTOINCREMENT``,
never reused) or PostgreSQL identity columns. Only ``msg_id`` needs to be globally unique
without coordination.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Final, NamedTuple

from gochat.clock import now_ms

__all__ = [
    "EPOCH_MS",
    "MAX_ID",
    "MAX_NODE_ID",
    "MAX_SEQUENCE",
    "IdGenerator",
    "IdParts",
    "id_parts",
    "id_unix_ms",
]

#: 2025-01-01T00:00:00Z in Unix milliseconds.
EPOCH_MS: Final = 1_735_689_600_000
TIMESTAMP_BITS: Final = 41
NODE_BITS: Final = 10
SEQUENCE_BITS: Final = 12
MAX_NODE_ID: Final = (1 << NODE_BITS) - 1
MAX_SEQUENCE: Final = (1 << SEQUENCE_BITS) - 1
MAX_TIMESTAMP: Final = (1 << TIMESTAMP_BITS) - 1
_NODE_SHIFT: Final = SEQUENCE_BITS
#: The largest user, conversation, group and message id and the largest seq: the protocol's
#: fields are u64, the stores' columns signed 64-bit. A request naming a larger id names
#: nothing that exists (NOT_FOUND); a larger seq means "beyond the newest" (docs/protocol.md).
MAX_ID: Final = (1 << 63) - 1
_TS_SHIFT: Final = SEQUENCE_BITS + NODE_BITS


class IdParts(NamedTuple):
    unix_ms: int
    node_id: int
    sequence: int


def id_parts(value: int) -> IdParts:
    """Split an id into (Unix ms, node id, sequence)."""
    return IdParts(
        (value >> _TS_SHIFT) + EPOCH_MS,
        (value >> _NODE_SHIFT) & MAX_NODE_ID,
        value & MAX_SEQUENCE,
    )


def id_unix_ms(value: int) -> int:
    """The Unix millisecond timestamp embedded in an id."""
    return (value >> _TS_SHIFT) + EPOCH_MS


class IdGenerator:
    """Thread-safe generator of strictly increasing snowflake ids for one node.

    ``clock`` returns Unix milliseconds (:func:`gochat.clock.now_ms` unless tests inject a fake one). ``after`` is an id issued
    earlier (by any generator with this node id); every new id is larger than it.
    """

    __slots__ = ("_clock", "_last_ms", "_lock", "_node_bits", "_seq", "node_id")

    def __init__(self, node_id: int, *, clock: Callable[[], int] | None = None, after: int = 0) -> None:
        if not 0 <= node_id <= MAX_NODE_ID:
            raise ValueError(f"node_id must be in 0..{MAX_NODE_ID}, got {node_id}")
        if after < 0:
            raise ValueError("after must be a non-negative id")
        self.node_id = node_id
        self._node_bits = node_id << _NODE_SHIFT
        self._clock = clock or now_ms
        self._lock = threading.Lock()
        # Timestamp (ms since EPOCH_MS) and sequence of the last id handed out.
        self._last_ms = -1
        self._seq = 0
        if after:
            self.observe(after)

    def observe(self, value: int) -> None:
        """Make every later id larger than ``value`` (an id issued earlier, e.g. the largest one
        found in the database at start), even if the clock is now behind it."""
        with self._lock:
            ts = value >> _TS_SHIFT
            if ts >= self._last_ms:
                self._last_ms = ts
                self._seq = MAX_SEQUENCE

    def _now(self) -> int:
        return max(0, self._clock() - EPOCH_MS)

    def next_id(self) -> int:
        with self._lock:
            return self._next_locked()

    def next_ids(self, n: int) -> list[int]:
        """``n`` ids, each larger than the one before (the SQLite writer numbers a whole run of
        appends at once: one lock and one clock read, not ``n``)."""
        if n <= 0:
            return []
        with self._lock:
            now = self._now()
            last = self._last_ms
            if now > last:
                first = 0  # a new millisecond
                last = now
            else:
                first = self._seq + 1  # same millisecond (or the clock stepped back)
            if first + n - 1 <= MAX_SEQUENCE and last <= MAX_TIMESTAMP:
                self._last_ms = last
                self._seq = first + n - 1
                base = (last << _TS_SHIFT) | self._node_bits
                return list(range(base + first, base + first + n))
            return [self._next_locked() for _ in range(n)]  # crosses a millisecond: one by one

    def _next_locked(self) -> int:
        now = self._now()
        last = self._last_ms
        if now > last:
            last = now
            seq = 0
        else:
            # Same millisecond, or the clock stepped back: borrow the last timestamp.
            seq = self._seq + 1
            if seq > MAX_SEQUENCE:
                seq = 0
                # Sane clock, sequence exhausted: wait for the next millisecond (< 1 ms).
                while now == last:
                    time.sleep(0)
                    now = self._now()
                # Clock behind (before or during the wait): borrow one millisecond ahead.
                last = now if now > last else last + 1
        if last > MAX_TIMESTAMP:
            raise OverflowError("snowflake timestamp exhausted (year 2094)")
        self._last_ms = last
        self._seq = seq
        return (last << _TS_SHIFT) | self._node_bits | seq

    def __repr__(self) -> str:
        return f"IdGenerator(node_id={self.node_id})"
