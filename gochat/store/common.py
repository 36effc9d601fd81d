"""What :mod:`gochat.store.sqlite` and :mod:`gochat.store.postgres` share.

Only logic that is the same in both backends lives here: constants, the validation of
arguments before anything is queued or sent, the conversion of a message row (both select
:data:`MSG_COLUMNS`), the paging of a history read, the shape of mapped errors, the counters
and the cached, single-flight :meth:`~gochat.store.base.Store.direct_conversation`. SQL, the
threading (SQLite) versus asyncio (PostgreSQL) machinery and the backend's exception classes
stay in each backend.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

from gochat.clock import now_ms  # re-exported: gochat.clock is the one wall clock
from gochat.errors import ErrorCode, RequestError, UnavailableError
from gochat.ids import IdGenerator
from gochat.store.base import AppendCallback, AppendRequest, AppendResult, StoredMessage, StoreStats

__all__ = [
    "CLIENT_MSG_ID_LEN",
    "DIRECT_CACHE_MAX",
    "KIND_DIRECT",
    "KIND_GROUP",
    "KIND_ROOM",
    "MAX_SEQ",
    "MSG_COLUMNS",
    "DirectConversationCache",
    "StoreCounters",
    "StoreStats",
    "conflict_error",
    "direct_peer",
    "history_page",
    "invalid_value_error",
    "message_from_row",
    "new_message",
    "now_ms",
    "resolve_ids",
    "run_callback",
    "unavailable",
    "validate_append",
    "validate_history",
]

log = logging.getLogger("gochat.store")

KIND_DIRECT: Final = 1
KIND_GROUP: Final = 2
KIND_ROOM: Final = 3
CLIENT_MSG_ID_LEN: Final = 16
MAX_SEQ: Final = (1 << 63) - 1
#: Entries of the direct-conversation cache before it is cleared (a bound on memory).
DIRECT_CACHE_MAX: Final = 1 << 18

#: The columns :func:`message_from_row` reads, from ``messages m JOIN conversations c``.
MSG_COLUMNS: Final = (
    "m.conv, c.kind, m.seq, m.msg_id, m.sender_id, m.ts_ms, m.client_msg_id, m.content_type, m.body"
)


def run_callback(done: AppendCallback, result: AppendResult | None, error: BaseException | None) -> None:
    """Call an :meth:`~gochat.store.base.Store.append_soon` callback; a failing callback is
    logged and does not keep the callbacks after it from running."""
    try:
        done(result, error)
    except Exception:
        log.exception("append callback failed")


def resolve_ids(ids: IdGenerator | None, node_id: int) -> IdGenerator:
    """The store's ``msg_id`` generator: the process's one when given (two generators with one
    node id could hand out the same id), else a new one."""
    if ids is not None and ids.node_id != node_id:
        raise ValueError(f"ids generator has node_id {ids.node_id}, store has {node_id}")
    return ids if ids is not None else IdGenerator(node_id)


# ---- errors -----------------------------------------------------------------------------------


def unavailable(exc: BaseException, what: str = "storage unavailable") -> UnavailableError:
    err = UnavailableError(what)
    err.__cause__ = exc
    return err


def conflict_error(exc: BaseException) -> RequestError:
    """An integrity violation of one request."""
    err = RequestError("conflicting state", code=ErrorCode.CONFLICT)
    err.__cause__ = exc
    return err


def invalid_value_error(exc: BaseException) -> RequestError:
    """A value the backend cannot store (an integer outside 64 bits, an unsupported type)."""
    err = RequestError("invalid value", code=ErrorCode.BAD_REQUEST)
    err.__cause__ = exc
    return err


# ---- argument validation ------------------------------------------------------------------------


def validate_append(request: AppendRequest) -> None:
    """The checks :meth:`~gochat.store.base.Store.append` makes before queueing anything."""
    if len(request.client_msg_id) != CLIENT_MSG_ID_LEN:
        raise RequestError("client_msg_id must be 16 bytes", code=ErrorCode.BAD_REQUEST)
    if request.kind == KIND_ROOM:
        raise RequestError("room messages are not stored", code=ErrorCode.BAD_REQUEST)
    if request.kind not in (KIND_DIRECT, KIND_GROUP):
        raise RequestError("unknown conversation kind", code=ErrorCode.BAD_REQUEST)


def validate_history(from_seq: int, limit: int) -> None:
    if limit < 1 or from_seq < 0:
        raise RequestError("limit must be >= 1 and from_seq >= 0", code=ErrorCode.BAD_REQUEST)


# ---- rows -------------------------------------------------------------------------------------


def message_from_row(row: Sequence[Any], offset: int = 0) -> StoredMessage:
    """A :class:`StoredMessage` from :data:`MSG_COLUMNS`, starting at column ``offset``."""
    o = offset
    return StoredMessage(
        conv=row[o],
        kind=row[o + 1],
        seq=row[o + 2],
        msg_id=row[o + 3],
        sender_id=row[o + 4],
        ts_ms=row[o + 5],
        client_msg_id=bytes(row[o + 6]),
        content_type=row[o + 7],
        body=bytes(row[o + 8]),
    )


def new_message(req: AppendRequest, seq: int, msg_id: int, ts_ms: int) -> StoredMessage:
    """The message an append of ``req`` just stored (one per append on the writer thread:
    positional construction, and no bytes() call when the fields already are bytes)."""
    cmid = req.client_msg_id
    body = req.body
    return StoredMessage(
        req.conv,
        req.kind,
        seq,
        msg_id,
        req.sender_id,
        ts_ms,
        cmid if type(cmid) is bytes else bytes(cmid),
        req.content_type,
        body if type(body) is bytes else bytes(body),
    )


def history_page(
    rows: Sequence[Sequence[Any]], limit: int, backward: bool
) -> tuple[list[StoredMessage], bool]:
    """A history answer from up to ``limit + 1`` rows in the direction of reading (descending
    seq when ``backward``): the first ``limit`` in ascending seq order, and whether more remain."""
    page = rows[:limit]
    return [message_from_row(r) for r in (reversed(page) if backward else page)], len(rows) > limit


def direct_peer(kind: int, lo: Any, hi: Any, user_id: int) -> Any:
    """:attr:`ConversationState.peer_id`: for a direct conversation (users ``lo``, ``hi``) the
    one that is not ``user_id``; else 0."""
    return (hi if lo == user_id else lo) if kind == KIND_DIRECT else 0


# ---- counters -----------------------------------------------------------------------------------


class StoreCounters:
    """The live counters behind :class:`StoreStats` (each written by one thread or task)."""

    __slots__ = ("appended", "duplicates", "failed_transactions", "jobs", "largest_batch", "transactions")

    def __init__(self) -> None:
        self.transactions = 0
        self.appended = 0
        self.duplicates = 0
        self.jobs = 0
        self.largest_batch = 0
        self.failed_transactions = 0

    def batch(self, size: int) -> None:
        self.largest_batch = max(self.largest_batch, size)

    def values(self) -> tuple[int, int, int, int, int, int]:
        """The fields of :class:`StoreStats`, in order."""
        return (
            self.transactions,
            self.appended,
            self.duplicates,
            self.jobs,
            self.largest_batch,
            self.failed_transactions,
        )


# ---- direct conversations -----------------------------------------------------------------------


class DirectConversationCache:
    """Cached (a direct conversation never changes once created) and single-flight lookup of
    the direct conversation of two users: concurrent first calls for one pair share one
    ``lookup(lo, hi)`` (``lo <= hi``) and resume in call order.

    ``per_loop``: share a lookup only between callers on one event loop (a store used from
    several loops); otherwise the store is bound to one loop. ``check(lo, hi)`` runs on a cache
    miss, before any lookup, and may raise."""

    __slots__ = ("_cache", "_check", "_inflight", "_lookup", "_max", "_per_loop")

    def __init__(
        self,
        lookup: Callable[[int, int], Awaitable[int]],
        *,
        per_loop: bool,
        check: Callable[[int, int], None] | None = None,
        max_entries: int = DIRECT_CACHE_MAX,
    ) -> None:
        self._lookup = lookup
        self._per_loop = per_loop
        self._check = check
        self._max = max_entries
        self._cache: dict[tuple[int, int], int] = {}
        self._inflight: dict[tuple[asyncio.AbstractEventLoop | None, int, int], asyncio.Task[int]] = {}

    async def get(self, a: int, b: int) -> int:
        lo, hi = (a, b) if a <= b else (b, a)
        conv = self._cache.get((lo, hi))
        if conv is not None:
            return conv
        if self._check is not None:
            self._check(lo, hi)
        loop = asyncio.get_running_loop()
        key = (loop if self._per_loop else None, lo, hi)
        task = self._inflight.get(key)
        if task is None:
            task = loop.create_task(self._resolve(lo, hi))
            self._inflight[key] = task
            task.add_done_callback(lambda _t: self._inflight.pop(key, None))
        # shield: a cancelled caller must not cancel the lookup the others wait for
        return await asyncio.shield(task)

    async def _resolve(self, lo: int, hi: int) -> int:
        conv = await self._lookup(lo, hi)
        if len(self._cache) >= self._max:
            self._cache.clear()
        self._cache[(lo, hi)] = conv
        return conv
