"""Wire protocol v1 codec in pure Python: the twin of ``gochat._native.codec``.

Same public API and behaviour as the Cython module (``tests/test_codec_*.py`` run every test on
both and compare them, error messages included). It is the readable reference for the layouts in
``docs/protocol.md`` and the fallback when the extension is not built (``GOCHAT_NO_EXTENSIONS=1``).
Import it through :mod:`gochat.protocol`, which picks the implementation.

Validation follows docs/protocol.md §2 in order: header rules 1-7, then the body field by field
in layout order (rule 8 BAD_BODY, rule 9 BAD_UTF8), so the first bad field decides the code.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator
from operator import index
from typing import Any, Final

from gochat.errors import ErrorCode, ProtocolError
from gochat.protocol.constants import (
    ALLOWED_FLAGS,
    CLIENT_MSG_ID_SIZE,
    DEFAULT_MAX_FRAME,
    HEADER_SIZE,
    MAX_HISTORY_LIMIT,
    MAX_METHOD,
    MAX_PING_PAYLOAD,
    MAX_TOKEN,
    MESSAGE_RECORD_SIZE,
    VERSION,
    Op,
)
from gochat.protocol.frames import (
    FRAME_TYPES,
    Auth,
    AuthOk,
    Call,
    CallResult,
    Deliver,
    Error,
    Event,
    Frame,
    GoAway,
    History,
    HistoryResult,
    Message,
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
)

__all__ = [
    "decode", "encode", "encode_deliver", "encode_error", "encode_event", "encode_many",
    "encode_send_ack", "iter_frames", "peek_header",
]

BytesLike = bytes | bytearray | memoryview

_BAD_BODY: Final = ErrorCode.BAD_BODY
_BAD_UTF8: Final = ErrorCode.BAD_UTF8
U8_MAX: Final = 0xFF
U16_MAX: Final = 0xFFFF
U32_MAX: Final = 0xFFFF_FFFF
U64_MAX: Final = 0xFFFF_FFFF_FFFF_FFFF

_HEADER: Final = struct.Struct("<IBBHI")  # len, ver, op, flags, rid
_RECORD: Final = struct.Struct("<BBQQQQQ16sI")  # message record without its body
_SEND: Final = struct.Struct("<BBQ16s")
_SEND_ACK: Final = struct.Struct("<BQQQQ")
_AUTH_OK: Final = struct.Struct("<QQQII")
_SYNC_ENTRY: Final = struct.Struct("<BQQ")
_SYNC_RESULT_ENTRY: Final = struct.Struct("<BQQQ")
_HISTORY: Final = struct.Struct("<BQQH")
_HISTORY_RESULT: Final = struct.Struct("<BQH")
_READ: Final = struct.Struct("<BQQ")
_TYPING: Final = struct.Struct("<BQ")
_EVENT: Final = struct.Struct("<BBQQQ")
_GOAWAY: Final = struct.Struct("<HIH")
_ERROR: Final = struct.Struct("<HI")
_U16: Final = struct.Struct("<H")
_U32: Final = struct.Struct("<I")
_U64: Final = struct.Struct("<Q")

# Reasons shared by decode and encode; codec.pyx uses the same strings.
R_SIZE: Final = "body size does not match the layout"
R_SHORT: Final = "body shorter than its fixed fields"
R_TOKEN_LEN: Final = "token length out of range 1-4096"
R_TOKEN_UTF8: Final = "token is not valid UTF-8"
R_PAYLOAD_LEN: Final = "payload longer than 64 bytes"
R_KIND: Final = "kind out of range"
R_COUNT: Final = "count does not match the body size"
R_LIMIT: Final = "limit out of range 1-1000"
R_RECORD: Final = "message record overruns the body"
R_TRAILING: Final = "bytes left after the last message record"
R_METHOD_LEN: Final = "method length out of range 1-64"
R_METHOD_OVERRUN: Final = "method overruns the body"
R_METHOD_UTF8: Final = "method is not valid UTF-8"
R_URL_OVERRUN: Final = "url overruns the body"
R_URL_UTF8: Final = "url is not valid UTF-8"
R_REASON_UTF8: Final = "reason is not valid UTF-8"
R_MESSAGE_UTF8: Final = "message is not valid UTF-8"
R_BODY_LEN: Final = "body_len does not match the bytes left"
R_TOO_LONG: Final = "frame longer than 4294967295 bytes"


class _Bad(Exception):
    """A body rule failed; the frame loop adds the op name and offset to the message."""

    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _op_name(op: int) -> str:
    try:
        return Op(op).name
    except ValueError:
        return f"op 0x{op:02x}"


# ==== decoding ========================================================================================


def _kind(kind: int) -> None:
    if not 1 <= kind <= 3:
        raise _Bad(_BAD_BODY, R_KIND)


def _text(raw: bytes, reason: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Bad(_BAD_UTF8, reason) from None


def _fixed(b: bytes, size: int) -> None:
    if len(b) != size:
        raise _Bad(_BAD_BODY, R_SIZE)


def _at_least(b: bytes, size: int) -> None:
    if len(b) < size:
        raise _Bad(_BAD_BODY, R_SHORT)


def _message(b: bytes, off: int) -> Message:
    """The record at ``off``, whose size the caller has checked."""
    kind, ct, conv_id, seq, msg_id, sender_id, ts_ms, cmid, body_len = _RECORD.unpack_from(b, off)
    start = off + MESSAGE_RECORD_SIZE
    return Message(kind, ct, conv_id, seq, msg_id, sender_id, ts_ms, cmid, b[start : start + body_len])


def _dec_auth(b: bytes, rid: int, flags: int) -> Auth:
    if not 1 <= len(b) <= MAX_TOKEN:
        raise _Bad(_BAD_BODY, R_TOKEN_LEN)
    return Auth(_text(b, R_TOKEN_UTF8), rid, flags)


def _dec_auth_ok(b: bytes, rid: int, flags: int) -> AuthOk:
    _fixed(b, _AUTH_OK.size)
    user_id, session_id, server_time_ms, heartbeat_ms, max_frame = _AUTH_OK.unpack(b)
    return AuthOk(user_id, session_id, server_time_ms, heartbeat_ms, max_frame, rid, flags)


def _dec_ping(b: bytes, rid: int, flags: int) -> Ping:
    if len(b) > MAX_PING_PAYLOAD:
        raise _Bad(_BAD_BODY, R_PAYLOAD_LEN)
    return Ping(b, rid, flags)


def _dec_pong(b: bytes, rid: int, flags: int) -> Pong:
    if len(b) > MAX_PING_PAYLOAD:
        raise _Bad(_BAD_BODY, R_PAYLOAD_LEN)
    return Pong(b, rid, flags)


def _dec_send(b: bytes, rid: int, flags: int) -> Send:
    _at_least(b, _SEND.size)
    kind, ct, conv_id, cmid = _SEND.unpack_from(b)
    _kind(kind)
    return Send(kind, ct, conv_id, cmid, b[_SEND.size :], rid, flags)


def _dec_send_ack(b: bytes, rid: int, flags: int) -> SendAck:
    _fixed(b, _SEND_ACK.size)
    kind, conv_id, seq, msg_id, ts_ms = _SEND_ACK.unpack(b)
    _kind(kind)
    return SendAck(kind, conv_id, seq, msg_id, ts_ms, rid, flags)


def _dec_sync(b: bytes, rid: int, flags: int) -> Sync:
    _at_least(b, 2)
    (count,) = _U16.unpack_from(b)
    if len(b) != 2 + _SYNC_ENTRY.size * count:
        raise _Bad(_BAD_BODY, R_COUNT)
    entries = []
    for kind, conv_id, seq in _SYNC_ENTRY.iter_unpack(b[2:]):
        _kind(kind)
        entries.append(SyncEntry(kind, conv_id, seq))
    return Sync(entries, rid, flags)


def _dec_sync_result(b: bytes, rid: int, flags: int) -> SyncResult:
    _at_least(b, 4)
    (count,) = _U32.unpack_from(b)
    if len(b) != 4 + _SYNC_RESULT_ENTRY.size * count:
        raise _Bad(_BAD_BODY, R_COUNT)
    entries = []
    for kind, conv_id, last_seq, read_seq in _SYNC_RESULT_ENTRY.iter_unpack(b[4:]):
        _kind(kind)
        entries.append(SyncResultEntry(kind, conv_id, last_seq, read_seq))
    return SyncResult(entries, rid, flags)


def _dec_history(b: bytes, rid: int, flags: int) -> History:
    _fixed(b, _HISTORY.size)
    kind, conv_id, from_seq, limit = _HISTORY.unpack(b)
    _kind(kind)
    if not 1 <= limit <= MAX_HISTORY_LIMIT:
        raise _Bad(_BAD_BODY, R_LIMIT)
    return History(kind, conv_id, from_seq, limit, rid, flags)


def _dec_history_result(b: bytes, rid: int, flags: int) -> HistoryResult:
    _at_least(b, _HISTORY_RESULT.size)
    kind, conv_id, count = _HISTORY_RESULT.unpack_from(b)
    _kind(kind)
    messages = []
    off = _HISTORY_RESULT.size
    for _ in range(count):
        if len(b) - off < MESSAGE_RECORD_SIZE:
            raise _Bad(_BAD_BODY, R_RECORD)
        _kind(b[off])
        (body_len,) = _U32.unpack_from(b, off + 58)
        if body_len > len(b) - off - MESSAGE_RECORD_SIZE:
            raise _Bad(_BAD_BODY, R_RECORD)
        messages.append(_message(b, off))
        off += MESSAGE_RECORD_SIZE + body_len
    if off != len(b):
        raise _Bad(_BAD_BODY, R_TRAILING)
    return HistoryResult(kind, conv_id, messages, rid, flags)


def _dec_read(b: bytes, rid: int, flags: int) -> Read:
    _fixed(b, _READ.size)
    kind, conv_id, seq = _READ.unpack(b)
    _kind(kind)
    return Read(kind, conv_id, seq, rid, flags)


def _dec_read_ok(b: bytes, rid: int, flags: int) -> ReadOk:
    _fixed(b, 0)
    return ReadOk(rid, flags)


def _dec_room(cls: type[Subscribe | SubscribeOk | Unsubscribe | UnsubscribeOk]) -> _Decoder:
    def dec(b: bytes, rid: int, flags: int) -> Frame:
        _fixed(b, 8)
        return cls(_U64.unpack(b)[0], rid, flags)

    return dec


def _dec_typing(b: bytes, rid: int, flags: int) -> Typing:
    _fixed(b, _TYPING.size)
    kind, conv_id = _TYPING.unpack(b)
    _kind(kind)
    return Typing(kind, conv_id, rid, flags)


def _dec_call(b: bytes, rid: int, flags: int) -> Call:
    _at_least(b, 1)
    m = b[0]
    if not 1 <= m <= MAX_METHOD:
        raise _Bad(_BAD_BODY, R_METHOD_LEN)
    if 1 + m > len(b):
        raise _Bad(_BAD_BODY, R_METHOD_OVERRUN)
    return Call(_text(b[1 : 1 + m], R_METHOD_UTF8), b[1 + m :], rid, flags)


def _dec_call_result(b: bytes, rid: int, flags: int) -> CallResult:
    return CallResult(b, rid, flags)


def _dec_deliver(b: bytes, rid: int, flags: int) -> Deliver:
    _at_least(b, MESSAGE_RECORD_SIZE)
    _kind(b[0])
    if _U32.unpack_from(b, 58)[0] != len(b) - MESSAGE_RECORD_SIZE:
        raise _Bad(_BAD_BODY, R_BODY_LEN)
    return Deliver(_message(b, 0), rid, flags)


def _dec_event(b: bytes, rid: int, flags: int) -> Event:
    _at_least(b, _EVENT.size)
    type_, kind, conv_id, actor_id, value = _EVENT.unpack_from(b)
    if kind > 3:  # EVENT also allows kind 0: no conversation
        raise _Bad(_BAD_BODY, R_KIND)
    return Event(type_, kind, conv_id, actor_id, value, b[_EVENT.size :], rid, flags)


def _dec_goaway(b: bytes, rid: int, flags: int) -> GoAway:
    _at_least(b, _GOAWAY.size)
    code, retry_after_ms, url_len = _GOAWAY.unpack_from(b)
    end = _GOAWAY.size + url_len
    if end > len(b):
        raise _Bad(_BAD_BODY, R_URL_OVERRUN)
    url = _text(b[_GOAWAY.size : end], R_URL_UTF8)
    return GoAway(code, retry_after_ms, url, _text(b[end:], R_REASON_UTF8), rid, flags)


def _dec_error(b: bytes, rid: int, flags: int) -> Error:
    _at_least(b, _ERROR.size)
    code, retry_after_ms = _ERROR.unpack_from(b)
    return Error(code, retry_after_ms, _text(b[_ERROR.size :], R_MESSAGE_UTF8), rid, flags)


_Decoder = Callable[[bytes, int, int], Frame]
_DECODERS: Final[dict[int, _Decoder]] = {
    Op.AUTH: _dec_auth,
    Op.AUTH_OK: _dec_auth_ok,
    Op.PING: _dec_ping,
    Op.PONG: _dec_pong,
    Op.SEND: _dec_send,
    Op.SEND_ACK: _dec_send_ack,
    Op.SYNC: _dec_sync,
    Op.SYNC_RESULT: _dec_sync_result,
    Op.HISTORY: _dec_history,
    Op.HISTORY_RESULT: _dec_history_result,
    Op.READ: _dec_read,
    Op.READ_OK: _dec_read_ok,
    Op.SUBSCRIBE: _dec_room(Subscribe),
    Op.SUBSCRIBE_OK: _dec_room(SubscribeOk),
    Op.UNSUBSCRIBE: _dec_room(Unsubscribe),
    Op.UNSUBSCRIBE_OK: _dec_room(UnsubscribeOk),
    Op.TYPING: _dec_typing,
    Op.CALL: _dec_call,
    Op.CALL_RESULT: _dec_call_result,
    Op.DELIVER: _dec_deliver,
    Op.EVENT: _dec_event,
    Op.GOAWAY: _dec_goaway,
    Op.ERROR: _dec_error,
}


def _as_bytes(data: BytesLike) -> bytes:
    # memoryview() rejects str and int (bytes(5) would be five zero bytes).
    return data if type(data) is bytes else memoryview(data).tobytes()


def _max_frame_arg(max_frame: int) -> int:
    mf = index(max_frame)
    if mf < 0:
        raise ValueError("max_frame must be >= 0")
    return min(mf, U32_MAX)  # a frame length is a u32: any larger maximum behaves the same


def _next_frame(buf: bytes, off: int, max_frame: int) -> tuple[Frame, int]:
    """Validate and build the frame at ``off``; return it and its length."""
    where = f"frame at byte {off}"
    avail = len(buf) - off
    if avail < HEADER_SIZE:  # rule 1
        raise ProtocolError(f"{where}: {avail} bytes left, a header needs 12", code=ErrorCode.TRUNCATED_FRAME)
    length, ver, op, flags, rid = _HEADER.unpack_from(buf, off)
    if length < HEADER_SIZE:  # rule 2
        raise ProtocolError(f"{where}: length {length} is below 12", code=ErrorCode.MALFORMED_FRAME)
    if length > max_frame:  # rule 3
        raise ProtocolError(
            f"{where}: length {length} is above the maximum frame size {max_frame}",
            code=ErrorCode.FRAME_TOO_LARGE,
        )
    if length > avail:  # rule 4
        raise ProtocolError(
            f"{where}: length {length} is beyond the {avail} bytes left", code=ErrorCode.TRUNCATED_FRAME
        )
    if ver != VERSION:  # rule 5
        raise ProtocolError(f"{where}: unsupported version {ver}", code=ErrorCode.UNSUPPORTED_VERSION)
    allowed = ALLOWED_FLAGS.get(op)
    if allowed is None:  # rule 6
        raise ProtocolError(f"{where}: unknown op 0x{op:02x}", code=ErrorCode.UNKNOWN_OP)
    if flags & ~allowed:  # rule 7
        raise ProtocolError(
            f"{_op_name(op)} {where}: undefined flag bits 0x{flags:04x}", code=ErrorCode.BAD_FLAGS
        )
    try:  # rules 8 and 9
        frame = _DECODERS[op](buf[off + HEADER_SIZE : off + length], rid, flags)
    except _Bad as bad:
        raise ProtocolError(f"{_op_name(op)} {where}: {bad.reason}", code=bad.code) from None
    return frame, length


def _frames(buf: bytes, max_frame: int) -> Iterator[Frame]:
    if not buf:
        raise ProtocolError("empty message", code=ErrorCode.MALFORMED_FRAME)
    off = 0
    while off < len(buf):
        frame, length = _next_frame(buf, off, max_frame)
        yield frame
        off += length


def decode(data: BytesLike, max_frame: int = DEFAULT_MAX_FRAME) -> list[Frame]:
    """Decode every frame of one WebSocket message; raise ProtocolError at the first bad one."""
    return list(_frames(_as_bytes(data), _max_frame_arg(max_frame)))


def iter_frames(data: BytesLike, max_frame: int = DEFAULT_MAX_FRAME) -> Iterator[Frame]:
    """Yield the frames of one message in order; raise ProtocolError at the first bad one."""
    # Arguments are checked now, the frames lazily: as the native iterator does.
    return _frames(_as_bytes(data), _max_frame_arg(max_frame))


def peek_header(data: BytesLike, offset: int = 0) -> tuple[int, int, int, int, int]:
    """(len, ver, op, flags, rid) of the header at ``offset``, without validating anything else."""
    off = index(offset)
    if off < 0:
        raise ValueError("offset must be >= 0")
    buf = _as_bytes(data)
    if len(buf) - off < HEADER_SIZE:
        raise ProtocolError(
            f"frame at byte {off}: {max(len(buf) - off, 0)} bytes left, a header needs 12",
            code=ErrorCode.TRUNCATED_FRAME,
        )
    length, ver, op, flags, rid = _HEADER.unpack_from(buf, off)
    return length, ver, op, flags, rid


# ==== encoding ========================================================================================
# Fields are checked in layout order (rid and flags first), exactly as codec.pyx does, so both
# implementations raise the same error for the same frame.


def _encode_error(code: ErrorCode, op: int, reason: str) -> ProtocolError:
    return ProtocolError(f"{_op_name(op)}: {reason}", code=code)


def _uint(v: Any, maxv: int, op: int, field: str) -> int:
    """An unsigned integer field: TypeError for a non-integer, BAD_BODY when out of range."""
    if type(v) is not int:
        v = index(v)  # ints, bools, numpy integers; not floats
    if v < 0 or v > maxv:
        raise _encode_error(_BAD_BODY, op, f"{field} out of range")
    return int(v)


def _kind_arg(v: Any, op: int, lo: int = 1, hi: int = 3) -> int:
    kind = _uint(v, U64_MAX, op, "kind")
    if not lo <= kind <= hi:
        raise _encode_error(_BAD_BODY, op, R_KIND)
    return kind


def _bytes_arg(v: Any) -> bytes:
    return v if type(v) is bytes else memoryview(v).tobytes()


def _utf8_arg(v: Any, op: int, field: str) -> bytes:
    if not isinstance(v, str):
        raise TypeError(f"{_op_name(op)} {field} must be str, not {type(v).__name__}")
    try:
        return v.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        raise _encode_error(_BAD_UTF8, op, f"{field} is not valid UTF-8") from None


def _flags_arg(v: Any, op: int) -> int:
    flags = v if type(v) is int else index(v)
    if flags < 0 or flags & ~ALLOWED_FLAGS[op]:
        raise _encode_error(ErrorCode.BAD_FLAGS, op, f"flags {flags} set bits the operation does not define")
    return int(flags)


def _cmid_arg(v: Any, op: int) -> bytes:
    cmid = _bytes_arg(v)
    if len(cmid) != CLIENT_MSG_ID_SIZE:
        raise _encode_error(_BAD_BODY, op, "client_msg_id is not 16 bytes")
    return cmid


def _list_arg(v: Any) -> list[Any]:
    return v if type(v) is list else list(v)


def _enc_record(m: Message, op: int) -> bytes:
    kind = _kind_arg(m.kind, op)
    ct = _uint(m.content_type, U8_MAX, op, "content_type")
    conv_id = _uint(m.conv_id, U64_MAX, op, "conv_id")
    seq = _uint(m.seq, U64_MAX, op, "seq")
    msg_id = _uint(m.msg_id, U64_MAX, op, "msg_id")
    sender_id = _uint(m.sender_id, U64_MAX, op, "sender_id")
    ts_ms = _uint(m.ts_ms, U64_MAX, op, "ts_ms")
    cmid = _cmid_arg(m.client_msg_id, op)
    body = _bytes_arg(m.body)
    if len(body) > U32_MAX - HEADER_SIZE - MESSAGE_RECORD_SIZE:
        raise _encode_error(_BAD_BODY, op, R_TOO_LONG)
    return _RECORD.pack(kind, ct, conv_id, seq, msg_id, sender_id, ts_ms, cmid, len(body)) + body


def _enc_auth(f: Auth, op: int) -> bytes:
    token = _utf8_arg(f.token, op, "token")
    if not 1 <= len(token) <= MAX_TOKEN:
        raise _encode_error(_BAD_BODY, op, R_TOKEN_LEN)
    return token


def _enc_auth_ok(f: AuthOk, op: int) -> bytes:
    return _AUTH_OK.pack(
        _uint(f.user_id, U64_MAX, op, "user_id"),
        _uint(f.session_id, U64_MAX, op, "session_id"),
        _uint(f.server_time_ms, U64_MAX, op, "server_time_ms"),
        _uint(f.heartbeat_ms, U32_MAX, op, "heartbeat_ms"),
        _uint(f.max_frame, U32_MAX, op, "max_frame"),
    )


def _enc_ping(f: Ping | Pong, op: int) -> bytes:
    payload = _bytes_arg(f.payload)
    if len(payload) > MAX_PING_PAYLOAD:
        raise _encode_error(_BAD_BODY, op, R_PAYLOAD_LEN)
    return payload


def _enc_send(f: Send, op: int) -> bytes:
    kind = _kind_arg(f.kind, op)
    ct = _uint(f.content_type, U8_MAX, op, "content_type")
    conv_id = _uint(f.conv_id, U64_MAX, op, "conv_id")
    cmid = _cmid_arg(f.client_msg_id, op)
    return _SEND.pack(kind, ct, conv_id, cmid) + _bytes_arg(f.body)


def _enc_send_ack(f: SendAck, op: int) -> bytes:
    return _SEND_ACK.pack(
        _kind_arg(f.kind, op),
        _uint(f.conv_id, U64_MAX, op, "conv_id"),
        _uint(f.seq, U64_MAX, op, "seq"),
        _uint(f.msg_id, U64_MAX, op, "msg_id"),
        _uint(f.ts_ms, U64_MAX, op, "ts_ms"),
    )


def _enc_sync(f: Sync, op: int) -> bytes:
    entries = _list_arg(f.entries)
    if len(entries) > U16_MAX:
        raise _encode_error(_BAD_BODY, op, "too many entries for the count field")
    parts = [_U16.pack(len(entries))]
    for e in entries:
        parts.append(
            _SYNC_ENTRY.pack(
                _kind_arg(e.kind, op), _uint(e.conv_id, U64_MAX, op, "conv_id"), _uint(e.seq, U64_MAX, op, "seq")
            )
        )
    return b"".join(parts)


def _enc_sync_result(f: SyncResult, op: int) -> bytes:
    entries = _list_arg(f.entries)
    if len(entries) > U32_MAX:
        raise _encode_error(_BAD_BODY, op, "too many entries for the count field")
    parts = [_U32.pack(len(entries))]
    for e in entries:
        parts.append(
            _SYNC_RESULT_ENTRY.pack(
                _kind_arg(e.kind, op),
                _uint(e.conv_id, U64_MAX, op, "conv_id"),
                _uint(e.last_seq, U64_MAX, op, "last_seq"),
                _uint(e.read_seq, U64_MAX, op, "read_seq"),
            )
        )
    return b"".join(parts)


def _enc_history(f: History, op: int) -> bytes:
    kind = _kind_arg(f.kind, op)
    conv_id = _uint(f.conv_id, U64_MAX, op, "conv_id")
    from_seq = _uint(f.from_seq, U64_MAX, op, "from_seq")
    limit = _uint(f.limit, U64_MAX, op, "limit")
    if not 1 <= limit <= MAX_HISTORY_LIMIT:
        raise _encode_error(_BAD_BODY, op, R_LIMIT)
    return _HISTORY.pack(kind, conv_id, from_seq, limit)


def _enc_history_result(f: HistoryResult, op: int) -> bytes:
    kind = _kind_arg(f.kind, op)
    conv_id = _uint(f.conv_id, U64_MAX, op, "conv_id")
    messages = _list_arg(f.messages)
    if len(messages) > U16_MAX:
        raise _encode_error(_BAD_BODY, op, "too many messages for the count field")
    parts = [_HISTORY_RESULT.pack(kind, conv_id, len(messages))]
    parts.extend(_enc_record(m, op) for m in messages)
    return b"".join(parts)


def _enc_read(f: Read, op: int) -> bytes:
    return _READ.pack(
        _kind_arg(f.kind, op), _uint(f.conv_id, U64_MAX, op, "conv_id"), _uint(f.seq, U64_MAX, op, "seq")
    )


def _enc_empty(f: ReadOk, op: int) -> bytes:
    return b""


def _enc_room(f: Subscribe | SubscribeOk | Unsubscribe | UnsubscribeOk, op: int) -> bytes:
    return _U64.pack(_uint(f.room_id, U64_MAX, op, "room_id"))


def _enc_typing(f: Typing, op: int) -> bytes:
    return _TYPING.pack(_kind_arg(f.kind, op), _uint(f.conv_id, U64_MAX, op, "conv_id"))


def _enc_call(f: Call, op: int) -> bytes:
    method = _utf8_arg(f.method, op, "method")
    if not 1 <= len(method) <= MAX_METHOD:
        raise _encode_error(_BAD_BODY, op, R_METHOD_LEN)
    return bytes((len(method),)) + method + _bytes_arg(f.payload)


def _enc_call_result(f: CallResult, op: int) -> bytes:
    return _bytes_arg(f.payload)


def _enc_deliver(f: Deliver, op: int) -> bytes:
    return _enc_record(f.message, op)


def _enc_event(f: Event, op: int) -> bytes:
    fixed = _EVENT.pack(
        _uint(f.type, U8_MAX, op, "type"),
        _kind_arg(f.kind, op, 0, 3),
        _uint(f.conv_id, U64_MAX, op, "conv_id"),
        _uint(f.actor_id, U64_MAX, op, "actor_id"),
        _uint(f.value, U64_MAX, op, "value"),
    )
    return fixed + _bytes_arg(f.extra)


def _enc_goaway(f: GoAway, op: int) -> bytes:
    code = _uint(f.code, U16_MAX, op, "code")
    retry_after_ms = _uint(f.retry_after_ms, U32_MAX, op, "retry_after_ms")
    url = _utf8_arg(f.url, op, "url")
    if len(url) > U16_MAX:
        raise _encode_error(_BAD_BODY, op, "url longer than 65535 bytes")
    reason = _utf8_arg(f.reason, op, "reason")
    return _GOAWAY.pack(code, retry_after_ms, len(url)) + url + reason


def _enc_error(f: Error, op: int) -> bytes:
    code = _uint(f.code, U16_MAX, op, "code")
    retry_after_ms = _uint(f.retry_after_ms, U32_MAX, op, "retry_after_ms")
    return _ERROR.pack(code, retry_after_ms) + _utf8_arg(f.message, op, "message")


_ENCODERS: Final[dict[int, Callable[[Any, int], bytes]]] = {
    Op.AUTH: _enc_auth,
    Op.AUTH_OK: _enc_auth_ok,
    Op.PING: _enc_ping,
    Op.PONG: _enc_ping,
    Op.SEND: _enc_send,
    Op.SEND_ACK: _enc_send_ack,
    Op.SYNC: _enc_sync,
    Op.SYNC_RESULT: _enc_sync_result,
    Op.HISTORY: _enc_history,
    Op.HISTORY_RESULT: _enc_history_result,
    Op.READ: _enc_read,
    Op.READ_OK: _enc_empty,
    Op.SUBSCRIBE: _enc_room,
    Op.SUBSCRIBE_OK: _enc_room,
    Op.UNSUBSCRIBE: _enc_room,
    Op.UNSUBSCRIBE_OK: _enc_room,
    Op.TYPING: _enc_typing,
    Op.CALL: _enc_call,
    Op.CALL_RESULT: _enc_call_result,
    Op.DELIVER: _enc_deliver,
    Op.EVENT: _enc_event,
    Op.GOAWAY: _enc_goaway,
    Op.ERROR: _enc_error,
}
_OP_OF_TYPE: Final[dict[type, int]] = {cls: int(op) for op, cls in FRAME_TYPES.items()}


def _frame_op(frame: object) -> int:
    for cls in type(frame).__mro__:
        op = _OP_OF_TYPE.get(cls)
        if op is not None:
            return op
    raise TypeError(f"cannot encode {type(frame).__name__}: not a protocol frame")


def _encode_frame(frame: Frame) -> bytes:
    op = _frame_op(frame)
    rid = _uint(frame.rid, U32_MAX, op, "rid")
    flags = _flags_arg(frame.flags, op)
    body = _ENCODERS[op](frame, op)
    if len(body) > U32_MAX - HEADER_SIZE:
        raise _encode_error(_BAD_BODY, op, R_TOO_LONG)
    return _HEADER.pack(HEADER_SIZE + len(body), VERSION, op, flags, rid) + body


def encode(frame: Frame) -> bytes:
    """The wire bytes of one frame; ProtocolError for a field the protocol cannot carry."""
    return _encode_frame(frame)


def encode_many(frames: Iterable[Frame]) -> bytes:
    """Frames back to back, as one WebSocket message carries them."""
    return b"".join([_encode_frame(f) for f in frames])


def encode_deliver(
    kind: int,
    content_type: int,
    conv_id: int,
    seq: int,
    msg_id: int,
    sender_id: int,
    ts_ms: int,
    client_msg_id: BytesLike,
    body: BytesLike,
) -> bytes:
    """DELIVER (rid 0, flags 0) from plain values; equal to encode(Deliver(Message(...)))."""
    msg = Message(kind, content_type, conv_id, seq, msg_id, sender_id, ts_ms, client_msg_id, body)  # type: ignore[arg-type]
    return _encode_frame(Deliver(msg))


def encode_send_ack(rid: int, flags: int, kind: int, conv_id: int, seq: int, msg_id: int, ts_ms: int) -> bytes:
    """SEND_ACK from plain values; equal to encode(SendAck(...))."""
    return _encode_frame(SendAck(kind, conv_id, seq, msg_id, ts_ms, rid, flags))


def encode_error(rid: int, code: int, retry_after_ms: int, message: str) -> bytes:
    """ERROR from plain values; equal to encode(Error(code, retry_after_ms, message, rid))."""
    return _encode_frame(Error(code, retry_after_ms, message, rid))


def encode_event(
    type: int,  # the wire field's name (shadows the builtin here only)
    kind: int,
    conv_id: int,
    actor_id: int,
    value: int,
    extra: BytesLike = b"",
) -> bytes:
    """EVENT (rid 0, flags 0) from plain values; equal to encode(Event(...))."""
    return _encode_frame(Event(type, kind, conv_id, actor_id, value, extra))  # type: ignore[arg-type]
