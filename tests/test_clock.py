"""One wall clock in milliseconds: :func:`gochat.clock.now_ms`. No module of the package keeps a
private copy (``_now_ms``, ``_wall_ms``, an inline ``time.time_ns() // 1_000_000`` or
``int(time.time() * 1000)``), so every timestamp gochat stores or sends comes from one place and
one rounding."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

import gochat.clock
from gochat.auth.tokens import TokenService
from gochat.ids import IdGenerator

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gochat"

#: a definition of a millisecond clock, or "now in ms" computed inline
_PATTERNS = {
    "defines a ms clock": re.compile(r"\bdef\s+_?(now|wall)_ms\s*\("),
    "computes now in ms from time_ns": re.compile(r"time_ns\(\)\s*//\s*(1_?000_?000|10\s*\*\*\s*6)\b"),
    "computes now in ms from time.time": re.compile(r"time\(\)\s*\*\s*(1_?000|1e3)\b"),
}

#: Deliberate exceptions, (path, pattern name, a line's text after strip()), each one explained:
ALLOWED = {
    # The one clock itself.
    ("gochat/clock.py", "defines a ms clock", "def now_ms() -> int:"),
    ("gochat/clock.py", "computes now in ms from time_ns", "return time.time_ns() // 1_000_000"),
    # TokenService's clock is injectable (Unix seconds, as JWT claims are; tests pass a fake one
    # to expire tokens). Its now_ms() method is that clock in ms, and gochat.clock.now_ms when
    # the clock is the default one (test_token_service_uses_the_one_clock_by_default).
    ("gochat/auth/tokens.py", "defines a ms clock", "def now_ms(self) -> int:"),
}


def _files() -> list[Path]:
    suffixes = {".py", ".pyx", ".pxd", ".pxi"}
    return sorted(p for p in PACKAGE.rglob("*") if p.suffix in suffixes and p.is_file())


def test_no_private_ms_clock_in_the_package() -> None:
    found = []
    for path in _files():
        rel = path.relative_to(ROOT).as_posix()
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for what, pattern in _PATTERNS.items():
                if pattern.search(line) and (rel, what, line.strip()) not in ALLOWED:
                    found.append(f"{rel}:{n}: {what}: {line.strip()} (use gochat.clock.now_ms)")
    assert not found, "\n".join(found)


def test_every_allowed_exception_still_exists() -> None:
    """An exception whose line is gone is stale: drop it rather than let it excuse a new copy."""
    for rel, what, text in ALLOWED:
        lines = [ln.strip() for ln in (ROOT / rel).read_text(encoding="utf-8").splitlines()]
        assert text in lines, (rel, what, text)
        assert _PATTERNS[what].search(text), (rel, what, text)


def test_the_patterns_catch_the_usual_copies() -> None:
    for line in (
        "def _now_ms() -> int:",
        "def _wall_ms() -> int:",
        "    def now_ms(self) -> int:",
        "ms = time.time_ns() // 1_000_000",
        "ms = time.time_ns()//1000000",
        "return int(time.time() * 1000)",
        "x = time.time()*1e3",
    ):
        assert any(p.search(line) for p in _PATTERNS.values()), line
    for line in ("from gochat.clock import now_ms", "now = now_ms()", "elapsed_ms = (time.monotonic() - t0) * 1000"):
        assert not any(p.search(line) for p in _PATTERNS.values()), line


def test_now_ms_is_the_wall_clock_in_ms() -> None:
    before = time.time_ns() // 1_000_000
    now = gochat.clock.now_ms()
    after = time.time_ns() // 1_000_000
    assert isinstance(now, int)
    assert before <= now <= after


def test_token_service_uses_the_one_clock_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gochat.auth.tokens.wall_clock_ms", lambda: 1_234)
    assert TokenService(keyring=None).now_ms() == 1_234  # type: ignore[arg-type]
    injected = TokenService(keyring=None, clock=lambda: 5.5)  # type: ignore[arg-type]
    assert injected.now_ms() == 5_500


def test_id_generator_uses_the_one_clock_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gochat.ids.now_ms", lambda: 1_700_000_000_000)
    gen = IdGenerator(7)
    assert gen._clock() == 1_700_000_000_000
    assert IdGenerator(7, clock=lambda: 5)._clock() == 5
