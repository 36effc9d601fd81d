"""ERROR replies: one place that answers a request (or a connection) with an ERROR frame.

The gateway and the messaging core both answer with it, so neither calls back into the other:
the core raises :class:`~gochat.errors.GochatError` for synchronous refusals and, for answers
that come later (after a commit or a lookup), writes the ERROR itself through this object.
A fatal code is followed by the WebSocket close ``4000 + code``; a retryable one always carries
a retry delay. Counts are plain ints per code, exported at scrape time (an ERROR under overload
must stay cheap).
"""

from __future__ import annotations

import logging
from typing import Protocol

from gochat.errors import ERRORS, ErrorCode, GochatError, close_code_for
from gochat.protocol import encode_error

__all__ = ["DEFAULT_RETRY_MS", "ErrorReplies", "Replyable"]

log = logging.getLogger("gochat.messaging")

#: retry hint for retryable errors that name none (store or broker unavailable)
DEFAULT_RETRY_MS = 1000


class Replyable(Protocol):
    """What an ERROR is written to: a client connection (``gochat._native.connection.Connection``)."""

    @property
    def user_id(self) -> int: ...

    def push(self, data: bytes, droppable: bool = False) -> None: ...

    def close_with(self, close_code: int, reason: str = "") -> None: ...


class ErrorReplies:
    """Writes ERROR frames and counts them by code in ``errors`` (the metrics' hot dict)."""

    def __init__(self, errors: dict[int, int]) -> None:
        self.errors = errors

    def error(self, conn: Replyable, rid: int, code: int, message: str = "", retry_after_ms: int = 0) -> None:
        """Answer request ``rid`` (0: the connection) with ERROR ``code``; close after a fatal one."""
        spec = ERRORS[code]  # keyed by ErrorCode, an IntEnum: a plain int finds its entry
        if spec.retryable and not retry_after_ms:
            retry_after_ms = DEFAULT_RETRY_MS
        errors = self.errors
        errors[code] = errors.get(code, 0) + 1
        conn.push(encode_error(rid, code, retry_after_ms, message or spec.description))
        if spec.fatal:
            conn.close_with(close_code_for(code), spec.code.name)

    def failed(self, conn: Replyable, rid: int, exc: BaseException) -> None:
        """Answer a failed request: its own code for a :class:`GochatError`, INTERNAL (logged)
        for anything else."""
        if isinstance(exc, GochatError):
            self.error(conn, rid, exc.code, exc.message, exc.retry_after_ms)
            return
        log.error("request failed (rid %d, user %d)", rid, conn.user_id, exc_info=exc)
        self.error(conn, rid, ErrorCode.INTERNAL)
