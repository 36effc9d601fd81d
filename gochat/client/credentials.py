"""The client's access token: :data:`TokenArg` (a string, or an async callable returning one)
and :class:`TokenProvider`, which hands out the token for each connection attempt and decides,
when the server refuses one, whether a new token is available (``invalidate`` then ask the
callable again) or the client must give up (:class:`AuthRejected`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from gochat.errors import AuthError, GochatError

__all__ = ["AuthRejected", "TokenArg", "TokenProvider"]

#: What :meth:`Client.connect` accepts as a token: a string, or an async callable returning one.
TokenArg = str | Callable[[], Awaitable[str]]


class AuthRejected(Exception):
    """Internal: authentication failed and no new token is available (fatal)."""

    def __init__(self, error: GochatError) -> None:
        super().__init__(str(error))
        self.error = error


class TokenProvider:
    """The token for the next connection attempt (see the module docstring)."""

    __slots__ = ("_fn", "_next", "_str")

    def __init__(self, token: TokenArg) -> None:
        if isinstance(token, str):
            self._str: str | None = token
            self._fn: Callable[[], Awaitable[str]] | None = None
        else:
            self._str = None
            self._fn = token
        self._next: str | None = None

    @property
    def has_next(self) -> bool:
        """A new token is waiting (a refused one was replaced): retry at once."""
        return self._next is not None

    async def get(self) -> str:
        """The token to authenticate with now."""
        if self._next is not None:
            tok, self._next = self._next, None
            return tok
        if self._fn is not None:
            try:
                return await self._fn()
            except AuthError as e:  # e.g. the password is wrong: retrying cannot help
                raise AuthRejected(e) from e
        assert self._str is not None
        return self._str

    async def rejected(self, token: str, err: GochatError) -> None:
        """``token`` was refused with an auth-fatal error: get a new one or give up."""
        if self._fn is None:
            raise AuthRejected(err)
        invalidate = getattr(self._fn, "invalidate", None)
        if callable(invalidate):
            invalidate(token)
        try:
            new = await self._fn()
        except GochatError as e:
            if isinstance(e, AuthError):
                raise AuthRejected(e) from e
            raise
        if new == token:
            raise AuthRejected(err)
        self._next = new
