"""Differential and boundary tests: the Cython codec against its pure-Python twin.

- random valid frames of every op round-trip through both codecs, and both encode the same bytes;
- random, structured and mutated messages decode the same on both (same frames, or the same
  error code and message), and nothing but ProtocolError ever escapes a decoder;
- every length field is swept around its bounds (STYLE practice 8).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gochat.errors import ErrorCode, ProtocolError
from gochat.protocol import (
    ALLOWED_FLAGS,
    FRAME_TYPES,
    Auth,
    AuthOk,
    Call,
    CallResult,
    Codec,
    Deliver,
    Error,
    Event,
    Frame,
    GoAway,
    History,
    HistoryResult,
    Message,
    Op,
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
    native_codec,
    python_codec,
)

PY = python_codec()
C = native_codec()
CODECS = [PY, C]
BAD_BODY = ErrorCode.BAD_BODY

# Both decoders run on every example, so keep the counts moderate: the codec suite stays well
# under a minute on two cores.
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
THOROUGH = settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module", params=["py-codec", "c-codec"])  # stateless: safe to share with @given
def codec(request: pytest.FixtureRequest) -> Codec:
    return python_codec() if request.param == "py-codec" else native_codec()


# ==== strategies ======================================================================================

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
# Bias toward the ends of the range, where byte-order and sign bugs live.
u64 = st.one_of(st.integers(0, 0xFFFF_FFFF_FFFF_FFFF), st.sampled_from([0, 1, 2**32, 2**63, 2**64 - 1]))
kind = st.integers(1, 3)
cmid = st.binary(min_size=16, max_size=16)
blob = st.binary(max_size=200)


def utf8_text(min_bytes: int, max_bytes: int, max_chars: int = 40) -> st.SearchStrategy[str]:
    return st.text(max_size=max_chars).filter(lambda s: min_bytes <= len(s.encode()) <= max_bytes)


def with_header(op: int, strategy: Callable[..., Any], **fields: Any) -> st.SearchStrategy[Any]:
    flags = st.integers(0, ALLOWED_FLAGS[op]).map(lambda f, m=ALLOWED_FLAGS[op]: f & m)
    return st.builds(strategy, **fields, rid=u32, flags=flags)


messages = st.builds(Message, kind, u8, u64, u64, u64, u64, u64, cmid, blob)

FRAME_STRATEGIES: dict[int, st.SearchStrategy[Any]] = {
    Op.AUTH: with_header(Op.AUTH, Auth, token=utf8_text(1, 4096)),
    Op.AUTH_OK: with_header(
        Op.AUTH_OK, AuthOk, user_id=u64, session_id=u64, server_time_ms=u64, heartbeat_ms=u32, max_frame=u32
    ),
    Op.PING: with_header(Op.PING, Ping, payload=st.binary(max_size=64)),
    Op.PONG: with_header(Op.PONG, Pong, payload=st.binary(max_size=64)),
    Op.SEND: with_header(Op.SEND, Send, kind=kind, content_type=u8, conv_id=u64, client_msg_id=cmid, body=blob),
    Op.SEND_ACK: with_header(Op.SEND_ACK, SendAck, kind=kind, conv_id=u64, seq=u64, msg_id=u64, ts_ms=u64),
    Op.SYNC: with_header(Op.SYNC, Sync, entries=st.lists(st.builds(SyncEntry, kind, u64, u64), max_size=8)),
    Op.SYNC_RESULT: with_header(
        Op.SYNC_RESULT, SyncResult, entries=st.lists(st.builds(SyncResultEntry, kind, u64, u64, u64), max_size=8)
    ),
    Op.HISTORY: with_header(
        Op.HISTORY, History, kind=kind, conv_id=u64, from_seq=u64, limit=st.integers(1, 1000)
    ),
    Op.HISTORY_RESULT: with_header(
        Op.HISTORY_RESULT, HistoryResult, kind=kind, conv_id=u64, messages=st.lists(messages, max_size=4)
    ),
    Op.READ: with_header(Op.READ, Read, kind=kind, conv_id=u64, seq=u64),
    Op.READ_OK: with_header(Op.READ_OK, ReadOk),
    Op.SUBSCRIBE: with_header(Op.SUBSCRIBE, Subscribe, room_id=u64),
    Op.SUBSCRIBE_OK: with_header(Op.SUBSCRIBE_OK, SubscribeOk, room_id=u64),
    Op.UNSUBSCRIBE: with_header(Op.UNSUBSCRIBE, Unsubscribe, room_id=u64),
    Op.UNSUBSCRIBE_OK: with_header(Op.UNSUBSCRIBE_OK, UnsubscribeOk, room_id=u64),
    Op.TYPING: with_header(Op.TYPING, Typing, kind=kind, conv_id=u64),
    Op.CALL: with_header(Op.CALL, Call, method=utf8_text(1, 64, 20), payload=blob),
    Op.CALL_RESULT: with_header(Op.CALL_RESULT, CallResult, payload=blob),
    Op.DELIVER: with_header(Op.DELIVER, Deliver, message=messages),
    Op.EVENT: with_header(
        Op.EVENT, Event, type=u8, kind=st.integers(0, 3), conv_id=u64, actor_id=u64, value=u64, extra=blob
    ),
    Op.GOAWAY: with_header(
        Op.GOAWAY, GoAway, code=u16, retry_after_ms=u32, url=utf8_text(0, 200), reason=utf8_text(0, 200)
    ),
    Op.ERROR: with_header(Op.ERROR, Error, code=u16, retry_after_ms=u32, message=utf8_text(0, 200)),
}
assert set(FRAME_STRATEGIES) == set(FRAME_TYPES)
frames = st.one_of(*FRAME_STRATEGIES.values())


def outcome(codec: Codec, data: bytes, max_frame: int = 65536) -> tuple[Any, ...]:
    """What a decoder makes of ``data``: the frames, or the error. Anything else propagates."""
    try:
        return ("ok", codec.decode(data, max_frame))
    except ProtocolError as exc:
        return ("error", exc.code, exc.message)


def iter_outcome(codec: Codec, data: bytes, max_frame: int = 65536) -> tuple[list[Frame], Any]:
    got: list[Frame] = []
    try:
        for frame in codec.iter_frames(data, max_frame):
            got.append(frame)
    except ProtocolError as exc:
        return got, (exc.code, exc.message)
    return got, None


def assert_agree(data: bytes, max_frame: int = 65536) -> tuple[Any, ...]:
    py, c = outcome(PY, data, max_frame), outcome(C, data, max_frame)
    assert py == c
    # iter_frames yields the good prefix, then fails the same way decode does
    py_iter, c_iter = iter_outcome(PY, data, max_frame), iter_outcome(C, data, max_frame)
    assert py_iter == c_iter
    if py[0] == "ok":
        assert py_iter == (py[1], None)
    else:
        assert py_iter[1] == py[1:]
    return py


def header(length: int, op: int, flags: int = 0, rid: int = 0, ver: int = 1) -> bytes:
    return struct.pack("<IBBHI", length, ver, op, flags, rid)


def raw_frame(op: int, body: bytes, flags: int = 0, rid: int = 0) -> bytes:
    return header(12 + len(body), op, flags, rid) + body


def decode_error(codec: Codec, data: bytes, max_frame: int = 65536) -> ErrorCode:
    with pytest.raises(ProtocolError) as info:
        codec.decode(data, max_frame)
    return info.value.code


def encode_error(codec: Codec, frame: Any) -> ErrorCode:
    with pytest.raises(ProtocolError) as info:
        codec.encode(frame)
    return info.value.code


# ==== round trips ======================================================================================


@FAST
@given(frame=frames)
def test_round_trip(codec: Codec, frame: Frame) -> None:
    data = codec.encode(frame)
    assert codec.decode(data) == [frame]
    assert codec.peek_header(data) == (len(data), 1, frame.op, frame.flags, frame.rid)


@FAST
@given(batch=st.lists(frames, min_size=1, max_size=6))
def test_batches_round_trip_and_encoders_agree(batch: list[Frame]) -> None:
    data = PY.encode_many(batch)
    assert C.encode_many(batch) == data
    assert [C.encode(f) for f in batch] == [PY.encode(f) for f in batch]
    assert PY.decode(data) == C.decode(data) == batch


@pytest.mark.parametrize("op", sorted(FRAME_STRATEGIES), ids=lambda op: Op(op).name)
def test_every_op_round_trips(codec: Codec, op: int) -> None:
    # Per op, so that a regression in one op names it; the mixed test above covers combinations.
    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(frame=FRAME_STRATEGIES[op])
    def check(frame: Frame) -> None:
        assert codec.decode(codec.encode(frame)) == [frame]

    check()


# ==== differential decoding ===========================================================================


@THOROUGH
@given(data=st.binary(max_size=120))
def test_random_bytes_agree(data: bytes) -> None:
    assert_agree(data)


@st.composite
def structured(draw: st.DrawFn) -> bytes:
    """A header that passes rules 1-7 around a random body: exercises body validation."""
    op = draw(st.sampled_from(sorted(FRAME_TYPES)))
    body = draw(st.binary(max_size=120))
    flags = draw(st.integers(0, ALLOWED_FLAGS[op])) & ALLOWED_FLAGS[op]
    return raw_frame(op, body, flags, draw(u32))


@THOROUGH
@given(data=st.lists(structured(), min_size=1, max_size=3).map(b"".join))
def test_structured_random_bodies_agree(data: bytes) -> None:
    assert_agree(data)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid message with a few bytes flipped, cut, inserted or a length field rewritten."""
    data = bytearray(PY.encode_many(draw(st.lists(frames, min_size=1, max_size=3))))
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["flip", "truncate", "insert", "length", "byte"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if action == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif action == "byte" and data:
            data[at] = draw(st.sampled_from([0x00, 0x01, 0x03, 0x04, 0x7F, 0x80, 0xC0, 0xED, 0xFF]))
        elif action == "truncate":
            del data[at:]
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif action == "length" and len(data) >= 4:
            delta = draw(st.sampled_from([-2, -1, 1, 2, 17, 62]))
            (length,) = struct.unpack_from("<I", data)
            struct.pack_into("<I", data, 0, max(0, min(length + delta, 0xFFFF_FFFF)))
    return bytes(data)


@THOROUGH
@given(data=mutated(), max_frame=st.sampled_from([12, 100, 65536, 2**32 - 1]))
def test_mutated_messages_agree(data: bytes, max_frame: int) -> None:
    assert_agree(data, max_frame)


_UTF8_EDGE = [b"\x80", b"\xbf", b"\xc0", b"\xc1", b"\xc2", b"\xdf", b"\xe0", b"\xe0\xa0", b"\xed", b"\xed\x9f",
              b"\xed\xa0", b"\xef", b"\xf0", b"\xf0\x90", b"\xf4", b"\xf4\x8f", b"\xf4\x90", b"\xf5", b"\xff"]


@THOROUGH
@given(parts=st.lists(st.one_of(st.text(max_size=12).map(str.encode), st.sampled_from(_UTF8_EDGE)),
                      min_size=1, max_size=8))
def test_utf8_validation_matches_python(parts: list[bytes]) -> None:
    token = b"".join(parts)[:4096] or b"x"
    try:
        token.decode("utf-8")
        valid = True
    except UnicodeDecodeError:
        valid = False
    result = assert_agree(raw_frame(Op.AUTH, token))
    assert (result[0] == "ok") is valid
    if not valid:
        assert result[1] == ErrorCode.BAD_UTF8


# ==== boundaries =======================================================================================


@pytest.mark.parametrize(
    ("length", "present", "code"),
    [
        (11, 12, ErrorCode.MALFORMED_FRAME),
        (12, 12, None),
        (13, 12, ErrorCode.TRUNCATED_FRAME),
        (13, 13, ErrorCode.BAD_BODY),  # READ_OK has an empty body
        (12, 11, ErrorCode.TRUNCATED_FRAME),
    ],
)
def test_header_length_boundaries(codec: Codec, length: int, present: int, code: ErrorCode | None) -> None:
    data = (header(length, Op.READ_OK) + bytes(8))[:present]
    if code is None:
        assert codec.decode(data) == [ReadOk()]
    else:
        assert decode_error(codec, data) == code


@pytest.mark.parametrize("max_frame", [12, 13, 100, 65536])
@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_max_frame_boundaries(codec: Codec, max_frame: int, delta: int) -> None:
    size = max_frame + delta
    if size < 12:
        return
    data = raw_frame(Op.CALL_RESULT, bytes(size - 12))
    if delta <= 0:
        assert codec.decode(data, max_frame) == [CallResult(bytes(size - 12))]
    else:
        assert decode_error(codec, data, max_frame) == ErrorCode.FRAME_TOO_LARGE


@pytest.mark.parametrize(("size", "ok"), [(0, False), (1, True), (4096, True), (4097, False)])
def test_token_length(codec: Codec, size: int, ok: bool) -> None:
    data = raw_frame(Op.AUTH, b"t" * size)
    if ok:
        assert codec.decode(data) == [Auth("t" * size)]
        assert codec.encode(Auth("t" * size)) == data
    else:
        assert decode_error(codec, data) == BAD_BODY
        assert encode_error(codec, Auth("t" * size)) == BAD_BODY


def test_token_length_counts_bytes(codec: Codec) -> None:
    assert codec.encode(Auth("é" * 2048))  # 4096 bytes
    assert encode_error(codec, Auth("é" * 2048 + "x")) == BAD_BODY


@pytest.mark.parametrize("cls", [Ping, Pong])
@pytest.mark.parametrize(("size", "ok"), [(0, True), (63, True), (64, True), (65, False)])
def test_ping_payload(codec: Codec, cls: type[Ping | Pong], size: int, ok: bool) -> None:
    data = raw_frame(cls.op, bytes(size))
    if ok:
        assert codec.decode(data) == [cls(bytes(size))]
        assert codec.encode(cls(bytes(size))) == data
    else:
        assert decode_error(codec, data) == BAD_BODY
        assert encode_error(codec, cls(bytes(size))) == BAD_BODY


@pytest.mark.parametrize(("size", "ok"), [(0, False), (1, True), (64, True), (65, False)])
def test_method_length(codec: Codec, size: int, ok: bool) -> None:
    data = raw_frame(Op.CALL, bytes([size]) + b"m" * size + b"{}")
    if ok:
        assert codec.decode(data) == [Call("m" * size, b"{}")]
        assert codec.encode(Call("m" * size, b"{}")) == data
    else:
        assert decode_error(codec, data) == BAD_BODY
        assert encode_error(codec, Call("m" * size, b"{}")) == BAD_BODY


def test_method_overrun(codec: Codec) -> None:
    assert codec.decode(raw_frame(Op.CALL, b"\x03abc")) == [Call("abc")]
    assert decode_error(codec, raw_frame(Op.CALL, b"\x04abc")) == BAD_BODY


def _record(body: bytes, body_len: int | None = None, kind: int = 1) -> bytes:
    n = len(body) if body_len is None else body_len
    return struct.pack("<BBQQQQQ16sI", kind, 1, 9, 1, 2, 3, 4, bytes(16), n) + body


@pytest.mark.parametrize("delta", [-1, 0, 1])
@pytest.mark.parametrize("size", [0, 1, 100])
def test_deliver_body_len(codec: Codec, size: int, delta: int) -> None:
    if size + delta < 0:
        return
    data = raw_frame(Op.DELIVER, _record(bytes(size), size + delta))
    if delta == 0:
        assert codec.decode(data) == [Deliver(Message(1, 1, 9, 1, 2, 3, 4, bytes(16), bytes(size)))]
    else:
        assert decode_error(codec, data) == BAD_BODY


@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_history_result_body_len(codec: Codec, delta: int) -> None:
    records = _record(b"ab") + _record(b"cde", 3 + delta)
    data = raw_frame(Op.HISTORY_RESULT, struct.pack("<BQH", 1, 9, 2) + records)
    if delta == 0:
        assert len(codec.decode(data)[0].messages) == 2  # type: ignore[union-attr]
    else:
        assert decode_error(codec, data) == BAD_BODY


@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_history_result_count(codec: Codec, delta: int) -> None:
    data = raw_frame(Op.HISTORY_RESULT, struct.pack("<BQH", 1, 9, 2 + delta) + _record(b"a") + _record(b""))
    if delta == 0:
        assert len(codec.decode(data)[0].messages) == 2  # type: ignore[union-attr]
    else:
        assert decode_error(codec, data) == BAD_BODY


@pytest.mark.parametrize(("op", "count_fmt", "entry"), [
    (Op.SYNC, "<H", struct.pack("<BQQ", 1, 9, 5)),
    (Op.SYNC_RESULT, "<I", struct.pack("<BQQQ", 1, 9, 5, 4)),
])
@pytest.mark.parametrize("entries", [0, 1, 3])
@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_sync_counts(codec: Codec, op: int, count_fmt: str, entry: bytes, entries: int, delta: int) -> None:
    if entries + delta < 0:
        return
    body = struct.pack(count_fmt, entries + delta) + entry * entries
    if delta == 0:
        assert len(codec.decode(raw_frame(op, body))[0].entries) == entries  # type: ignore[union-attr]
    else:
        assert decode_error(codec, raw_frame(op, body)) == BAD_BODY
    # one byte more or less than the entries need
    assert decode_error(codec, raw_frame(op, body + b"\x00")) == BAD_BODY
    assert decode_error(codec, raw_frame(op, body[:-1])) == BAD_BODY


@pytest.mark.parametrize(("limit", "ok"), [(0, False), (1, True), (1000, True), (1001, False), (65535, False)])
def test_history_limit(codec: Codec, limit: int, ok: bool) -> None:
    data = raw_frame(Op.HISTORY, struct.pack("<BQQH", 1, 9, 1, limit))
    if ok:
        assert codec.decode(data) == [History(1, 9, 1, limit)]
        assert codec.encode(History(1, 9, 1, limit)) == data
    else:
        assert decode_error(codec, data) == BAD_BODY
        assert encode_error(codec, History(1, 9, 1, limit)) == BAD_BODY


@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_goaway_url_len(codec: Codec, delta: int) -> None:
    data = raw_frame(Op.GOAWAY, struct.pack("<HIH", 502, 0, 4 + delta) + b"ws:/")
    if delta <= 0:
        frame = codec.decode(data)[0]
        assert isinstance(frame, GoAway) and frame.url + frame.reason == "ws:/"
    else:
        assert decode_error(codec, data) == BAD_BODY


def test_goaway_url_size_limit(codec: Codec) -> None:
    assert len(codec.encode(GoAway(502, 0, "u" * 65535))) == 12 + 8 + 65535
    assert encode_error(codec, GoAway(502, 0, "u" * 65536)) == BAD_BODY


@pytest.mark.parametrize(("op", "size"), [
    (Op.AUTH_OK, 32), (Op.SEND_ACK, 33), (Op.HISTORY, 19), (Op.READ, 17), (Op.READ_OK, 0),
    (Op.SUBSCRIBE, 8), (Op.SUBSCRIBE_OK, 8), (Op.UNSUBSCRIBE, 8), (Op.UNSUBSCRIBE_OK, 8), (Op.TYPING, 9),
], ids=lambda v: Op(v).name if isinstance(v, Op) else str(v))
def test_fixed_sizes(codec: Codec, op: int, size: int) -> None:
    body = bytearray(size)
    if size:
        body[0] = 1  # a valid kind where the layout starts with one
    if op == Op.HISTORY:
        body[17] = 1  # limit 1
    assert len(codec.decode(raw_frame(op, bytes(body)))) == 1
    assert decode_error(codec, raw_frame(op, bytes(body) + b"\x00")) == BAD_BODY
    if size:
        assert decode_error(codec, raw_frame(op, bytes(body[:-1]))) == BAD_BODY


@pytest.mark.parametrize(("op", "fixed"), [(Op.SEND, 26), (Op.EVENT, 26), (Op.DELIVER, 62), (Op.GOAWAY, 8),
                                           (Op.ERROR, 6), (Op.HISTORY_RESULT, 11), (Op.SYNC, 2),
                                           (Op.SYNC_RESULT, 4), (Op.CALL, 1)],
                         ids=lambda v: Op(v).name if isinstance(v, Op) else str(v))
def test_short_bodies(codec: Codec, op: int, fixed: int) -> None:
    for size in range(fixed):
        assert decode_error(codec, raw_frame(op, b"\x01" * size)) == BAD_BODY


@pytest.mark.parametrize("value", [0, 1, 2, 3, 4, 255])
def test_kind_ranges(codec: Codec, value: int) -> None:
    ok = 1 <= value <= 3
    cases: list[tuple[Any, bytes]] = [
        (Send(value, 0, 9, bytes(16), b""), raw_frame(Op.SEND, struct.pack("<BBQ16s", value, 0, 9, bytes(16)))),
        (SendAck(value, 9, 1, 1, 1), raw_frame(Op.SEND_ACK, struct.pack("<BQQQQ", value, 9, 1, 1, 1))),
        (Read(value, 9, 1), raw_frame(Op.READ, struct.pack("<BQQ", value, 9, 1))),
        (Typing(value, 9), raw_frame(Op.TYPING, struct.pack("<BQ", value, 9))),
        (History(value, 9, 1, 1), raw_frame(Op.HISTORY, struct.pack("<BQQH", value, 9, 1, 1))),
        (Sync([SyncEntry(value, 9, 1)]), raw_frame(Op.SYNC, struct.pack("<HBQQ", 1, value, 9, 1))),
        (SyncResult([SyncResultEntry(value, 9, 1, 1)]),
         raw_frame(Op.SYNC_RESULT, struct.pack("<IBQQQ", 1, value, 9, 1, 1))),
        (Deliver(Message(value, 1, 9, 1, 2, 3, 4, bytes(16), b"")), raw_frame(Op.DELIVER, _record(b"", kind=value))),
        (HistoryResult(value, 9), raw_frame(Op.HISTORY_RESULT, struct.pack("<BQH", value, 9, 0))),
        (HistoryResult(1, 9, [Message(value, 1, 9, 1, 2, 3, 4, bytes(16), b"")]),
         raw_frame(Op.HISTORY_RESULT, struct.pack("<BQH", 1, 9, 1) + _record(b"", kind=value))),
    ]
    for frame, data in cases:
        if ok:
            assert codec.encode(frame) == data
            assert codec.decode(data) == [frame]
        else:
            assert encode_error(codec, frame) == BAD_BODY, frame
            assert decode_error(codec, data) == BAD_BODY, frame
    event = Event(1, value, 9, 7, 1)
    if value <= 3:  # EVENT allows kind 0: no conversation
        assert codec.decode(codec.encode(event)) == [event]
    else:
        assert encode_error(codec, event) == BAD_BODY


@pytest.mark.parametrize("op", sorted(FRAME_TYPES), ids=lambda op: Op(op).name)
def test_flag_bits(codec: Codec, op: int) -> None:
    example = PY.encode(_EXAMPLES[op])
    for bit in range(16):
        flags = 1 << bit
        data = example[:6] + struct.pack("<H", flags) + example[8:]
        if flags & ALLOWED_FLAGS[op]:
            assert codec.decode(data)[0].flags == flags
        else:
            assert decode_error(codec, data) == ErrorCode.BAD_FLAGS
            frame = PY.decode(example)[0]
            frame.flags = flags
            assert encode_error(codec, frame) == ErrorCode.BAD_FLAGS
    frame = PY.decode(example)[0]
    frame.flags = -1
    assert encode_error(codec, frame) == ErrorCode.BAD_FLAGS


_EXAMPLES: dict[int, Any] = {
    Op.AUTH: Auth("t"), Op.AUTH_OK: AuthOk(1, 2, 3, 4, 5), Op.PING: Ping(), Op.PONG: Pong(),
    Op.SEND: Send(1, 1, 9, bytes(16), b"x"), Op.SEND_ACK: SendAck(1, 9, 1, 2, 3), Op.SYNC: Sync(),
    Op.SYNC_RESULT: SyncResult(), Op.HISTORY: History(1, 9, 1, 10), Op.HISTORY_RESULT: HistoryResult(1, 9),
    Op.READ: Read(1, 9, 1), Op.READ_OK: ReadOk(), Op.SUBSCRIBE: Subscribe(4), Op.SUBSCRIBE_OK: SubscribeOk(4),
    Op.UNSUBSCRIBE: Unsubscribe(4), Op.UNSUBSCRIBE_OK: UnsubscribeOk(4), Op.TYPING: Typing(1, 9),
    Op.CALL: Call("m"), Op.CALL_RESULT: CallResult(), Op.DELIVER: Deliver(Message(1, 1, 9, 1, 2, 3, 4, bytes(16), b"")),
    Op.EVENT: Event(1, 0, 0, 7, 1), Op.GOAWAY: GoAway(502, 0), Op.ERROR: Error(500),
}


# ==== encoder argument checking =========================================================================

_INT_FIELDS: list[tuple[Any, str, int]] = [
    (Send(1, 1, 9, bytes(16), b""), "content_type", 0xFF),
    (Send(1, 1, 9, bytes(16), b""), "conv_id", 2**64 - 1),
    (Send(1, 1, 9, bytes(16), b""), "rid", 0xFFFF_FFFF),
    (AuthOk(1, 2, 3, 4, 5), "heartbeat_ms", 0xFFFF_FFFF),
    (AuthOk(1, 2, 3, 4, 5), "max_frame", 0xFFFF_FFFF),
    (AuthOk(1, 2, 3, 4, 5), "server_time_ms", 2**64 - 1),
    (GoAway(502, 0), "code", 0xFFFF),
    (GoAway(502, 0), "retry_after_ms", 0xFFFF_FFFF),
    (Error(500), "code", 0xFFFF),
    (Event(1, 0, 0, 7, 1), "type", 0xFF),
    (Event(1, 0, 0, 7, 1), "value", 2**64 - 1),
    (SendAck(1, 9, 1, 2, 3), "ts_ms", 2**64 - 1),
    (History(1, 9, 1, 10), "from_seq", 2**64 - 1),
    (Subscribe(4), "room_id", 2**64 - 1),
]


@pytest.mark.parametrize(("frame", "field", "top"), _INT_FIELDS, ids=[f"{type(f).__name__}.{n}" for f, n, _ in _INT_FIELDS])
def test_integer_field_ranges(codec: Codec, frame: Any, field: str, top: int) -> None:
    setattr(frame, field, top)
    assert codec.decode(codec.encode(frame)) == [frame]
    for bad in (top + 1, -1, 2**64, 2**100):
        setattr(frame, field, bad)
        assert encode_error(codec, frame) == BAD_BODY
    for wrong_type in (1.0, "1", None, b"1"):
        setattr(frame, field, wrong_type)
        with pytest.raises(TypeError):
            codec.encode(frame)


class _Index:
    def __index__(self) -> int:
        return 7


def test_integer_like_values(codec: Codec) -> None:
    frame = Subscribe(True)
    assert codec.encode(frame) == codec.encode(Subscribe(1))
    assert codec.encode(Subscribe(_Index())) == codec.encode(Subscribe(7))  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [0, 15, 17])
