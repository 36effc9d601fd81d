"""Configuration: resolved at start-up into a frozen :class:`Settings`; the settings marked
``reloadable`` can be replaced while the node runs (gochat/config_reload.py).

Precedence, lowest first: built-in defaults → TOML file (``--config``) → ``GOCHAT_*`` environment
variables → command-line flags. Each field documents its default (centrifuge ``config.go``
style); ``docs/configuration.md`` is generated from the same metadata. Hot paths never read
options: they receive plain values from this object when they are built.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final

from gochat.errors import ConfigError

__all__ = [
    "ENV_PREFIX",
    "LOG_LEVELS",
    "Settings",
    "load_settings",
    "reloadable_settings",
    "settings_markdown",
    "validate_settings",
]

ENV_PREFIX: Final = "GOCHAT_"
#: the accepted values of ``log_level`` (any case)
LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR")


def _opt(default: Any, help: str, reloadable: bool = False) -> Any:
    """A setting: its default, its documentation and whether a running node applies a new value
    (SIGHUP, ``PUT /v1/admin/config``; gochat/config_reload.py)."""
    return field(default=default, metadata={"help": help, "reloadable": reloadable})


@dataclass(frozen=True, slots=True)
class Settings:
    """Every server setting. Environment: ``GOCHAT_<FIELD NAME IN UPPER CASE>``."""

    host: str = _opt("127.0.0.1", "address the WebSocket and HTTP listeners bind")
    ws_port: int = _opt(8700, "WebSocket gateway port (path /ws); 0 picks a free port")
    http_port: int = _opt(8701, "HTTP API port; 0 picks a free port")
    data_dir: str = _opt("./gochat-data", "directory for the SQLite database and key files")
    node_id: int = _opt(0, "node id 0–1023, part of every msg_id (unique per cluster node)")
    public_ws_url: str = _opt("", "WebSocket URL announced to clients (default ws://host:ws_port/ws)")
    # auth
    jwt_algorithm: str = _opt("EdDSA", "access-token signature: EdDSA (Ed25519) or RS256")
    access_ttl_s: int = _opt(900, "access-token lifetime, seconds")
    refresh_ttl_s: int = _opt(30 * 24 * 3600, "refresh-token lifetime, seconds")
    # gateway limits
    max_frame: int = _opt(65536, "largest accepted frame (and WebSocket message), bytes")
    max_body: int = _opt(32768, "largest message body, bytes")
    heartbeat_ms: int = _opt(25000, "PING interval announced to clients; idle close after 3 intervals")
    auth_timeout_ms: int = _opt(10000, "time allowed between connect and a successful AUTH")
    rate_limit_per_s: float = _opt(200.0, "sustained requests per second per connection (token bucket)", reloadable=True)
    rate_limit_burst: int = _opt(400, "token-bucket burst per connection", reloadable=True)
    outbound_soft_limit: int = _opt(1 << 20, "bytes queued to a client above which ephemeral events are dropped")
    outbound_hard_limit: int = _opt(4 << 20, "bytes queued to a client above which it is disconnected (4401)")
    socket_sndbuf: int = _opt(
        128 * 1024,
        "kernel send buffer per WebSocket (SO_SNDBUF, which Linux doubles): bounds kernel memory held for "
        "a client that does not read; 0 = kernel autotuning (up to tcp_wmem max, 4 MiB a socket)",
    )
    history_max_limit: int = _opt(500, "most messages one HISTORY reply carries", reloadable=True)
    max_group_members: int = _opt(10000, "largest group", reloadable=True)
    drain_timeout_s: float = _opt(10.0, "on SIGTERM, how long to wait for in-flight sends to commit")
    store_commit_delay_ms: float = _opt(
        8.0, "embedded SQLite: longest wait for a batch to gather after a busy commit (0: none; lower latency, more CPU)"
    )
    slow_query_ms: float = _opt(
        100.0,
        "store statements taking this long or longer are logged, counted and listed in /v1/admin/slow-queries "
        "(0: every statement, for debugging)", reloadable=True,
    )
    overload_send_latency_ms: float = _opt(
        250.0,
        "shed load: answer a SEND OVERLOADED when its commit would wait longer than this (0: never shed)", reloadable=True,
    )
    native_session: bool = _opt(
        True, "walk client frames in the native session state machine (false: the Python reference gateway)"
    )
    log_level: str = _opt("INFO", "logging level: DEBUG, INFO, WARNING, ERROR", reloadable=True)
    log_format: str = _opt(
        "text", "log lines: text (readable) or json (one object a line, with trace ids; docs/observability.md)"
    )
    # cluster mode (both URLs set): PostgreSQL store, Redis broker/presence/registry
    redis_url: str = _opt("", "Redis URL for cluster mode, e.g. redis://127.0.0.1:6379/0")
    postgres_dsn: str = _opt("", "PostgreSQL DSN for cluster mode, e.g. postgresql://gochat@db/gochat")
    postgres_schema: str = _opt("gochat", "PostgreSQL schema holding gochat's tables")
    redis_prefix: str = _opt("gochat:", "prefix of every Redis key and channel (isolates clusters)")
    registry_ttl_s: int = _opt(90, "registry entry TTL; a node that stops renewing vanishes after it")
    registry_renew_s: int = _opt(30, "registry renewal interval")
    weight: int = _opt(100, "load-balancing weight announced in the registry")
    large_group_threshold: int = _opt(
        500,
        "groups above this many members fan out across nodes through Redis Streams jobs; with the "
        "dynamic threshold on, its starting value (bounded), and a hot reload sets the current value",
        reloadable=True,
    )
    large_group_threshold_min: int = _opt(
        300, "dynamic large-group threshold: lowest value (equal to the max: off, large_group_threshold stays)"
    )
    large_group_threshold_max: int = _opt(1000, "dynamic large-group threshold: highest value")
    threshold_interval_s: float = _opt(
        5.0, "dynamic large-group threshold: seconds between two decisions (load probed every 0.25 s)"
    )
    # fan-out tiers (docs/cluster.md, "Fan-out tiers"), checked in this order: inline up to
    # fanout_inline_max, batched up to the large-group threshold, sharded up to
    # fanout_cascade_min, cascaded above (a tier whose range is empty is skipped)
    fanout_inline_max: int = _opt(
        100, "groups up to this many members are fanned out inline, at the small-group priority", reloadable=True
    )
    fanout_cascade_min: int = _opt(
        5000,
        "groups above this many members are cascaded: one broadcast, every node fans out to its own members",
        reloadable=True,
    )
    fanout_shard_size: int = _opt(500, "members per stream job of the sharded tier", reloadable=True)
    fanout_chunk: int = _opt(
        1000, "recipients a node queues per event-loop turn in a sharded or cascaded fan-out", reloadable=True
    )
    fanout_max_jobs: int = _opt(
        1024, "sharded and cascaded fan-outs waiting on one node; more are shed (recovered by SYNC)", reloadable=True
    )
    fanout_job_concurrency: int = _opt(4, "stream jobs of the sharded tier one node handles at once")
    fanout_claim_idle_ms: int = _opt(
        5000,
        "a sharded-tier stream job taken by a node that died is handed to another node after this long "
        "(a live node keeps its running jobs fresh)",
    )
    grpc_health_port: int = _opt(0, "port of the gRPC health service (grpc.health.v1); 0 disables it")
    workers: int = _opt(1, "node processes sharing the ports (SO_REUSEPORT); >1 needs cluster mode")
    # resilience (docs/resilience.md): one retry policy, the circuit breakers, degradation
    retry_max_attempts: int = _opt(3, "server-side retries: most tries of one operation (1: no retry)")
    retry_base_delay_ms: float = _opt(50.0, "server-side retries: first backoff cap (full jitter, doubling)")
    retry_max_delay_ms: float = _opt(2000.0, "server-side retries: largest backoff between two tries")
    retry_max_elapsed_ms: float = _opt(5000.0, "server-side retries: no new try this long after the first")
    breaker_window_s: float = _opt(10.0, "circuit breakers: sliding window the failure and slow-call rates cover")
    breaker_min_calls: int = _opt(20, "circuit breakers: calls in the window before a rate can open the breaker")
    breaker_failure_rate: float = _opt(0.5, "circuit breakers: open at or above this share of failed calls")
    breaker_slow_call_ms: float = _opt(2000.0, "circuit breakers: a call slower than this counts as slow (0: off)")
    breaker_slow_call_rate: float = _opt(0.8, "circuit breakers: open at or above this share of slow calls")
    breaker_open_s: float = _opt(5.0, "circuit breakers: time open before half-open probing")
    breaker_half_open_calls: int = _opt(3, "circuit breakers: probe calls in half-open; all must succeed to close")
    breaker_max_concurrent: int = _opt(
        256, "circuit breakers: calls in flight per dependency (bulkhead); more are refused at once (0: no limit)"
    )
    degrade_read_only: bool = _opt(
        False, "degradation: start read-only (SENDs refused with 504 READ_ONLY); also set at run time by the admin API"
    )
    degrade_non_core_off: bool = _opt(
        False, "degradation: start with typing, presence events and read receipts off; also by the admin API"
    )
    admin_token: str = _opt(
        "", "operator credential for /v1/admin/* (Authorization: Bearer <admin_token>); empty: admin API off"
    )
    # tracing (docs/observability.md, "Tracing"); needs the gochat[otel] extra
    trace_sample_rate: float = _opt(
        0.0, "share of SENDs traced with OpenTelemetry, 0–1 (0: none, at no cost; a client's sampled TRACED SEND "
        "is traced whenever tracing is on)"
    )
    otlp_endpoint: str = _opt(
        "", "OTLP/HTTP receiver of the spans, e.g. http://127.0.0.1:4318 (/v1/traces added when no path); "
        "setting it turns tracing on even at rate 0; empty: the SDK's OTEL_EXPORTER_OTLP_* variables"
    )

    @property
    def cluster(self) -> bool:
        return bool(self.redis_url and self.postgres_dsn)

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def _coerce(name: str, typ: Any, value: Any) -> Any:
    kind = typ if isinstance(typ, type) else {"int": int, "float": float, "str": str, "bool": bool}.get(str(typ))
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            return str(value).strip().lower() in ("1", "true", "yes", "on")
        if kind is int:
            if isinstance(value, bool):
                raise ValueError("boolean")
            return int(value)
        if kind is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting {name!r}: cannot use {value!r} ({exc})") from exc


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Resolve settings from defaults, a TOML file, ``GOCHAT_*`` variables and overrides."""
    env = os.environ if env is None else env
    known = {f.name: f for f in fields(Settings)}
    values: dict[str, Any] = {}
    if config_file:
        try:
            with open(config_file, "rb") as fh:
                doc = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc}") from exc
        section = doc.get("gochat", doc)
        for key, value in section.items():
            if key not in known:
                raise ConfigError(f"unknown setting {key!r} in {config_file}")
            values[key] = _coerce(key, known[key].type, value)
    for name, f in known.items():
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None and raw != "":
            values[name] = _coerce(name, f.type, raw)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in known:
            raise ConfigError(f"unknown setting {key!r}")
        values[key] = _coerce(key, known[key].type, value)
    settings = Settings(**values)
    _validate(settings)
    return settings


