"""Value objects the client hands to applications."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from gochat.protocol.constants import ContentType, EventType, Kind
from gochat.protocol.frames import Event as EventFrame
from gochat.protocol.frames import Message as MessageRecord

__all__ = ["ConvKey", "ConversationState", "Event", "HistoryResult", "Message", "SendAck"]

#: A conversation as the client sees it: ``(kind, conv_id)``; ``conv_id`` of a direct
#: conversation is the peer's user id.
ConvKey = tuple[int, int]


@dataclass(frozen=True, slots=True)
class Message:
    """A stored (or, for rooms, broadcast) message, from DELIVER or HISTORY_RESULT.

    ``seq`` grows by exactly 1 per conversation from 1 (0 for room messages); ``conv_id`` of a
    direct conversation is the peer's user id from this user's side.
    """

    kind: int
    conv_id: int
    seq: int
    msg_id: int
    sender_id: int
    ts_ms: int
    client_msg_id: bytes
    content_type: int
    body: bytes

    @classmethod
    def from_record(cls, rec: MessageRecord) -> Message:
        """Build from a codec message record."""
        return cls(rec.kind, rec.conv_id, rec.seq, rec.msg_id, rec.sender_id, rec.ts_ms,
                   bytes(rec.client_msg_id), rec.content_type, bytes(rec.body))

    @property
    def key(self) -> ConvKey:
        """``(kind, conv_id)``."""
        return (self.kind, self.conv_id)

    @property
    def text(self) -> str:
        """The body decoded as UTF-8 (invalid bytes replaced), whatever the content type."""
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        """The body parsed as JSON (raises ``orjson.JSONDecodeError`` if it is not)."""
        return orjson.loads(self.body)

    @property
    def is_text(self) -> bool:
        return self.content_type == ContentType.TEXT

    @property
    def is_room(self) -> bool:
        return self.kind == Kind.ROOM


@dataclass(frozen=True, slots=True)
class Event:
    """A server push that is not a message (EVENT frame): presence, typing, read receipts,
    membership changes, conversation updates or an application-defined event (type 128-255).

    ``kind``/``conv_id`` are 0 when the event is not about a conversation (presence).
    """

    type: int
    kind: int
    conv_id: int
    actor_id: int
    value: int
    extra: bytes = b""

    @classmethod
    def from_frame(cls, f: EventFrame) -> Event:
        return cls(f.type, f.kind, f.conv_id, f.actor_id, f.value, bytes(f.extra))

    @property
    def key(self) -> ConvKey:
        return (self.kind, self.conv_id)

    @property
    def type_name(self) -> str:
        """``"PRESENCE"``, ``"TYPING"``, ... or ``"EVENT_<n>"`` for other types."""
        try:
            return EventType(self.type).name
        except ValueError:
            return f"EVENT_{self.type}"

    def json(self) -> Any:
        """``extra`` parsed as JSON; ``{}`` when empty."""
        return orjson.loads(self.extra) if self.extra else {}


@dataclass(frozen=True, slots=True)
class SendAck:
    """The server's acknowledgement of a SEND: the message is durable under ``seq``/``msg_id``.

    ``duplicate`` is true when the server had already stored this ``client_msg_id`` (a retry
    after a reconnect); ``seq``, ``msg_id`` and ``ts_ms`` are then the original ones.
    """

    kind: int
    conv_id: int
    seq: int
    msg_id: int
    ts_ms: int
    client_msg_id: bytes
    duplicate: bool = False

    @property
    def key(self) -> ConvKey:
        return (self.kind, self.conv_id)


@dataclass(frozen=True, slots=True)
class HistoryResult:
    """One HISTORY page; ``more`` means more messages remain in the direction asked for;
    ``partial`` that a degraded node answered from its cache (messages may be missing: ask
    again later)."""

    kind: int
    conv_id: int
    messages: list[Message] = field(default_factory=list)
    more: bool = False
    partial: bool = False


@dataclass(frozen=True, slots=True)
class ConversationState:
    """A SYNC_RESULT entry: the conversation's newest seq and this user's read position."""

    kind: int
    conv_id: int
    last_seq: int
    read_seq: int

    @property
    def key(self) -> ConvKey:
        return (self.kind, self.conv_id)
