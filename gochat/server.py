"""One gochat node: wires store, auth, messaging core, gateway and HTTP API, and runs them.

Embedded defaults need no outside service: SQLite in ``data_dir``, in-process presence and
routing. ``gochat serve`` calls :func:`run`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from aiohttp import web
from picows import ws_create_server

from gochat import __version__
from gochat._native.connection import ClientErrorLog, FanoutWriter, set_socket_sndbuf
from gochat._native.routing import RoutingTable
from gochat.api.http import build_app
from gochat.auth.keys import Algorithm, KeyRing
from gochat.auth.service import AuthService
from gochat.clock import now_ms
from gochat.cluster.backends import ClusterBackends, memory_backends, redis_backends
from gochat.cluster.base import PRESENCE_GUARD_S, NodeInfo
from gochat.cluster.bus import EVENT_FRESH_S, BreakerChanged, DegradationChanged
from gochat.cluster.envelope import CascadeEnvelope
from gochat.cluster.fanout import FanoutProgress, Tier
from gochat.cluster.link import ClusterLink
from gochat.config import Settings
from gochat.config_reload import ConfigReloader, node_hooks
from gochat.errors import ErrorCode, GochatError
from gochat.gateway.gateway import Gateway
from gochat.ids import IdGenerator
from gochat.messaging.core import MessagingCore
from gochat.messaging.delivery import LocalDelivery
from gochat.messaging.events import NodeEventHandler
from gochat.messaging.replies import ErrorReplies
from gochat.messaging.threshold import SendLatencySampler, ThresholdController
from gochat.observability.grpc_health import GrpcHealth
from gochat.observability.logs import configure_logging
from gochat.observability.metrics import Metrics
from gochat.observability.tracing import Tracing, setup_tracing
from gochat.resilience import BreakerState, CircuitBreaker
from gochat.resilience.degradation import SWITCH_NAMES, Degradation, Switch
from gochat.resilience.node import NodeResilience
from gochat.store import Store

__all__ = ["Server", "run"]

log = logging.getLogger("gochat.server")

#: How long a thread may hold the GIL while another waits for it (CPython's default: 5 ms).
GIL_SWITCH_INTERVAL_S = 0.0005


class Server:
    """A gochat node. ``await start()``, then ``await stop()`` (drains)."""

    def __init__(
        self, settings: Settings, tracer_provider: Any = None, load_config: Callable[[], Settings] | None = None
    ) -> None:
        self.settings = settings
        #: reads the configuration again as at start (file, environment, flags): SIGHUP
        self.load_config = load_config
        self.config: ConfigReloader
        self._reregister: asyncio.Task[None] | None = None
        #: an OpenTelemetry TracerProvider to use instead of the one the settings describe
        #: (tests: the SDK's in-memory exporter); docs/observability.md, "Tracing"
        self._tracer_provider = tracer_provider
        self.tracing: Tracing | None = None
        self.metrics = Metrics()
        self.ids = IdGenerator(settings.node_id)
        self.draining = False
        self.ws_url = ""
        self.http_url = ""
        self._ws_server: asyncio.AbstractServer | None = None
        self._http_runner: web.AppRunner | None = None
        self._warmup: asyncio.Task[Any] | None = None
        self.grpc_health: GrpcHealth | None = None
        self.store: Store
        self.node_name = f"{socket.gethostname()}-{os.getpid()}-{settings.node_id}"
        self.started_ms = now_ms()
        #: retry policy, breakers and degradation switches (docs/resilience.md)
        self.resilience = NodeResilience(settings)
        #: the dynamic large-group threshold (gochat/messaging/threshold.py), once started
        self.threshold: ThresholdController | None = None

    async def start(self) -> None:
        s = self.settings
        data = Path(s.data_dir)
        data.mkdir(parents=True, exist_ok=True)
        backends, open_store = self._choose_backends(data)
        if s.node_id == 0:
            # A snowflake node id (0-1023) unique among live nodes: taken from a cluster counter.
            self.ids = IdGenerator(await backends.registry.node_number() % 1024)
            self.node_name = f"{socket.gethostname()}-{os.getpid()}-{self.ids.node_id}"
        self.store = open_store()
        await self.store.open()
        # In a cluster every node must verify every node's tokens: they share the key file
        # (same data_dir on one machine, or the file distributed as a secret; docs/cluster.md).
        keyring = KeyRing.load_or_create(data, algorithm=cast(Algorithm, s.jwt_algorithm))
        self.auth = AuthService(
            self.store, keyring, access_ttl_s=s.access_ttl_s, refresh_ttl_s=s.refresh_ttl_s
        )
        await self.auth.start()
        loop = asyncio.get_running_loop()
        set_socket_sndbuf(s.socket_sndbuf)
        self.writer = FanoutWriter(loop)
        self.routing = RoutingTable()
        local = LocalDelivery(self.routing)
        self.tracing = setup_tracing(s, self.node_name, self._tracer_provider)
        self.cluster = ClusterLink(
            self.node_name,
            backends,
            local,
            s.fanout_shard_size,
            presence_guard_s=min(s.registry_renew_s, PRESENCE_GUARD_S),
            retry=self.resilience.retry,
            tracing=self.tracing,
        )
        self.cluster.job_concurrency = s.fanout_job_concurrency
        self.replies = ErrorReplies(self.metrics.hot.errors)
        degradation = self.resilience.degradation
        self.core = MessagingCore(
            s,
            self.store,
            self.routing,
            self.writer,
            self.cluster,
            self.ids,
            self.metrics,
            self.replies,
            degradation,
            local.recent,
            self.tracing,
        )
        degradation.retry_after_ms = int(s.breaker_open_s * 1000)
        self.threshold = ThresholdController(
            s.large_group_threshold,
            s.large_group_threshold_min,
            s.large_group_threshold_max,
            apply=self._set_large_group_threshold,
            node_id=self.node_name,
            interval_s=s.threshold_interval_s,
            commit_full_s=s.overload_send_latency_ms / 1000,
        )
        self._set_large_group_threshold(self.threshold.value)
        self.metrics.attach_threshold(self.threshold)
        self.resilience.breakers.on_change(self._breaker_changed)
        self.metrics.attach_resilience(self.resilience.breakers, degradation)
        self.metrics.attach_cluster(self.cluster, local.latency, self.core.delivery)
        self.gateway = Gateway(s, self.auth, self.core, self.writer, self.replies)
        # hot reload (docs/configuration.md, "Hot reload"): applied here, published to every node
        self.config = ConfigReloader(
            s, node_hooks(self), origin=self.node_name, publish=self.cluster.publish_event, on_change=self._config_changed
        )
        self.metrics.attach_config(self.config)
        self.auth.on_revoke(self._revoked)
        self.metrics.attach_data_plane(self.gateway.stats)
        store = self.store
        self.metrics.attach_store(lambda: store.stats)
        self.metrics.attach_slow_queries(store)
        caches = self.core.addressing.caches
        self.metrics.attach_caches(lambda: [c.snapshot() for c in caches])
        addressing = self.core.addressing
        self.metrics.attach_shared_cache(lambda: addressing.l2_stats, lambda: addressing.warmup)

        heartbeat = s.heartbeat_ms / 1000
        # One logger object for every connection: given a logging.Logger, picows makes a child
        # Logger per connection (~0.5 KiB each, idle memory per connection is a target).
        # ClientErrorLog: picows logs every bad frame a client sends at ERROR; it turns them into
        # DEBUG lines and a rate-limited WARNING (docs/protocol.md, WebSocket conformance).
        picows_log = ClientErrorLog(logging.getLogger("picows.gochat.picows"))
        # The writer's heartbeat replaces picows' auto-ping (a Task and a timer per connection,
        # ~1.8 KiB): PING after 2 heartbeats without a frame, close 1 heartbeat later without a
        # PONG. Connection answers PINGs itself (auto-pong off) so the heartbeat sees every frame.
        own_heartbeat = heartbeat > 0
        if own_heartbeat:
            self.writer.start_heartbeat(heartbeat * 2, heartbeat, picows_log)
        self._ws_server = await ws_create_server(
            self.gateway.listener_factory,
            s.host,
            s.ws_port,
            enable_auto_ping=not own_heartbeat,
            auto_ping_idle_timeout=heartbeat * 2,
            auto_ping_reply_timeout=heartbeat,
            enable_auto_pong=not own_heartbeat,
            max_frame_size=s.max_frame * 4,
            # picows never starts below 2048 bytes; Connection shrinks the buffer after AUTH
            read_buffer_init_size=512,
            # uvloop's own TCP transport: aiofastnet's (picows' default when installed) costs
            # ~5.7 KiB more per idle connection, and idle memory per connection is a target.
            use_aiofastnet=False,
            logger_name=picows_log,
            reuse_address=True,
            reuse_port=s.workers > 1,
        )
        ws_port = self._ws_server.sockets[0].getsockname()[1]
        self.ws_url = s.public_ws_url or f"ws://{s.host}:{ws_port}/ws"

        self._http_runner = web.AppRunner(build_app(self), access_log=None, handle_signals=False)
        await self._http_runner.setup()
        site = web.TCPSite(
            self._http_runner, s.host, s.http_port, reuse_address=True, reuse_port=s.workers > 1
        )
        await site.start()
        http_port = self._http_runner.addresses[0][1]
        self.http_url = f"http://{s.host}:{http_port}"
        if s.grpc_health_port:
            self.grpc_health = GrpcHealth(s.host, s.grpc_health_port, self._ready)
            await self.grpc_health.start()
        events = _NodeEvents(self)
        await self.cluster.start(self._node_info(), self._node_info, events)
        # The event bus (docs/consistency.md): a consumer name that survives a restart of the
        # node (its configured node id) replays from its cursor; a new one rebuilds.
        handler = NodeEventHandler(
            self.core.addressing,
            events.revoked,
            self.auth.reload_revocations,
            lambda: self.core.sessions.close_revoked(self.auth.is_denied),
            degradation,
            self.node_name,
            self.config.apply_event,
        )
        consumer = await self.cluster.start_events(
            f"node-{s.node_id}" if s.node_id else self.node_name, handler.apply, handler.rebuild
        )
        cluster = self.cluster
        self.threshold.start(
            lambda: cluster.nodes,
            lambda: cluster.queue_depth,
            SendLatencySampler(self.metrics.hot.send_latency),
            lambda: cluster.peers,
        )
        # The member lists of the most recently active groups, into the L1 cache in the
        # background (docs/consistency.md, "Caches"): readiness does not wait for it.
        self._warmup = asyncio.create_task(addressing.warm_up(), name="cache-warmup")
        self.metrics.attach_events(lambda: consumer.stats, self.cluster.outbox, self.auth.fresh)
        # Tokens are accepted only while this node is known to have every revocation
        # (docs/consistency.md, Revocations): a node whose reader fell behind catches up first.
        bus = self.cluster.backends.bus
        self.auth.guard_freshness(lambda: bus.caught_up(EVENT_FRESH_S), EVENT_FRESH_S)
        log.info(
            "gochat listening ws=%s http=%s data=%s node=%s",
            self.ws_url,
            self.http_url,
            data.resolve(),
            self.node_name,
        )

    def _choose_backends(self, data: Path) -> tuple[ClusterBackends, Callable[[], Store]]:
        """The one choice of backends: Redis + PostgreSQL for a cluster, in-process + SQLite in
        ``data_dir`` on embedded defaults (a cluster of one node). Everything after it runs the
        same code; a backend's package is imported only when chosen. The store is opened later,
        once the node id is known."""
        s = self.settings
        if s.cluster:
            resilience = self.resilience
            # Outbound dependencies get breakers; while one is not closed its switches are on
            # (docs/resilience.md) and a probe pings it until it closes again.
            redis_breaker, pg_breaker = resilience.breaker("redis"), resilience.breaker("postgres")
            resilience.watch(pg_breaker, Switch.READ_ONLY | Switch.CACHE_ONLY, lambda: self.store.ping())
            resilience.watch(redis_breaker, Switch.NON_CORE_OFF, lambda: self.cluster.ping())
            backends = redis_backends(
                s.redis_url,
                s.redis_prefix,
                registry_ttl_s=s.registry_ttl_s,
                registry_renew_s=s.registry_renew_s,
                timeout_s=5.0,
                breaker=redis_breaker,
                retry=resilience.retry,
                claim_idle_ms=s.fanout_claim_idle_ms,
            )

            def postgres() -> Store:
                from gochat.store.postgres import PostgresStore

                return PostgresStore(
                    s.postgres_dsn,
                    node_id=self.ids.node_id,
                    ids=self.ids,
                    schema=s.postgres_schema,
                    breaker=pg_breaker,
                    retry=resilience.retry,
                    slow_query_ms=s.slow_query_ms,
                )

            return backends, postgres

        def sqlite() -> Store:
            from gochat.store.sqlite import SQLiteStore

            return SQLiteStore(
                data / "gochat.db",
                node_id=self.ids.node_id,
                ids=self.ids,
                commit_delay_ms=s.store_commit_delay_ms,
                slow_query_ms=s.slow_query_ms,
            )

        return memory_backends(), sqlite

    def _set_large_group_threshold(self, value: int) -> None:
        self.core.delivery.large_group_threshold = value

    def _node_info(self) -> NodeInfo:
        return NodeInfo(
            node_id=self.node_name,
            ws_url=self.ws_url,
            http_url=self.http_url,
            version=__version__,
            weight=self.settings.weight,
            connections=self.gateway.connection_count,
            draining=self.draining,
            started_ms=self.started_ms,
            config_version=self.config.version,
        )

    async def readiness(self) -> tuple[bool, dict[str, str]]:
        """(ready, checks): dependencies reachable and not draining."""
        checks: dict[str, str] = {}
        ready = True
        try:
            await self.store.ping()
            checks["store"] = "ok"
        except GochatError as exc:
            checks["store"] = f"unavailable: {exc.message}"
            ready = False
        try:
            async with asyncio.timeout(2.0):
                await self.cluster.ping()
            checks["cluster"] = "ok"
        except GochatError as exc:
            checks["cluster"] = f"unavailable: {exc.message}"
            ready = False
        except TimeoutError:
            checks["cluster"] = "unavailable: no answer within 2 s"
            ready = False
        checks["gateway"] = "draining" if self.draining else "ok"
        for breaker in self.resilience.breakers:
            checks[f"breaker:{breaker.name}"] = breaker.state.value
        # degraded is not unready: a read-only node still serves reads (docs/resilience.md)
        checks["degraded"] = ",".join(Degradation.names(self.resilience.degradation.active)) or "none"
        ready = ready and not self.draining
        return ready, checks

    async def _ready(self) -> bool:
        return (await self.readiness())[0]

    def _breaker_changed(self, breaker: CircuitBreaker, old: BreakerState, new: BreakerState, reason: str) -> None:
        self.cluster.publish_event(BreakerChanged(breaker=breaker.name, state=new.value, reason=reason))

    def set_degradation(self, switch: Switch, value: bool | None) -> None:
        """An operator's switch (admin API): applied here now and on every node via the bus."""
        self.resilience.degradation.set_manual(switch, value, "operator")
        self.cluster.publish_event(
            DegradationChanged(switch=SWITCH_NAMES[switch], value=-1 if value is None else int(value))
        )

    @property
    def fanout_progress(self) -> FanoutProgress:
        """The cluster's fan-out job records (``GET /v1/admin/fanout``)."""
        return self.cluster.progress

    def fanout_status(self) -> dict[str, Any]:
        """This node's fan-out: tier boundaries now, queues, counters (``GET /v1/admin/fanout``)."""
        delivery = self.core.delivery
        jobs = delivery.jobs
        return {
            "node_id": self.node_name,
            "tiers": {
                "inline_max": delivery.inline_max,
                "batched_max": delivery.large_group_threshold,
                "sharded_max": delivery.cascade_min,
                "shard_size": self.cluster.shard_size,
            },
            "fanouts": {t.label: delivery.by_tier[t] for t in Tier},
            "route_queue": self.cluster.queue_depths(),
            "local_jobs": {
                "waiting": jobs.waiting,
                "pending_recipients": jobs.pending_recipients,
                "started": jobs.started,
                "finished": jobs.finished,
                "shed": jobs.shed,
                "chunk": jobs.chunk,
                "max_jobs": jobs.max_jobs,
            },
        }

    def reload_config(self) -> bool:
        """SIGHUP: read the configuration again (as at start) and apply its reloadable changes."""
        if self.load_config is None:
            log.warning("SIGHUP: this node has no configuration source to read again")
            return False
        return self.config.reload_file(self.load_config)

    def _config_changed(self, settings: Settings) -> None:
        self.settings = settings
        if self._reregister is None or self._reregister.done():
            # the registry entry (and so /v1/gateways) shows the new config_version now, not at the next renewal
            self._reregister = asyncio.get_running_loop().create_task(self._register_again(), name="config-register")

    async def _register_again(self) -> None:
        if self.draining:
            return
        try:
            await self.cluster.registry.register(self._node_info(), self._node_info)
        except GochatError as exc:
            log.warning("registry: config version %d announced at the next renewal (%s)", self.config.version, exc)

    def _revoked(self, user_id: int, revoked_id: str) -> None:
        self.gateway.kick_user(user_id, ErrorCode.TOKEN_REVOKED, "logged out", revoked_id)
        expires_ms = now_ms() + self.settings.access_ttl_s * 1000
        self.cluster.publish_revocation(user_id, expires_ms, revoked_id)

    async def gateways(self) -> list[dict[str, Any]]:
        """The live gateways: every node the registry lists."""
        try:
            nodes = await self.cluster.registry.nodes()
        except GochatError as exc:
            # Registry unreachable: the last list the watch delivered still helps clients.
            log.warning("registry unavailable (%s); serving the last known gateways", exc.message)
            nodes = list(self.cluster.nodes)
        return [
            {
                "node_id": n.node_id,
                "url": n.ws_url,
                "http_url": n.http_url,
                "weight": n.weight,
                "connections": n.connections,
                "draining": n.draining,
                "version": n.version,
                "config_version": n.config_version,
            }
            for n in nodes
            if not n.draining
        ]

    async def stop(self) -> None:
        """Drain: GOAWAY to clients, let in-flight sends commit, close listeners and the store."""
        if self.draining:
            return
        self.draining = True
        log.info("gochat draining")
        if self.threshold is not None:
            await self.threshold.stop()
        if self.grpc_health is not None:
            await self.grpc_health.draining()
        await self.cluster.deregister()
        others = sorted(self.cluster.other_nodes(), key=lambda n: n.connections / max(n.weight, 1))
        hint = others[0].ws_url if others else ""
        log.debug("deregistered; reconnect hint %r", hint)
        if self._ws_server is not None:
            self._ws_server.close()
        await self.gateway.drain(url_hint=hint, timeout=self.settings.drain_timeout_s)
        self.writer.stop_heartbeat()
        if self._warmup is not None:
            self._warmup.cancel()
        log.debug("gateway drained")
        if self._http_runner is not None:
            await self._http_runner.cleanup()
        log.debug("HTTP API stopped")
        await self.auth.close()
        await self.resilience.close()
        await self.core.close()
        await self.cluster.close()
        log.debug("cluster link closed")
        await self.store.close()
        log.debug("store closed")
        if self.grpc_health is not None:
            await self.grpc_health.stop()
        if self.tracing is not None:
            await self.tracing.shutdown()  # the last spans out
        log.info("gochat stopped")


