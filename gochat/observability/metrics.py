"""Prometheus metrics of one node.

Hot-path figures are plain integers read only when ``/metrics`` is scraped, through custom
collectors: the data plane's C counters (``FanoutWriter``) and the messaging core's per-message
counters and SEND latency histogram (:class:`HotCounters`). Counting a message is then an integer
add, not a ``prometheus_client`` call with its lock (about 1 µs per SEND before). Control-plane
and per-request metrics use ``prometheus_client`` directly.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from gochat.protocol.constants import Kind

__all__ = ["HotCounters", "LatencyHistogram", "Metrics"]

if TYPE_CHECKING:
    from gochat.observability.slow_queries import SlowQueryLog

_SEND_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class LatencyHistogram:
    """A fixed-bucket histogram whose ``observe`` is a bisect and two adds (event-loop thread
    only; it takes no lock)."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last slot is +Inf
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative (upper bound, count) pairs, +Inf last (Prometheus' form)."""
        cumulative: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            running += count
            cumulative.append((repr(float(bound)), running))
        running += self.counts[-1]
        cumulative.append(("+Inf", running))
        return cumulative

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        return HistogramMetricFamily(name, documentation, buckets=self.buckets(), sum_value=self.total)


class HotCounters:
    """Per-message counters of the messaging core (event-loop thread only)."""

    __slots__ = ("deliveries", "errors", "messages_in", "send_latency", "sends_shed")

    def __init__(self) -> None:
        #: accepted SENDs by message kind (index = ``Kind`` value)
        self.messages_in = [0] * (max(Kind) + 1)
        #: DELIVER frames queued to local connections
        self.deliveries = 0
        #: SEND received → SEND_ACK queued (includes the durable commit)
        self.send_latency = LatencyHistogram(_SEND_BUCKETS)
        #: SENDs answered OVERLOADED because commits lagged (load shedding)
        self.sends_shed = 0
        #: ERROR frames sent, by code (a plain dict: an overloaded node sends many)
        self.errors: dict[int, int] = {}


class _HotCollector(Collector):
    def __init__(self, hot: HotCounters) -> None:
        self._hot = hot

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        hot = self._hot
        family = CounterMetricFamily("gochat_messages_in", "SEND requests accepted", labels=["kind"])
        for kind in Kind:
            family.add_metric([str(int(kind))], hot.messages_in[kind])
        yield family
        yield CounterMetricFamily("gochat_deliveries", "DELIVER frames queued to connections", value=hot.deliveries)
        errors = CounterMetricFamily("gochat_errors", "ERROR frames sent, by code", labels=["code"])
        for code, n in sorted(hot.errors.items()):
            errors.add_metric([str(int(code))], n)
        yield errors
        yield CounterMetricFamily(
            "gochat_sends_shed", "SENDs answered OVERLOADED because commits lagged", value=hot.sends_shed
        )
        yield hot.send_latency.family(
            "gochat_send_latency_seconds", "SEND received to SEND_ACK queued (includes the durable commit)"
        )


class _StoreCollector(Collector):
    def __init__(self, read: Callable[[], Any]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        st = self._read()
        yield CounterMetricFamily(
            "gochat_store_transactions", "Committed write transactions (group commits)", value=st.transactions
        )
        yield CounterMetricFamily("gochat_store_appends", "Messages appended", value=st.appended)
        yield CounterMetricFamily(
            "gochat_store_duplicate_appends", "Appends answered from the dedup key", value=st.duplicates
        )
        yield CounterMetricFamily(
            "gochat_store_failed_transactions", "Write transactions that failed", value=st.failed_transactions
        )
        yield GaugeMetricFamily("gochat_store_largest_batch", "Most writes in one transaction", value=st.largest_batch)
        # PostgreSQL only (SQLite's one writer never deadlocks): 0 in embedded mode
        yield CounterMetricFamily(
            "gochat_store_retried_transactions",
            "Write transactions the database rolled back (deadlock, serialization failure) and that were run again",
            value=getattr(st, "retried_transactions", 0),
        )


class _DataPlaneCollector(Collector):
    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        v = self._read()
        yield GaugeMetricFamily("gochat_connections", "Open WebSocket connections", value=v["connections"])
        yield GaugeMetricFamily(
            "gochat_authenticated_connections", "Authenticated connections", value=v["authenticated"]
        )
        yield CounterMetricFamily("gochat_frames_out", "Frames queued to clients", value=v["frames_out"])
        yield CounterMetricFamily("gochat_bytes_out", "Bytes written to clients", value=v["bytes_out"])
        yield CounterMetricFamily(
            "gochat_socket_writes", "WebSocket messages written (coalesced frames)", value=v["writes"]
        )
        yield CounterMetricFamily(
            "gochat_dropped_frames", "Droppable frames dropped for slow consumers", value=v["drops"]
        )
        yield CounterMetricFamily(
            "gochat_slow_consumer_disconnects", "Connections closed with 4401", value=v["slow_disconnects"]
        )
        yield CounterMetricFamily(
            "gochat_deliveries_held",
            "DELIVERs that arrived ahead of a missing seq and waited for it (order gate)",
            value=v["order_held"],
        )
        yield CounterMetricFamily(
            "gochat_deliveries_stale",
            "DELIVERs not delivered: at or below the last seq delivered (duplicates, given-up gaps)",
            value=v["order_stale"],
        )


class _EventsCollector(Collector):
    """The event-bus consumer's counters (a :class:`~gochat.cluster.bus.EventStats`), the
    node's outbox (a :class:`~gochat.cluster.bus.EventOutbox`) and revocation freshness."""

    def __init__(self, read: Callable[[], Any], outbox: Any, fresh: Callable[[], bool]) -> None:
        self._read = read
        self._outbox = outbox
        self._fresh = fresh

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        st = self._read()
        applied = CounterMetricFamily("gochat_events_applied", "Domain events applied from the event bus", labels=["type"])
        for etype, n in sorted(st.applied.items()):
            applied.add_metric([etype], n)
        yield applied
        yield CounterMetricFamily(
            "gochat_events_skipped", "Events skipped: unknown type, newer schema or bad payload", value=st.skipped
        )
        yield CounterMetricFamily(
            "gochat_events_duplicates", "Events delivered again and not applied twice", value=st.duplicates
        )
        yield CounterMetricFamily("gochat_events_retries", "Retries of failed event handlers", value=st.retries)
        yield CounterMetricFamily("gochat_events_dead", "Events moved to the dead letters", value=st.dead)
        yield CounterMetricFamily(
            "gochat_events_rebuilds", "Cache rebuilds from the store instead of a replay", value=st.rebuilds
        )
        yield GaugeMetricFamily(
            "gochat_event_lag_seconds", "Publish to apply delay of the last event applied", value=st.lag_s
        )
        ob = self._outbox
        yield GaugeMetricFamily("gochat_events_outbox_pending", "This node's events waiting for the bus", value=ob.pending)
        yield CounterMetricFamily("gochat_events_published", "Events this node published", value=ob.published)
        yield CounterMetricFamily(
            "gochat_events_publish_retries", "Publishes retried while the bus was unreachable", value=ob.retries
        )
        yield CounterMetricFamily(
            "gochat_events_outbox_dropped", "Events dropped from a full outbox (never published)", value=ob.dropped
        )
        yield GaugeMetricFamily(
            "gochat_revocations_fresh",
            "1 when this node knows every revocation (accepts tokens); 0 while it catches up",
            value=1.0 if self._fresh() else 0.0,
        )


class _ClusterCollector(Collector):
    """The cluster link's counters (a :class:`~gochat.cluster.link.ClusterLink`) and this
    node's delivery latency (a :class:`LatencyHistogram`)."""

    def __init__(self, link: Any, delivery_latency: dict[str, LatencyHistogram], delivery: Any = None) -> None:
        self._link = link
        self._latency = delivery_latency
        self._delivery = delivery

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        link = self._link
        yield GaugeMetricFamily("gochat_cluster_nodes", "Nodes the registry lists (this one included)", value=len(link.nodes))
        yield CounterMetricFamily(
            "gochat_cluster_routed", "Envelopes published to other nodes (a batch per node and turn)", value=link.routed
        )
        yield CounterMetricFamily(
            "gochat_cluster_route_failures", "Pushes to other nodes lost to a broker or presence failure", value=link.route_failures
        )
        yield CounterMetricFamily(
            "gochat_cluster_shed", "Pushes to other nodes shed because the routing queue was full", value=link.shed
        )
        resubscribes = CounterMetricFamily(
            "gochat_cluster_resubscribes", "Pub/sub readers that reconnected and subscribed again", labels=["reader"]
        )
        # in-process backends never lose a subscription: they have no such counter
        resubscribes.add_metric(["broker"], getattr(link.broker, "resubscribes", 0))
        resubscribes.add_metric(["registry"], getattr(link.registry, "resubscribes", 0))
        yield resubscribes
        latency = HistogramMetricFamily(
            "gochat_delivery_latency_seconds",
            "A stored message's commit to its DELIVER queued on this node's connections (once per message and node)",
            labels=["tier"],
        )
        for tier, hist in self._latency.items():
            latency.add_metric([tier], hist.buckets(), hist.total)
        yield latency
        queue = GaugeMetricFamily(
            "gochat_cluster_route_queue", "Frames waiting for the router, by priority class", labels=["priority"]
        )
        for priority, depth in link.queue_depths().items():
            queue.add_metric([priority], depth)
        yield queue
        if self._delivery is not None:
            yield from self._fanout(self._delivery)

    def _fanout(self, delivery: Any) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        from gochat.cluster.fanout import Tier

        by_tier = CounterMetricFamily(
            "gochat_fanout_messages", "Fan-outs this node started (messages and events), by tier", labels=["tier"]
        )
        for tier in Tier:
            by_tier.add_metric([tier.label], delivery.by_tier[tier])
        yield by_tier
        jobs = delivery.jobs
        yield GaugeMetricFamily(
            "gochat_fanout_local_jobs_waiting", "Sharded and cascaded fan-outs queued or running on this node",
            value=jobs.waiting,
        )
        states = CounterMetricFamily(
            "gochat_fanout_local_jobs", "Local parts of fan-out jobs, by what became of them", labels=["state"]
        )
        states.add_metric(["started"], jobs.started)
        states.add_metric(["finished"], jobs.finished)
        states.add_metric(["shed"], jobs.shed)
        yield states
        yield CounterMetricFamily(
            "gochat_fanout_local_recipients", "Recipients the local parts of fan-out jobs went through", value=jobs.recipients
        )
        yield CounterMetricFamily(
            "gochat_fanout_local_chunks", "Chunks (one per event-loop turn) of local fan-out jobs", value=jobs.chunks
        )


class _ResilienceCollector(Collector):
    """Circuit breakers (a :class:`~gochat.resilience.BreakerRegistry`) and degradation switches
    (a :class:`~gochat.resilience.degradation.Degradation`), read at scrape time."""

    def __init__(self, breakers: Any, degradation: Any) -> None:
        self._breakers = breakers
        self._degradation = degradation

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        from gochat.resilience.degradation import SWITCH_NAMES
        from gochat.resilience.node import BREAKER_STATE_VALUES

        state = GaugeMetricFamily(
            "gochat_breaker_state",
            "Circuit breaker state: 0 closed, 1 open, 2 half-open, 3 forced open, 4 forced closed",
            labels=["breaker"],
        )
        counters = {
            "calls": "Calls through the breaker (admitted)",
            "failures": "Calls that failed against the dependency (unreachable, broken, timed out)",
            "slow": "Calls slower than breaker_slow_call_ms",
            "rejected": "Calls refused because the breaker was open",
            "rejected_bulkhead": "Calls refused because breaker_max_concurrent were in flight",
            "state_changes": "Breaker state changes",
        }
        families = {
            k: CounterMetricFamily(f"gochat_breaker_{k}", doc, labels=["breaker"]) for k, doc in counters.items()
        }
        in_flight = GaugeMetricFamily("gochat_breaker_in_flight", "Calls in flight through the breaker", labels=["breaker"])
        for b in self._breakers:
            state.add_metric([b.name], BREAKER_STATE_VALUES[b.state])
            for k, family in families.items():
                family.add_metric([b.name], getattr(b, k))
            in_flight.add_metric([b.name], b.in_flight)
        yield state
        yield from families.values()
        yield in_flight
        degraded = GaugeMetricFamily(
            "gochat_degraded", "1 while a degradation switch is on (read_only, cache_only, non_core_off)", labels=["switch"]
        )
        active = self._degradation.active
        for switch, name in SWITCH_NAMES.items():
            degraded.add_metric([name], 1.0 if switch in active else 0.0)
        yield degraded


class _CacheCollector(Collector):
    """The L1 caches' counters (:class:`~gochat.messaging.cache.CacheSnapshot` objects, read at
    scrape time: the hit path counts plain integers)."""

    def __init__(self, read: Callable[[], Iterable[Any]]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        snaps = list(self._read())
        hits = CounterMetricFamily("gochat_cache_hits", "L1 cache reads answered from the cache", labels=["cache"])
        misses = CounterMetricFamily(
            "gochat_cache_misses", "L1 cache lookups that loaded (or joined a load)", labels=["cache"]
        )
        loads = CounterMetricFamily("gochat_cache_loads", "L1 cache loads from the store", labels=["cache"])
        load_s = CounterMetricFamily(
            "gochat_cache_load_seconds", "Seconds spent in L1 cache loads (miss latency: / loads)", labels=["cache"]
        )
        inval = CounterMetricFamily(
            "gochat_cache_invalidations", "L1 cache entries invalidated (events, changes, rebuilds)", labels=["cache"]
        )
        evictions = CounterMetricFamily(
            "gochat_cache_evictions", "L1 cache entries evicted, by reason (size, bytes, ttl)", labels=["cache", "reason"]
        )
        entries = GaugeMetricFamily("gochat_cache_entries", "Entries in an L1 cache", labels=["cache"])
        size = GaugeMetricFamily("gochat_cache_bytes", "Estimated bytes held by an L1 cache", labels=["cache"])
        hot = GaugeMetricFamily(
            "gochat_cache_hot_key_hits", "Most read keys of an L1 cache, estimated hits (sampled)", labels=["cache", "key"]
        )
        for st in snaps:
            name = [st.name]
            hits.add_metric(name, st.hits)
            misses.add_metric(name, st.misses)
            loads.add_metric(name, st.loads)
            load_s.add_metric(name, st.load_seconds)
            inval.add_metric(name, st.invalidations)
            for reason, n in st.evictions.items():
                evictions.add_metric([st.name, reason], n)
            entries.add_metric(name, st.entries)
            size.add_metric(name, st.bytes)
            for key, n in st.hot:
                hot.add_metric([st.name, key], n)
        yield from (hits, misses, loads, load_s, inval, evictions, entries, size, hot)


class _SharedCacheCollector(Collector):
    """The shared (L2) cache's counters per cache (:class:`~gochat.messaging.l2.L2Stats`) and
    what the start-up warm-up loaded (:class:`~gochat.messaging.addressing.WarmupStats`)."""

    def __init__(self, read: Callable[[], Iterable[Any]], warmup: Callable[[], Any]) -> None:
        self._read = read
        self._warmup = warmup

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        counters = {
            "hits": "L2 cache entries found and used",
            "misses": "L2 cache reads that found no entry",
            "stale": "L2 cache entries ignored: older than the version known here, or from before a rebuild",
            "errors": "L2 cache operations that failed or timed out (lookups then read the store)",
            "writes": "L2 cache entries written",
            "too_large": "L2 cache writes skipped: the value is over the entry bound",
            "reads": "L2 cache reads that reached the backend",
            "read_seconds": "Seconds spent in L2 cache reads (mean latency: / reads)",
        }
        families = {
            field: CounterMetricFamily(f"gochat_shared_cache_{field}", doc, labels=["cache"]) for field, doc in counters.items()
        }
        for st in self._read():
            for field, family in families.items():
                family.add_metric([st.name], getattr(st, field))
        yield from families.values()
        w = self._warmup()
        loaded = GaugeMetricFamily(
            "gochat_cache_warmup_loaded", "Group member lists the start-up warm-up loaded, by source", labels=["source"]
        )
        loaded.add_metric(["l2"], w.from_l2)
        loaded.add_metric(["store"], w.from_store)
        yield loaded
        yield GaugeMetricFamily("gochat_cache_warmup_seconds", "How long the start-up warm-up took", value=w.seconds)
        yield GaugeMetricFamily(
            "gochat_cache_warmup_done", "1 once the start-up warm-up ended (-1: it failed)", value=-1 if w.failed else int(w.done)
        )


class _SlowQueryCollector(Collector):
    """Slow statements per store (:class:`~gochat.observability.slow_queries.SlowQueryLog`
    objects, read at scrape time). The families are exported, without samples, before a store
    is attached."""

    def __init__(self, logs: list[SlowQueryLog]) -> None:
        self._logs = logs

    def collect(self) -> Iterator[CounterMetricFamily]:
        count = CounterMetricFamily(
            "gochat_slow_queries", "Store statements at or above slow_query_ms", labels=["store"]
        )
        seconds = CounterMetricFamily(
            "gochat_slow_query_seconds", "Seconds spent in store statements at or above slow_query_ms", labels=["store"]
        )
        for slow in self._logs:
            count.add_metric([slow.store], slow.count)
            seconds.add_metric([slow.store], slow.seconds)
        yield count
        yield seconds


class _ConfigCollector(Collector):
    """The node's configuration version and refused reloads (a
    :class:`~gochat.config_reload.ConfigReloader`)."""

    def __init__(self, config: Any) -> None:
        self._config = config

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        yield GaugeMetricFamily(
            "gochat_config_version", "Version of the configuration this node runs (0: as started)",
            value=self._config.version,
        )
        yield CounterMetricFamily(
            "gochat_config_reload_failures", "Configuration reloads refused (malformed or invalid)",
            value=self._config.failures,
        )


class _ThresholdCollector(Collector):
    """The dynamic large-group threshold and the event-loop lag it measures (a
    :class:`~gochat.messaging.threshold.ThresholdController`)."""

    def __init__(self, controller: Any) -> None:
        self._controller = controller

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        c = self._controller
        yield GaugeMetricFamily(
            "gochat_large_group_threshold", "Groups above this many members fan out through stream jobs",
            value=c.value,
        )
        yield CounterMetricFamily(
            "gochat_large_group_threshold_changes", "Changes of the dynamic large-group threshold", value=c.changes
        )
        yield GaugeMetricFamily(
            "gochat_event_loop_lag_seconds", "Event-loop lag: a 0.25 s timer's worst drift over the last interval",
            value=c.lag_s,
        )


class Metrics:
    """The metric set of one gochat node, in its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.hot = HotCounters()
        self.registry.register(_HotCollector(self.hot))
        self.http_requests = Counter(
            "gochat_http_requests", "HTTP API requests", ["route", "status"], registry=self.registry
        )
        #: the slow-statement logs of the node's store (attach_slow_queries)
        self.slow_queries: list[SlowQueryLog] = []
        self.registry.register(_SlowQueryCollector(self.slow_queries))

    def attach_config(self, config: Any) -> None:
        """``gochat_config_version`` and ``gochat_config_reload_failures_total`` (hot reload)."""
        self.registry.register(_ConfigCollector(config))

    def attach_threshold(self, controller: Any) -> None:
        """``gochat_large_group_threshold``, its changes and ``gochat_event_loop_lag_seconds``."""
        self.registry.register(_ThresholdCollector(controller))

    def attach_data_plane(self, read: Callable[[], dict[str, Any]]) -> None:
        self.registry.register(_DataPlaneCollector(read))

    def attach_store(self, read: Callable[[], Any]) -> None:
        """Export the store's write counters (a :class:`~gochat.store.common.StoreStats`)."""
        self.registry.register(_StoreCollector(read))

    def attach_events(self, read: Callable[[], Any], outbox: Any, fresh: Callable[[], bool]) -> None:
        """Export the event-bus consumer's counters (a :class:`~gochat.cluster.bus.EventStats`),
        the outbox's (a :class:`~gochat.cluster.bus.EventOutbox`) and ``fresh()`` (auth)."""
        self.registry.register(_EventsCollector(read, outbox, fresh))

    def attach_cluster(self, link: Any, delivery_latency: dict[str, LatencyHistogram], delivery: Any = None) -> None:
        """Export the cluster link's counters, the delivery latency histogram and (given the
        node's :class:`~gochat.messaging.delivery.Delivery`) the fan-out counters."""
        self.registry.register(_ClusterCollector(link, delivery_latency, delivery))

    def attach_resilience(self, breakers: Any, degradation: Any) -> None:
        """Export the breakers' states and counters and the degradation switches."""
        self.registry.register(_ResilienceCollector(breakers, degradation))

    def attach_caches(self, read: Callable[[], Iterable[Any]]) -> None:
        """Export L1 cache counters (an iterable of :class:`~gochat.messaging.cache.CacheSnapshot`)."""
        self.registry.register(_CacheCollector(read))

    def attach_shared_cache(self, read: Callable[[], Iterable[Any]], warmup: Callable[[], Any]) -> None:
        """Export the L2 cache counters (an iterable of :class:`~gochat.messaging.l2.L2Stats`)
        and the warm-up's (a :class:`~gochat.messaging.addressing.WarmupStats`)."""
        self.registry.register(_SharedCacheCollector(read, warmup))

    def attach_slow_queries(self, store: object) -> None:
        """Export the slow statements of ``store`` (its ``slow_queries``, a
        :class:`~gochat.observability.slow_queries.SlowQueryLog`; a store without one is
        ignored). Attaching one log twice exports it once."""
        from gochat.observability.slow_queries import SlowQueryLog

        slow = getattr(store, "slow_queries", store)
        if isinstance(slow, SlowQueryLog) and all(s is not slow for s in self.slow_queries):
            self.slow_queries.append(slow)

    def render(self) -> bytes:
        return generate_latest(self.registry)
