"""Wire protocol v1: constants, typed frames and the codec (``docs/protocol.md``).

The codec has two implementations with one API: the Cython module ``gochat._native.codec`` and
its pure-Python twin ``gochat.protocol._codec_py``. The choice is made once, at import:

- ``GOCHAT_NO_EXTENSIONS=1`` in the environment selects the twin;
- otherwise the native module, and if it cannot be imported (not built), the twin with one
  warning on the ``gochat.protocol`` logger.

``IMPLEMENTATION`` says which one is in use ("native" or "python"). Tests that need a specific
one call :func:`native_codec` or :func:`python_codec`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from typing import Final, Protocol

from gochat.protocol import _codec_py
from gochat.protocol.constants import (
    ALLOWED_FLAGS,
    CLIENT_MSG_ID_SIZE,
    CLIENT_OPS,
    DEFAULT_MAX_FRAME,
    EVENT_FIXED_SIZE,
    FLAG_BACKWARD,
    FLAG_DUPLICATE,
    FLAG_MORE,
    FLAG_PARTIAL,
    FLAG_STOPPED,
    FLAG_TRACED,
    HEADER_SIZE,
    MAX_HISTORY_LIMIT,
    MAX_METHOD,
    MAX_PING_PAYLOAD,
    MAX_TOKEN,
    MESSAGE_RECORD_SIZE,
    SEND_FIXED_SIZE,
    SYNC_ENTRY_SIZE,
    SYNC_RESULT_ENTRY_SIZE,
    TRACEPARENT_SIZE,
    VERSION,
    ContentType,
    EventType,
    Kind,
    Op,
)
from gochat.protocol.frames import (
    FRAME_TYPES,
    Auth,
    AuthOk,
    Call,
    CallResult,
    Deliver,
    Error,
    Event,
    Frame,
    GoAway,
    History,
    HistoryResult,
    Message,
    Ping,
    Pong,
    Read,
    ReadOk,
    Send,
    SendAck,
    Subscribe,
    SubscribeOk,
    Sync,
    SyncEntry,
    SyncResult,
    SyncResultEntry,
    Typing,
    Unsubscribe,
    UnsubscribeOk,
)

__all__ = [
    "ALLOWED_FLAGS", "CLIENT_MSG_ID_SIZE", "CLIENT_OPS", "DEFAULT_MAX_FRAME", "EVENT_FIXED_SIZE",
    "FLAG_BACKWARD", "FLAG_DUPLICATE", "FLAG_MORE", "FLAG_PARTIAL", "FLAG_STOPPED", "FLAG_TRACED",
    "FRAME_TYPES", "HEADER_SIZE", "IMPLEMENTATION", "MAX_HISTORY_LIMIT", "MAX_METHOD", "MAX_PING_PAYLOAD",
    "MAX_TOKEN", "MESSAGE_RECORD_SIZE", "SEND_FIXED_SIZE", "SYNC_ENTRY_SIZE", "SYNC_RESULT_ENTRY_SIZE",
    "TRACEPARENT_SIZE", "VERSION",
    "Auth", "AuthOk", "BytesLike", "Call", "CallResult", "Codec", "ContentType", "Deliver", "Error",
    "Event", "EventType", "Frame", "GoAway", "History", "HistoryResult", "Kind", "Message", "Op",
    "Ping", "Pong", "Read", "ReadOk", "Send", "SendAck", "Subscribe", "SubscribeOk", "Sync",
    "SyncEntry", "SyncResult", "SyncResultEntry", "Typing", "Unsubscribe", "UnsubscribeOk",
    "decode", "encode", "encode_deliver", "encode_error", "encode_event", "encode_many",
    "encode_send_ack", "iter_frames", "native_codec", "peek_header", "python_codec",
]

BytesLike = bytes | bytearray | memoryview

logger = logging.getLogger("gochat.protocol")


class Codec(Protocol):
    """The API both codec modules provide (a module satisfies this protocol)."""

    def encode(self, frame: Frame) -> bytes: ...
    def encode_many(self, frames: Iterable[Frame]) -> bytes: ...
    def decode(self, data: BytesLike, max_frame: int = ...) -> list[Frame]: ...
    def iter_frames(self, data: BytesLike, max_frame: int = ...) -> Iterator[Frame]: ...
    def peek_header(self, data: BytesLike, offset: int = ...) -> tuple[int, int, int, int, int]: ...
    def encode_deliver(
        self, kind: int, content_type: int, conv_id: int, seq: int, msg_id: int, sender_id: int,
        ts_ms: int, client_msg_id: BytesLike, body: BytesLike,
    ) -> bytes: ...
    def encode_send_ack(
        self, rid: int, flags: int, kind: int, conv_id: int, seq: int, msg_id: int, ts_ms: int
    ) -> bytes: ...
    def encode_error(self, rid: int, code: int, retry_after_ms: int, message: str) -> bytes: ...
    def encode_event(
        self, type: int, kind: int, conv_id: int, actor_id: int, value: int, extra: BytesLike = ...
    ) -> bytes: ...


def native_codec() -> Codec:
    """The Cython codec; ImportError if the extension is not built."""
    from gochat._native import codec

    return codec


def python_codec() -> Codec:
    """The pure-Python twin."""
    return _codec_py


def _select() -> tuple[Codec, str]:
    # Same switch semantics as setup.py: unset, "", "0", "false" and "no" mean off.
    if os.environ.get("GOCHAT_NO_EXTENSIONS", "") not in ("", "0", "false", "no"):
        return _codec_py, "python"
    try:
        return native_codec(), "native"
    except ImportError as exc:
        logger.warning("native codec unavailable (%s): using the pure-Python codec", exc)
        return _codec_py, "python"


_codec, _implementation = _select()
#: "native" or "python": the codec behind the functions below.
IMPLEMENTATION: Final[str] = _implementation

encode = _codec.encode
encode_many = _codec.encode_many
decode = _codec.decode
iter_frames = _codec.iter_frames
peek_header = _codec.peek_header
encode_deliver = _codec.encode_deliver
encode_send_ack = _codec.encode_send_ack
encode_error = _codec.encode_error
encode_event = _codec.encode_event
