"""Cluster seams (registry, broker, presence, job queue) and their memory and Redis backends."""

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
from gochat.cluster.redis import (
    RedisBroker,
    RedisJobQueue,
    RedisPresence,
    RedisRegistry,
    connect,
)

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
