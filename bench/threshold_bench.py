"""Micro-benchmark of the dynamic threshold's load statistics: numpy ``LoadStats`` against its
pure-Python twin (:class:`PyLoadStats`, also the reference tests/test_threshold.py checks it on).

    python bench/threshold_bench.py [--repeat 5] [--min-time 0.2]

For each window size (256, 4096, 65536) on a full window: µs per ``add`` (one sample: ring
buffer write and EWMA), per ``extend`` of a 256-sample batch (per sample) and per percentile
query (p50 and p99 together). Method: ``timeit`` auto-ranged to ``--min-time`` seconds,
best of ``--repeat``. Results go to stdout as a markdown table.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import sys
import timeit
from collections.abc import Iterable, Sequence
from pathlib import Path

# Run from a checkout without installing: the repository root goes first on the path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from gochat.messaging.loadstats import LoadStats

SIZES = (256, 4096, 65536)


class PyLoadStats:
    """:class:`~gochat.messaging.threshold.LoadStats` in pure Python: a list ring buffer, an
    EWMA, percentiles by sorting (linear interpolation, numpy's default method)."""

    __slots__ = ("_buf", "_next", "alpha", "capacity", "count", "ewma")

    def __init__(self, capacity: int = 256, alpha: float = 0.2) -> None:
        self.capacity = capacity
        self.alpha = alpha
        self._buf = [0.0] * capacity
        self._next = 0
        self.count = 0
        self.ewma = 0.0

    def add(self, x: float) -> None:
        self._buf[self._next] = x
        self._next = (self._next + 1) % self.capacity
        self.ewma = x if not self.count else self.ewma + self.alpha * (x - self.ewma)
        self.count += 1

    def extend(self, xs: Iterable[float]) -> None:
        for x in xs:
            self.add(x)

    def window(self) -> list[float]:
        return self._buf if self.count >= self.capacity else self._buf[: self.count]

    def percentiles(self, qs: Sequence[float]) -> list[float]:
        if not self.count:
            return [0.0] * len(qs)
        s = sorted(self.window())
        out = []
        for q in qs:
            rank = q / 100 * (len(s) - 1)
            lo, hi = math.floor(rank), math.ceil(rank)
            out.append(s[lo] + (s[hi] - s[lo]) * (rank - lo))
        return out

    def percentile(self, q: float) -> float:
        return self.percentiles((q,))[0]

    def mean(self) -> float:
        w = self.window()
        return sum(w) / len(w) if w else 0.0


def _best(stmt: str, env: dict[str, object], repeat: int, min_time: float) -> float:
    """Best seconds per call of ``stmt``."""
    timer = timeit.Timer(stmt, globals=env)
    number, elapsed = 1, 0.0
    while True:
        elapsed = timer.timeit(number)
        if elapsed >= min_time:
            break
        number *= 2 if elapsed == 0 else max(2, min(10, int(min_time / elapsed) + 1))
    return min([elapsed, *timer.repeat(repeat - 1, number)]) / number


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--min-time", type=float, default=0.2)
    ap.add_argument("--sizes", type=int, nargs="*", default=list(SIZES))
    args = ap.parse_args(argv)
    rng = random.Random(1)
    batch = [rng.expovariate(100.0) for _ in range(256)]
    batch_np = np.asarray(batch)
    print(f"python {platform.python_version()}, numpy {np.__version__}, {platform.machine()}, {os.cpu_count()} CPUs")
    print()
    print("| window | implementation | add, µs | extend ×256, µs/sample | p50+p99 query, µs |")
    print("|---:|---|---:|---:|---:|")
    for size in args.sizes:
        for name, cls, xs in (("numpy", LoadStats, batch_np), ("pure Python", PyLoadStats, batch)):
            stats = cls(size)
            stats.extend([rng.expovariate(100.0) for _ in range(size)])
            env = {"stats": stats, "xs": xs, "x": 0.0123, "qs": (50.0, 99.0)}
            add = _best("stats.add(x)", env, args.repeat, args.min_time)
            extend = _best("stats.extend(xs)", env, args.repeat, args.min_time) / len(batch)
            query = _best("stats.percentiles(qs)", env, args.repeat, args.min_time)
            print(f"| {size} | {name} | {add * 1e6:.2f} | {extend * 1e6:.3f} | {query * 1e6:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
