"""Operator endpoints, ``/v1/admin/…`` (docs/http-api.md, "Admin API"; docs/resilience.md).

Every route needs the operator credential: ``Authorization: Bearer <admin_token>`` (the
``admin_token`` setting, compared in constant time). Without the header: 401 UNAUTHORIZED;
with anything else (a user's access token included): 403 FORBIDDEN; with no ``admin_token``
configured the admin API is off and every route answers 403.

- ``GET /v1/admin/breakers``: every breaker of this node (state, window, counters)
- ``POST /v1/admin/breakers/{name}`` ``{"action": "force_open" | "force_closed" | "reset"}``:
  this node's breaker (breakers are per node: each node has its own links)
- ``GET /v1/admin/degradation``: the switches (active, manual, causes)
- ``PUT /v1/admin/degradation`` ``{"read_only": true | false | null, "cache_only": …,
  "non_core_off": …}``: force a switch on or off, or hand it back to its causes (null); applied
  on every node of the cluster (through the event bus)
- ``GET /v1/admin/slow-queries?limit=N``: this node's slow store statements, the top N (20;
  at most 500) fingerprints by total time (docs/observability.md, "Slow queries")
- ``GET /v1/admin/config``: the reloadable settings' values and ``config_version``
- ``PUT /v1/admin/config`` ``{"<setting>": value, …}``: change reloadable settings; applied on
  every node of the cluster under one new ``config_version`` (docs/configuration.md, "Hot reload")
- ``GET /v1/admin/fanout?limit=N``: the newest N (50; at most 1000) fan-out jobs of the cluster
  with their progress, and this node's fan-out queues (docs/cluster.md, "Fan-out tiers")
- ``GET /v1/admin/fanout/{job_id}``: one job (404 when unknown or expired)
"""

from __future__ import annotations

import hmac
from typing import Any

from aiohttp import web

from gochat.api.common import SERVER_KEY, Node, bearer, json_response, read_body
from gochat.errors import ConfigError, ErrorCode, GochatError, RequestError
from gochat.resilience.degradation import SWITCH_NAMES

__all__ = ["add_admin_routes", "operator"]

_ACTIONS = ("force_open", "force_closed", "reset")
_SWITCHES = {name: switch for switch, name in SWITCH_NAMES.items()}


def operator(request: web.Request) -> Node:
    """The node, once the request carries the operator credential (else 401 / 403)."""
    server = request.app[SERVER_KEY]
    expected = server.settings.admin_token
    presented = bearer(request)  # 401 without a bearer credential
    if not expected:
        raise GochatError("the admin API is off: no admin_token is configured", code=ErrorCode.FORBIDDEN)
    if not hmac.compare_digest(presented.encode(), expected.encode()):
        raise GochatError("operator credential required", code=ErrorCode.FORBIDDEN)
    return server


async def list_breakers(request: web.Request) -> web.Response:
    server = operator(request)
    return json_response({"breakers": server.resilience.breakers.snapshot()})


async def change_breaker(request: web.Request) -> web.Response:
    server = operator(request)
    name = request.match_info["name"]
    if name not in server.resilience.breakers:
        raise RequestError(f"no breaker {name!r} on this node", code=ErrorCode.NOT_FOUND)
    data = await read_body(request)
    action = data.get("action")
    if action not in _ACTIONS:
        raise RequestError(f"'action' must be one of {', '.join(_ACTIONS)}", code=ErrorCode.BAD_REQUEST)
    breaker = server.resilience.breakers[name]
    getattr(breaker, action)("operator (admin API)")
    return json_response(breaker.snapshot())


def _degradation(server: Node) -> dict[str, Any]:
    return dict(server.resilience.degradation.snapshot())


async def get_degradation(request: web.Request) -> web.Response:
    return json_response(_degradation(operator(request)))


async def put_degradation(request: web.Request) -> web.Response:
    server = operator(request)
    data = await read_body(request)
    unknown = set(data) - set(_SWITCHES)
    if unknown or not data:
        raise RequestError(
            f"expected some of {', '.join(_SWITCHES)} (true, false or null); got {sorted(unknown) or 'nothing'}",
            code=ErrorCode.BAD_REQUEST,
        )
    for name, value in data.items():
        if value is not None and not isinstance(value, bool):
            raise RequestError(f"{name!r} must be true, false or null", code=ErrorCode.BAD_REQUEST)
    for name, value in data.items():
        server.set_degradation(_SWITCHES[name], value)
    return json_response(_degradation(server))


async def slow_queries(request: web.Request) -> web.Response:
    from gochat.observability.slow_queries import SlowQueryLog

    server = operator(request)
    raw = request.query.get("limit", "20")
    if not raw.isdigit() or not 1 <= int(raw) <= 500:
        raise RequestError("'limit' must be an integer from 1 to 500", code=ErrorCode.BAD_REQUEST)
    slow = getattr(server.store, "slow_queries", None)
    if not isinstance(slow, SlowQueryLog):
        raise RequestError("this node's store times no statements", code=ErrorCode.NOT_FOUND)
    return json_response(slow.snapshot(int(raw)))


def _config(server: Node) -> dict[str, Any]:
    return {"config_version": server.config.version, "settings": server.config.values()}


async def get_config(request: web.Request) -> web.Response:
    return json_response(_config(operator(request)))


async def put_config(request: web.Request) -> web.Response:
    server = operator(request)
    data = await read_body(request)
    if not data:
        raise RequestError("expected an object of setting: value (the reloadable settings)", code=ErrorCode.BAD_REQUEST)
    try:
        changed = server.config.change(data)
    except ConfigError as exc:
        raise RequestError(exc.message, code=ErrorCode.BAD_REQUEST) from None
    return json_response({**_config(server), "changed": changed})


def _limit(request: web.Request, default: int, most: int) -> int:
    raw = request.query.get("limit", str(default))
    if not raw.isdigit() or not 1 <= int(raw) <= most:
        raise RequestError(f"'limit' must be an integer from 1 to {most}", code=ErrorCode.BAD_REQUEST)
    return int(raw)


async def list_fanout(request: web.Request) -> web.Response:
    server = operator(request)
    limit = _limit(request, 50, 1000)
    jobs = await server.fanout_progress.recent(limit)
    return json_response({"jobs": [j.as_dict() for j in jobs], "node": server.fanout_status()})


async def get_fanout(request: web.Request) -> web.Response:
    server = operator(request)
    job = await server.fanout_progress.get(request.match_info["job_id"])
    if job is None:
        raise RequestError("no such fan-out job (unknown, or older than an hour)", code=ErrorCode.NOT_FOUND)
    return json_response(job.as_dict())


def add_admin_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/v1/admin/breakers", list_breakers)
    router.add_post("/v1/admin/breakers/{name}", change_breaker)
    router.add_get("/v1/admin/degradation", get_degradation)
    router.add_put("/v1/admin/degradation", put_degradation)
    router.add_get("/v1/admin/slow-queries", slow_queries)
    router.add_get("/v1/admin/config", get_config)
    router.add_put("/v1/admin/config", put_config)
    router.add_get("/v1/admin/fanout", list_fanout)
    router.add_get("/v1/admin/fanout/{job_id}", get_fanout)
