"""The newest DELIVERs this node passed to its sessions, per conversation: what a cache-only
node answers HISTORY from while the database is out of reach (docs/resilience.md).

The frames are the encoded DELIVER bytes the node fans out anyway (no copy, no decoding on the
way in: one deque append per DELIVER). They are decoded only to answer a HISTORY in
cache-only mode. Keys are those of the order gate (:class:`~gochat.messaging.delivery.
LocalDelivery`): a group's id, or (the viewer's conv_id, the viewer) for a direct
conversation, which is exactly what that viewer names in HISTORY. Bounded: ``per_conv``
frames a conversation, ``max_bytes`` in all (the conversations seen longest ago go first).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Any

from gochat.protocol import decode
from gochat.protocol.frames import Deliver, Message

__all__ = ["RECENT_MAX_BYTES", "RECENT_PER_CONV", "RecentMessages"]

#: DELIVERs kept per conversation (a client's first HISTORY page is usually 20–50)
RECENT_PER_CONV = 64
#: bytes of frames kept in all
RECENT_MAX_BYTES = 32 << 20


class RecentMessages:
    __slots__ = ("_convs", "bytes", "max_bytes", "per_conv")

    def __init__(self, per_conv: int = RECENT_PER_CONV, max_bytes: int = RECENT_MAX_BYTES) -> None:
        self.per_conv = per_conv
        self.max_bytes = max_bytes
        self.bytes = 0
        self._convs: OrderedDict[Any, deque[bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._convs)

    def add(self, key: Any, frame: bytes) -> None:
        """Keep ``frame`` (a DELIVER, delivered in seq order for ``key``)."""
        frames = self._convs.get(key)
        if frames is None:
            frames = self._convs[key] = deque()
        elif len(frames) >= self.per_conv:
            self.bytes -= len(frames.popleft())
        frames.append(frame)
        self.bytes += len(frame)
        while self.bytes > self.max_bytes and self._convs:
            _, gone = self._convs.popitem(last=False)
            self.bytes -= sum(map(len, gone))

    def last_seq(self, key: Any) -> int:
        """The newest seq kept for ``key`` (0: none)."""
        frames = self._convs.get(key)
        return _seq(frames[-1]) if frames else 0

    def history(self, key: Any, from_seq: int, limit: int, backward: bool) -> tuple[list[Message], bool]:
        """Messages of ``key`` as a HISTORY would list them (ascending seq): with ``backward``
        the newest ``limit`` at or below ``from_seq``, else the oldest ``limit`` at or above it.
        Returns (messages, more: others kept past the page in that direction)."""
        frames = list(self._convs.get(key, ()))
        if backward:
            chosen = [f for f in frames if _seq(f) <= from_seq]
            page, more = chosen[-limit:], len(chosen) > limit
        else:
            chosen = [f for f in frames if _seq(f) >= from_seq]
            page, more = chosen[:limit], len(chosen) > limit
        out = []
        for frame in page:
            deliver = decode(frame, 16 << 20)[0]
            assert isinstance(deliver, Deliver)
            out.append(deliver.message)
        return out, more


def _seq(frame: bytes) -> int:
    # the DELIVER's message record starts at 12: kind @0, content_type @1, conv_id @2, seq @10
    return int.from_bytes(frame[22:30], "little")
