"""Durable storage behind the :class:`~gochat.store.base.Store` interface (and its parts:
:class:`~gochat.store.base.UserStore`, :class:`~gochat.store.base.TokenStore`,
:class:`~gochat.store.base.ConversationStore`, :class:`~gochat.store.base.MessageStore`,
:class:`~gochat.store.base.StoreLifecycle`).

Implementations: :mod:`gochat.store.sqlite` and :mod:`gochat.store.postgres`; helpers they share
are in :mod:`gochat.store.common`."""

from gochat.store.base import (
    AppendRequest,
    AppendResult,
    ConversationState,
    ConversationStore,
    GroupInfo,
    MessageStore,
    RefreshStatus,
    Store,
    StoredMessage,
    StoreLifecycle,
    TokenStore,
    UserRecord,
    UserStore,
)

__all__ = [
    "AppendRequest",
    "AppendResult",
    "ConversationState",
    "ConversationStore",
    "GroupInfo",
    "MessageStore",
    "RefreshStatus",
    "Store",
    "StoreLifecycle",
    "StoredMessage",
    "TokenStore",
    "UserRecord",
    "UserStore",
]
