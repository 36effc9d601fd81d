"""The Store seam: durable users, tokens, conversations and messages.

Implementations: :mod:`gochat.store.sqlite` (embedded, WAL, one writer thread with group
commit) and :mod:`gochat.store.postgres` (cluster, asyncpg, group commit). The same behaviour
tests run against every implementation. The store never touches a socket and never parses wire
bytes.

The contract is split by concern, so that code can depend on the part it uses:
:class:`StoreLifecycle` (open, close, ping, stats), :class:`UserStore`, :class:`TokenStore`
(refresh tokens and the access-token deny-list), :class:`ConversationStore` and
:class:`MessageStore`. :class:`Store` is all of them.

Conversation identity inside the store is ``conv`` (an internal u64). A group's wire id is its
``conv``. A direct conversation between users A and B has one ``conv`` too; on the wire it is
addressed by the *peer's* user id, a mapping that the messaging core does
(:meth:`Store.direct_conversation`, :attr:`ConversationState.peer_id`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeAlias, runtime_checkable

from gochat.errors import ErrorCode, GochatError

__all__ = [
    "AppendCallback",
    "AppendRequest",
    "AppendResult",
    "ConversationState",
    "ConversationStore",
    "GroupInfo",
    "MessageStore",
    "RefreshStatus",
    "StaleFenceError",
    "Store",
    "StoreLifecycle",
    "StoreStats",
    "StoredMessage",
    "TokenStore",
    "UserRecord",
    "UserStore",
]


@dataclass(frozen=True, slots=True)
class UserRecord:
    user_id: int
    username: str
    password_hash: str
    created_ms: int


@dataclass(slots=True)  # not frozen: a frozen __init__ costs ~1 µs per message; never mutated
class StoredMessage:
    conv: int
    kind: int
    seq: int
    msg_id: int
    sender_id: int
    ts_ms: int
    client_msg_id: bytes
    content_type: int
    body: bytes


@dataclass(slots=True)  # not frozen (~1 µs per message); the store owns it once queued
class AppendRequest:
    """One message to persist. ``conv`` is the internal conversation id.

    Once handed to :meth:`Store.append` or :meth:`Store.append_soon` the store owns it (a
    writer thread may read it later): callers must not change it.
    """

    conv: int
    kind: int
    sender_id: int
    client_msg_id: bytes
    content_type: int
    body: bytes


@dataclass(slots=True)  # not frozen: a frozen __init__ costs ~1 µs per message; never mutated
class AppendResult:
    message: StoredMessage
    #: True when (sender_id, client_msg_id) was already stored: ``message`` is the original.
    duplicate: bool


#: ``done(result, error)``: exactly one of the two is None.
@dataclass(frozen=True, slots=True)
class StoreStats:
    """Counters (a snapshot). ``transactions`` counts committed write transactions; under
    concurrency it is far below ``appended`` (group commit)."""

    transactions: int
    appended: int
    duplicates: int
    jobs: int
    largest_batch: int
    failed_transactions: int


AppendCallback: TypeAlias = Callable[["AppendResult | None", "BaseException | None"], None]


@dataclass(frozen=True, slots=True)
class ConversationState:
    """One conversation as seen by one user (SYNC, conversation list)."""

    conv: int
    kind: int
    #: For a direct conversation, the other user's id (the wire conv_id); else 0.
    peer_id: int
    last_seq: int
    read_seq: int
    name: str


@dataclass(frozen=True, slots=True)
class GroupInfo:
    conv: int
    name: str
    owner_id: int
    created_ms: int
    members: tuple[int, ...]
    last_seq: int


class StaleFenceError(GochatError):
    """A membership write carried a fence below the one the group has stored: it was made
    under a lock that has expired and been taken by a later holder since (docs/consistency.md
    § Distributed locks, Fencing). Nothing was changed. UNAVAILABLE (501, retryable): the
    caller may take the lock again and retry."""

    code = ErrorCode.UNAVAILABLE

    def __init__(self, conv: int, fence: int, stored: int) -> None:
        super().__init__(f"stale fence {fence} for group {conv} (it has accepted fence {stored})")
        self.conv = conv
        self.fence = fence
        self.stored = stored


class RefreshStatus:
    """Outcome of :meth:`TokenStore.use_refresh_token`."""

    OK = "ok"  #: valid and now spent
    REUSED = "reused"  #: already spent: the caller must revoke the family
    REVOKED = "revoked"  #: family revoked
    UNKNOWN = "unknown"  #: never issued, or expired and purged


@runtime_checkable
class StoreLifecycle(Protocol):
    """Opening, closing and probing a store (``ping`` raises
    :class:`gochat.errors.UnavailableError` when the backend cannot be reached)."""

    async def open(self) -> None:
        """Create or migrate the schema and start background work."""

    async def close(self) -> None:
        """Flush pending appends (they commit, their waiters get results) and release resources."""

    @property
    def stats(self) -> StoreStats:
        """A snapshot of the write counters (transactions, appends, largest batch, ...)."""

    async def ping(self) -> None:
        """Raise UnavailableError if the backend is unreachable (readiness probe)."""


@runtime_checkable
class UserStore(Protocol):
    """Accounts. Every method may raise :class:`gochat.errors.UnavailableError` when the
    backend cannot be reached; nothing is acknowledged in that case."""

    async def create_user(self, username: str, password_hash: str) -> int:
        """Insert a user; raise ``RequestError(code=CONFLICT)`` if the name is taken."""

    async def get_user(self, user_id: int) -> UserRecord | None: ...

    async def get_user_by_name(self, username: str) -> UserRecord | None: ...


@runtime_checkable
class TokenStore(Protocol):
    """Refresh tokens (rotation, reuse detection) and the access-token deny-list.
    Every method may raise :class:`gochat.errors.UnavailableError` when the backend cannot be
    reached; nothing is acknowledged in that case."""

    async def add_refresh_token(self, jti: str, family: str, user_id: int, expires_ms: int) -> None: ...

    async def use_refresh_token(self, jti: str, now_ms: int) -> tuple[str, str, int]:
        """Spend a refresh token atomically: returns (RefreshStatus, family, user_id).

        Family and user id are returned for REUSED/REVOKED too (empty / 0 for UNKNOWN).
        """

    async def revoke_family(self, family: str) -> None: ...

    async def revoke_user_tokens(self, user_id: int) -> None:
        """Revoke every refresh-token family of the user."""

    async def revoke_jti(self, jti: str, expires_ms: int) -> None:
        """Deny-list an access token id until it expires anyway."""

    async def revoked_jtis(self, now_ms: int) -> dict[str, int]:
        """All deny-listed access token ids not yet expired: jti -> expires_ms."""


@runtime_checkable
class ConversationStore(Protocol):
    """Direct conversations, groups and membership. Every method may raise
    :class:`gochat.errors.UnavailableError` when the backend cannot be reached; nothing is
    acknowledged in that case."""

    async def direct_conversation(self, a: int, b: int) -> int:
        """The conv of the direct conversation between users a and b, created on first use.

        Raises ``RequestError(code=NOT_FOUND)`` if either user does not exist.
        """

    async def create_group(self, owner_id: int, name: str, members: list[int]) -> GroupInfo:
        """Create a group with the owner and ``members`` (unknown users: NOT_FOUND)."""

    async def group_info(self, conv: int) -> GroupInfo | None: ...

    async def add_member(self, conv: int, user_id: int, fence: int | None = None) -> bool:
        """True if added, False if already a member.

        ``fence``: the fence of the lock ``group:{conv}`` the caller holds (None: unchecked).
        The write is applied only if ``fence`` is at least the group's stored fence, which it
        then becomes (same transaction, whether or not the membership changed); a lower one
        raises :class:`StaleFenceError` and changes nothing."""

    async def remove_member(self, conv: int, user_id: int, fence: int | None = None) -> bool:
        """True if removed, False if not a member. ``fence`` as for :meth:`add_member`."""

    async def members(self, conv: int) -> tuple[int, ...]:
        """Members of a group or the two users of a direct conversation (empty if unknown)."""

    async def members_versioned(self, conv: int) -> tuple[int, tuple[int, ...]]:
        """(membership version, members) of a group, read together (one snapshot): the
        version starts at 1 and grows by one with every add_member/remove_member that changed
        the membership. (0, ()) for an unknown conversation."""

    async def conversation_kind(self, conv: int) -> int | None:
        """1 direct, 2 group, or None if there is no such conversation."""

    async def conversations(self, user_id: int) -> list[ConversationState]:
        """Every conversation the user is in, with last_seq and the user's read_seq."""

    async def recent_groups(self, limit: int, scan: int = 100_000) -> list[int]:
        """The ids of at most ``limit`` groups with the most recent messages, the most recent
        first, judged by the newest ``scan`` messages (by ``msg_id``, which grows with time):
        bounded work whatever the store's size; a group without a message among them is not
        listed. For the cache warm-up of a starting node."""


