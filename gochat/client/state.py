"""Pure client-side state machines: per-conversation sequence tracking and reconnect backoff.

Nothing here does I/O, so it is tested directly (``tests/test_client_unit.py``).
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field

from gochat.client.types import ConvKey, Message

__all__ = ["Backoff", "SeqTracker"]


@dataclass(slots=True)
class _Conv:
    #: highest seq up to which every message is accounted for (emitted, skipped or own)
    hwm: int
    #: highest seq known to exist (from DELIVER, SEND_ACK or SYNC_RESULT)
    target: int
    #: seqs above ``hwm + 1`` already received: the message to emit, or None to skip it
    ahead: dict[int, Message | None] = field(default_factory=dict)


class SeqTracker:
    """Exactly-once, in-order delivery per conversation.

    For every conversation the tracker keeps ``hwm``, the seq up to which the application has
    seen (or does not need to see) every message, and ``target``, the highest seq known to
    exist. A message with ``seq == hwm + 1`` is released at once, together with any directly
    following messages held back; a message with a larger seq is held back until the gap is
    filled; a message at or below ``hwm`` (or already held) is a duplicate and dropped.

    ``hwm < target`` means there is a gap: :meth:`gap` returns the first missing seq, which the
    client fetches with HISTORY and feeds back through :meth:`on_message`.

    Room messages (``seq == 0``) are not tracked: they pass straight through.

    A conversation the tracker has never seen starts at ``hwm = 0`` once :attr:`complete` is
    true (the tracker knows every conversation that existed before, so a new one is new in its
    entirety), and at ``seq - 1`` before that (first sight defines the starting point).
    """

    __slots__ = ("_convs", "complete")

    def __init__(self, positions: Iterable[tuple[ConvKey, int]] = (), *, complete: bool = False) -> None:
        self._convs: dict[ConvKey, _Conv] = {}
        #: True once every conversation existing when tracking started is known.
        self.complete = complete
        for key, seq in positions:
            self._convs[key] = _Conv(seq, seq)

    # -- queries -------------------------------------------------------------------------

    def __contains__(self, key: object) -> bool:
        return key in self._convs

    def __len__(self) -> int:
        return len(self._convs)

    def position(self, key: ConvKey) -> int | None:
        """The seq up to which ``key`` is accounted for, or None if the conversation is unknown."""
        c = self._convs.get(key)
        return None if c is None else c.hwm

    def positions(self) -> dict[ConvKey, int]:
        """``{(kind, conv_id): hwm}`` for every known conversation (what SYNC sends)."""
        return {k: c.hwm for k, c in self._convs.items()}

    def target(self, key: ConvKey) -> int | None:
        c = self._convs.get(key)
        return None if c is None else c.target

    def held(self, key: ConvKey) -> int:
        """How many messages of ``key`` are held back waiting for a gap to be filled."""
        c = self._convs.get(key)
        return 0 if c is None else sum(1 for m in c.ahead.values() if m is not None)

    def gap(self, key: ConvKey) -> int | None:
        """The first missing seq of ``key`` (fetch HISTORY forward from it), or None."""
        c = self._convs.get(key)
        if c is None or c.hwm >= c.target:
            return None
        return c.hwm + 1

    def gaps(self) -> list[ConvKey]:
        """Every conversation with a gap."""
        return [k for k, c in self._convs.items() if c.hwm < c.target]

    # -- updates -------------------------------------------------------------------------

    def _get(self, key: ConvKey, seq: int) -> _Conv:
        c = self._convs.get(key)
        if c is None:
            start = 0 if self.complete else max(seq - 1, 0)
            c = self._convs[key] = _Conv(start, start)
        return c

    @staticmethod
    def _drain(c: _Conv, out: list[Message]) -> None:
        ahead = c.ahead
        while ahead:
            nxt = c.hwm + 1
            if nxt not in ahead:
                break
            m = ahead.pop(nxt)
            c.hwm = nxt
            if m is not None:
                out.append(m)

    def on_message(self, msg: Message, *, emit: bool = True) -> list[Message]:
        """Account for ``msg``; return the messages now releasable, in order.

        With ``emit=False`` the seq is accounted for without ever releasing the message (the
        application already has it: its own send, or a page it fetched itself).
        """
        if msg.seq == 0:
            return [msg] if emit else []
        return self._account(msg.key, msg.seq, msg if emit else None)

    def on_own(self, key: ConvKey, seq: int) -> list[Message]:
        """Account for ``seq`` of ``key``, acknowledged to this client's own send."""
        if seq == 0:
            return []
        return self._account(key, seq, None)

    def _account(self, key: ConvKey, seq: int, msg: Message | None) -> list[Message]:
        c = self._get(key, seq)
        out: list[Message] = []
        if seq > c.target:
            c.target = seq
        if seq <= c.hwm:
            return out
        if seq == c.hwm + 1:
            c.hwm = seq
            if msg is not None:
                out.append(msg)
            c.ahead.pop(seq, None)
            self._drain(c, out)
        elif seq in c.ahead:
            if msg is None:
                # seen by the application through another path: never release it
                c.ahead[seq] = None
        else:
            c.ahead[seq] = msg
        return out

    def mark_seen(self, msg: Message) -> list[Message]:
        """The application got ``msg`` by itself (a HISTORY page it asked for).

        Advances ``hwm`` only when the message is the next one (or is held back), so a page far
        from the current position does not create a gap. Returns what became releasable.
        """
        c = self._convs.get(msg.key)
        if msg.seq == 0 or c is None or msg.seq <= c.hwm:
            return []
        if msg.seq == c.hwm + 1 or msg.seq in c.ahead:
            return self._account(msg.key, msg.seq, None)
        return []

    def note_last_seq(self, key: ConvKey, last_seq: int) -> None:
        """A SYNC_RESULT says ``key`` has messages up to ``last_seq``."""
        c = self._convs.get(key)
        if c is None:
            if not self.complete:
                # no reference point: everything up to now counts as history
                self._convs[key] = _Conv(last_seq, last_seq)
                return
            c = self._convs[key] = _Conv(0, 0)
        if last_seq > c.target:
            c.target = last_seq

    def set_baseline(self, entries: Iterable[tuple[ConvKey, int]]) -> None:
        """Take every conversation's current ``last_seq`` as already seen (a first SYNC).

        Conversations already observed keep their position and get ``last_seq`` as a target,
        so messages that raced the SYNC are fetched rather than lost. Afterwards the tracker
        is :attr:`complete`.
        """
        for key, last_seq in entries:
            c = self._convs.get(key)
            if c is None:
                self._convs[key] = _Conv(last_seq, last_seq)
            elif last_seq > c.target:
                c.target = last_seq
        self.complete = True

    def set_position(self, key: ConvKey, seq: int) -> list[Message]:
        """Declare that the application has seen ``key`` up to ``seq`` (may rewind).

        Rewinding below messages already released makes them due again: ``target`` stays, so
        :meth:`gap` reports them and the client refetches them. Returns held messages that
        became releasable (when moving forward onto them).
        """
        c = self._convs.get(key)
        if c is None:
            self._convs[key] = _Conv(seq, seq)
            return []
        c.ahead = {s: m for s, m in c.ahead.items() if s > seq}
        c.target = max(c.target, seq)
        c.hwm = seq
        out: list[Message] = []
        self._drain(c, out)
        return out

    def skip_gap(self, key: ConvKey) -> list[Message]:
        """Give up on the current gap of ``key`` (HISTORY cannot fill it): jump to the next held
        seq (or to ``target``) and return what became releasable."""
        c = self._convs.get(key)
        if c is None or c.hwm >= c.target:
            return []
        nxt = min(c.ahead) if c.ahead else c.target + 1
        c.hwm = nxt - 1
        out: list[Message] = []
        self._drain(c, out)
        return out

    def forget(self, key: ConvKey) -> None:
        """Stop tracking ``key`` (left the group)."""
        self._convs.pop(key, None)


