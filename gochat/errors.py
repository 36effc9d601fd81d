"""One exception root and the client-visible error/close code table.

Error codes are *data*, not a class per code (asyncpg ``exceptions/_base.py``,
centrifuge ``errors.go``). Every code has a name, a numeric value in a reserved
range, a flag telling whether the connection survives it, and whether a client
may retry the same request later. A code whose connection does not survive is
sent as an ERROR frame followed by a WebSocket close with ``close_code``
(``4000 + code``).

Ranges (see ``docs/protocol.md`` for the table that clients implement):

=========  ====================================================================
0          no error
100–199    protocol violations: ERROR, then close 4100–4199
200–299    authentication / authorization
300–399    request errors: the connection stays open
400–499    throttling and flow control
500–599    server side; 501/503 are retryable
600–999    reserved for future gochat versions
1000–65535 reserved for applications / extensions (never sent by gochat)
=========  ====================================================================
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

__all__ = [
    "CLOSE_CODE_BASE",
    "ERRORS",
    "AuthError",
    "ConfigError",
    "ErrorCode",
    "ErrorSpec",
    "GochatError",
    "ProtocolError",
    "RequestError",
    "UnavailableError",
    "close_code_for",
    "error_for_http_status",
]

#: WebSocket close code sent for a fatal error is ``CLOSE_CODE_BASE + code``
#: (RFC 6455 leaves 4000–4999 to applications).
CLOSE_CODE_BASE: Final = 4000


class ErrorCode(enum.IntEnum):
    """Numeric error codes carried in ERROR frames and HTTP error bodies."""

    OK = 0
    # 1xx protocol violations (fatal)
    MALFORMED_FRAME = 100
    TRUNCATED_FRAME = 101
    FRAME_TOO_LARGE = 102
    UNSUPPORTED_VERSION = 103
    UNKNOWN_OP = 104
    BAD_BODY = 105
    BAD_UTF8 = 106
    TEXT_FRAME = 107
    NOT_AUTHENTICATED = 108
    BAD_FLAGS = 109
    UNEXPECTED_OP = 110
    # 2xx authentication / authorization
    UNAUTHORIZED = 200
    TOKEN_EXPIRED = 201
    TOKEN_REVOKED = 202
    FORBIDDEN = 203
    ALREADY_AUTHENTICATED = 204
    # 3xx request errors (connection stays)
    BAD_REQUEST = 300
    NOT_FOUND = 301
    NOT_MEMBER = 302
    BODY_TOO_LARGE = 303
    EMPTY_BODY = 304
    BAD_JSON = 305
    UNKNOWN_METHOD = 306
    CONFLICT = 307
    # 4xx throttling / flow control
    RATE_LIMITED = 400
    SLOW_CONSUMER = 401
    IDLE_TIMEOUT = 402
    # 5xx server side
    INTERNAL = 500
    UNAVAILABLE = 501
    SHUTTING_DOWN = 502
    OVERLOADED = 503
    READ_ONLY = 504


@dataclass(frozen=True, slots=True)
class ErrorSpec:
    code: ErrorCode
    fatal: bool
    retryable: bool
    description: str
    #: the HTTP status of the HTTP API's error response carrying this code
    http_status: int = 400

    @property
    def close_code(self) -> int:
        return CLOSE_CODE_BASE + int(self.code) if self.fatal else 0


def _spec(code: ErrorCode, fatal: bool, retryable: bool, description: str, http_status: int = 400) -> ErrorSpec:
    return ErrorSpec(code, fatal, retryable, description, http_status)


_E = ErrorCode
#: The one table. ``docs/protocol.md`` mirrors it; ``tests`` check that they agree. Keyed by
#: code: an :class:`ErrorCode` or the plain int it equals.
ERRORS: Final[dict[int, ErrorSpec]] = {
    s.code: s
    for s in (
        _spec(_E.OK, False, False, "no error"),
        _spec(_E.MALFORMED_FRAME, True, False, "frame length below 12, or an empty WebSocket message"),
        _spec(_E.TRUNCATED_FRAME, True, False, "frame (or its 12-byte header) extends past the end of the message"),
        _spec(_E.FRAME_TOO_LARGE, True, False, "frame length above the negotiated maximum"),
        _spec(_E.UNSUPPORTED_VERSION, True, False, "protocol version byte is not 1"),
        _spec(_E.UNKNOWN_OP, True, False, "operation code not in the v1 table"),
        _spec(_E.BAD_BODY, True, False, "body too short, too long or with an invalid field for its operation"),
        _spec(_E.BAD_UTF8, True, False, "a text field is not valid UTF-8"),
        _spec(_E.TEXT_FRAME, True, False, "a WebSocket text message was received; only binary is allowed"),
        _spec(_E.NOT_AUTHENTICATED, True, False, "an operation other than AUTH or PING before authentication"),
        _spec(_E.BAD_FLAGS, True, False, "a flag bit that the operation does not define is set"),
        _spec(_E.UNEXPECTED_OP, True, False, "a server-to-client operation was sent by the client"),
        _spec(_E.UNAUTHORIZED, True, False, "token missing, malformed, forged or signed with an unknown key", 401),
        _spec(_E.TOKEN_EXPIRED, True, False, "token expired; refresh it and reconnect", 401),
        _spec(_E.TOKEN_REVOKED, True, False, "token or session revoked (logout, kick)", 401),
        _spec(_E.FORBIDDEN, False, False, "authenticated but not allowed to do this", 403),
        _spec(_E.ALREADY_AUTHENTICATED, False, False, "AUTH on a connection that is already authenticated"),
        _spec(_E.BAD_REQUEST, False, False, "a field value is invalid for this request"),
        _spec(_E.NOT_FOUND, False, False, "unknown conversation, user or room", 404),
        _spec(_E.NOT_MEMBER, False, False, "sender is not a member of the conversation"),
        _spec(_E.BODY_TOO_LARGE, False, False, "message body above the configured maximum", 413),
        _spec(_E.EMPTY_BODY, False, False, "message body is empty"),
        _spec(_E.BAD_JSON, False, False, "CALL payload is not a JSON object"),
        _spec(_E.UNKNOWN_METHOD, False, False, "CALL method is not known"),
        _spec(_E.CONFLICT, False, False, "state conflict (a username that is taken, ...)", 409),
        _spec(_E.RATE_LIMITED, False, True, "request rate above the per-connection limit; retry after retry_after_ms", 429),
        _spec(_E.SLOW_CONSUMER, True, False, "outbound buffer limit exceeded: the client does not read fast enough"),
        _spec(_E.IDLE_TIMEOUT, True, False, "nothing received within the idle timeout"),
        _spec(_E.INTERNAL, False, True, "unexpected server error; the request may be retried", 500),
        _spec(_E.UNAVAILABLE, False, True, "a dependency (store, broker) is unavailable; nothing was acknowledged", 503),
        _spec(_E.SHUTTING_DOWN, True, True, "the node is draining; reconnect elsewhere", 503),
        _spec(_E.OVERLOADED, False, True, "the node is overloaded; retry after retry_after_ms", 503),
        _spec(_E.READ_ONLY, False, True, "the service is read-only for now (degraded); retry after retry_after_ms", 503),
    )
}


def error_for_http_status(status: int) -> ErrorCode:
    """The request error (300–399) whose HTTP status is ``status`` (the first in code order),
    for HTTP errors the web framework raises itself (404, 405, 413, ...); BAD_REQUEST when none."""
    for spec in ERRORS.values():
        if 300 <= spec.code < 400 and spec.http_status == status:
            return spec.code
    return ErrorCode.BAD_REQUEST


def close_code_for(code: int) -> int:
    """WebSocket close code for a fatal error ``code`` (``4000 + code``)."""
    return CLOSE_CODE_BASE + int(code)


class GochatError(Exception):
    """Root of every exception gochat raises on purpose.

    ``code`` is the client-visible :class:`ErrorCode`; ``message`` is safe to
    show to the client.
    """

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str = "", *, code: int | None = None, retry_after_ms: int = 0) -> None:
        if code is not None:
            self.code = ErrorCode(code)
        self.message = message or ERRORS[self.code].description
        self.retry_after_ms = retry_after_ms
        super().__init__(self.message)

    @property
    def spec(self) -> ErrorSpec:
        return ERRORS[self.code]

    @property
    def fatal(self) -> bool:
        return self.spec.fatal

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code.name}, message={self.message!r})"


class ProtocolError(GochatError):
    """A frame violates the wire protocol (codes 100–199)."""

    code = ErrorCode.MALFORMED_FRAME


class AuthError(GochatError):
    """Authentication or authorization failed (codes 200–299)."""

    code = ErrorCode.UNAUTHORIZED


class RequestError(GochatError):
    """A well-formed request that cannot be served (codes 300–499)."""

    code = ErrorCode.BAD_REQUEST


class UnavailableError(GochatError):
    """A dependency is unavailable; the client may retry (code 501)."""

    code = ErrorCode.UNAVAILABLE


class ConfigError(GochatError):
    """Invalid configuration; raised at start-up, never to a client."""

    code = ErrorCode.INTERNAL


def markdown_error_table() -> str:
    """The error table of ``docs/protocol.md`` §4, generated from :data:`ERRORS` (a test compares)."""
    lines = [
        "| code | name | fatal | close code | retryable | HTTP | description |",
        "|---:|---|---|---:|---|---:|---|",
    ]
    for spec in sorted(ERRORS.values(), key=lambda s: int(s.code)):
        close = str(spec.close_code) if spec.fatal else "—"
        description = spec.description.replace("|", "\\|")
        lines.append(
            f"| {int(spec.code)} | {spec.code.name} | {'yes' if spec.fatal else 'no'} | {close} "
            f"| {'yes' if spec.retryable else 'no'} | {spec.http_status} | {description} |"
        )
    return "\n".join(lines) + "\n"
