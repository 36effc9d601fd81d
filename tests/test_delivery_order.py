"""The order gate of LocalDelivery: on one node, each conversation's DELIVERs reach the sessions
in strictly increasing seq order, whatever order they arrive in from the node's own commits and
from other nodes (docs/consistency.md, "Delivery order")."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gochat.messaging.delivery import LocalDelivery
from gochat.protocol import Kind, encode_deliver, encode_event
from tests.conftest import run

HOLD_S = 0.05


class _Routing:
    """The native routing table's fanout_users, reduced to a log of (user_ids, seq)."""

    def __init__(self) -> None:
        self.out: list[tuple[tuple[int, ...], int]] = []

    def fanout_users(self, user_ids: Any, data: bytes, skip: Any, droppable: bool) -> int:
        seq = int.from_bytes(data[22:30], "little") if data[5] == 0x40 else -1
        self.out.append((tuple(user_ids), seq))
        return len(user_ids)


def _deliver(seq: int, conv: int = 50, kind: int = Kind.GROUP) -> bytes:
    return encode_deliver(kind, 1, conv, seq, 1000 + seq, 7, 0, b"\0" * 16, b"x")


def _gate(hold_s: float = HOLD_S) -> tuple[LocalDelivery, _Routing]:
    routing = _Routing()
    return LocalDelivery(routing, hold_s=hold_s), routing  # type: ignore[arg-type]


def test_in_order_passes_at_once_and_a_gap_that_fills_is_released_in_order() -> None:
    async def body() -> None:
        gate, routing = _gate()
        for seq in (1, 2, 4, 5):
            gate.users((1, 2), _deliver(seq), False)
        assert [s for _, s in routing.out] == [1, 2], "4 and 5 wait for 3"
        gate.users((1, 2), _deliver(3), False)
        assert [s for _, s in routing.out] == [1, 2, 3, 4, 5]
        assert gate.held == 2 and gate.stale_dropped == 0

    run(body())


def test_a_gap_that_does_not_fill_is_given_up_and_the_late_message_dropped() -> None:
    async def body() -> None:
        gate, routing = _gate()
        gate.users((1,), _deliver(1), False)
        gate.users((1,), _deliver(3), False)
        gate.users((1,), _deliver(4), False)
        await asyncio.sleep(HOLD_S * 3)
        assert [s for _, s in routing.out] == [1, 3, 4], "delivered in order after the hold"
        gate.users((1,), _deliver(2), False)  # too late: the client fetches it with HISTORY
        gate.users((1,), _deliver(4), False)  # a duplicate push
        gate.users((1,), _deliver(5), False)
        assert [s for _, s in routing.out] == [1, 3, 4, 5]
        assert gate.stale_dropped == 2

    run(body())


def test_rooms_events_and_conversations_are_independent() -> None:
    async def body() -> None:
        gate, routing = _gate()
        gate.users((1,), encode_deliver(Kind.ROOM, 1, 9, 0, 1, 7, 0, b"\0" * 16, b"r"), True)
        gate.users((1,), encode_event(2, Kind.GROUP, 50, 7, 1), True)
        gate.users((1,), _deliver(5, conv=50), False)  # first seen: delivered
        gate.users((1,), _deliver(1, conv=51), False)
        # a direct conversation is keyed by the recipient too: two viewers, two seq spaces
        gate.users((9,), _deliver(3, conv=7, kind=Kind.DIRECT), False)
        gate.users((10,), _deliver(1, conv=7, kind=Kind.DIRECT), False)
        assert [s for _, s in routing.out] == [0, -1, 5, 1, 3, 1]

    run(body())


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 40), st.randoms(use_true_random=False), st.floats(0, 0.3))
def test_any_arrival_order_comes_out_strictly_increasing(n: int, rnd: random.Random, lost: float) -> None:
    """Seqs 1..n arrive shuffled (each at most a few places late), some lost, some twice: what
    reaches the sessions is strictly increasing, and nothing that arrived in time is lost."""
    seqs = [s for s in range(1, n + 1) if s == 1 or rnd.random() >= lost]
    arrival = sorted(seqs, key=lambda s: s + rnd.uniform(0, 4))
    arrival += rnd.sample(seqs, k=min(3, len(seqs)))  # duplicates at the end

    async def body() -> list[int]:
        gate, routing = _gate(hold_s=0.005)
        for seq in arrival:
            gate.users((1,), _deliver(seq), False)
        await asyncio.sleep(0.02)
        return [s for _, s in routing.out]

    out = run(body())
    assert out == sorted(set(out)), out
    assert set(out) <= set(seqs)
    if lost == 0 and arrival[0] == 1:
        # the gate knew where the conversation stood (seq 1 came first): every message that
        # arrived within the hold time is delivered, in order
        assert out == seqs


class _NobodyElse(_Routing):
    """The sender has no other session here: its own view (``skip`` given) reaches nobody."""

    def fanout_users(self, user_ids: Any, data: bytes, skip: Any, droppable: bool) -> int:
        n = super().fanout_users(user_ids, data, skip, droppable)
        return 0 if skip is not None else n


def test_a_peer_message_that_arrives_after_the_senders_own_first_view_is_delivered() -> None:
    """Found by ``python -m bench groups``: both sides of a new direct conversation send at once
    from different nodes. On Y's node, Y's own seq 2 (its view, for Y's other sessions: none
    here) is the first DELIVER of the conversation; X's seq 1 arrives after. Nothing was
    delivered to Y here, so seq 1 is not stale: Y gets it. Once something reached a session,
    a lower seq is stale again."""

    async def body() -> None:
        routing = _NobodyElse()
        gate = LocalDelivery(routing, hold_s=HOLD_S)  # type: ignore[arg-type]
        own = object()  # the sending connection
        gate.users((9,), _deliver(2, conv=7, kind=Kind.DIRECT), False, own)
        gate.users((9,), _deliver(1, conv=7, kind=Kind.DIRECT), False)
        gate.users((9,), _deliver(3, conv=7, kind=Kind.DIRECT), False)
        assert [s for _, s in routing.out] == [2, 1, 3]  # 2 reached nobody: Y saw 1 then 3
        gate.users((9,), _deliver(1, conv=7, kind=Kind.DIRECT), False)  # now a duplicate
        assert [s for _, s in routing.out] == [2, 1, 3] and gate.stale_dropped == 1
        # the sender's own view that reached a session does not open the window
        gate2, routing2 = _gate()
        gate2.users((9,), _deliver(2, conv=8, kind=Kind.DIRECT), False, own)
        gate2.users((9,), _deliver(1, conv=8, kind=Kind.DIRECT), False)
        assert [s for _, s in routing2.out] == [2] and gate2.stale_dropped == 1

    run(body())
