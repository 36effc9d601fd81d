"""Build gochat's Cython extensions.

Every ``_native/*.pyx`` compiles into ``gochat._native.<name>``; ``gochat/_native`` is a symlink to
``_native/`` so that Cython's qualified names (and ``cimport gochat._native.codec``) resolve.

Switches (environment variables, as uvloop's and msgspec's setup.py take them):

- ``GOCHAT_CYTHON_ANNOTATE=1``  write ``_native/*.html`` annotation reports
- ``GOCHAT_DEBUG_BUILD=1``      bounds/wraparound checks on, ``-O0 -g``, ``GOCHAT_DEBUG`` macro
- ``GOCHAT_COVERAGE_BUILD=1``   Cython line tracing for coverage.py
- ``GOCHAT_NO_EXTENSIONS=1``    build nothing: the pure-Python twins are used
- ``GOCHAT_BUILD_ONLY=a,b``     development: build only these modules
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import Extension, setup

ROOT = Path(__file__).parent
NATIVE = ROOT / "_native"


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0", "false", "no")


def _extensions() -> list[Extension]:
    if _flag("GOCHAT_NO_EXTENSIONS"):
        print("gochat: GOCHAT_NO_EXTENSIONS set: building the pure-Python package only", file=sys.stderr)
        return []
    from Cython.Build import cythonize

    debug = _flag("GOCHAT_DEBUG_BUILD")
    coverage = _flag("GOCHAT_COVERAGE_BUILD")
    # Hot-path directives are explicit: no bounds or wraparound checks, C division,
    # no None checks on typed arguments; a debug build turns the checks back on.
    directives = {
        "language_level": "3",
        "boundscheck": debug,
        "wraparound": debug,
        "cdivision": not debug,
        "nonecheck": debug,
        "initializedcheck": debug,
        "embedsignature": True,
        "freethreading_compatible": False,
    }
    only = {m for m in os.environ.get("GOCHAT_BUILD_ONLY", "").split(",") if m}
    macros: list[tuple[str, str | None]] = []
    cflags = ["-O0", "-g3", "-UNDEBUG"] if debug else ["-O3"]
    if debug:
        macros.append(("GOCHAT_DEBUG", "1"))
    if coverage:
        directives["linetrace"] = True
        macros.append(("CYTHON_TRACE_NOGIL", "1"))
    exts = [
        Extension(
            f"gochat._native.{pyx.stem}",
            [str(pyx.relative_to(ROOT))],
            extra_compile_args=cflags,
            define_macros=macros,
        )
        for pyx in sorted(NATIVE.glob("*.pyx"))
        if not only or pyx.stem in only
    ]
    built = cythonize(
        exts,
        compiler_directives=directives,
        annotate=_flag("GOCHAT_CYTHON_ANNOTATE"),
        include_path=[str(ROOT)],
        nthreads=0,
    )
    names = ", ".join(e.name for e in built)
    mode = "debug" if debug else "release"
    print(f"gochat: building accelerated modules ({mode}): {names}", file=sys.stderr)
    return list(built)


setup(ext_modules=_extensions())
