"""``gochat doctor``: check a node's dependencies and print what to fix.

With the node's settings (the same sources as ``gochat serve``: ``--config``, ``GOCHAT_*``,
flags), in cluster mode (``postgres_dsn`` and ``redis_url``):

* PostgreSQL (:mod:`gochat.store.postgres.doctor`): schema version; every index the migrations
  create is present and valid; the hot queries' plans use their indexes; table statistics are
  fresh; replication lag of each replica (or "no replicas");
* Redis (:func:`redis_findings`): memory used against ``maxmemory``, the eviction policy (must be
  ``noeviction``), keys already evicted, the replication role;
* clocks (:func:`clock_findings`): every node the registry lists against Redis ``TIME`` and this
  machine, through the node's ``GET /healthz`` (its ``time_ms`` when it sends one, else the HTTP
  ``Date`` header, to the second).

Embedded mode (SQLite in ``data_dir``): :mod:`gochat.store.sqlite.doctor`.

Output is one line per finding (``--json``: one JSON object). Exit status: 0 when every finding
is ok or info, 1 when one is warn or error, 2 when the settings are unusable.
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import time
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson

from gochat.config import Settings
from gochat.observability.findings import Finding, Status

__all__ = [
    "ClockSample",
    "Report",
    "add_doctor_arguments",
    "clock_findings",
    "diagnose",
    "doctor_main",
    "redis_findings",
    "render_text",
]

#: default largest clock difference between nodes
MAX_SKEW_MS: Final = 500.0
MEMORY_WARN, MEMORY_ERROR = 0.75, 0.90

_WHY_NOEVICTION = (
    "gochat keeps state in Redis that must not vanish under memory pressure: the event-bus and "
    "large-group fan-out streams (an evicted stream loses events and jobs without a trace), "
    "distributed locks (an evicted lock lets a second node take a group's membership lock), and "
    "the registry and presence entries (nodes and online users disappear). With noeviction a full "
    "Redis refuses writes instead: the node's Redis breaker opens, it degrades visibly, and nothing "
    "acknowledged is lost"
)
_WHY_CLOCKS = (
    "nodes compare each other's clocks: an access token issued by one node expires by another's "
    "clock (no leeway), messages from different nodes are stamped (ts_ms, msg_id) by their own "
    "clocks, and event lag (gochat_event_lag_seconds) is measured across nodes"
)


@dataclass
class Report:
    mode: str
    target: dict[str, str]
    findings: list[Finding] = field(default_factory=list)

    @property
    def failing(self) -> list[Finding]:
        return [f for f in self.findings if f.status.failing]

    @property
    def exit_code(self) -> int:
        return 1 if self.failing else 0

    def as_dict(self) -> dict[str, Any]:
        counts = {str(s): sum(f.status is s for f in self.findings) for s in Status}
        return {
            "ok": not self.failing,
            "mode": self.mode,
            "target": self.target,
            "counts": counts,
            "findings": [f.as_dict() for f in self.findings],
        }


# ---- Redis -----------------------------------------------------------------------------------


def _int(info: Mapping[str, Any], key: str) -> int:
    try:
        return int(info.get(key) or 0)
    except (TypeError, ValueError):
        return 0


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def redis_findings(info: Mapping[str, Any]) -> list[Finding]:
    """Findings from Redis ``INFO`` (as redis-py parses it: ``used_memory``, ``maxmemory``,
    ``maxmemory_policy``, ``total_system_memory``, ``evicted_keys``, ``role``,
    ``connected_slaves``, ``slaveN`` dicts, ``master_repl_offset``)."""
    out: list[Finding] = []
    policy = str(info.get("maxmemory_policy", "?"))
    if policy != "noeviction":
        out.append(
            Finding(
                "redis",
                Status.ERROR,
                "maxmemory-policy",
                f"maxmemory-policy is {policy}: {_WHY_NOEVICTION}",
                "CONFIG SET maxmemory-policy noeviction, and set maxmemory-policy noeviction in redis.conf "
                "(CONFIG REWRITE) so that a restart keeps it",
                {"maxmemory_policy": policy},
            )
        )
    else:
        out.append(Finding("redis", Status.OK, "maxmemory-policy", "noeviction: Redis never drops gochat's keys"))
    evicted = _int(info, "evicted_keys")
    if evicted:
        out.append(
            Finding(
                "redis",
                Status.ERROR,
                "evicted_keys",
                f"Redis evicted {evicted} keys since it started: streams, locks or presence may have lost entries",
                "set maxmemory-policy noeviction and give Redis more memory; nodes rebuild their caches "
                "from the store on their own, lost fan-out jobs are recovered by clients' SYNC",
                {"evicted_keys": evicted},
            )
        )
    used, limit, system = _int(info, "used_memory"), _int(info, "maxmemory"), _int(info, "total_system_memory")
    details = {"used_memory": used, "maxmemory": limit, "total_system_memory": system}
    if limit:
        share = used / limit
        text = f"{_mib(used)} used of maxmemory {_mib(limit)} ({share:.0%})"
        fix = (
            "raise maxmemory (CONFIG SET maxmemory …), look for big keys (redis-cli --bigkeys): a stream a "
            "dead consumer group holds back, a huge presence set"
        )
        if share >= MEMORY_ERROR:
            out.append(Finding("redis", Status.ERROR, "memory", text + ": writes fail when it is full", fix, details))
        elif share >= MEMORY_WARN:
            out.append(Finding("redis", Status.WARN, "memory", text, fix, details))
        else:
            out.append(Finding("redis", Status.OK, "memory", text, details=details))
    else:
        share_sys = used / system if system else 0.0
        status = Status.WARN if share_sys >= MEMORY_WARN else Status.INFO
        out.append(
            Finding(
                "redis",
                status,
                "memory",
                f"{_mib(used)} used, no maxmemory" + (f" ({share_sys:.0%} of the machine's memory)" if system else ""),
                "set maxmemory (with noeviction) below the machine's memory and alert on used_memory: without it "
                "Redis grows until the kernel's OOM killer stops it",
                details,
            )
        )
    role = str(info.get("role", "master"))
    if role != "master":
        out.append(
            Finding(
                "redis",
                Status.ERROR,
                "role",
                f"redis_url points at a {role} (read-only): gochat writes need the primary",
                "point redis_url at the primary (or at a Sentinel-aware proxy)",
            )
        )
    replicas = _int(info, "connected_slaves")
    if role == "master" and replicas:
        offset = _int(info, "master_repl_offset")
        for i in range(replicas):
            r = info.get(f"slave{i}")
            if not isinstance(r, Mapping):
                continue
            behind, lag = offset - _int(r, "offset"), _int(r, "lag")
            name = f"redis replica {r.get('ip', '?')}:{r.get('port', '?')}"
            ok = r.get("state") == "online" and lag < 10
            out.append(
                Finding(
                    "replication",
                    Status.OK if ok else Status.WARN,
                    name,
                    f"{name} ({r.get('state', '?')}): {behind} bytes behind, last ack {lag} s ago",
                    "" if ok else "check the replica's link and load (INFO replication on it)",
                )
            )
    return out


async def check_redis(url: str, timeout: float = 5.0) -> list[Finding]:
    """:func:`redis_findings` on the server at ``url`` (one ``INFO``)."""
    from redis.asyncio import Redis
    from redis.exceptions import RedisError

    client = Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        info = await client.info()
    except (RedisError, OSError, TimeoutError) as exc:
        return [Finding("redis", Status.ERROR, "redis_url", f"cannot reach Redis: {exc}", "check redis_url")]
    finally:
        await client.aclose()
    return redis_findings(info)


# ---- clocks ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClockSample:
    """A clock read against this machine's: ``offset_ms`` (theirs minus ours), ``error_ms``
    (the reading's uncertainty: half the round trip, plus half a second from a Date header)."""

    name: str
    offset_ms: float | None
    error_ms: float = 0.0
    source: str = ""
    problem: str = ""


async def _redis_clock(url: str, timeout: float) -> ClockSample:
    from redis.asyncio import Redis

    client = Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        t0 = time.time()
        sec, usec = await client.time()
        t1 = time.time()
    except Exception as exc:
        return ClockSample("redis", None, problem=f"cannot read TIME: {exc}")
    finally:
        await client.aclose()
    return ClockSample("redis", (sec + usec / 1e6 - (t0 + t1) / 2) * 1000, (t1 - t0) * 500, "TIME")


async def _node_clock(session: Any, name: str, http_url: str, timeout: float) -> ClockSample:
    import aiohttp

    try:
        t0 = time.time()
        async with session.get(http_url.rstrip("/") + "/healthz", timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            date = r.headers.get("Date")
            raw = await r.read()
        t1 = time.time()
    except Exception as exc:
        return ClockSample(name, None, problem=f"unreachable at {http_url}: {exc or type(exc).__name__}")
    try:
        body = orjson.loads(raw) if r.status == 200 else {}
    except orjson.JSONDecodeError:
        body = {}
    mid, half_rtt = (t0 + t1) / 2, (t1 - t0) * 500
    if isinstance(body, dict) and isinstance(body.get("time_ms"), int | float):
        return ClockSample(name, body["time_ms"] - mid * 1000, half_rtt, "time_ms")
    parsed = email.utils.parsedate_to_datetime(date) if date else None
    if parsed is None:
        return ClockSample(name, None, problem=f"{http_url}/healthz sent neither time_ms nor a Date header")
    # Date is truncated to the second: the clock read lies in [Date, Date + 1 s)
    return ClockSample(name, (parsed.timestamp() + 0.5 - mid) * 1000, half_rtt + 500, "Date header")


def clock_findings(samples: Sequence[ClockSample], max_skew_ms: float = MAX_SKEW_MS) -> list[Finding]:
    """Each sample against the reference, Redis ``TIME`` when there is a ``redis`` sample, else
    this machine; a clock is skewed when its offset exceeds ``max_skew_ms`` by more than the
    reading's uncertainty."""
    out: list[Finding] = []
    ref = next((s for s in samples if s.name == "redis" and s.offset_ms is not None), None)
    ref_off, ref_err = (ref.offset_ms or 0.0, ref.error_ms) if ref is not None else (0.0, 0.0)
    ref_name = "Redis TIME" if ref is not None else "this machine"
    fix = f"run NTP (chrony or systemd-timesyncd) on every node and on Redis's host; `chronyc tracking` shows the offset ({_WHY_CLOCKS})"
    if ref is not None:
        samples = [ClockSample("this machine", 0.0, 0.0, "local"), *samples]
    for s in samples:
        if s is ref:
            continue
        if s.offset_ms is None:
            out.append(Finding("clock", Status.WARN, s.name, f"cannot judge its clock: {s.problem}", "check that the node is up"))
            continue
        skew, err = s.offset_ms - ref_off, s.error_ms + ref_err
        details = {"skew_ms": round(skew, 1), "uncertainty_ms": round(err, 1), "source": s.source, "reference": ref_name}
        text = f"{skew:+.0f} ms against {ref_name} (±{err:.0f} ms, {s.source})"
        if abs(skew) - err > max_skew_ms:
            out.append(Finding("clock", Status.ERROR, s.name, f"clock off by {text}; limit {max_skew_ms:g} ms", fix, details))
        else:
            out.append(Finding("clock", Status.OK, s.name, text, details=details))
    return out


async def check_clocks(settings: Settings, max_skew_ms: float, timeout: float = 5.0) -> list[Finding]:
    """Redis TIME, this machine and every node the registry lists (their ``/healthz``)."""
    import aiohttp

    from gochat.cluster.redis.registry import RedisRegistry
    from gochat.errors import GochatError

    samples = [await _redis_clock(settings.redis_url, timeout)]
    registry = RedisRegistry(settings.redis_url, settings.redis_prefix, timeout_s=timeout)
    try:
        nodes = await registry.nodes()
    except GochatError as exc:
        return [*clock_findings(samples, max_skew_ms), Finding("clock", Status.WARN, "registry", f"cannot list the nodes: {exc.message}")]
    finally:
        await registry.close()
    async with aiohttp.ClientSession() as session:
        samples += await asyncio.gather(
            *(_node_clock(session, f"node {n.node_id}", n.http_url, timeout) for n in nodes if n.http_url)
        )
    out = clock_findings(samples, max_skew_ms)
    if not nodes:
        out.append(Finding("clock", Status.INFO, "registry", f"no node is registered under prefix {settings.redis_prefix!r}"))
    return out


# ---- the whole check -------------------------------------------------------------------------


async def _guarded(check: str, coro: Awaitable[list[Finding]]) -> list[Finding]:
    """A check that fails unexpectedly is a finding, not a crash of the others."""
    try:
        return await coro
    except Exception as exc:
        return [Finding(check, Status.ERROR, "doctor", f"the check failed: {exc!r}", "report this as a gochat bug")]


async def diagnose(settings: Settings, *, max_skew_ms: float = MAX_SKEW_MS, timeout: float = 30.0) -> Report:
    """Every check for a node with ``settings``."""
    if settings.postgres_dsn and settings.redis_url:
        from gochat.store.postgres.doctor import check_postgres

        report = Report(
            "cluster",
            {"postgres_schema": settings.postgres_schema, "redis_prefix": settings.redis_prefix},
        )
        results = await asyncio.gather(
            _guarded("postgres", check_postgres(settings.postgres_dsn, settings.postgres_schema, timeout=timeout)),
            _guarded("redis", check_redis(settings.redis_url, timeout=min(timeout, 5.0))),
            _guarded("clock", check_clocks(settings, max_skew_ms, timeout=min(timeout, 5.0))),
        )
        for part in results:
            report.findings += part
        return report
    from gochat.store.sqlite.doctor import check_database

    path = Path(settings.data_dir) / "gochat.db"
    report = Report("embedded", {"database": str(path)})
    report.findings += await _guarded("sqlite", asyncio.to_thread(check_database, path))
    return report


_MARK = {Status.OK: "ok   ", Status.INFO: "info ", Status.WARN: "WARN ", Status.ERROR: "ERROR"}


def render_text(report: Report, *, verbose: bool = False) -> str:
    """One line per finding (``ok`` ones only with ``verbose``, counted otherwise), each fix
    indented under its finding, and a summary."""
    target = ", ".join(f"{k}={v}" for k, v in report.target.items())
    lines = [f"gochat doctor: {report.mode} mode ({target})"]
    hidden = 0
    for f in report.findings:
        if f.status is Status.OK and not verbose:
            hidden += 1
            continue
        lines.append(f"[{_MARK[f.status]}] {f.check}: {f.subject}: {f.message}")
        if f.fix:
            lines.append(f"          fix: {f.fix}")
        if verbose and f.details.get("plan"):
            plan = f.details["plan"]
            lines.append(f"          plan: {plan if isinstance(plan, str) else '; '.join(plan)}")
    failing = report.failing
    errors = sum(f.status is Status.ERROR for f in failing)
    summary = f"{len(report.findings)} checks: {errors} errors, {len(failing) - errors} warnings"
    if hidden:
        summary += f", {hidden} ok (--verbose lists them)"
    lines.append(summary + (": nothing to fix" if not failing else ""))
    return "\n".join(lines) + "\n"


def add_doctor_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE.toml", help="TOML configuration file (as for serve)")
    parser.add_argument("--data-dir", help="data directory (embedded mode: its gochat.db is checked)")
    parser.add_argument("--redis", dest="redis_url", metavar="URL", help="Redis URL (cluster mode, with --postgres)")
    parser.add_argument("--postgres", dest="postgres_dsn", metavar="DSN", help="PostgreSQL DSN (cluster mode)")
    parser.add_argument("--schema", dest="postgres_schema", help="PostgreSQL schema (default gochat)")
    parser.add_argument("--redis-prefix", help="Redis key prefix of the cluster (default gochat:)")
    parser.add_argument("--max-skew-ms", type=float, default=MAX_SKEW_MS, help=f"largest clock difference allowed (default {MAX_SKEW_MS:g})")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds for all checks (default 30)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("-v", "--verbose", action="store_true", help="list the checks that passed, and plans")


def doctor_main(args: argparse.Namespace) -> int:
    """``gochat doctor``: the report on stdout; exit status 0, 1 (something to fix) or 2."""
    import sys

    from gochat.config import load_settings
    from gochat.errors import ConfigError

    overrides = {
        "data_dir": args.data_dir,
        "redis_url": args.redis_url,
        "postgres_dsn": args.postgres_dsn,
        "postgres_schema": args.postgres_schema,
        "redis_prefix": args.redis_prefix,
    }
    try:
        settings = load_settings(args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"gochat: {exc.message}", file=sys.stderr)
        return 2
    report = asyncio.run(diagnose(settings, max_skew_ms=args.max_skew_ms, timeout=args.timeout))
    if args.json:
        sys.stdout.write(orjson.dumps(report.as_dict(), default=str, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        sys.stdout.write(render_text(report, verbose=args.verbose))
    return report.exit_code
