"""docs/protocol.md §7 "CALL methods" and the server's CALL handlers stay in step.

Every method of :class:`MessagingCore`'s handler table is documented in §7 and every documented
method exists; each method's section names its errors (valid codes, written ``code NAME`` as in
§4), its events and its JSON request and result, and every error code a handler raises itself
(``ErrorCode.X`` in its source) is among the ones documented for it.
"""

from __future__ import annotations

import asyncio
import inspect
import re
from pathlib import Path
from typing import Any

import orjson

from gochat.config import Settings
from gochat.errors import ErrorCode
from gochat.messaging.core import MessagingCore

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL = ROOT / "docs" / "protocol.md"
CALL_HEADING = "## 7. CALL methods"
_CODE = re.compile(r"\b(\d{3}) ([A-Z][A-Z_]+[A-Z])\b")
_JSON_BLOCK = re.compile(r"^```json\n(.*?)^```", re.M | re.S)


def _handler_table_owner() -> tuple[type, str]:
    """The class that holds the CALL method table, and the attribute name of the table."""
    try:
        from gochat.messaging.calls import ControlCalls  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return MessagingCore, "_calls"
    return ControlCalls, "methods"


def _handlers() -> dict[str, Any]:
    cls, attr = _handler_table_owner()

    async def build() -> dict[str, Any]:
        # the table is built in __init__, which only keeps its collaborators (None here)
        params = inspect.signature(cls).parameters.values()
        obj = cls(*[Settings() if p.name == "settings" else None for p in params])
        return dict(getattr(obj, attr))

    return asyncio.run(build())


def _call_section() -> str:
    text = PROTOCOL.read_text(encoding="utf-8")
    assert text.count(CALL_HEADING) == 1, f"docs/protocol.md needs one {CALL_HEADING!r} section"
    section = text[text.index(CALL_HEADING) + len(CALL_HEADING):]
    end = re.search(r"^## ", section, re.M)
    return section[: end.start()] if end else section


def _methods() -> tuple[str, dict[str, str]]:
    """(the section's preamble, {method: its subsection})."""
    parts = re.split(r"^### (\S+)\n", _call_section(), flags=re.M)
    preamble, rest = parts[0], parts[1:]
    return preamble, dict(zip(rest[0::2], rest[1::2], strict=True))


def _paragraph(body: str, label: str) -> str:
    m = re.search(rf"^{label}:(.*?)(?:\n\n|\Z)", body, re.M | re.S)
    assert m, f"no {label!r} paragraph"
    return m.group(1)


def _codes(text: str) -> set[int]:
    found = set()
    for number, name in _CODE.findall(text):
        code = int(number)
        assert code in ErrorCode._value2member_map_, f"{number} {name}: no such error code"
        assert ErrorCode(code).name == name, f"{number} is {ErrorCode(code).name}, not {name}"
        found.add(code)
    return found


def test_every_call_method_is_documented_and_every_documented_method_exists() -> None:
    _, documented = _methods()
    handlers = _handlers()
    assert sorted(documented) == sorted(handlers), (
        f"undocumented: {sorted(set(handlers) - set(documented))}; "
        f"documented but unknown to the server: {sorted(set(documented) - set(handlers))}"
    )


def test_each_method_documents_request_result_errors_and_events() -> None:
    preamble, documented = _methods()
    general = _codes(preamble)
    assert {ErrorCode.UNKNOWN_METHOD, ErrorCode.BAD_JSON, ErrorCode.BAD_REQUEST, ErrorCode.NOT_FOUND} <= general
    for method, body in documented.items():
        blocks = _JSON_BLOCK.findall(body)
        assert len(blocks) >= 2, f"{method}: a JSON request and a JSON result example"
        for block in blocks:
            assert isinstance(orjson.loads(block), dict), f"{method}: JSON examples are objects"
        _codes(_paragraph(body, "Errors"))  # valid codes, named as in §4
        assert _paragraph(body, "Events").strip(), f"{method}: say which EVENTs it triggers (or none)"


def test_errors_a_handler_raises_itself_are_documented_for_it() -> None:
    preamble, documented = _methods()
    general = _codes(preamble)
    for method, handler in _handlers().items():
        source = inspect.getsource(handler)
        raised = {ErrorCode[n] for n in re.findall(r"ErrorCode\.([A-Z_]+)", source)}
        if re.search(r"\b_bad\(", source):  # gochat.messaging.calls' BAD_REQUEST helper
            raised.add(ErrorCode.BAD_REQUEST)
        if re.search(r"\bnot_found\(", source):
            raised.add(ErrorCode.NOT_FOUND)
        allowed = general | _codes(_paragraph(documented[method], "Errors"))
        missing = sorted(int(c) for c in raised - allowed)
        assert not missing, f"{method} raises {missing}, not documented in docs/protocol.md §7"


def test_client_doc_lists_the_same_call_methods() -> None:
    text = (ROOT / "docs" / "client.md").read_text(encoding="utf-8")
    row = next(line for line in text.splitlines() if line.startswith("| `await call("))
    listed = set(re.findall(r"`([a-z]+\.[a-z]+)`", row))
    assert listed == set(_handlers()), "docs/client.md's call() row lists the CALL methods"
