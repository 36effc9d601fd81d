"""gochat client library: an asyncio client on picows, and the HTTP account API.

::

    from gochat.client import Client, HttpApi, Kind

    async with HttpApi("http://127.0.0.1:8701") as api:
        tokens = api.token_source("alice", "secret")
        async with await Client.connect("ws://127.0.0.1:8700/ws", tokens) as client:
            await client.send(Kind.DIRECT, await api.lookup_user("bob"), "hi bob")
            async for item in client:
                print(item)

See ``docs/client.md``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from gochat.client.connection import NEWEST, Client, Item, TokenArg, new_client_msg_id
from gochat.client.discovery import Gateway, GatewayBalancer, Strategy
from gochat.client.errors import (
    ClientClosedError,
    ConnectionLostError,
    error_class_for,
    error_for,
)
from gochat.client.http import HttpApi, Tokens, TokenSource
from gochat.client.state import Backoff, SeqTracker
from gochat.client.types import (
    ConversationState,
    ConvKey,
    Event,
    HistoryResult,
    Message,
    SendAck,
)
from gochat.errors import (
    AuthError,
    ErrorCode,
    GochatError,
    ProtocolError,
    RequestError,
    UnavailableError,
)
from gochat.protocol.constants import ContentType, EventType, Kind

__all__ = [
    "NEWEST",
    "AuthError",
    "Backoff",
    "Client",
    "ClientClosedError",
    "ConnectionLostError",
    "ContentType",
    "ConvKey",
    "ConversationState",
    "ErrorCode",
    "Event",
    "EventType",
    "Gateway",
    "GatewayBalancer",
    "GochatError",
    "HistoryResult",
    "HttpApi",
    "Item",
    "Kind",
    "Message",
    "ProtocolError",
    "RequestError",
    "SendAck",
    "SeqTracker",
    "Strategy",
    "TokenArg",
    "TokenSource",
    "Tokens",
    "UnavailableError",
    "error_class_for",
    "error_for",
    "new_client_msg_id",
    "run",
]

_T = TypeVar("_T")


def run(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coro`` to completion on a new event loop, uvloop's when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
