"""The client package stays split by responsibility: no module over 600 lines, and no import
cycle between its modules."""

from __future__ import annotations

import ast
from pathlib import Path

CLIENT = Path(__file__).resolve().parent.parent / "gochat" / "client"
MAX_LINES = 600


def test_no_client_module_exceeds_600_lines() -> None:
    sizes = {p.name: len(p.read_text(encoding="utf-8").splitlines()) for p in CLIENT.glob("*.py")}
    assert sizes, CLIENT
    too_long = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not too_long, f"split these modules (limit {MAX_LINES} lines): {too_long}"


def test_client_modules_import_no_cycle() -> None:
    mods = {p.stem for p in CLIENT.glob("*.py") if p.stem != "__init__"}
    deps: dict[str, set[str]] = {}
    for m in mods:
        tree = ast.parse((CLIENT / f"{m}.py").read_text(encoding="utf-8"))
        deps[m] = {
            node.module.rsplit(".", 1)[1]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module
            and node.module.startswith("gochat.client.") and node.module.rsplit(".", 1)[1] in mods
        }
    done: set[str] = set()

    def visit(m: str, path: tuple[str, ...]) -> None:
        assert m not in path, f"import cycle: {' -> '.join((*path, m))}"
        if m not in done:
            for d in sorted(deps[m]):
                visit(d, (*path, m))
            done.add(m)

    for m in sorted(mods):
        visit(m, ())
