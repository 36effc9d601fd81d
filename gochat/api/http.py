"""HTTP control-plane API on aiohttp.

Routes (``docs/http-api.md`` documents bodies and errors):

- ``POST /v1/users``, ``GET /v1/users/by-name/{username}``
- ``POST /v1/auth/login``, ``POST /v1/auth/refresh``, ``POST /v1/auth/logout``
- ``GET /.well-known/jwks.json``, ``GET /v1/gateways``
- ``GET /healthz``, ``GET /readiness``, ``GET /metrics``
- ``/v1/admin/…`` for operators (:mod:`gochat.api.admin`)

Every error is JSON ``{"error": {"code", "name", "message"}}`` with the gochat error code of
``gochat/errors.py`` and a matching HTTP status; a retryable one also carries
``retry_after_ms`` and a ``Retry-After`` header (seconds, rounded up).
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from gochat.api.admin import add_admin_routes
from gochat.api.common import SERVER_KEY, Handler, Node, bearer, error_response, json_response, read_body
from gochat.auth.service import TokenPair
from gochat.clock import now_ms
from gochat.errors import ErrorCode, GochatError, error_for_http_status

__all__ = ["build_app"]

log = logging.getLogger("gochat.api")

_MAX_BODY = 64 * 1024
@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    server = request.app[SERVER_KEY]
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    try:
        response = await handler(request)
    except GochatError as exc:
        response = error_response(exc.code, exc.message, exc.retry_after_ms)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_response(error_for_http_status(exc.status), exc.reason)
        response.set_status(exc.status)
    except Exception:
        log.exception("HTTP %s %s failed", request.method, request.path)
        response = error_response(ErrorCode.INTERNAL, "internal error")
    server.metrics.http_requests.labels(route=route, status=str(response.status)).inc()
    return response


def _str_field(data: dict[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str):
        raise GochatError(f"{name!r} must be a string", code=ErrorCode.BAD_REQUEST)
    return value


def _token_pair(server: Node, pair: TokenPair) -> dict[str, Any]:
    return {
        "access_token": pair.access_token,
        "refresh_token": pair.refresh_token,
        "expires_in": server.auth.access_ttl_s,
        "token_type": "Bearer",
        "user_id": pair.user_id,
    }


async def create_user(request: web.Request) -> web.Response:
    data = await read_body(request)
    server = request.app[SERVER_KEY]
    user_id = await server.auth.register(_str_field(data, "username"), _str_field(data, "password"))
    return json_response({"user_id": user_id}, 201)


async def user_by_name(request: web.Request) -> web.Response:
    server = request.app[SERVER_KEY]
    server.auth.verify_access(bearer(request))
    user = await server.store.get_user_by_name(request.match_info["username"])
    if user is None:
        raise GochatError("no such user", code=ErrorCode.NOT_FOUND)
    return json_response({"user_id": user.user_id, "username": user.username})


async def login(request: web.Request) -> web.Response:
    data = await read_body(request)
    server = request.app[SERVER_KEY]
    pair = await server.auth.login(_str_field(data, "username"), _str_field(data, "password"))
    return json_response(_token_pair(server, pair))


async def refresh(request: web.Request) -> web.Response:
    data = await read_body(request)
    server = request.app[SERVER_KEY]
    pair = await server.auth.refresh(_str_field(data, "refresh_token"))
    return json_response(_token_pair(server, pair))


async def logout(request: web.Request) -> web.Response:
    server = request.app[SERVER_KEY]
    claims = server.auth.verify_access(bearer(request), require_fresh=False)
    data = await read_body(request)
    refresh_token = data.get("refresh_token")
    if refresh_token is not None and not isinstance(refresh_token, str):
        raise GochatError("'refresh_token' must be a string", code=ErrorCode.BAD_REQUEST)
    await server.auth.logout(claims, refresh_token)
    return web.Response(status=204)


async def jwks(request: web.Request) -> web.Response:
    return json_response(request.app[SERVER_KEY].auth.keyring.jwks())


async def gateways(request: web.Request) -> web.Response:
    return json_response({"gateways": await request.app[SERVER_KEY].gateways()})


async def healthz(request: web.Request) -> web.Response:
    # time_ms: this node's clock, for `gochat doctor`'s clock-skew check
    return json_response({"status": "ok", "time_ms": now_ms()})


async def readiness(request: web.Request) -> web.Response:
    ready, checks = await request.app[SERVER_KEY].readiness()
    return json_response({"ready": ready, "checks": checks}, 200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[SERVER_KEY].metrics.render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def build_app(server: Node) -> web.Application:
    app = web.Application(middlewares=[_errors], client_max_size=_MAX_BODY)
    app[SERVER_KEY] = server
    app.router.add_post("/v1/users", create_user)
    app.router.add_get("/v1/users/by-name/{username}", user_by_name)
    app.router.add_post("/v1/auth/login", login)
    app.router.add_post("/v1/auth/refresh", refresh)
    app.router.add_post("/v1/auth/logout", logout)
    app.router.add_get("/.well-known/jwks.json", jwks)
    app.router.add_get("/v1/gateways", gateways)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readiness", readiness)
    app.router.add_get("/metrics", metrics)
    add_admin_routes(app.router)
    return app
