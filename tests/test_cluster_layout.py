"""The layout of ``gochat.cluster`` (docs/architecture.md): modules small enough to do one job,
no import cycle through a cluster module, the Redis backends one module each behind the
``gochat.cluster.redis`` package, and redis-py loaded only when a Redis backend is asked for."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gochat"
CLUSTER = PACKAGE / "cluster"
MAX_LINES = 600


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "build" not in p.parts}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every gochat module ``name`` imports anywhere: module level, in functions (lazy imports)
    and under ``if TYPE_CHECKING:`` (stricter than what runs, so a cycle cannot hide there).
    ``from pkg import x`` counts as an import of ``pkg.x`` when that is a module, else of ``pkg``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if full in modules:
                    out.add(full)
                elif base in modules:
                    out.add(base)
    out.discard(name)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work: list[tuple[str, list[str]]] = [(root, sorted(graph[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, todo = work[-1]
            if todo:
                w = todo.pop()
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, sorted(graph[w])))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_cluster_module_is_over_600_lines() -> None:
    too_long = []
    for path in sorted(CLUSTER.rglob("*.py")):
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {n} lines")
    assert not too_long, "\n".join(too_long)


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_runs_through_a_cluster_module() -> None:
    modules = _modules()
    assert "gochat.cluster.redis.client" in modules
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert "gochat.cluster.redis.client" in graph["gochat.cluster.redis.registry"]
    through_cluster = [
        c for c in _cycles(graph) if any(m == "gochat.cluster" or m.startswith("gochat.cluster.") for m in c)
    ]
    assert not through_cluster, through_cluster


def test_the_redis_package_exports_what_the_module_did() -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, gochat.cluster as c\n"
            "assert 'redis' not in sys.modules, 'gochat.cluster loaded redis-py'\n"
            "from gochat.cluster.redis import (DEFAULT_PREFIX, RedisBroker, RedisJobQueue, RedisPresence,\n"
            "    RedisRegistry, cancel_tasks, connect)\n"
            "import gochat.cluster.redis as r\n"
            "assert c.RedisBroker is RedisBroker and c.connect is connect\n"
            "assert sorted(r.__all__) == sorted(['DEFAULT_PREFIX', 'RedisBroker', 'RedisJobQueue',\n"
            "    'RedisPresence', 'RedisRegistry', 'cancel_tasks', 'connect'])\n"
            "assert DEFAULT_PREFIX == 'gochat:'\n"
            "for cls in (RedisBroker, RedisJobQueue, RedisPresence, RedisRegistry):\n"
            "    assert cls.__module__.startswith('gochat.cluster.redis.'), cls.__module__\n"
            "import logging, gochat.cluster.redis.client as cl\n"
            "assert cl.log is logging.getLogger('gochat.cluster.redis')\n",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
