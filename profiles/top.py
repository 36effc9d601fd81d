"""Summarise a py-spy ``--format raw`` profile (collapsed stacks): the functions with the most
self time and the most inclusive time.

Stacks of threads parked on a lock or a queue (the SQLite writer, the password-hashing pool) are
counted as idle and left out; percentages are of the remaining (busy) samples, mostly the event
loop thread. ``epoll_pwait`` is the loop waiting for I/O.

    python profiles/top.py profiles/fanout-gochat.txt [--n 25]
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_LINE = re.compile(r"^(.*) (\d+)$")
_IDLE = ("PyThread_acquire_lock_timed", "_queue_SimpleQueue_get", "pthread_cond_wait", "sem_wait")


def _frame_name(frame: str) -> str:
    # py-spy raw frames look like "func (path/to/file.py:123)"; drop the line number
    return re.sub(r":\d+\)$", ")", frame.strip())


def summarise(path: Path, n: int) -> str:
    self_t: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    idle = 0
    for line in path.read_text().splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        stack, count = m.group(1), int(m.group(2))
        frames = [_frame_name(f) for f in stack.split(";") if f.strip()]
        if not frames or any(marker in stack for marker in _IDLE):
            idle += count
            continue
        total += count
        self_t[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    if not total:
        return f"{path.name}: no busy samples ({idle} idle)"
    out = [f"{path.name}: {total} busy samples ({idle} idle-thread samples left out)", "", "| self % | function |", "|---:|---|"]
    out += [f"| {100 * c / total:.1f} | `{f}` |" for f, c in self_t.most_common(n)]
    out += ["", "| inclusive % | function |", "|---:|---|"]
    out += [f"| {100 * c / total:.1f} | `{f}` |" for f, c in incl.most_common(n)]
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("profile", type=Path)
    p.add_argument("--n", type=int, default=25)
    a = p.parse_args()
    print(summarise(a.profile, a.n))


if __name__ == "__main__":
    main()
