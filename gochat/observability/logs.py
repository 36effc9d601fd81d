"""Structured logs: one JSON object per line (``log_format = "json"``), for log pipelines.

Fields: ``ts`` (ISO 8601, UTC, milliseconds), ``level``, ``logger``, ``message``, ``node`` (the
node's name), ``exc`` (the traceback, when there is one), and ``trace_id`` / ``span_id`` (hex,
W3C form) when the record was made inside a current OpenTelemetry span or was given them as
``extra``. The formatter never imports OpenTelemetry itself: with tracing off (the module not
loaded) no trace fields are looked up.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

__all__ = ["JsonFormatter", "configure_logging"]


class JsonFormatter(logging.Formatter):
    def __init__(self, node: str = "") -> None:
        super().__init__()
        self.node = node

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.node:
            out["node"] = self.node
        trace_id = getattr(record, "trace_id", None)
        span_id = getattr(record, "span_id", None)
        if trace_id is None:
            trace_id, span_id = _current_span_ids()
        if trace_id:
            out["trace_id"] = trace_id if isinstance(trace_id, str) else f"{trace_id:032x}"
            if span_id:
                out["span_id"] = span_id if isinstance(span_id, str) else f"{span_id:016x}"
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out).decode()


def _current_span_ids() -> tuple[int, int]:
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return 0, 0
    ctx = trace.get_current_span().get_span_context()
    return (ctx.trace_id, ctx.span_id) if ctx.is_valid else (0, 0)


def configure_logging(level: str, log_format: str, node: str = "") -> None:
    """The process's root logger: ``text`` (a readable line) or ``json`` (:class:`JsonFormatter`)."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(node))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
