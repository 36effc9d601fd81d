"""Builds the bench's own native pieces into ``bench/build/`` (git-ignored): the Cython load
generator listener (``_loadgen``), the C floor server (``cfloor``) and the LD_PRELOAD write-syscall
counter (``libsyscount.so``). Rebuilt when the source is newer than the output."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
BUILD = HERE / "build"


def _stale(out: Path, src: Path) -> bool:
    return not out.exists() or out.stat().st_mtime < src.stat().st_mtime


def cfloor() -> Path:
    """Path of the compiled C floor server (built with ``cc -O2`` on first use)."""
    src = HERE / "peers" / "cfloor.c"
    out = BUILD / "cfloor"
    if _stale(out, src):
        BUILD.mkdir(exist_ok=True)
        cc = shutil.which("cc") or shutil.which("gcc") or "cc"
        subprocess.run([cc, "-O2", "-o", str(out), str(src)], check=True)
    return out


def syscount() -> Path | None:
    """Path of the LD_PRELOAD socket-write counter (``bench/peers/syscount.c``, built with
    ``cc -O2 -shared -fPIC``), or None when it cannot be built (no C compiler): the bench then
    reports write counts only for the targets with their own counters."""
    src = HERE / "peers" / "syscount.c"
    out = BUILD / "libsyscount.so"
    if _stale(out, src):
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            return None
        BUILD.mkdir(exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        r = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(tmp), str(src), "-ldl"])
        if r.returncode != 0:
            return None
        tmp.replace(out)  # atomic: a server starting elsewhere never preloads a half-written file
    return out


#: why this process (and the load generators it starts) use the pure-Python load generator
_FALLBACK_ENV = "BENCH_LOADGEN_FALLBACK_REASON"
INSTALL_HINT = "pip install -r bench/requirements.txt (or pip install '.[bench]')"


def loadgen() -> ModuleType:
    """Import ``_loadgen`` (Cython on picows), compiling it first when needed; the pure-Python
    twin ``bench._loadgen_py`` when that cannot be built or ``BENCH_PURE_PYTHON_LOADGEN=1``.
    The fallback is never silent: :func:`fallback_reason` says why, and the driver prints it
    and writes it into the results."""
    if os.environ.get("BENCH_PURE_PYTHON_LOADGEN", "") not in ("", "0"):
        return importlib.import_module("bench._loadgen_py")
    try:
        return _cython_loadgen()
    except (ImportError, OSError, subprocess.CalledProcessError) as exc:
        if isinstance(exc, ImportError) and exc.name == "Cython":
            why = f"Cython is not installed ({INSTALL_HINT})"
        else:
            why = f"the Cython load generator did not build: {exc!r}"
        print(f"bench: WARNING: {why}; using the pure-Python load generator", file=sys.stderr)
        os.environ["BENCH_PURE_PYTHON_LOADGEN"] = "1"  # child processes follow
        os.environ[_FALLBACK_ENV] = why
        return importlib.import_module("bench._loadgen_py")


def fallback_reason() -> str | None:
    """None when the load generators record with the Cython listener; else why they do not
    (the pure-Python one costs several times more CPU per delivery, so the load generator
    may saturate before the server does: its numbers are not comparable)."""
    if loadgen().__name__ == "_loadgen":
        return None
    return os.environ.get(_FALLBACK_ENV) or "BENCH_PURE_PYTHON_LOADGEN=1 is set"


def loadgen_impl() -> str:
    """Which load generator implementation this process uses: "cython" or "python"."""
    return "cython" if loadgen().__name__ == "_loadgen" else "python"


def _cython_loadgen() -> ModuleType:
    src = HERE / "_loadgen.pyx"
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    out = BUILD / f"_loadgen{suffix}"
    if _stale(out, src):
        BUILD.mkdir(exist_ok=True)
        code = (
            "import sys; from setuptools import setup, Extension; from Cython.Build import cythonize;"
            "import numpy;"
            f"sys.argv=['setup','build_ext','--build-lib',{str(BUILD)!r},'--build-temp',{str(BUILD / 'tmp')!r}];"
            f"setup(script_args=sys.argv[1:], ext_modules=cythonize([Extension('_loadgen',[{str(src)!r}],"
            "extra_compile_args=['-O2'])], build_dir=" + repr(str(BUILD / "c")) + ", quiet=True))"
        )
        import Cython  # noqa: F401  (ImportError here: no Cython, use the Python twin)

        subprocess.run([sys.executable, "-c", code], check=True, cwd=str(BUILD), stdout=subprocess.DEVNULL)
    if str(BUILD) not in sys.path:
        sys.path.insert(0, str(BUILD))
    return importlib.import_module("_loadgen")
