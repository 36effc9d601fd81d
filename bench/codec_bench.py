"""Codec micro-benchmark: the Cython codec against its pure-Python twin, ns per frame.

    python bench/codec_bench.py [--repeat 7] [--min-time 0.2]

Method: each case is a ``timeit`` statement calling the codec function directly (no lambda in
between), auto-ranged to run at least ``--min-time`` seconds, repeated ``--repeat`` times; the
table shows the best repetition divided by the frames per call. Best-of-N is the usual
micro-benchmark estimator: noise only ever adds time. Results go to stdout as a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import timeit
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Run from a checkout without installing: the repository root goes first on the path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gochat.protocol import (
    Codec,
    Deliver,
    Message,
    Send,
    native_codec,
    python_codec,
)

CMID = bytes(range(16))


@dataclass(frozen=True)
class Case:
    name: str
    statement: str  # uses ``c`` (the codec) and ``x`` (the argument)
    arg: Callable[[Codec], Any]  # builds ``x`` for a codec
    frames: int = 1


def _deliver(body_size: int, seq: int = 1) -> Deliver:
    return Deliver(Message(2, 1, 300, seq, 1000 + seq, 7, 1_767_225_600_000, CMID, b"m" * body_size))


SEND = Send(2, 1, 300, CMID, b"m" * 64, rid=42)
BATCH = [_deliver(64, seq) for seq in range(1, 17)]
DELIVER_ARGS = (2, 1, 300, 1, 1001, 7, 1_767_225_600_000, CMID)

CASES = [
    Case("SEND 64 B: encode", "c.encode(x)", lambda c: SEND),
    Case("SEND 64 B: decode", "c.decode(x)", lambda c: c.encode(SEND)),
    Case("DELIVER 64 B: encode", "c.encode(x)", lambda c: _deliver(64)),
    Case("DELIVER 64 B: encode_deliver", "c.encode_deliver(*x)", lambda c: (*DELIVER_ARGS, b"m" * 64)),
    Case("DELIVER 64 B: decode", "c.decode(x)", lambda c: c.encode(_deliver(64))),
    Case("DELIVER 1 KiB: encode", "c.encode(x)", lambda c: _deliver(1024)),
    Case("DELIVER 1 KiB: encode_deliver", "c.encode_deliver(*x)", lambda c: (*DELIVER_ARGS, b"m" * 1024)),
    Case("DELIVER 1 KiB: decode", "c.decode(x)", lambda c: c.encode(_deliver(1024))),
    Case("16 × DELIVER 64 B: encode_many", "c.encode_many(x)", lambda c: BATCH, frames=16),
    Case("16 × DELIVER 64 B: decode", "c.decode(x)", lambda c: c.encode_many(BATCH), frames=16),
]


def measure(codec: Codec, case: Case, repeat: int, min_time: float) -> float:
    """Best ns per frame over ``repeat`` runs of at least ``min_time`` seconds each."""
    timer = timeit.Timer(case.statement, globals={"c": codec, "x": case.arg(codec)})
    number, elapsed = timer.autorange()
    number = max(1, int(number * min_time / max(elapsed, 1e-9)))
    best = min(timer.repeat(repeat=repeat, number=number))
    return best / number / case.frames * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=7, help="repetitions per case (best is kept)")
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds per repetition")
    args = parser.parse_args()

    py, native = python_codec(), native_codec()
    print(f"Python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs, "
          f"{platform.platform()}")
    print()
    print("| case | pure Python ns/frame | Cython ns/frame | speed-up |")
    print("|---|---:|---:|---:|")
    for case in CASES:
        slow = measure(py, case, args.repeat, args.min_time)
        fast = measure(native, case, args.repeat, args.min_time)
        print(f"| {case.name} | {slow:,.0f} | {fast:,.0f} | {slow / fast:.1f}× |", flush=True)


if __name__ == "__main__":
    main()
