"""Cluster seams (registry, broker, presence, job queue) and their memory and Redis backends.

The Redis backends are imported on first use (``gochat.cluster.RedisBroker`` or
``gochat.cluster.redis``), so a node on embedded defaults never loads redis-py.
"""

from typing import TYPE_CHECKING, Any

from gochat.cluster.base import (
    REGISTRY_RENEW_S,
    REGISTRY_TTL_S,
    Broker,
    JobHandler,
    JobQueue,
    NodeInfo,
    Presence,
    Registry,
    SessionLease,
)
from gochat.cluster.memory import (
    MemoryBroker,
    MemoryClusterPresence,
    MemoryHub,
    MemoryJobQueue,
    MemoryRegistry,
)

if TYPE_CHECKING:
    from gochat.cluster.redis import RedisBroker, RedisJobQueue, RedisPresence, RedisRegistry, connect

_REDIS_NAMES = frozenset({"RedisBroker", "RedisJobQueue", "RedisPresence", "RedisRegistry", "connect"})


def __getattr__(name: str) -> Any:
    if name in _REDIS_NAMES:
        from gochat.cluster import redis

        return getattr(redis, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "REGISTRY_RENEW_S",
    "REGISTRY_TTL_S",
    "Broker",
    "JobHandler",
    "JobQueue",
    "MemoryBroker",
    "MemoryClusterPresence",
    "MemoryHub",
    "MemoryJobQueue",
    "MemoryRegistry",
    "NodeInfo",
    "Presence",
    "RedisBroker",
    "RedisJobQueue",
    "RedisPresence",
    "RedisRegistry",
    "Registry",
    "SessionLease",
    "connect",
]
