"""The hex vectors of tests/vectors/protocol_v1.json, both ways, on both codecs.

Format of the file: its "format" key and docs/protocol.md §6. Each test runs on the pure-Python
twin ("py-codec") and the Cython module ("c-codec"); a missing extension fails "c-codec".
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any

import pytest

from gochat.errors import ErrorCode, ProtocolError
from gochat.protocol import (
    DEFAULT_MAX_FRAME,
    FRAME_TYPES,
    Codec,
    Frame,
    Op,
    native_codec,
    python_codec,
)

VECTORS_PATH = Path(__file__).parent / "vectors" / "protocol_v1.json"
VECTORS: dict[str, Any] = json.loads(VECTORS_PATH.read_text(encoding="utf-8"))
VALID: list[dict[str, Any]] = VECTORS["valid"]
INVALID: list[dict[str, Any]] = VECTORS["invalid"]


@pytest.fixture(params=["py-codec", "c-codec"])
def codec(request: pytest.FixtureRequest) -> Codec:
    return python_codec() if request.param == "py-codec" else native_codec()


def _value(tp: Any, raw: Any) -> Any:
    """A JSON value as the frames.py field type ``tp`` holds it (see the file's "values")."""
    if tp is int:
        return int(raw)  # u64 fields are decimal strings
    if tp is bytes:
        return bytes.fromhex(raw)
    if tp is str:
        return raw
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        return [_value(item, x) for x in raw]
    if dataclasses.is_dataclass(tp):
        return _dataclass(tp, raw)
    raise TypeError(f"no JSON mapping for {tp!r}")


def _dataclass(cls: Any, obj: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    return cls(**{f.name: _value(hints[f.name], obj[f.name]) for f in dataclasses.fields(cls)})


def frame_from_json(obj: dict[str, Any]) -> Frame:
    cls = FRAME_TYPES[Op[obj["op"]]]
    assert set(obj) == {"op"} | {f.name for f in dataclasses.fields(cls)}, obj
    frame: Frame = _dataclass(cls, obj)
    return frame


def message_bytes(vector: dict[str, Any]) -> bytes:
    return bytes.fromhex("".join(vector["hex"].split()))


def max_frame(vector: dict[str, Any]) -> int:
    return int(vector.get("max_frame", VECTORS["default_max_frame"]))


def _ids(vectors: list[dict[str, Any]]) -> list[str]:
    return [v["name"] for v in vectors]


# ---- the file itself ---------------------------------------------------------------------------------


def test_file_documents_its_format() -> None:
    assert {"summary", "hex", "valid", "invalid", "frame", "values"} <= set(VECTORS["format"])
    assert VECTORS["protocol_version"] == 1
    assert VECTORS["default_max_frame"] == DEFAULT_MAX_FRAME


def test_every_op_has_a_valid_vector() -> None:
    ops = {frame["op"] for v in VALID for frame in v["frames"]}
    assert ops == {op.name for op in Op}
    assert any(len(v["frames"]) > 1 for v in VALID), "a multi-frame message"


def test_every_rule_has_an_invalid_vector() -> None:
    assert {v["rule"] for v in INVALID} == {"empty", 1, 2, 3, 4, 5, 6, 7, 8, 9}
    for v in INVALID:
        assert ErrorCode[v["error"]] == v["code"], v["name"]
    # rule 9 for every text field of the protocol
    utf8_names = " ".join(v["description"] for v in INVALID if v["rule"] == 9)
    for field in ("token", "method", "url", "reason", "message"):
        assert field in utf8_names, field


def test_names_are_unique() -> None:
    names = _ids(VALID + INVALID)
    assert len(names) == len(set(names))


# ---- valid vectors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("vector", VALID, ids=_ids(VALID))
def test_decode_valid(codec: Codec, vector: dict[str, Any]) -> None:
    expected = [frame_from_json(f) for f in vector["frames"]]
    assert codec.decode(message_bytes(vector), max_frame(vector)) == expected
    assert list(codec.iter_frames(message_bytes(vector), max_frame(vector))) == expected


@pytest.mark.parametrize("vector", VALID, ids=_ids(VALID))
def test_encode_valid(codec: Codec, vector: dict[str, Any]) -> None:
    frames = [frame_from_json(f) for f in vector["frames"]]
    data = message_bytes(vector)
    assert codec.encode_many(frames) == data
    assert b"".join(codec.encode(f) for f in frames) == data


def test_decode_accepts_any_bytes_like(codec: Codec) -> None:
    for vector in VALID:
        data = message_bytes(vector)
        expected = codec.decode(data, max_frame(vector))
        assert codec.decode(bytearray(data), max_frame(vector)) == expected
        assert codec.decode(memoryview(data), max_frame(vector)) == expected
        # a view that does not start at the beginning of its buffer
        padded = memoryview(b"\xaa" * 3 + data + b"\xbb")[3:-1]
        assert codec.decode(padded, max_frame(vector)) == expected


# ---- invalid vectors -------------------------------------------------------------------------------


@pytest.mark.parametrize("vector", INVALID, ids=_ids(INVALID))
def test_decode_invalid(codec: Codec, vector: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError) as info:
        codec.decode(message_bytes(vector), max_frame(vector))
    assert info.value.code == ErrorCode[vector["error"]]
    assert info.value.fatal


@pytest.mark.parametrize("vector", INVALID, ids=_ids(INVALID))
def test_iter_frames_invalid(codec: Codec, vector: dict[str, Any]) -> None:
    before = [frame_from_json(f) for f in vector.get("frames_before", [])]
    frames = codec.iter_frames(message_bytes(vector), max_frame(vector))
    for expected in before:
        assert next(frames) == expected
    with pytest.raises(ProtocolError) as info:
        next(frames)
    assert info.value.code == ErrorCode[vector["error"]]
    assert list(frames) == []  # a bad frame ends the message


@pytest.mark.parametrize("vector", INVALID, ids=_ids(INVALID))
def test_error_messages_agree(vector: dict[str, Any]) -> None:
    messages = []
    for codec in (python_codec(), native_codec()):
        with pytest.raises(ProtocolError) as info:
            codec.decode(message_bytes(vector), max_frame(vector))
        messages.append(info.value.message)
    assert messages[0] == messages[1]