class Backoff:
    """Exponential backoff with jitter for reconnect attempts.

    Attempt ``n`` (from 0) waits ``min(maximum, initial * factor**n)`` reduced by a random
    fraction of at most ``jitter``: with the default 0.5 the delay lies in ``[base/2, base]``,
    so clients that lost the same server spread out.
    """

    __slots__ = ("_rng", "attempts", "factor", "initial", "jitter", "maximum")

    def __init__(self, initial: float = 0.2, maximum: float = 10.0, *, factor: float = 2.0,
                 jitter: float = 0.5, rng: random.Random | None = None) -> None:
        if initial <= 0 or maximum < initial or factor < 1 or not 0 <= jitter <= 1:
            raise ValueError("invalid backoff parameters")
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self.jitter = jitter
        self.attempts = 0
        self._rng = rng or random.Random()

    def base(self, attempt: int) -> float:
        """The delay before jitter for attempt ``attempt``."""
        # cap the exponent to avoid float overflow after many attempts
        return float(min(self.maximum, self.initial * self.factor ** min(attempt, 64)))

    def next(self) -> float:
        """The delay before the next attempt; counts the attempt."""
        b = self.base(self.attempts)
        self.attempts += 1
        return b * (1.0 - self.jitter * self._rng.random())

    def spread(self, delay: float) -> float:
        """A delay the server asked for (``retry_after_ms``), lengthened by a random fraction of
        at most ``jitter``: never shorter than asked, and clients told the same delay by an
        overloaded node do not all come back at once."""
        return delay * (1.0 + self.jitter * self._rng.random())

    def reset(self) -> None:
        """A connection succeeded: start again from ``initial``."""
        self.attempts = 0
