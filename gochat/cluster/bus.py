"""The event bus: typed domain events that every node must learn about, behind one seam.

A change that other nodes cache or enforce (a group's membership, a revoked token, ...) is
published as a :class:`DomainEvent` on the :class:`EventBus`: in-process in embedded mode
(:mod:`gochat.cluster.memory_bus`), one Redis stream in a cluster (:mod:`gochat.cluster.redis.bus`).
Every node reads every event, in the order of the log, from its own cursor; the cursor is
persisted, so a node that was disconnected (or a consumer that restarted under the same name)
replays what it missed. The log is trimmed by length and age; a node whose cursor fell behind
the retention cannot replay and calls its *rebuild* callback instead (reload what it caches
from the store), then goes on from the end of the log.

:class:`EventConsumer` is the backend-independent half: it decodes entries (an unknown type or
a newer schema is skipped and counted, never a crash), applies each event id at most once per
node (a bounded set of recent ids), retries a failing handler with exponential backoff and,
after the last try, moves the entry to the dead letters (counted). Its counters are exported
in ``/metrics`` (docs/http-api.md). The send path never touches the bus.

Events carry ``event_id`` (unique), ``type`` and ``schema`` (class constants), ``version`` (the
version of what changed: a group's membership version, ...) and ``origin`` (publishing node).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import orjson

from gochat.clock import now_ms
from gochat.errors import GochatError
from gochat.resilience import RetryPolicy
from gochat.resilience.policy import DEFAULT_RETRY

__all__ = [
    "EVENT_FRESH_S",
    "EVENT_RETENTION_AGE_S",
    "EVENT_RETENTION_LEN",
    "EVENT_TYPES",
    "BreakerChanged",
    "ConfigChanged",
    "DegradationChanged",
    "DomainEvent",
    "EventBus",
    "EventConsumer",
    "EventOutbox",
    "EventStats",
    "GroupCreated",
    "GroupDissolved",
    "GroupUpdated",
    "MemberAdded",
    "MemberRemoved",
    "PermissionChanged",
    "SigningKeyRotated",
    "SkippedEvent",
    "TokenRevoked",
    "UserChanged",
    "decode_event",
    "encode_event",
]

log = logging.getLogger("gochat.cluster.bus")

#: retention: at least this many of the newest events are kept (trimming is approximate, so
#: a little more is kept) ...
EVENT_RETENTION_LEN = 100_000
#: ... and nothing younger than this is trimmed by age (seconds)
EVENT_RETENTION_AGE_S = 24 * 3600
#: events waiting to be published while the bus is unreachable, per node (beyond: the oldest
#: are dropped and counted; the other nodes catch up at their caches' TTL or their next rebuild)
OUTBOX_MAX = 10_000
#: a node whose event reader has not reached the end of the log within this long (Redis
#: unreachable, the process stalled) may have missed a revocation: it refuses tokens until it
#: has caught up (or reloaded the deny-list from the store). Readers poll at most every
#: EVENT_FRESH_S / 3 while idle, so a healthy node is always caught up.
EVENT_FRESH_S = 0.75

EntryHandler = Callable[[str, bytes], Awaitable[None]]
Rebuild = Callable[[], Awaitable[None]]


def new_event_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True, kw_only=True)
class DomainEvent:
    """A change other nodes must learn about. Subclasses set ``type`` and ``schema``."""

    type: ClassVar[str] = ""
    #: the newest payload layout of this type that this code reads
    schema: ClassVar[int] = 1

    #: the version of what changed (a group's membership version, ...; 0 when it has none)
    version: int = 0
    event_id: str = field(default_factory=new_event_id)
    #: the node that published it
    origin: str = ""
    at_ms: int = field(default_factory=now_ms)


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupCreated(DomainEvent):
    type: ClassVar[str] = "group.created"
    group_id: int
    owner_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupUpdated(DomainEvent):
    type: ClassVar[str] = "group.updated"
    group_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupDissolved(DomainEvent):
    type: ClassVar[str] = "group.dissolved"
    group_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberAdded(DomainEvent):
    type: ClassVar[str] = "member.added"
    group_id: int
    user_id: int
    actor_id: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberRemoved(DomainEvent):
    type: ClassVar[str] = "member.removed"
    group_id: int
    user_id: int
    actor_id: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class UserChanged(DomainEvent):
    type: ClassVar[str] = "user.changed"
    user_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PermissionChanged(DomainEvent):
    type: ClassVar[str] = "permission.changed"
    user_id: int
    group_id: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenRevoked(DomainEvent):
    """An access-token ``jti`` or a login session (``sid``) was revoked (stored by the store's
    ``revoke_*`` first); ``expires_ms`` bounds how long it must stay denied."""

    type: ClassVar[str] = "token.revoked"
    user_id: int
    revoked_id: str
    expires_ms: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SigningKeyRotated(DomainEvent):
    type: ClassVar[str] = "key.rotated"
    kid: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigChanged(DomainEvent):
    """An operator changed the reloadable settings (SIGHUP, ``PUT /v1/admin/config``): every
    node applies ``values`` (all the reloadable settings, not only those that changed) as
    config ``version``. Ordered by (``version``, ``origin``): a node ignores an event that is not
    newer than the configuration it runs (gochat/config_reload.py)."""

    type: ClassVar[str] = "config.changed"
    values: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class DegradationChanged(DomainEvent):
    """An operator set a degradation switch (the admin API): every node applies it. ``value``:
    1 forced on, 0 forced off, -1 automatic (docs/resilience.md)."""

    type: ClassVar[str] = "degradation.changed"
    switch: str
    value: int


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerChanged(DomainEvent):
    """A node's circuit breaker changed state (informational: other nodes log and count it)."""

    type: ClassVar[str] = "breaker.changed"
    breaker: str
    state: str
    reason: str = ""


