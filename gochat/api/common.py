"""What the HTTP API's route modules share: the node they serve (:class:`Node`), JSON
responses and errors, request bodies and bearer credentials."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from aiohttp import web

from gochat.errors import ERRORS, ErrorCode, GochatError

if TYPE_CHECKING:
    from gochat.auth.service import AuthService
    from gochat.cluster.fanout import FanoutProgress
    from gochat.config import Settings
    from gochat.config_reload import ConfigReloader
    from gochat.observability.metrics import Metrics
    from gochat.resilience.degradation import Switch
    from gochat.resilience.node import NodeResilience
    from gochat.store import UserStore

__all__ = ["SERVER_KEY", "Handler", "Node", "bearer", "error_response", "json_response", "read_body"]


class Node(Protocol):
    """What the HTTP API needs from its node (``gochat.server.Server``; a Protocol, so that
    this module does not import the server that imports it)."""

    @property
    def auth(self) -> AuthService: ...

    @property
    def store(self) -> UserStore: ...

    @property
    def metrics(self) -> Metrics: ...

    async def gateways(self) -> list[dict[str, Any]]: ...

    async def readiness(self) -> tuple[bool, dict[str, str]]: ...

    @property
    def settings(self) -> Settings: ...

    @property
    def resilience(self) -> NodeResilience: ...

    @property
    def config(self) -> ConfigReloader: ...

    def set_degradation(self, switch: Switch, value: bool | None) -> None: ...

    @property
    def fanout_progress(self) -> FanoutProgress: ...

    def fanout_status(self) -> dict[str, Any]: ...


SERVER_KEY: web.AppKey[Node] = web.AppKey("server")


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def error_response(code: ErrorCode, message: str, retry_after_ms: int = 0) -> web.Response:
    status = ERRORS[code].http_status
    error: dict[str, Any] = {"code": int(code), "name": code.name, "message": message}
    if retry_after_ms:
        error["retry_after_ms"] = retry_after_ms
    response = json_response({"error": error}, status)
    if retry_after_ms:
        response.headers["Retry-After"] = str(-(-retry_after_ms // 1000))
    return response


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def read_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        data = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        raise GochatError("request body is not JSON", code=ErrorCode.BAD_JSON) from None
    if not isinstance(data, dict):
        raise GochatError("request body must be a JSON object", code=ErrorCode.BAD_JSON)
    return data


def bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise GochatError("expected 'Authorization: Bearer <access token>'", code=ErrorCode.UNAUTHORIZED)
    return token.strip()
