"""Redis implementations of the cluster seams (``docs/cluster.md`` § Redis data model).

Every class takes a Redis URL (it then owns a client made by :func:`connect`) or a shared
``redis.asyncio.Redis`` client (never closed here; build it with bytes responses, i.e. without
``decode_responses``), and a key prefix so that several clusters or test runs share one server.
Backend outages surface as :class:`~gochat.errors.UnavailableError` within a bounded time; the
background loops (registry renewal, pub/sub readers, job consumers) log at WARNING and recover
by themselves when Redis comes back, re-creating what a restart without persistence lost.

All keys of one class live under its prefix. The Lua scripts touch keys they compute from the
prefix, which is fine on a single server (or a primary with replicas); on Redis Cluster put a
hash tag in the prefix (``"{gochat}:"``) so every key maps to one slot.

One module a job: :mod:`.client` (the client helper shared by every backend: :func:`connect`,
the outage guard, :func:`cancel_tasks`, the pub/sub subscriber), :mod:`.registry`,
:mod:`.broker`, :mod:`.presence` and :mod:`.jobs` (one backend each). Every module logs to
``gochat.cluster.redis``. Importing this package loads redis-py; :mod:`gochat.cluster` imports
it only when a Redis backend is asked for.
"""

from gochat.cluster.redis.broker import RedisBroker
from gochat.cluster.redis.client import DEFAULT_PREFIX, cancel_tasks, connect
from gochat.cluster.redis.jobs import RedisJobQueue
from gochat.cluster.redis.presence import RedisPresence
from gochat.cluster.redis.registry import RedisRegistry

__all__ = [
    "DEFAULT_PREFIX",
    "RedisBroker",
    "RedisJobQueue",
    "RedisPresence",
    "RedisRegistry",
    "cancel_tasks",
    "connect",
]
