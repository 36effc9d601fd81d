"""W3C Trace Context ``traceparent`` (version 00), as a TRACED SEND carries it (docs/protocol.md,
"Traced SEND").

``00-<trace-id: 32 lowercase hex>-<parent-id: 16 lowercase hex>-<trace-flags: 2 lowercase hex>``,
55 ASCII bytes; an all-zero trace id or parent id is invalid. Bit 0 of the flags is *sampled*.
Shared by the server (which checks what a client sends) and the client SDK (which writes it).
"""

from __future__ import annotations

import re
from typing import Final, NamedTuple

from gochat.protocol.constants import TRACEPARENT_SIZE

__all__ = ["SAMPLED", "TraceParent", "format_traceparent", "parse_traceparent"]

#: trace-flags bit: the caller records this trace (gochat traces such a SEND)
SAMPLED: Final = 0x01

_TRACEPARENT = re.compile(rb"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


class TraceParent(NamedTuple):
    trace_id: int
    span_id: int
    flags: int

    @property
    def sampled(self) -> bool:
        return bool(self.flags & SAMPLED)


def parse_traceparent(value: bytes) -> TraceParent | None:
    """The trace context in ``value`` (exactly 55 bytes), or None when it is not a valid
    version-00 traceparent."""
    if len(value) != TRACEPARENT_SIZE:
        return None
    m = _TRACEPARENT.fullmatch(value)
    if m is None:
        return None
    trace_id, span_id = int(m[1], 16), int(m[2], 16)
    if not trace_id or not span_id:
        return None
    return TraceParent(trace_id, span_id, int(m[3], 16))


def format_traceparent(trace_id: int, span_id: int, flags: int = SAMPLED) -> bytes:
    """A version-00 traceparent (55 bytes); raises ValueError for ids out of range or zero."""
    if not 0 < trace_id < 1 << 128 or not 0 < span_id < 1 << 64 or not 0 <= flags <= 0xFF:
        raise ValueError("trace_id must be 1..2**128-1, span_id 1..2**64-1 and flags 0..255")
    return b"00-%032x-%016x-%02x" % (trace_id, span_id, flags)
