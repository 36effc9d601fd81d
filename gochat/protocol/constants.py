"""Wire protocol v1 constants: see ``docs/protocol.md``."""

from __future__ import annotations

import enum
from typing import Final

VERSION: Final = 1
HEADER_SIZE: Final = 12
#: Default maximum frame size (header included); servers announce theirs in AUTH_OK.
DEFAULT_MAX_FRAME: Final = 65536
MAX_TOKEN: Final = 4096
MAX_PING_PAYLOAD: Final = 64
MAX_METHOD: Final = 64
MAX_HISTORY_LIMIT: Final = 1000
CLIENT_MSG_ID_SIZE: Final = 16
#: Fixed part of a message record (DELIVER body, HISTORY_RESULT entry).
MESSAGE_RECORD_SIZE: Final = 62
SEND_FIXED_SIZE: Final = 26
EVENT_FIXED_SIZE: Final = 26
SYNC_ENTRY_SIZE: Final = 17
SYNC_RESULT_ENTRY_SIZE: Final = 25
#: A W3C traceparent of version 00 ("00-<32 hex>-<16 hex>-<2 hex>"), prefixed to a TRACED SEND's body.
TRACEPARENT_SIZE: Final = 55


class Op(enum.IntEnum):
    AUTH = 0x01
    PING = 0x02
    SEND = 0x03
    SYNC = 0x04
    HISTORY = 0x05
    READ = 0x06
    SUBSCRIBE = 0x07
    UNSUBSCRIBE = 0x08
    TYPING = 0x09
    CALL = 0x0A
    AUTH_OK = 0x81
    PONG = 0x82
    SEND_ACK = 0x83
    SYNC_RESULT = 0x84
    HISTORY_RESULT = 0x85
    READ_OK = 0x86
    SUBSCRIBE_OK = 0x87
    UNSUBSCRIBE_OK = 0x88
    CALL_RESULT = 0x8A
    DELIVER = 0x40
    EVENT = 0x41
    GOAWAY = 0x42
    ERROR = 0x7F


#: Operations a client may send.
CLIENT_OPS: Final = frozenset(
    {Op.AUTH, Op.PING, Op.SEND, Op.SYNC, Op.HISTORY, Op.READ, Op.SUBSCRIBE, Op.UNSUBSCRIBE, Op.TYPING, Op.CALL}
)


class Kind(enum.IntEnum):
    """Conversation kind."""

    DIRECT = 1
    GROUP = 2
    ROOM = 3


class ContentType(enum.IntEnum):
    BINARY = 0
    TEXT = 1
    JSON = 2


class EventType(enum.IntEnum):
    PRESENCE = 1
    TYPING = 2
    READ = 3
    MEMBER_ADDED = 4
    MEMBER_REMOVED = 5
    CONVERSATION_UPDATED = 6
    DEGRADED = 7
    RESYNC = 8


# Flag bits, per operation.
FLAG_TRACED: Final = 0x0001  # SEND: the body starts with a W3C traceparent (TRACEPARENT_SIZE bytes)
FLAG_DUPLICATE: Final = 0x0001  # SEND_ACK: a retry of an already acknowledged send
FLAG_BACKWARD: Final = 0x0001  # HISTORY: newest `limit` messages at or below from_seq
FLAG_MORE: Final = 0x0001  # HISTORY_RESULT: more messages remain in that direction
FLAG_PARTIAL: Final = 0x0002  # HISTORY_RESULT, SYNC_RESULT: answered from cache (degraded)
FLAG_STOPPED: Final = 0x0001  # TYPING: the user stopped typing

#: Flag bits each operation defines; any other bit set is BAD_FLAGS.
ALLOWED_FLAGS: Final[dict[int, int]] = {op: 0 for op in Op}
ALLOWED_FLAGS[Op.SEND] = FLAG_TRACED
ALLOWED_FLAGS[Op.SEND_ACK] = FLAG_DUPLICATE
ALLOWED_FLAGS[Op.HISTORY] = FLAG_BACKWARD
ALLOWED_FLAGS[Op.HISTORY_RESULT] = FLAG_MORE | FLAG_PARTIAL
ALLOWED_FLAGS[Op.SYNC_RESULT] = FLAG_PARTIAL
ALLOWED_FLAGS[Op.TYPING] = FLAG_STOPPED
