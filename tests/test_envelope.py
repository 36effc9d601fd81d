"""Node-to-node envelopes round-trip, batch, and reject garbage with a typed error."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gochat.cluster.envelope import (
    KickEnvelope,
    PresenceEnvelope,
    RevokeEnvelope,
    RoomEnvelope,
    UsersEnvelope,
    decode_envelope,
    encode_batch,
    encode_kick,
    encode_presence,
    encode_revoke,
    encode_room,
    encode_users,
    split_batch,
)
from gochat.errors import GochatError

u64 = st.integers(0, 2**64 - 1)


@given(st.lists(u64, max_size=50), st.binary(max_size=300), st.booleans())
def test_users_round_trip(ids: list[int], frame: bytes, droppable: bool) -> None:
    assert decode_envelope(encode_users(ids, frame, droppable)) == UsersEnvelope(tuple(ids), frame, droppable)


@given(u64, u64, st.binary(max_size=100), st.text(max_size=40), st.integers(0, 65535))
def test_other_envelopes_round_trip(a: int, b: int, frame: bytes, text: str, code: int) -> None:
    assert decode_envelope(encode_room(a, b, frame)) == RoomEnvelope(a, b, frame)
    assert decode_envelope(encode_presence(a, True)) == PresenceEnvelope(a, True)
    assert decode_envelope(encode_revoke(a, b, text)) == RevokeEnvelope(a, b, text)
    assert decode_envelope(encode_kick(a, code, text)) == KickEnvelope(a, code, text)


@given(st.lists(st.binary(min_size=1, max_size=60), max_size=20))
def test_batch_keeps_order(parts: list[bytes]) -> None:
    assert split_batch(encode_batch(parts)) == parts


def test_single_envelope_is_its_own_batch() -> None:
    env = encode_presence(7, False)
    assert split_batch(env) == [env]


@given(st.binary(max_size=64))
def test_garbage_raises_typed_error(data: bytes) -> None:
    try:
        for env in split_batch(data):
            decode_envelope(env)
    except GochatError:
        pass


def test_truncated_user_list() -> None:
    with pytest.raises(GochatError):
        decode_envelope(encode_users([1, 2, 3], b"x")[:10])
