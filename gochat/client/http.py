"""Async client for the gochat HTTP API (accounts and tokens), on aiohttp.

Errors come back as the same :class:`gochat.errors.GochatError` subclasses as on the WebSocket
(:func:`gochat.client.errors.error_for`), built from the JSON error body
``{"error": {"code", "name", "message"}}``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from gochat.client.errors import error_for
from gochat.errors import ErrorCode, GochatError

__all__ = ["HttpApi", "TokenSource", "Tokens"]


@dataclass(frozen=True, slots=True)
class Tokens:
    """The answer of login and refresh."""

    access_token: str
    refresh_token: str
    expires_in: float
    user_id: int


def _status_error(status: int, text: str) -> GochatError:
    """An error for a response without a gochat JSON error body."""
    if status in (401, 403):
        code = ErrorCode.UNAUTHORIZED if status == 401 else ErrorCode.FORBIDDEN
    elif status == 404:
        code = ErrorCode.NOT_FOUND
    elif status == 409:
        code = ErrorCode.CONFLICT
    elif status == 429:
        code = ErrorCode.RATE_LIMITED
    elif 400 <= status < 500:
        code = ErrorCode.BAD_REQUEST
    elif status == 503:
        code = ErrorCode.UNAVAILABLE
    else:
        code = ErrorCode.INTERNAL
    return error_for(code, f"HTTP {status}: {text[:200]}".rstrip(": "))


class HttpApi:
    """The account/token HTTP API.

    ::

        async with HttpApi("http://127.0.0.1:8701") as api:
            await api.register("alice", "alice-secret-1")
            tokens = await api.login("alice", "alice-secret-1")
            bob = await api.lookup_user("bob")  # sends tokens.access_token

    One :class:`aiohttp.ClientSession` is opened lazily and reused; close it with
    :meth:`close` (or use the instance as an async context manager).

    Endpoints that need an access token (:meth:`lookup_user`) take it as ``access_token=``;
    without one they use a token of the most recent :meth:`token_source` of this object (which
    refreshes it when needed), else the access token of its last :meth:`login` or
    :meth:`refresh`. :meth:`logout` always names the token it revokes.
    """

    def __init__(self, base_url: str, *, timeout: float = 10.0,
                 session: aiohttp.ClientSession | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session = session
        self._own_session = session is None
        #: the latest tokens a login or refresh through this object returned
        self.last_tokens: Tokens | None = None
        self._token_provider: Callable[[], Awaitable[str]] | None = None

    async def __aenter__(self) -> HttpApi:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session (if this object opened it)."""
        if self._session is not None and self._own_session:
            await self._session.close()
        self._session = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
            self._own_session = True
        return self._session

    async def _request(self, method: str, path: str, *, json: Any = None,
                       token: str | None = None) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        data = orjson.dumps(json) if json is not None else None
        if data is not None:
            headers["Content-Type"] = "application/json"
        try:
            async with self._get_session().request(method, self.base_url + path, data=data,
                                                   headers=headers) as resp:
                body = await resp.read()
                status = resp.status
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            raise error_for(ErrorCode.UNAVAILABLE, f"{method} {path}: {e!r}") from e
        if status >= 400:
            try:
                err = orjson.loads(body)["error"]
                exc = error_for(int(err["code"]), str(err.get("message", "")),
                                int(err.get("retry_after_ms", 0) or 0))
            except (ValueError, KeyError, TypeError):
                exc = _status_error(status, body.decode("utf-8", "replace"))
            exc.http_status = status  # type: ignore[attr-defined]
            raise exc
        if not body:
            return None
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as e:
            raise error_for(ErrorCode.INTERNAL, f"{method} {path}: response is not JSON") from e

    @staticmethod
    def _tokens(d: Any) -> Tokens:
        return Tokens(str(d["access_token"]), str(d["refresh_token"]), float(d.get("expires_in", 0)),
                      int(d["user_id"]))

    async def register(self, username: str, password: str) -> int:
        """Create an account; returns the new user id (CONFLICT if the name is taken)."""
        d = await self._request("POST", "/v1/users", json={"username": username, "password": password})
        return int(d["user_id"])

    async def login(self, username: str, password: str) -> Tokens:
        """Exchange a username and password for an access and a refresh token."""
        d = await self._request("POST", "/v1/auth/login", json={"username": username, "password": password})
        self.last_tokens = t = self._tokens(d)
        return t

    async def refresh(self, refresh_token: str) -> Tokens:
        """Exchange a refresh token for a new token pair."""
        d = await self._request("POST", "/v1/auth/refresh", json={"refresh_token": refresh_token})
        self.last_tokens = t = self._tokens(d)
        return t

    async def _access_token(self, access_token: str | None) -> str:
        """The token for an endpoint that requires one (see the class docstring)."""
        if access_token:
            return access_token
        if self._token_provider is not None:
            return await self._token_provider()
        if self.last_tokens is not None:
            return self.last_tokens.access_token
        raise error_for(ErrorCode.UNAUTHORIZED,
                        "this endpoint needs an access token: pass access_token=, or log in "
                        "(login() or token_source()) through this HttpApi first")

    async def logout(self, access_token: str, refresh_token: str | None = None) -> None:
        """Revoke the session of ``access_token`` (and ``refresh_token`` if given)."""
        body = {"refresh_token": refresh_token} if refresh_token else None
        await self._request("POST", "/v1/auth/logout", json=body, token=access_token)

    async def lookup_user(self, username: str, *, access_token: str | None = None) -> int:
        """The user id of ``username`` (NOT_FOUND if there is none). The endpoint requires an
        access token: ``access_token``, else this object's own (see the class docstring)."""
        token = await self._access_token(access_token)
        d = await self._request("GET", f"/v1/users/by-name/{quote(username, safe='')}", token=token)
        return int(d["user_id"])

    def token_source(self, username: str, password: str) -> TokenSource:
        """A token callable for :meth:`gochat.client.Client.connect` that logs in and refreshes.
        It also becomes the source of this object's token for :meth:`lookup_user`."""
        source = TokenSource(self, username, password)
        self._token_provider = source
        return source


