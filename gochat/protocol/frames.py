"""Typed frames of wire protocol v1, shared by the Cython codec and its pure-Python twin.

Each class has a class attribute ``op`` and the fields of its body in layout order, then ``rid``
and ``flags`` (both default 0). Both codecs build exactly these objects, so tests compare them
with ``==``. Layouts: ``docs/protocol.md``.

The data plane does not build these per message: the gateway and fan-out read and write the
bytes through ``gochat._native.codec``'s cimportable functions. These classes serve the client,
the control plane and tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from gochat.protocol.constants import Op

__all__ = [
    "FRAME_TYPES",
    "Auth",
    "AuthOk",
    "Call",
    "CallResult",
    "Deliver",
    "Error",
    "Event",
    "Frame",
    "GoAway",
    "History",
    "HistoryResult",
    "Message",
    "Ping",
    "Pong",
    "Read",
    "ReadOk",
    "Send",
    "SendAck",
    "Subscribe",
    "SubscribeOk",
    "Sync",
    "SyncEntry",
    "SyncResult",
    "SyncResultEntry",
    "Typing",
    "Unsubscribe",
    "UnsubscribeOk",
]


@dataclass(slots=True)
class Message:
    """A message record (DELIVER body, HISTORY_RESULT entry)."""

    kind: int
    content_type: int
    conv_id: int
    seq: int
    msg_id: int
    sender_id: int
    ts_ms: int
    client_msg_id: bytes
    body: bytes


@dataclass(slots=True)
class SyncEntry:
    kind: int
    conv_id: int
    seq: int


@dataclass(slots=True)
class SyncResultEntry:
    kind: int
    conv_id: int
    last_seq: int
    read_seq: int


@dataclass(slots=True)
class Auth:
    op: ClassVar[int] = Op.AUTH
    token: str
    rid: int = 0
    flags: int = 0


@dataclass(slots=True)
class AuthOk:
    op: ClassVar[int] = Op.AUTH_OK
    user_id: int
    session_id: int
    server_time_ms: int
    heartbeat_ms: int
    max_frame: int
    rid: int = 0
    flags: int = 0


@dataclass(slots=True)
class Ping:
    op: ClassVar[int] = Op.PING
    payload: bytes = b""
    rid: int = 0
    flags: int = 0


@dataclass(slots=True)
class Pong:
    op: ClassVar[int] = Op.PONG
    payload: bytes = b""
    rid: int = 0
    flags: int = 0


@dataclass(slots=True)
class Send:
    op: ClassVar[int] = Op.SEND
    kind: int
    content_type: int
    conv_id: int
    client_msg_id: bytes
    body: bytes
    rid: int = 0
    flags: int = 0


@dataclass(slots=True)
class SendAck:
    op: ClassVar[int] = Op.SEND_ACK
    kind: int
    conv_id: int
    seq: int
    msg_id: int
    ts_ms: int
    rid: int = 0
    flags: int = 0


@dataclass(slots=True)
class Sync:
    op: ClassVar[int] = Op.SYNC
    entries: list[SyncEntry] = field(default_factory=list)
    rid: int = 0
    flags: int = 0


@dataclass(slots=True)
class SyncResult:
    op: ClassVar[int] = Op.SYNC_RESULT
    entries: list[SyncResultEntry] = field(default_factory=list)
    rid: int = 0
    flags: int = 0


@dataclass(slots=True)
class History:
    op: ClassVar[int] = Op.HISTORY
    kind: int
    conv_id: int
    from_seq: int
    limit: int
    rid: int = 0
    flags: int = 0


@dataclass(slots=True)
class HistoryResult:
    op: ClassVar[int] = Op.HISTORY_RESULT
    kind: int
    conv_id: int
    messages: list[Message] = field(default_factory=list)
    rid: int = 0
    flags: int = 0


@dataclass(slots=True)
class Read:
    op: ClassVar[int] = Op.READ
    kind: int
    conv_id: int
    seq: int
    rid: int = 0
    flags: int = 0


@dataclass(slots=True)
class ReadOk:
    op: ClassVar[int] = Op.READ_OK
    rid: int = 0
    flags: int = 0


@dataclass(slots=True)
class Subscribe:
    op: ClassVar[int] = Op.SUBSCRIBE
    room_id: int
    rid: int = 0
    flags: int = 0


@dataclass(slots=True)
class SubscribeOk:
    op: ClassVar[int] = Op.SUBSCRIBE_OK
    room_id: int
    rid: int = 0
    flags: int = 0


@dataclass(slots=True)
class Unsubscribe:
    op: ClassVar[int] = Op.UNSUBSCRIBE
    room_id: int
    rid: int = 0
    flags: int = 0


@dataclass(slots=True)
class UnsubscribeOk:
    op: ClassVar[int] = Op.UNSUBSCRIBE_OK
    room_id: int
    rid: int = 0
    flags: int = 0


@dataclass(slots=True)
class Typing:
    op: ClassVar[int] = Op.TYPING
    kind: int
    conv_id: int
    rid: int = 0
    flags: int = 0


@dataclass(slots=True)
class Call:
    op: ClassVar[int] = Op.CALL
    method: str
    payload: bytes = b""
    rid: int = 0
    flags: int = 0


@dataclass(slots=True)
class CallResult:
    op: ClassVar[int] = Op.CALL_RESULT
    payload: bytes = b""
    rid: int = 0
    flags: int = 0


@dataclass(slots=True)
class Deliver:
    op: ClassVar[int] = Op.DELIVER
    message: Message
    rid: int = 0
    flags: int = 0


@dataclass(slots=True)
class Event:
    op: ClassVar[int] = Op.EVENT
    type: int
    kind: int
    conv_id: int
    actor_id: int
    value: int
    extra: bytes = b""
    rid: int = 0
    flags: int = 0


@dataclass(slots=True)
class GoAway:
    op: ClassVar[int] = Op.GOAWAY
    code: int
    retry_after_ms: int
    url: str = ""
    reason: str = ""
    rid: int = 0
    flags: int = 0


@dataclass(slots=True)
class Error:
    op: ClassVar[int] = Op.ERROR
    code: int
    retry_after_ms: int = 0
    message: str = ""
    rid: int = 0
    flags: int = 0


Frame = (
    Auth | AuthOk | Ping | Pong | Send | SendAck | Sync | SyncResult | History | HistoryResult
    | Read | ReadOk | Subscribe | SubscribeOk | Unsubscribe | UnsubscribeOk | Typing | Call
    | CallResult | Deliver | Event | GoAway | Error
)

#: op code -> frame class
FRAME_TYPES: dict[int, type] = {
    cls.op: cls  # type: ignore[attr-defined]
    for cls in (
        Auth, AuthOk, Ping, Pong, Send, SendAck, Sync, SyncResult, History, HistoryResult, Read,
        ReadOk, Subscribe, SubscribeOk, Unsubscribe, UnsubscribeOk, Typing, Call, CallResult,
        Deliver, Event, GoAway, Error,
    )
}