def reloadable_settings() -> frozenset[str]:
    """The settings a running node applies when they change (SIGHUP, ``PUT /v1/admin/config``)."""
    return frozenset(f.name for f in fields(Settings) if f.metadata.get("reloadable"))


def validate_settings(s: Settings) -> None:
    """Raise :class:`ConfigError` naming what is wrong with ``s`` (as :func:`load_settings` does)."""
    _validate(s)


def _validate(s: Settings) -> None:
    if s.log_level.upper() not in LOG_LEVELS:
        raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
    if s.history_max_limit < 1 or s.max_group_members < 2 or s.large_group_threshold < 1:
        raise ConfigError("history_max_limit and large_group_threshold must be >= 1, max_group_members >= 2")
    if not 1 <= s.large_group_threshold_min <= s.large_group_threshold_max:
        raise ConfigError("large_group_threshold_min must be >= 1 and not above large_group_threshold_max")
    if not (
        s.fanout_inline_max >= 0
        and s.fanout_cascade_min >= 1
        and s.fanout_shard_size >= 1
        and s.fanout_claim_idle_ms >= 100 and s.fanout_chunk >= 1 and s.fanout_max_jobs >= 1 and s.fanout_job_concurrency >= 1
    ):
        raise ConfigError(
            "fanout_inline_max must be >= 0; fanout_cascade_min, fanout_shard_size, fanout_chunk, "
            "fanout_max_jobs and fanout_job_concurrency >= 1; fanout_claim_idle_ms >= 100"
        )
    if not 0.25 <= s.threshold_interval_s <= 3600:
        raise ConfigError("threshold_interval_s must be between 0.25 and 3600")
    if not (s.rate_limit_per_s > 0 and s.rate_limit_burst >= 1):
        raise ConfigError("rate_limit_per_s must be positive and rate_limit_burst at least 1")
    if s.log_format not in ("text", "json"):
        raise ConfigError("log_format must be text or json")
    if s.jwt_algorithm not in ("EdDSA", "RS256"):
        raise ConfigError("jwt_algorithm must be EdDSA or RS256")
    if not 0 <= s.node_id <= 1023:
        raise ConfigError("node_id must be in 0..1023")
    if not 1024 <= s.max_frame <= 16 << 20:
        raise ConfigError("max_frame must be between 1 KiB and 16 MiB")
    if not 1 <= s.max_body <= s.max_frame - 12 - 26:
        raise ConfigError("max_body must be positive and fit in max_frame with the SEND header")
    if not 0 <= s.store_commit_delay_ms <= 1000:
        raise ConfigError("store_commit_delay_ms must be between 0 and 1000")
    if not 0 <= s.slow_query_ms <= 3_600_000:
        raise ConfigError("slow_query_ms must be between 0 and 3600000")
    if not 0 <= s.overload_send_latency_ms <= 60_000:
        raise ConfigError("overload_send_latency_ms must be between 0 and 60000")
    if not 0 <= s.socket_sndbuf <= 64 << 20:
        raise ConfigError("socket_sndbuf must be between 0 (kernel autotuning) and 64 MiB")
    if s.outbound_soft_limit > s.outbound_hard_limit:
        raise ConfigError("outbound_soft_limit must not exceed outbound_hard_limit")
    if bool(s.redis_url) != bool(s.postgres_dsn):
        raise ConfigError("cluster mode needs both redis_url and postgres_dsn")
    if s.workers < 1 or (s.workers > 1 and not s.redis_url):
        raise ConfigError("workers must be >= 1, and > 1 only in cluster mode (redis_url + postgres_dsn)")
    if s.workers > 1 and (s.ws_port == 0 or s.http_port == 0):
        raise ConfigError("workers > 1 need fixed ws_port and http_port to share")
    if not 0 < s.registry_renew_s < s.registry_ttl_s:
        raise ConfigError("registry_renew_s must be positive and below registry_ttl_s")
    if s.retry_max_attempts < 1 or s.retry_base_delay_ms < 0 or s.retry_max_delay_ms < s.retry_base_delay_ms:
        raise ConfigError("retry_max_attempts must be >= 1 and 0 <= retry_base_delay_ms <= retry_max_delay_ms")
    if s.retry_max_elapsed_ms < 0:
        raise ConfigError("retry_max_elapsed_ms must not be negative")
    if not (0 < s.breaker_failure_rate <= 1 and 0 < s.breaker_slow_call_rate <= 1):
        raise ConfigError("breaker_failure_rate and breaker_slow_call_rate must be in (0, 1]")
    if s.breaker_window_s <= 0 or s.breaker_open_s <= 0 or s.breaker_min_calls < 1 or s.breaker_half_open_calls < 1:
        raise ConfigError("breaker_window_s and breaker_open_s must be positive, breaker_*_calls at least 1")
    if s.breaker_slow_call_ms < 0 or s.breaker_max_concurrent < 0:
        raise ConfigError("breaker_slow_call_ms and breaker_max_concurrent must not be negative")
    if not 0 <= s.trace_sample_rate <= 1:
        raise ConfigError("trace_sample_rate must be between 0 and 1")
    if s.otlp_endpoint and not s.otlp_endpoint.startswith(("http://", "https://")):
        raise ConfigError("otlp_endpoint must be an http:// or https:// URL (OTLP/HTTP)")
    if s.admin_token and len(s.admin_token) < 16:
        raise ConfigError("admin_token must be at least 16 characters (or empty: admin API off)")
    for name in ("ws_port", "http_port", "grpc_health_port"):
        if not 0 <= getattr(s, name) <= 65535:
            raise ConfigError(f"{name} out of range")


def settings_markdown() -> str:
    """The settings table for ``docs/configuration.md``."""
    rows = ["| setting | environment | default | reloadable | meaning |", "|---|---|---|---|---|"]
    for f in fields(Settings):
        reload = "yes" if f.metadata.get("reloadable") else ""
        rows.append(
            f"| `{f.name}` | `{ENV_PREFIX}{f.name.upper()}` | `{f.default!r}` | {reload} | {f.metadata['help']} |"
        )
    return "\n".join(rows) + "\n"
