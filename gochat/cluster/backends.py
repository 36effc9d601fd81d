"""The cluster seams' backends, chosen once when a node is composed: in-process for embedded
mode, Redis for a cluster. Whatever the choice, the node runs the same code over them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from gochat.cluster.base import Broker, JobQueue, Presence, Registry
from gochat.cluster.bus import EventBus
from gochat.cluster.fanout import FanoutProgress, MemoryFanoutProgress
from gochat.cluster.locks import Locks
from gochat.cluster.memory import (
    MemoryBroker,
    MemoryClusterPresence,
    MemoryHub,
    MemoryJobQueue,
    MemoryRegistry,
)
from gochat.cluster.memory_bus import MemoryEventBus
from gochat.cluster.memory_cache import MemorySharedCache
from gochat.cluster.memory_locks import MemoryLocks
from gochat.cluster.shared_cache import SharedCache
from gochat.resilience import CircuitBreaker, RetryPolicy
from gochat.resilience.policy import DEFAULT_RETRY

__all__ = ["ClusterBackends", "memory_backends", "redis_backends"]

log = logging.getLogger("gochat.cluster")

#: how long closing one backend may take on shutdown (a hung connection must not stall it)
CLOSE_TIMEOUT_S = 3.0


@dataclass(frozen=True, slots=True)
class ClusterBackends:
    broker: Broker
    presence: Presence
    registry: Registry
    jobs: JobQueue
    #: resources the backends share (a Redis client), closed after them
    shared: tuple[Callable[[], Awaitable[None]], ...] = ()
    #: domain events every node reads (gochat/cluster/bus.py); a private log when not given
    bus: EventBus = field(default_factory=MemoryEventBus)
    #: distributed locks (gochat/cluster/locks.py); in-process ones of their own when not given
    locks: Locks = field(default_factory=MemoryLocks)
    #: the shared (L2) cache (gochat/cluster/shared_cache.py); a private one when not given
    cache: SharedCache = field(default_factory=MemorySharedCache)
    #: fan-out job records (gochat/cluster/fanout.py); private ones when not given
    progress: FanoutProgress = field(default_factory=MemoryFanoutProgress)

    async def close(self) -> None:
        """Close every backend, then what they share; each within CLOSE_TIMEOUT_S."""
        closers = [
            self.progress.close, self.cache.close, self.locks.close, self.bus.close, self.jobs.close, self.broker.close,
            self.registry.close, self.presence.close, *self.shared,
        ]
        for closer in closers:
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await closer()
            except TimeoutError:
                log.warning("closing %r timed out", closer)
            except Exception:
                log.exception("closing %r failed", closer)


def memory_backends(hub: MemoryHub | None = None) -> ClusterBackends:
    """In-process backends: a cluster of the nodes that share ``hub`` (one node by default)."""
    hub = hub if hub is not None else MemoryHub()
    return ClusterBackends(
        MemoryBroker(hub),
        MemoryClusterPresence(hub),
        MemoryRegistry(hub),
        MemoryJobQueue(hub),
        bus=MemoryEventBus(hub),
        locks=MemoryLocks(hub),
        cache=MemorySharedCache(hub),
        progress=MemoryFanoutProgress(hub),
    )


def redis_backends(
    url: str,
    prefix: str,
    *,
    registry_ttl_s: float,
    registry_renew_s: float,
    timeout_s: float = 5.0,
    breaker: CircuitBreaker | None = None,
    retry: RetryPolicy = DEFAULT_RETRY,
    claim_idle_ms: int = 5_000,
) -> ClusterBackends:
    """Redis backends (imported here, so that embedded mode never loads redis-py). Presence,
    registry and jobs share one client; the broker's pub/sub has connections of its own. Every
    command goes through ``breaker`` (the node's Redis breaker) and every reconnect or retry
    follows ``retry`` (the node's policy)."""
    from gochat.cluster.redis import RedisBroker, RedisJobQueue, RedisPresence, RedisRegistry, connect
    from gochat.cluster.redis.bus import RedisEventBus
    from gochat.cluster.redis.cache import RedisSharedCache
    from gochat.cluster.redis.client import _Client
    from gochat.cluster.redis.locks import RedisLocks
    from gochat.cluster.redis.progress import RedisFanoutProgress

    client = connect(url, timeout_s=timeout_s, retry=retry)
    pubsub_client = connect(url, timeout_s=timeout_s, retry=retry)  # the broker's, apart
    broker = RedisBroker(pubsub_client, prefix, timeout_s=timeout_s)
    presence = RedisPresence(client, prefix, node_ttl_s=registry_ttl_s, timeout_s=timeout_s)
    registry = RedisRegistry(client, prefix, ttl_s=registry_ttl_s, renew_s=registry_renew_s, timeout_s=timeout_s)
    jobs = RedisJobQueue(client, prefix, claim_idle_ms=claim_idle_ms, timeout_s=timeout_s)
    bus = RedisEventBus(client, prefix, timeout_s=timeout_s)
    locks = RedisLocks(client, prefix, timeout_s=timeout_s)
    cache = RedisSharedCache(client, prefix, timeout_s=timeout_s)
    progress = RedisFanoutProgress(client, prefix, timeout_s=timeout_s)
    parts: tuple[_Client, ...] = (broker, presence, registry, jobs, bus, locks, cache, progress)
    for part in parts:
        part.breaker = breaker
        part.retry = retry
    return ClusterBackends(
        broker,
        presence,
        registry,
        jobs,
        shared=(client.aclose, pubsub_client.aclose),
        bus=bus,
        locks=locks,
        cache=cache,
        progress=progress,
    )