def test_client_msg_id_size(codec: Codec, size: int) -> None:
    assert encode_error(codec, Send(1, 1, 9, bytes(size), b"")) == BAD_BODY
    assert encode_error(codec, Deliver(Message(1, 1, 9, 1, 2, 3, 4, bytes(size), b""))) == BAD_BODY


def test_bytes_fields_take_any_bytes_like(codec: Codec) -> None:
    expected = codec.encode(Send(1, 1, 9, bytes(16), b"body"))
    assert codec.encode(Send(1, 1, 9, bytearray(16), memoryview(b"body"))) == expected  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        codec.encode(Send(1, 1, 9, bytes(16), "body"))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        codec.encode(Ping(3))  # type: ignore[arg-type]


def test_text_fields(codec: Codec) -> None:
    for frame in (Auth("\ud800"), Call("m\udfff"), GoAway(1, 0, "\ud800"), GoAway(1, 0, "", "\udc00"),
                  Error(1, 0, "\ud800")):
        assert encode_error(codec, frame) == ErrorCode.BAD_UTF8
    with pytest.raises(TypeError):
        codec.encode(Auth(b"token"))  # type: ignore[arg-type]


def test_encode_errors_agree() -> None:
    """For a frame with several bad fields, both codecs report the same (first) one."""
    # deliberately wrong values and types, hence Any
    bad: list[Any] = [Send, Deliver, Message, Call]
    send, deliver, message, call = bad
    frames: list[Any] = [
        send(0, 256, -1, b"", "x", rid=-1),
        send(1, 256, -1, b"", "x"),
        send(1, 1, -1, b"", "x"),
        send(1, 1, 1, b"", "x"),
        deliver(message(1, 1, 1, 1, 1, 1, 1, b"short", "str")),
        GoAway(1, 0, "u" * 70000, "\ud800"),
        call("", 5),
        HistoryResult(1, 9, [Message(4, 1, 1, 1, 1, 1, 1, b"", b"")]),
        Sync([SyncEntry(1, 9, 1), SyncEntry(1, -9, 1)]),
        Error(1, 0, "x", flags=2, rid=2**32),
    ]
    for frame in frames:
        results: list[tuple[Any, ...]] = []
        for codec in CODECS:
            try:
                codec.encode(frame)
                results.append(("ok",))
            except ProtocolError as exc:
                results.append(("error", exc.code, exc.message))
            except TypeError:
                results.append(("type",))
        assert results[0] == results[1], frame
