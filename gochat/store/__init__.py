"""Durable storage behind the :class:`~gochat.store.base.Store` interface."""

from gochat.store.base import (
    AppendRequest,
    AppendResult,
    ConversationState,
    GroupInfo,
    RefreshStatus,
    Store,
    StoredMessage,
    UserRecord,
)

__all__ = [
    "AppendRequest",
    "AppendResult",
    "ConversationState",
    "GroupInfo",
    "RefreshStatus",
    "Store",
    "StoredMessage",
    "UserRecord",
]
