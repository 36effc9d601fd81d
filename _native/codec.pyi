"""Types for the Cython wire codec ``gochat._native.codec`` (twin: ``gochat.protocol._codec_py``)."""

from collections.abc import Iterable, Iterator

from gochat.protocol.frames import Frame

__all__ = [
    "decode", "encode", "encode_deliver", "encode_error", "encode_event", "encode_many",
    "encode_send_ack", "iter_frames", "peek_header",
]

_BytesLike = bytes | bytearray | memoryview

def decode(data: _BytesLike, max_frame: int = 65536) -> list[Frame]: ...
def iter_frames(data: _BytesLike, max_frame: int = 65536) -> Iterator[Frame]: ...
def peek_header(data: _BytesLike, offset: int = 0) -> tuple[int, int, int, int, int]: ...
def encode(frame: Frame) -> bytes: ...
def encode_many(frames: Iterable[Frame]) -> bytes: ...
def encode_deliver(
    kind: int,
    content_type: int,
    conv_id: int,
    seq: int,
    msg_id: int,
    sender_id: int,
    ts_ms: int,
    client_msg_id: _BytesLike,
    body: _BytesLike,
) -> bytes: ...
def encode_send_ack(
    rid: int, flags: int, kind: int, conv_id: int, seq: int, msg_id: int, ts_ms: int
) -> bytes: ...
def encode_error(rid: int, code: int, retry_after_ms: int, message: str) -> bytes: ...
def encode_event(
    type: int, kind: int, conv_id: int, actor_id: int, value: int, extra: _BytesLike = b""
) -> bytes: ...
