"""The client's event stream: the queue of :class:`~gochat.client.types.Message` and
:class:`~gochat.client.types.Event` items the application reads with ``async for`` and
:meth:`Client.next_event`, and its end marker once the client is closed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any, Final

from gochat.client.transport import Link
from gochat.client.types import Event, Message

__all__ = ["EventStream", "Item"]

#: What the event stream yields.
Item = Message | Event

_CLOSED: Final = object()


class EventStream:
    """Items in arrival order; ends (after the items already queued) when the client closes."""

    __slots__ = ("_link", "_queue")

    def __init__(self, link: Link) -> None:
        self._link = link
        self._queue: asyncio.Queue[Any] = asyncio.Queue()

    def __len__(self) -> int:
        return self._queue.qsize()

    def emit(self, items: Iterable[Item]) -> None:
        """Append ``items`` (the hot path: every delivered message comes through here)."""
        put = self._queue.put_nowait
        for it in items:
            put(it)

    def end(self) -> None:
        """The client closed: readers get its error once the queued items are consumed."""
        self._queue.put_nowait(_CLOSED)

    async def next(self, timeout: float | None) -> Item:
        """The next item (see :meth:`Client.next_event`)."""
        queue = self._queue
        if queue.empty() and self._link.closed:
            raise self._link.closed_error()
        if timeout is None:
            item = await queue.get()
        else:
            item = await asyncio.wait_for(queue.get(), timeout)
        if item is _CLOSED:
            queue.put_nowait(_CLOSED)
            raise self._link.closed_error()
        return item  # type: ignore[no-any-return]
