"""The architecture as docs/architecture.md states it, checked on the code itself: one code path
for embedded and cluster mode (no branch on the mode, backends chosen once in ``server.py``,
backend packages imported only when chosen), and the messaging core's parts driven directly on
the in-process backends, without a socket."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gochat"


def test_no_module_branches_on_the_mode() -> None:
    """Embedded mode runs the cluster seams on in-process backends: nothing asks whether there
    is a cluster."""
    pattern = re.compile(r"\bcluster\s+is\s+(not\s+)?None\b|\bif\s+(not\s+)?(self\.)?(settings|s)\.cluster\b")
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    # server.py chooses the backends once, at composition: that one choice is the exception
    offenders = [o for o in offenders if not o.startswith("gochat/server.py") or "if s.cluster:" not in o]
    assert not offenders, "\n".join(offenders)


def test_an_embedded_server_loads_no_redis_or_postgres_module(tmp_path: Path) -> None:
    """Start a node on embedded defaults, serve one authenticated connection, stop it, and list
    what it imported."""
    script = textwrap.dedent(
        """
        import asyncio, sys
        import uvloop
        from gochat.config import Settings
        from gochat.server import Server

        async def main():
            s = Settings(data_dir=sys.argv[1], ws_port=0, http_port=0)
            server = Server(s)
            await server.start()
            from tests.conftest import create_user
            from tests.e2e.rawclient import connect
            from gochat.protocol.frames import AuthOk
            user = await create_user(server.http_url, "modules")
            c = await connect(server.ws_url, user.access_token)
            await c.expect(AuthOk)
            c.close()
            await server.stop()
            loaded = sorted(
                m for m in sys.modules
                if m.split(".")[0] in ("redis", "asyncpg", "hiredis")
                or m.startswith(("gochat.cluster.redis", "gochat.store.postgres"))
            )
            print("LOADED", loaded)

        uvloop.run(main())
        """
    )
    r = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "data")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    (line,) = [ln for ln in r.stdout.splitlines() if ln.startswith("LOADED")]
    assert line == "LOADED []", line


def test_the_import_graph_has_no_cycles() -> None:
    """No cycle among gochat's modules, counting lazy and TYPE_CHECKING imports too (what
    runs is a subset): each layer imports only the layers below it."""
    from tests.test_cluster_layout import _cycles, _imports, _modules

    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert _cycles(graph) == []


#: Modules allowed above MAX_LINES, each doing one job (the reason says which).
LONG_MODULES = {
    "_native/codec.pyx": "the wire codec: validation rules 1-9, decode and encode of every op",
    "gochat/protocol/_codec_py.py": "the codec's pure-Python twin, rule for rule",
    "_native/connection.pyx": "a connection's I/O: its listener callbacks, outbound buffer and the writer "
    "that flushes and heartbeats every connection (two cdef classes using each other's C fields)",
}
MAX_LINES = 600


def test_no_product_module_is_over_600_lines_but_the_listed_ones() -> None:
    sizes = {
        str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines())
        for p in [*PACKAGE.rglob("*.py"), *(ROOT / "_native").glob("*.pyx")]
        if "build" not in p.parts and not str(p.relative_to(ROOT)).startswith("gochat/_native/")
    }
    too_long = {path: n for path, n in sizes.items() if n > MAX_LINES and path not in LONG_MODULES}
    assert not too_long, too_long
    stale = [path for path in LONG_MODULES if sizes.get(path, 0) <= MAX_LINES]
    assert not stale, f"no longer long, drop from LONG_MODULES: {stale}"
