"""Regenerate the generated parts of docs/: the settings table (docs/configuration.md) and the
error table (docs/protocol.md). Tests check that the committed docs match.

    python scripts/gen_docs.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gochat.config import settings_markdown  # noqa: E402
from gochat.errors import markdown_error_table  # noqa: E402


def _replace(path: Path, tag: str, body: str) -> None:
    text = path.read_text()
    pattern = re.compile(rf"(<!-- {tag}:begin -->\n).*?(<!-- {tag}:end -->)", re.S)
    new, n = pattern.subn(lambda m: m.group(1) + body + m.group(2), text)
    if n != 1:
        raise SystemExit(f"{path}: markers for {tag} not found")
    path.write_text(new)


if __name__ == "__main__":
    _replace(ROOT / "docs" / "configuration.md", "settings", settings_markdown())
    _replace(ROOT / "docs" / "protocol.md", "error-table", markdown_error_table())
    print("docs regenerated")
