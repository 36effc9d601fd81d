"""Large-group arithmetic micro-benchmark: numpy (gochat/cluster/members.py) against the
pure-Python equivalent, µs per operation.

    python bench/members_bench.py [--repeat 5] [--min-time 0.1] [--sizes 1000,20000,100000]

Cases per group size (member ids random in [2**62, 2**63), given as a Python list, as the store
returns them):

* sort+dedupe: ``sorted(set(ids))`` against ``np.unique`` of the list (``as_sorted_ids``);
* shard+encode: the sorted members cut into 1,000-id shards, each shard's USERS envelope built
  (what ``ClusterLink.route_large`` does) — list slices and ``struct.pack`` against array views
  and their bytes;
* intersect 10 % / 50 %: the members online, against an online set of that share of the group
  plus as many non-members (a ``set`` for Python, a sorted array for numpy);
* split 3 / 10 nodes: the online half of the group spread over that many nodes (one in ten on
  two nodes), grouped per node; numpy from pre-built (user, node) arrays, and from the
  ``user -> nodes`` dict (the adapter included).

Method as in bench/codec_bench.py: ``timeit`` auto-ranged to ``--min-time`` seconds per
repetition, best of ``--repeat``. Results go to stdout as a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import timeit
from pathlib import Path
from typing import Any

# Run from a checkout without installing: the repository root goes first on the path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from gochat.cluster import members as m
from gochat.cluster.envelope import encode_users

SHARD = 1000
FRAME = b"f" * 96


def _py_shard_encode(ids: list[int]) -> list[bytes]:
    return [encode_users(s, FRAME, False) for s in m.py_shards(ids, SHARD)]


def _np_shard_encode(ids: m.Ids) -> list[bytes]:
    return [m.encode_users(s, FRAME, False) for s in m.shards(ids, SHARD)]


def cases(n: int, rng: random.Random) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(name, python statement, numpy statement, globals)."""
    raw = [rng.randrange(2**62, 2**63) for _ in range(n)]
    ref = m.py_sorted_ids(raw)
    arr = m.as_sorted_ids(raw)
    g: dict[str, Any] = {"m": m, "raw": raw, "ref": ref, "arr": arr, "py_se": _py_shard_encode, "np_se": _np_shard_encode}
    out = [
        ("sort+dedupe", "m.py_sorted_ids(raw)", "m.as_sorted_ids(raw)", g),
        (f"shard {SHARD} + encode", "py_se(ref)", "np_se(arr)", g),
    ]
    for share in (10, 50):
        k = n * share // 100
        online = rng.sample(ref, k) + [rng.randrange(2**62) for _ in range(k)]
        gi = {**g, "on_set": set(online), "on_arr": m.as_sorted_ids(online)}
        out.append((f"intersect {share} % online", "m.py_intersect_online(ref, on_set)", "m.intersect_online(arr, on_arr)", gi))
    on = rng.sample(ref, n // 2)
    for nodes in (3, 10):
        names = [f"node-{i}" for i in range(nodes)]
        where = {u: rng.sample(names, 2 if rng.random() < 0.1 else 1) for u in on}
        gs = {**g, "where": where, "pairs": m.node_pairs(where)}
        out.append((f"split {nodes} nodes", "m.py_split_by_node(ref, where)", "m.split_by_node(arr, pairs)", gs))
        out.append((f"split {nodes} nodes (from dict)", "m.py_split_by_node(ref, where)", "m.split_by_node(arr, where)", gs))
    return out


def measure(statement: str, g: dict[str, Any], repeat: int, min_time: float) -> float:
    """Best µs per call over ``repeat`` runs of at least ``min_time`` seconds each."""
    timer = timeit.Timer(statement, globals=g)
    number, elapsed = timer.autorange()
    number = max(1, int(number * min_time / max(elapsed, 1e-9)))
    return min(timer.repeat(repeat=repeat, number=number)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5, help="repetitions per case (best is kept)")
    parser.add_argument("--min-time", type=float, default=0.1, help="seconds per repetition")
    parser.add_argument("--sizes", default="1000,20000,100000", help="group sizes, comma-separated")
    args = parser.parse_args()
    rng = random.Random(15)
    print(
        f"# large-group arithmetic: CPython {platform.python_version()}, numpy {np.__version__}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs; best of {args.repeat}"
    )
    print()
    print("| members | operation | Python µs | numpy µs | speed-up |")
    print("|---:|---|---:|---:|---:|")
    for n in (int(s) for s in args.sizes.split(",")):
        for name, py_stmt, np_stmt, g in cases(n, rng):
            py = measure(py_stmt, g, args.repeat, args.min_time)
            nu = measure(np_stmt, g, args.repeat, args.min_time)
            print(f"| {n:,} | {name} | {py:,.1f} | {nu:,.1f} | {py / nu:.1f}× |", flush=True)


if __name__ == "__main__":
    main()