class TokenSource:
    """An access-token provider for :meth:`gochat.client.Client.connect`.

    Calling it returns a valid access token: the cached one while it is not about to expire,
    else a refreshed one (or a fresh login when refreshing fails). The client calls
    :meth:`invalidate` when the server rejects a token, so the next call gets a new one.
    """

    def __init__(self, api: HttpApi, username: str, password: str, *, margin: float = 30.0) -> None:
        self.api = api
        self.username = username
        self._password = password
        self._margin = margin
        self.tokens: Tokens | None = None
        self._expires_at = 0.0
        self._lock = asyncio.Lock()

    def _store(self, t: Tokens) -> str:
        self.tokens = t
        self._expires_at = time.monotonic() + t.expires_in if t.expires_in > 0 else float("inf")
        return t.access_token

    async def __call__(self) -> str:
        async with self._lock:
            t = self.tokens
            if t is not None and time.monotonic() < self._expires_at - self._margin:
                return t.access_token
            if t is not None:
                try:
                    return self._store(await self.api.refresh(t.refresh_token))
                except GochatError as e:
                    if e.code not in range(200, 300) and e.code not in range(300, 400):
                        raise
            return self._store(await self.api.login(self.username, self._password))

    def invalidate(self, token: str) -> None:
        """``token`` was rejected: the next call refreshes."""
        if self.tokens is not None and self.tokens.access_token == token:
            self._expires_at = 0.0

    async def logout(self) -> None:
        """Revoke the current session on the server."""
        if self.tokens is not None:
            await self.api.logout(self.tokens.access_token, self.tokens.refresh_token)
            self.tokens = None