@runtime_checkable
class MessageStore(Protocol):
    """Appends (group commit), history and read positions. Every method may raise
    :class:`gochat.errors.UnavailableError` when the backend cannot be reached; nothing is
    acknowledged in that case."""

    async def append(self, request: AppendRequest) -> AppendResult:
        """Persist one message durably (group commit: concurrent calls share one transaction).

        Assigns ``seq`` = conversation's last_seq + 1, a unique ``msg_id`` and ``ts_ms`` in the
        same transaction as the insert. Idempotent on (sender_id, client_msg_id): a repeat
        returns the original with ``duplicate=True``. Returns only after commit.
        """

    def append_soon(self, request: AppendRequest, done: AppendCallback) -> None:
        """:meth:`append` without a coroutine, a Task or a Future (the SEND fast path).

        Enqueues ``request`` before returning (so call order is queue order is seq order) and
        calls ``done(result, None)`` or ``done(None, error)`` on the event loop that opened the
        store, after the commit, in queue order. Validation and admission failures (closed,
        queue full) raise here and nothing is queued.
        """

    async def history(
        self, conv: int, from_seq: int, limit: int, backward: bool
    ) -> tuple[list[StoredMessage], bool]:
        """Messages in ascending seq order and whether more remain in that direction.

        Forward: seq >= from_seq, the first ``limit``. Backward: seq <= from_seq (0 = latest), the
        last ``limit``, still returned ascending.
        """

    async def set_read(self, conv: int, user_id: int, seq: int) -> int:
        """Move the user's read position forward (never back, capped at last_seq); return it."""


@runtime_checkable
class Store(StoreLifecycle, UserStore, TokenStore, ConversationStore, MessageStore, Protocol):
    """Durable state: every part of the contract. Every method may raise
    :class:`gochat.errors.UnavailableError` when the backend cannot be reached; nothing is
    acknowledged in that case.

    Code that needs only a part should depend on that part (:class:`UserStore`,
    :class:`TokenStore`, :class:`ConversationStore`, :class:`MessageStore`,
    :class:`StoreLifecycle`); both stores satisfy each of them."""
