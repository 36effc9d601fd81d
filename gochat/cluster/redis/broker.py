"""The node-to-node broker on Redis pub/sub: :class:`RedisBroker` (a channel per node and one
for broadcasts, at most once)."""

from __future__ import annotations

from collections.abc import Callable

from redis.asyncio import Redis

from gochat.cluster.redis.client import DEFAULT_PREFIX, _Client, _Subscriber

__all__ = ["RedisBroker"]


class RedisBroker(_Client):
    """:class:`~gochat.cluster.base.Broker` on Redis pub/sub: channel ``{prefix}node:{id}`` per
    node and ``{prefix}all`` for broadcasts; payloads are opaque bytes, delivery at most once.
    The reader re-subscribes by itself after losing Redis (counted in :attr:`resubscribes`)."""

    def __init__(
        self,
        redis: Redis | str,
        prefix: str = DEFAULT_PREFIX,
        *,
        timeout_s: float = 2.0,
        ping_s: float = 5.0,
    ) -> None:
        super().__init__(redis, prefix, timeout_s)
        self.ping_s = ping_s
        self.all_channel = f"{prefix}all"
        self.node_id = ""
        self._sub: _Subscriber | None = None

    def node_channel(self, node_id: str) -> str:
        return f"{self.prefix}node:{node_id}"

    @property
    def resubscribes(self) -> int:
        return self._sub.resubscribes if self._sub is not None else 0

    async def start(
        self, node_id: str, on_message: Callable[[bytes], None], on_resubscribe: Callable[[], None] | None = None
    ) -> None:
        """Subscribe and return once Redis confirmed it (UnavailableError if it is down)."""
        if self._sub is not None:
            raise RuntimeError("broker already started")
        self.node_id = node_id
        sub = _Subscriber(
            self.redis,
            [self.node_channel(node_id), self.all_channel],
            lambda _ch, data: on_message(data),
            name=f"broker-{node_id}",
            timeout_s=self.timeout_s,
            ping_s=self.ping_s,
            retry=self.retry,
            on_resubscribe=on_resubscribe,
        )
        await sub.start()
        self._sub = sub

    async def send_to_node(self, node_id: str, payload: bytes) -> None:
        async with self.guard("broker publish"):
            await self.redis.publish(self.node_channel(node_id), payload)

    async def broadcast(self, payload: bytes) -> None:
        async with self.guard("broker broadcast"):
            await self.redis.publish(self.all_channel, payload)

    async def close(self) -> None:
        if self._sub is not None:
            await self._sub.close()
            self._sub = None
        await self._close_client()