EVENT_TYPES: dict[str, type[DomainEvent]] = {
    cls.type: cls
    for cls in (
        GroupCreated,
        GroupUpdated,
        GroupDissolved,
        MemberAdded,
        MemberRemoved,
        UserChanged,
        PermissionChanged,
        TokenRevoked,
        SigningKeyRotated,
        ConfigChanged,
        DegradationChanged,
        BreakerChanged,
    )
}


class SkippedEvent(Exception):
    """An entry this code does not read: an unknown type, a newer schema or a bad payload."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def encode_event(event: DomainEvent) -> bytes:
    body: dict[str, Any] = {"type": event.type, "schema": event.schema}
    for f in dataclasses.fields(event):
        body[f.name] = getattr(event, f.name)
    return orjson.dumps(body)


def decode_event(payload: bytes) -> DomainEvent:
    """The event of an entry; :class:`SkippedEvent` for one this code cannot read."""
    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise SkippedEvent(f"not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise SkippedEvent("not a JSON object")
    cls = EVENT_TYPES.get(body.get("type"))  # type: ignore[arg-type]
    if cls is None:
        raise SkippedEvent(f"unknown type {body.get('type')!r}")
    schema = body.get("schema")
    if not isinstance(schema, int) or schema > cls.schema:
        raise SkippedEvent(f"{cls.type} schema {schema!r} is newer than {cls.schema}")
    names = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: v for k, v in body.items() if k in names})
    except TypeError as exc:
        raise SkippedEvent(f"bad {cls.type} payload: {exc}") from None


@runtime_checkable
class EventBus(Protocol):
    """An append-only log every node reads in full, each from its own persisted cursor."""

    async def publish(self, event: DomainEvent) -> str:
        """Append ``event`` (trimming the log to its retention); returns the entry id.
        Raises :class:`~gochat.errors.UnavailableError` when the backend is unreachable."""

    async def subscribe(self, name: str, handler: EntryHandler, rebuild: Rebuild) -> None:
        """Start reading in the background as consumer ``name`` (a stable node name): from its
        persisted cursor when it has one and the log still holds everything after it; else
        from the end of the log, after ``await rebuild()`` (no cursor yet, the cursor fell
        behind the retention, or the backend lost the log). ``handler(entry_id, payload)`` gets
        the entries in log order; the cursor moves past an entry once its handler returned.
        The reader survives backend outages and goes on from its cursor."""

    def caught_up(self, within_s: float) -> bool:
        """Whether this node's reader is known to have applied every event published more
        than ``within_s`` seconds ago: a read issued less than ``within_s`` ago reached the end
        of the log and its entries were handled. False while the backend is unreachable, the
        reader has not started, or the process was stalled (SIGSTOP) for longer than that.
        The auth service refuses tokens while it is False (docs/consistency.md, Revocations)."""

    async def dead_letter(self, name: str, entry_id: str, payload: bytes, error: str) -> None:
        """Keep an entry that consumer ``name`` gave up on (bounded)."""

    async def dead_letters(self) -> list[tuple[str, str, bytes, str]]:
        """(consumer, entry id, payload, error) of the dead letters, oldest first."""

    async def close(self) -> None:
        """Stop reading (the cursor stays where it is)."""


@dataclass(slots=True)
class EventStats:
    """One node's consumer counters (exported in /metrics)."""

    applied: dict[str, int] = field(default_factory=dict)
    skipped: int = 0
    duplicates: int = 0
    retries: int = 0
    dead: int = 0
    rebuilds: int = 0
    #: now - at_ms of the last event handled (seconds)
    lag_s: float = 0.0