class _NodeEvents:
    """What this node does when the cluster link reports an event from anywhere."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def presence_changed(self, user_id: int, online: bool) -> None:
        self.server.core.presence_changed(user_id, online)

    def revoked(self, user_id: int, expires_ms: int, revoked_id: str) -> None:
        self.server.auth.apply_revocation(revoked_id, expires_ms)
        self.server.gateway.kick_user(user_id, ErrorCode.TOKEN_REVOKED, "logged out", revoked_id)

    def kicked(self, user_id: int, code: int, reason: str) -> None:
        self.server.gateway.kick_user(user_id, ErrorCode(code), reason)

    def local_sessions(self) -> list[tuple[int, int]]:
        return self.server.core.sessions.local()

    def cascade(self, env: CascadeEnvelope) -> None:
        self.server.core.cascade(env)

    def resync(self, user_ids: tuple[int, ...] | None) -> None:
        reason = "broker subscription restored" if user_ids is None else "pushes lost on the way"
        self.server.core.resync(user_ids, reason)


async def _serve(settings: Settings, load_config: Callable[[], Settings] | None = None) -> None:
    server = Server(settings, load_config=load_config)
    await server.start()
    # Everything allocated at start-up lives for the whole process: keep it out of the cyclic
    # GC's scans, and let gen 0 grow (the data plane creates few cycles; profiles showed ~20 %
    # of a busy loop in gc_collect_main with the default threshold of 700).
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)
    # The SQLite writer thread needs the GIL back after every sqlite3_step, and a busy event
    # loop only lets go of it when asked, after the switch interval (5 ms by default). Under
    # load that made each write transaction wait tens of ms: commits fell behind the loop and
    # throughput collapsed to half the offered rate (docs/benchmarks.md, "Direct messages").
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload_config)
    await stop.wait()
    await server.stop()


def _supervise(settings: Settings) -> int:
    """``--workers N``: run N node processes that share the ports (SO_REUSEPORT); forward
    SIGINT/SIGTERM/SIGHUP to them and wait. Each worker is a full cluster node with its own node id."""
    import subprocess

    children = []
    for index in range(settings.workers):
        env = dict(os.environ, GOCHAT_WORKER_INDEX=str(index))
        children.append(subprocess.Popen([sys.executable, "-m", "gochat.cli", *sys.argv[1:]], env=env))

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGHUP, forward)  # hot reload: every worker reads the file again
    return max(child.wait() for child in children)


def _worker_settings(load: Callable[[], Settings], index: int) -> Callable[[], Settings]:
    """``load``, with the node id a worker derives from it (as :func:`run` does at start)."""

    def load_worker() -> Settings:
        s = load()
        return s.replace(node_id=(s.node_id + index) % 1024) if s.node_id else s

    return load_worker


def run(settings: Settings, load_config: Callable[[], Settings] | None = None) -> int:
    """Run a node (or ``workers`` nodes) until SIGINT/SIGTERM, on uvloop. ``load_config``
    resolves the settings again as at start (SIGHUP: hot reload)."""
    if settings.workers > 1 and "GOCHAT_WORKER_INDEX" not in os.environ:
        return _supervise(settings)
    index = int(os.environ.get("GOCHAT_WORKER_INDEX", "0"))
    if index and settings.node_id:
        settings = settings.replace(node_id=(settings.node_id + index) % 1024)
        if load_config is not None:
            load_config = _worker_settings(load_config, index)
    configure_logging(settings.log_level, settings.log_format, f"{socket.gethostname()}-{os.getpid()}")
    # picows logs every accepted connection at INFO: too chatty for a server with 100k clients.
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("picows").setLevel(logging.WARNING)
    os.umask(0o077)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(_serve(settings, load_config))
    else:
        uvloop.run(_serve(settings, load_config))
    return 0
