"""Load statistics on numpy ring buffers: the dynamic large-group threshold's windows
(gochat/messaging/threshold.py). numpy is imported only with this module, which the threshold
controller loads the first time its node sees a peer: an embedded node never loads numpy
(docs/dependencies.md, "numpy"). bench/threshold_bench.py measures it against a pure-Python twin.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["LoadStats"]


class LoadStats:
    """A window of the last ``capacity`` samples on a numpy ring buffer (percentiles, mean,
    max) and an EWMA of every sample (``alpha``: the newest sample's weight)."""

    __slots__ = ("_buf", "_next", "alpha", "capacity", "count", "ewma")

    def __init__(self, capacity: int = 256, alpha: float = 0.2) -> None:
        if capacity < 1 or not 0 < alpha <= 1:
            raise ValueError("capacity must be >= 1 and alpha in (0, 1]")
        self.capacity = capacity
        self.alpha = alpha
        self._buf = np.zeros(capacity, dtype=np.float64)
        self._next = 0
        #: samples seen (the window holds the last min(count, capacity))
        self.count = 0
        self.ewma = 0.0

    def add(self, x: float) -> None:
        self._buf[self._next] = x
        self._next = (self._next + 1) % self.capacity
        self.ewma = x if not self.count else self.ewma + self.alpha * (x - self.ewma)
        self.count += 1

    def extend(self, xs: Iterable[float] | np.ndarray) -> None:
        """Add many samples at once (vectorised: the same result as ``add`` for each)."""
        arr = np.asarray(xs if isinstance(xs, np.ndarray) else list(xs), dtype=np.float64).ravel()
        m = len(arr)
        if not m:
            return
        # EWMA: e_m = (1-a)^m e_0 + sum_i a (1-a)^(m-1-i) x_i (a first sample seeds e_0)
        seed, rest = (self.ewma, arr) if self.count else (float(arr[0]), arr[1:])
        if len(rest):
            decay = 1.0 - self.alpha
            powers = decay ** np.arange(len(rest) - 1, -1, -1, dtype=np.float64)
            seed = decay ** len(rest) * seed + self.alpha * float(np.dot(powers, rest))
        self.ewma = seed
        # ring buffer: only the last `capacity` samples matter, written in at most two slices
        tail = arr[-self.capacity :]
        start = (self._next + m - len(tail)) % self.capacity
        first = min(len(tail), self.capacity - start)
        self._buf[start : start + first] = tail[:first]
        self._buf[: len(tail) - first] = tail[first:]
        self._next = (start + len(tail)) % self.capacity
        self.count += m

    def window(self) -> np.ndarray:
        """The samples in the window (in storage order, not arrival order)."""
        return self._buf if self.count >= self.capacity else self._buf[: self.count]

    def percentiles(self, qs: Sequence[float]) -> np.ndarray:
        """The ``qs`` percentiles (0-100, linear interpolation) of the window; zeros when empty."""
        if not self.count:
            return np.zeros(len(qs))
        # np.percentile's "linear" method, on one np.partition around the ranks it needs (3x
        # faster than np.percentile on small windows; the same on large ones)
        w = self.window()
        ranks = np.asarray(qs, dtype=np.float64) / 100 * (len(w) - 1)
        lo, hi = np.floor(ranks).astype(np.intp), np.ceil(ranks).astype(np.intp)
        part = np.partition(w, np.union1d(lo, hi))
        below = part[lo]
        return below + (part[hi] - below) * (ranks - lo)

    def percentile(self, q: float) -> float:
        return float(self.percentiles((q,))[0])

    @property
    def p50(self) -> float:
        return self.percentile(50)

    @property
    def p99(self) -> float:
        return self.percentile(99)

    def mean(self) -> float:
        return float(self.window().mean()) if self.count else 0.0