class EventConsumer:
    """Reads the bus as one node: decodes, deduplicates, applies with retries, dead-letters.

    ``apply(event)`` may be sync or async; it must be idempotent by the event's ``version``
    (a redelivery after a restart, which the in-memory id set cannot see, applies it again).
    A failing ``apply`` is retried by ``retry`` (the node's retry policy; any exception counts
    as retryable here, since a handler's failure cannot be classified better), in place: later
    events wait, so each node applies events in log order. Then the entry goes to the dead
    letters and the consumer moves on.
    """

    def __init__(
        self,
        bus: EventBus,
        name: str,
        apply: Callable[[DomainEvent], Awaitable[None] | None],
        rebuild: Callable[[], Awaitable[None] | None],
        *,
        retry: RetryPolicy = DEFAULT_RETRY,
        remember: int = 65_536,
    ) -> None:
        self.bus = bus
        self.name = name
        self._apply = apply
        self._rebuild = rebuild
        self.retry = dataclasses.replace(retry, retryable=lambda exc: True)
        self.remember = remember
        self.stats = EventStats()
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._started = False

    async def start(self) -> None:
        await self.bus.subscribe(self.name, self._on_entry, self._do_rebuild)
        self._started = True

    async def close(self) -> None:
        if self._started:
            self._started = False
            await self.bus.close()

    async def _do_rebuild(self) -> None:
        self.stats.rebuilds += 1
        result = self._rebuild()
        if result is not None:
            await result

    async def _on_entry(self, entry_id: str, payload: bytes) -> None:
        try:
            event = decode_event(payload)
        except SkippedEvent as exc:
            self.stats.skipped += 1
            log.warning("event %s skipped: %s", entry_id, exc.reason)
            return
        if event.event_id in self._seen:
            self.stats.duplicates += 1
            return
        async def apply() -> None:
            result = self._apply(event)
            if result is not None:
                await result

        def retried(attempt: int, exc: BaseException, _wait: float) -> None:
            self.stats.retries += 1
            log.warning("event %s (%s) failed (try %d): %r", entry_id, event.type, attempt, exc)

        try:
            await self.retry.run(apply, what=f"event {event.type}", on_retry=retried)
        except Exception as exc:
            await self._dead(entry_id, payload, event, exc)
            return
        self._remember(event)

    async def _dead(self, entry_id: str, payload: bytes, event: DomainEvent, exc: Exception) -> None:
        self.stats.dead += 1
        self._seen[event.event_id] = None  # given up on: a redelivery is not retried again
        log.error("event %s (%s) moved to dead letters: %r", entry_id, event.type, exc)
        try:
            await self.bus.dead_letter(self.name, entry_id, payload, repr(exc))
        except GochatError as dl_exc:
            log.warning("cannot store dead letter %s: %s", entry_id, dl_exc.message)

    def _remember(self, event: DomainEvent) -> None:
        self._seen[event.event_id] = None
        if len(self._seen) > self.remember:
            self._seen.popitem(last=False)
        self.stats.applied[event.type] = self.stats.applied.get(event.type, 0) + 1
        self.stats.lag_s = max(0.0, (now_ms() - event.at_ms) / 1000)


class EventOutbox:
    """Publishes a node's events in the order they were made, retrying (``retry``'s backoff,
    without giving up) while the bus is unreachable (what changed is in the store already, so an event must not be lost because
    Redis blinked). One background task; ``add`` never waits. Bounded by ``max_pending``: past
    it the oldest waiting event is dropped and counted (``dropped``), the one loss a node that
    stays cut off from the bus can suffer; a node that crashes loses what still waits.
    """

    def __init__(
        self,
        bus: EventBus,
        *,
        max_pending: int = OUTBOX_MAX,
        retry: RetryPolicy = DEFAULT_RETRY,
    ) -> None:
        self.bus = bus
        self.max_pending = max_pending
        self.retry = retry
        self._pending: deque[DomainEvent] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.published = 0
        self.retries = 0
        self.dropped = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    def add(self, event: DomainEvent) -> None:
        if len(self._pending) >= self.max_pending:
            lost = self._pending.popleft()
            self.dropped += 1
            log.error("event outbox full (%d): dropped %s %s", self.max_pending, lost.type, lost.event_id)
        self._pending.append(event)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="event-outbox")
        self._wake.set()

    async def _run(self) -> None:
        backoff = self.retry.backoff()
        while True:
            self._wake.clear()
            while self._pending:
                event = self._pending[0]
                try:
                    await self.bus.publish(event)
                except GochatError as exc:
                    self.retries += 1
                    if backoff.attempt in (0, 8):  # the first failure, then about once every few seconds
                        log.warning("event bus unreachable (%s): %d events wait", exc.message, len(self._pending))
                    await asyncio.sleep(backoff.next())
                    continue
                if self._pending and self._pending[0] is event:
                    self._pending.popleft()
                self.published += 1
                backoff.reset()
            await self._wake.wait()

    async def flush(self, timeout_s: float) -> bool:
        """Wait at most ``timeout_s`` for every waiting event to be published (True if so)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._pending and loop.time() < deadline:
            await asyncio.sleep(0.01)
        return not self._pending

    async def close(self) -> None:
        """Stop publishing (what still waits is lost, logged)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._pending:
            log.error("event outbox closed with %d events unpublished", len(self._pending))
