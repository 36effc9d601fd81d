"""The shape of gochat.store: both stores satisfy every part of the Store contract, the parts
add up to Store, no module is over 600 lines and the package's modules import no cycle."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from gochat.store.base import (
    ConversationStore,
    MessageStore,
    Store,
    StoreLifecycle,
    TokenStore,
    UserStore,
)
from gochat.store.postgres import PostgresStore
from gochat.store.sqlite import SQLiteStore

STORE_DIR = Path(__file__).resolve().parent.parent / "gochat" / "store"
MAX_LINES = 600
PARTS = (StoreLifecycle, UserStore, TokenStore, ConversationStore, MessageStore)


def _stores(tmp_path: Path) -> list[object]:
    # Constructing either store opens nothing (no file, no connection).
    return [SQLiteStore(tmp_path / "x.db"), PostgresStore("postgresql://127.0.0.1:1/none")]


@pytest.mark.parametrize("part", [*PARTS, Store], ids=lambda p: p.__name__)
def test_both_stores_satisfy_each_part(tmp_path: Path, part: type) -> None:
    for store in _stores(tmp_path):
        assert isinstance(store, part), f"{type(store).__name__} is not a {part.__name__}"


def test_parts_typecheck(tmp_path: Path) -> None:
    """Static form of the check above (mypy reads these assignments)."""
    sqlite = SQLiteStore(tmp_path / "x.db")
    pg = PostgresStore("postgresql://127.0.0.1:1/none")
    users: UserStore = sqlite
    tokens: TokenStore = pg
    convs: ConversationStore = sqlite
    msgs: MessageStore = pg
    life: StoreLifecycle = sqlite
    whole: Store = pg
    assert all(x is not None for x in (users, tokens, convs, msgs, life, whole))


def _members(proto: type) -> set[str]:
    return {
        name
        for name, value in vars(proto).items()
        if not name.startswith("_") and (inspect.isfunction(value) or isinstance(value, property))
    }


def test_parts_add_up_to_store() -> None:
    parts = [_members(p) for p in PARTS]
    union = set().union(*parts)
    assert sum(len(p) for p in parts) == len(union), "a method is in two parts"
    assert _members(Store) == set(), "Store declares methods of its own: put them in a part"
    assert union == {name for name in dir(Store) if not name.startswith("_")}
    assert len(union) == 27  # the contract (the split had 25; members_versioned came with the event bus, recent_groups with the cache warm-up)


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(STORE_DIR.rglob("*.py")):
        rel = path.relative_to(STORE_DIR.parent.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts)] = path
    return out


def test_no_store_module_over_600_lines() -> None:
    modules = _modules()
    assert "gochat.store.sqlite.engine" in modules and "gochat.store.postgres.engine" in modules
    too_long = {
        name: n for name, path in modules.items() if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not too_long, f"modules over {MAX_LINES} lines: {too_long}"


def _runtime_imports(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    """Import statements that run (``if TYPE_CHECKING:`` blocks skipped), at any depth."""
    out: list[ast.Import | ast.ImportFrom] = []
    for stmt in body:
        if isinstance(stmt, ast.Import | ast.ImportFrom):
            out.append(stmt)
        elif isinstance(stmt, ast.If) and ast.unparse(stmt.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            out += _runtime_imports(stmt.orelse)
        else:
            for field in ("body", "orelse", "finalbody", "handlers"):
                inner = getattr(stmt, field, None)
                if isinstance(inner, list):
                    out += _runtime_imports([s for s in inner if isinstance(s, ast.stmt)])
                    for h in inner:
                        if isinstance(h, ast.ExceptHandler):
                            out += _runtime_imports(h.body)
    return out


def test_store_modules_import_no_cycle() -> None:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in _runtime_imports(ast.parse(path.read_text()).body):
            if isinstance(node, ast.ImportFrom):
                assert node.module and node.level == 0, f"{name}: use absolute imports"
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                targets = [a.name for a in node.names]
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps

    done: set[str] = set()

    def visit(node: str, stack: list[str]) -> None:
        if node in stack:
            raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(node) :], node]))
        if node in done:
            return
        for dep in sorted(graph[node]):
            visit(dep, [*stack, node])
        done.add(node)

    for name in graph:
        visit(name, [])
