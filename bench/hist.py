"""Decoding of the load generator's latency histograms (see ``bench/_loadgen.pyx``).

Bucket i < 64 holds the value i µs; above, 32 sub-buckets per power of two, so a reported
percentile is within about 3 % of the true value (HDR histogram style, 2 significant digits).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

NBUCKETS = 2048


def bucket_bounds(n: int = NBUCKETS) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) bound of each bucket, µs."""
    idx = np.arange(n, dtype=np.int64)
    e = idx // 32 + 4
    m = idx % 32 + 32
    scale = np.exp2(np.clip(e - 5, 0, None).astype(np.float64))
    lower = np.where(idx < 64, idx.astype(np.float64), m * scale)
    width = np.where(idx < 64, 1.0, scale)
    return lower, lower + width


def percentiles(hist: np.ndarray, ps: tuple[float, ...] = (50, 99, 99.9)) -> dict[str, float]:
    """Percentiles in µs (upper bound of the bucket that holds the rank), plus count and max."""
    total = int(hist.sum())
    out: dict[str, float] = {"count": total}
    if total == 0:
        for p in ps:
            out[f"p{p:g}"] = float("nan")
        out["max"] = float("nan")
        return out
    lower, upper = bucket_bounds(len(hist))
    cum = np.cumsum(hist)
    for p in ps:
        rank = max(1, int(np.ceil(total * p / 100.0)))
        i = int(np.searchsorted(cum, rank))
        out[f"p{p:g}"] = float(upper[i] if i >= 64 else lower[i])
    nz = np.nonzero(hist)[0]
    out["max"] = float(upper[nz[-1]])
    return out


def merge_reports(paths: list[str]) -> dict[str, Any]:
    """Sum the histograms and merge per-message first/last receive times of several processes."""
    hist = np.zeros(NBUCKETS, dtype=np.int64)
    first: np.ndarray | None = None
    last: np.ndarray | None = None
    for p in paths:
        with np.load(Path(p)) as z:
            hist += z["hist"]
            f, la = z["first"], z["last"]
        if first is None or last is None:
            first, last = f.copy(), la.copy()
            continue
        n = max(len(first), len(f))
        first = _pad(first, n)
        last = _pad(last, n)
        f, la = _pad(f, n), _pad(la, n)
        both = (first > 0) & (f > 0)
        first = np.where(both, np.minimum(first, f), np.maximum(first, f))
        last = np.maximum(last, la)
    spread: dict[str, float] = {}
    if first is not None and last is not None:
        ok = (first > 0) & (last > 0)
        s = (last[ok] - first[ok]) / 1000.0
        if len(s):
            spread = {
                "p50": float(np.percentile(s, 50)),
                "p99": float(np.percentile(s, 99)),
                "max": float(s.max()),
                "messages": len(s),
            }
    return {"hist": hist, "latency": percentiles(hist), "spread": spread}


def _pad(a: np.ndarray, n: int) -> np.ndarray:
    if len(a) >= n:
        return a
    return np.concatenate([a, np.zeros(n - len(a), dtype=a.dtype)])
