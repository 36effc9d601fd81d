"""Error classes the client raises, and the one mapping from a wire error code to a class.

Every error the client raises on purpose is a :class:`gochat.errors.GochatError`; the ``code``
attribute is the :class:`gochat.errors.ErrorCode` the server sent (or the closest one for
client-side conditions), and ``retry_after_ms`` is copied from the ERROR frame.
"""

from __future__ import annotations

from gochat.errors import (
    AuthError,
    ErrorCode,
    GochatError,
    ProtocolError,
    RequestError,
    UnavailableError,
)

__all__ = [
    "AUTH_FATAL_CODES",
    "ClientClosedError",
    "ConnectionLostError",
    "error_class_for",
    "error_for",
    "is_auth_fatal",
]

#: Authentication failures that make reconnecting with the same token pointless.
AUTH_FATAL_CODES = frozenset({ErrorCode.UNAUTHORIZED, ErrorCode.TOKEN_EXPIRED, ErrorCode.TOKEN_REVOKED})


class ConnectionLostError(UnavailableError):
    """The connection carrying a request went away before its reply arrived.

    Raised by requests that are not retried automatically (``call``); the request may or may
    not have been executed by the server.
    """

    code = ErrorCode.UNAVAILABLE


class ClientClosedError(GochatError):
    """The client was closed (by :meth:`Client.close` or after a fatal error)."""

    code = ErrorCode.UNAVAILABLE


def error_class_for(code: int) -> type[GochatError]:
    """The exception class for a wire error ``code``.

    ``100-199`` :class:`ProtocolError`, ``200-299`` :class:`AuthError`, ``300-499``
    :class:`RequestError`, ``501-599`` :class:`UnavailableError`; anything else (``500``
    INTERNAL, unknown or application codes) is the root :class:`GochatError`.
    """
    if 100 <= code < 200:
        return ProtocolError
    if 200 <= code < 300:
        return AuthError
    if 300 <= code < 500:
        return RequestError
    if 500 < code < 600:
        return UnavailableError
    return GochatError


def error_for(code: int, message: str = "", retry_after_ms: int = 0) -> GochatError:
    """Build the exception for an ERROR frame (or an HTTP error body).

    Codes outside :class:`ErrorCode` (reserved or application-defined) become a plain
    :class:`GochatError` with code INTERNAL and the numeric code in the message; the original
    number is always available as ``exc.wire_code``.
    """
    cls = error_class_for(code)
    try:
        known = ErrorCode(code)
    except ValueError:
        exc = GochatError(f"error {code}: {message}" if message else f"error {code}",
                          code=ErrorCode.INTERNAL, retry_after_ms=retry_after_ms)
    else:
        exc = cls(message, code=known, retry_after_ms=retry_after_ms)
    exc.wire_code = code  # type: ignore[attr-defined]
    return exc


def is_auth_fatal(code: int) -> bool:
    """True for the authentication failures after which the same token cannot succeed."""
    return code in AUTH_FATAL_CODES
