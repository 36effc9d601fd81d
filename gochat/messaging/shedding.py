"""Load shedding: past the node's capacity a SEND is answered OVERLOADED instead of queued.

A SEND's commit wait is estimated as the SENDs in flight ahead of it over the rate at which
SENDs are being answered (the better of the last two windows of ``RATE_WINDOW_S``: one slow
commit, a checkpoint or a GC pass, must not make a node below its capacity shed; a real overload
or a stalled store shows in both). Above ``overload_send_latency_ms`` the SEND is shed. Shedding
keeps the latency of accepted SENDs bounded where an unbounded queue would make every SEND late;
nothing shed was acknowledged. A node busy for less than the limit is not judged, so a burst into
an idle node is kept (docs/architecture.md, "Overload").
"""

from __future__ import annotations

import asyncio

__all__ = ["SHED_MIN_IN_FLIGHT", "SendAccounting"]

#: load shedding judges a SEND only with at least this many in flight, so that a moderate
#: load is never shed
SHED_MIN_IN_FLIGHT = 1024
RATE_WINDOW_S = 0.25


class SendAccounting:
    """SENDs in flight (handed to the send path, not yet answered), the answer rate, and the
    shedding decision; :meth:`settled` lets a drain wait for the last one."""

    __slots__ = (
        "_answer_rate",
        "_answer_rate_before",
        "_answered",
        "_idle",
        "_in_flight_since",
        "_rate_base",
        "_rate_since",
        "_shed_after_s",
        "in_flight",
    )

    def __init__(self, overload_send_latency_ms: float) -> None:
        self._shed_after_s = overload_send_latency_ms / 1000
        self.in_flight = 0
        self._idle: asyncio.Future[None] | None = None
        self._answered = 0
        self._answer_rate = 0.0
        self._answer_rate_before = 0.0
        self._rate_since = 0.0
        self._rate_base = 0
        #: when the node last went from no SEND in flight to some
        self._in_flight_since = 0.0

    def set_shed_after_ms(self, overload_send_latency_ms: float) -> None:
        """A new ``overload_send_latency_ms`` (hot reload; 0: never shed)."""
        self._shed_after_s = overload_send_latency_ms / 1000

    def started(self, now: float) -> None:
        if not self.in_flight:
            self._in_flight_since = now
        self.in_flight += 1

    def settled(self) -> None:
        """A SEND left the node's hands without an answer being counted (e.g. it moved from a
        backlog to the store, which answers it later)."""
        self.in_flight -= 1
        if not self.in_flight and self._idle is not None:
            self._idle.set_result(None)
            self._idle = None

    def answered(self, now: float) -> None:
        """A SEND was answered after its commit (or its commit failed)."""
        self.settled()
        self._answered += 1
        if now - self._rate_since >= RATE_WINDOW_S:
            self._measure(now)

    def shed_delay_ms(self, now: float) -> int:
        """Non-zero (a retry delay in ms) when a new SEND is to be shed."""
        if self.in_flight < SHED_MIN_IN_FLIGHT or not self._shed_after_s:
            return 0
        if now - self._rate_since >= RATE_WINDOW_S:
            self._measure(now)  # also while nothing is answered: a stalled store
        if now - self._in_flight_since <= self._shed_after_s:
            return 0
        wait = self.in_flight / max(self._answer_rate, self._answer_rate_before, 1.0)
        if wait <= self._shed_after_s:
            return 0
        return min(5000, max(100, int(wait * 1000)))

    def _measure(self, now: float) -> None:
        self._answer_rate_before = self._answer_rate
        self._answer_rate = (self._answered - self._rate_base) / (now - self._rate_since)
        self._rate_since = now
        self._rate_base = self._answered

    async def all_settled(self) -> None:
        """Wait until every SEND in flight has been answered."""
        while self.in_flight:
            if self._idle is None:
                self._idle = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._idle)
