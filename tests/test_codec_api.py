"""The codec's public surface: implementation selection, fast encoders, stubs, docs, peek_header."""

from __future__ import annotations

import ast
import inspect
import os
import re
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

import gochat.protocol
from gochat.errors import ErrorCode, ProtocolError, markdown_error_table
from gochat.protocol import (
    DEFAULT_MAX_FRAME,
    Codec,
    Deliver,
    Error,
    Event,
    Frame,
    HistoryResult,
    Message,
    Ping,
    Send,
    SendAck,
    constants,
    frames,
    native_codec,
    python_codec,
)

ROOT = Path(__file__).resolve().parent.parent
PUBLIC = [
    "decode", "encode", "encode_deliver", "encode_error", "encode_event", "encode_many",
    "encode_send_ack", "iter_frames", "peek_header",
]


@pytest.fixture(params=["py-codec", "c-codec"])
def codec(request: pytest.FixtureRequest) -> Codec:
    return python_codec() if request.param == "py-codec" else native_codec()


def _python(code: str, **env: str) -> str:
    """Run ``code`` in a fresh interpreter (selection happens once per process, at import)."""
    environ = {k: v for k, v in os.environ.items() if k != "GOCHAT_NO_EXTENSIONS"} | env
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=environ, capture_output=True,
        text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


# ---- selection -----------------------------------------------------------------------------------


def test_native_codec_is_built() -> None:
    # Fails (never skips) without the extension: the differential tests would be meaningless.
    module = native_codec()
    assert Path(module.__file__ or "").suffix in (".so", ".pyd")  # type: ignore[attr-defined]


def test_default_is_native() -> None:
    expected = "python" if os.environ.get("GOCHAT_NO_EXTENSIONS", "") not in ("", "0", "false", "no") else "native"
    assert gochat.protocol.IMPLEMENTATION == expected
    if expected == "native":
        assert gochat.protocol.decode is native_codec().decode


@pytest.mark.parametrize(("value", "expected"), [("1", "python"), ("yes", "python"), ("0", "native"), ("", "native")])
def test_no_extensions_switch(value: str, expected: str) -> None:
    out = _python(
        """
        import sys, gochat.protocol as p
        print(p.IMPLEMENTATION, p.encode.__module__, "gochat._native.codec" in sys.modules)
        """,
        GOCHAT_NO_EXTENSIONS=value,
    )
    module = "gochat.protocol._codec_py" if expected == "python" else "gochat._native.codec"
    assert out == f"{expected} {module} {expected == 'native'}"


def test_missing_extension_falls_back_with_one_warning() -> None:
    out = _python(
        """
        import logging, sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "gochat._native.codec":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        records = []
        logging.getLogger("gochat.protocol").addHandler(type("H", (logging.Handler,), {"emit": lambda s, r: records.append(r)})())
        import gochat.protocol as p
        import gochat.protocol
        print(p.IMPLEMENTATION, len(records), records[0].levelname, records[0].name)
        """
    )
    assert out == "python 1 WARNING gochat.protocol"


def test_importing_the_extension_first_works() -> None:
    # gochat.protocol imports the extension, which imports gochat.protocol.frames: a cycle that
    # must resolve whichever side is imported first (fan-out cimports the codec directly).
    out = _python(
        """
        import gochat._native.codec as c
        import gochat.protocol as p
        print(p.IMPLEMENTATION, p.encode is c.encode, c.decode(c.encode(p.Ping(b"x"))) == [p.Ping(b"x")])
        """
    )
    assert out == "native True True"


# ---- stubs and signatures ------------------------------------------------------------------------


def _stub_signatures() -> dict[str, list[tuple[str, str | None]]]:
    tree = ast.parse((ROOT / "_native" / "codec.pyi").read_text())
    out = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            args = node.args.args
            defaults: list[ast.expr | None] = [None] * (len(args) - len(node.args.defaults))
            defaults += list(node.args.defaults)
            out[node.name] = [(a.arg, None if d is None else ast.literal_eval(d)) for a, d in zip(args, defaults, strict=True)]
    return out


def _runtime_signature(func: Any) -> list[tuple[str, Any]]:
    return [
        (p.name, None if p.default is inspect.Parameter.empty else p.default)
        for p in inspect.signature(func).parameters.values()
    ]


@pytest.mark.parametrize("module", ["py-codec", "c-codec"])
def test_stub_matches_module(module: str) -> None:
    codec = python_codec() if module == "py-codec" else native_codec()
    stub = _stub_signatures()
    assert sorted(stub) == PUBLIC
    assert sorted(codec.__all__) == PUBLIC  # type: ignore[attr-defined]
    for name in PUBLIC:
        assert _runtime_signature(getattr(codec, name)) == stub[name], name


def test_default_max_frame_matches_constants() -> None:
    for codec in (python_codec(), native_codec()):
        assert inspect.signature(codec.decode).parameters["max_frame"].default == DEFAULT_MAX_FRAME


# ---- fast encoders -------------------------------------------------------------------------------

CMID = bytes(range(16))


@pytest.mark.parametrize("body", [b"", b"x", bytes(64), bytes(1024), bytes(60000)])
def test_encode_deliver(codec: Codec, body: bytes) -> None:
    args = (2, 1, 300, 17, 2**64 - 1, 7, 1_767_225_600_000, CMID, body)
    assert codec.encode_deliver(*args) == codec.encode(Deliver(Message(*args)))
    assert codec.encode_deliver(*args[:-2], bytearray(CMID), memoryview(body)) == codec.encode_deliver(*args)


def test_encode_send_ack(codec: Codec) -> None:
    for flags in (0, 1):
        data = codec.encode_send_ack(5, flags, 1, 9, 3, 1001, 1_767_225_600_000)
        assert data == codec.encode(SendAck(1, 9, 3, 1001, 1_767_225_600_000, rid=5, flags=flags))


@pytest.mark.parametrize("message", ["", "not a member", "é" * 100])
def test_encode_error(codec: Codec, message: str) -> None:
    assert codec.encode_error(5, 302, 1500, message) == codec.encode(Error(302, 1500, message, rid=5))


@pytest.mark.parametrize("extra", [b"", b'{"name":"ops"}'])
def test_encode_event(codec: Codec, extra: bytes) -> None:
    assert codec.encode_event(6, 2, 300, 7, 0, extra) == codec.encode(Event(6, 2, 300, 7, 0, extra))
    assert codec.encode_event(1, 0, 0, 7, 1) == codec.encode(Event(1, 0, 0, 7, 1))


@pytest.mark.parametrize(
    ("func", "args", "code"),
    [
        ("encode_deliver", (0, 1, 9, 1, 1, 1, 1, CMID, b""), ErrorCode.BAD_BODY),
        ("encode_deliver", (1, 256, 9, 1, 1, 1, 1, CMID, b""), ErrorCode.BAD_BODY),
        ("encode_deliver", (1, 1, 9, 1, 1, 1, 1, CMID[:15], b""), ErrorCode.BAD_BODY),
        ("encode_send_ack", (2**32, 0, 1, 9, 1, 1, 1), ErrorCode.BAD_BODY),
        ("encode_send_ack", (1, 2, 1, 9, 1, 1, 1), ErrorCode.BAD_FLAGS),
        ("encode_send_ack", (1, 0, 4, 9, 1, 1, 1), ErrorCode.BAD_BODY),
        ("encode_error", (1, 70000, 0, ""), ErrorCode.BAD_BODY),
        ("encode_error", (1, 500, -1, ""), ErrorCode.BAD_BODY),
        ("encode_error", (1, 500, 0, "\ud800"), ErrorCode.BAD_UTF8),
        ("encode_event", (256, 0, 0, 0, 0), ErrorCode.BAD_BODY),
        ("encode_event", (1, 4, 0, 0, 0), ErrorCode.BAD_BODY),
        ("encode_event", (1, 0, 0, 0, -1), ErrorCode.BAD_BODY),
    ],
)
def test_fast_encoder_errors(codec: Codec, func: str, args: tuple[Any, ...], code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as info:
        getattr(codec, func)(*args)
    assert info.value.code == code
    messages = []
    for c in (python_codec(), native_codec()):
        with pytest.raises(ProtocolError) as info:
            getattr(c, func)(*args)
        messages.append(info.value.message)
    assert messages[0] == messages[1]


# ---- API details -----------------------------------------------------------------------------------


def test_peek_header(codec: Codec) -> None:
    data = codec.encode(SendAck(1, 9, 3, 1001, 5, rid=77, flags=1))
    assert codec.peek_header(data) == (45, 1, 0x83, 1, 77)
    two = codec.encode(Ping(b"ab", rid=3)) + data
    assert codec.peek_header(two, 14) == (45, 1, 0x83, 1, 77)
    assert codec.peek_header(bytes(12) + b"\xff" * 12, 12) == (0xFFFFFFFF, 0xFF, 0xFF, 0xFFFF, 0xFFFFFFFF)
    for bad in (b"", data[:11], data):
        offset = 34 if bad is data else 0
        with pytest.raises(ProtocolError) as info:
            codec.peek_header(bad, offset)
        assert info.value.code == ErrorCode.TRUNCATED_FRAME
    with pytest.raises(ProtocolError):
        codec.peek_header(data, 100)
    with pytest.raises(ValueError):
        codec.peek_header(data, -1)


def test_argument_errors(codec: Codec) -> None:
    with pytest.raises(TypeError):
        codec.decode("not bytes")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        codec.iter_frames(12)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        codec.decode(b"", -1)
    with pytest.raises(TypeError):
        codec.encode(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        codec.encode_many([Ping(), "frame"])  # type: ignore[list-item]


def test_subclass_of_a_frame_encodes(codec: Codec) -> None:
    class MyPing(Ping):
        pass

    assert codec.encode(MyPing(b"x", rid=1)) == codec.encode(Ping(b"x", rid=1))


def test_encode_many(codec: Codec) -> None:
    records = [Message(1, 1, 9, n, n, 7, 0, CMID, bytes(n * 300)) for n in range(1, 6)]
    batch: list[Frame] = [Ping(b"a", rid=1), HistoryResult(1, 9, records), Ping(b"b", rid=2)]
    data = codec.encode_many(batch)
    assert data == b"".join(codec.encode(f) for f in batch)
    assert codec.decode(data) == batch
    assert codec.encode_many([]) == b""
    assert codec.encode_many(iter(batch)) == data  # any iterable


def test_max_frame_above_u32(codec: Codec) -> None:
    data = codec.encode(Ping())
    assert codec.decode(data, 2**70) == [Ping()]


def test_iter_frames_is_lazy(codec: Codec) -> None:
    data = codec.encode(Ping(b"1")) + b"\x00" * 3
    frames = codec.iter_frames(data)
    assert next(frames) == Ping(b"1")
    with pytest.raises(ProtocolError):
        next(frames)


def test_native_codec_does_not_leak() -> None:
    codec = native_codec()
    send = Send(1, 1, 9, CMID, bytes(100), rid=5)
    batch: list[Frame] = [send, Deliver(Message(1, 1, 9, 1, 2, 3, 4, CMID, b"x")), Error(500, 0, "oops")] * 4
    data = codec.encode_many(batch)

    def work() -> None:
        for _ in range(2000):
            codec.decode(codec.encode(send))
            codec.decode(data)
            list(codec.iter_frames(data))
            codec.encode_deliver(1, 1, 9, 1, 2, 3, 4, CMID, b"body")
            for bad in (b"", data[:-1], b"\x0c\x00\x00\x00\x02\x02\x00\x00\x00\x00\x00\x00"):
                try:
                    codec.decode(bad)
                except ProtocolError:
                    pass
            try:
                codec.encode(Send(1, 1, 9, CMID, "not bytes"))  # type: ignore[arg-type]
            except TypeError:
                pass

    work()  # warm caches and free lists
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        work()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert after - before < 64 * 1024, f"grew by {after - before} bytes"


# ---- docs ----------------------------------------------------------------------------------------


def test_protocol_doc_error_table_is_generated() -> None:
    text = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
    begin, end = "<!-- error-table:begin -->\n", "<!-- error-table:end -->"
    assert text.count(begin) == 1 and text.count(end) == 1
    table = text[text.index(begin) + len(begin) : text.index(end)]
    assert table == markdown_error_table(), "regenerate it from gochat.errors.markdown_error_table()"


def test_package_reexports_constants_and_frames() -> None:
    for module in (constants, frames):
        public = getattr(module, "__all__", None) or [n for n in vars(module) if n.isupper() or n[:1].isupper()]
        for name in public:
            if not name.startswith("_") and name not in ("Final", "ClassVar"):
                assert getattr(gochat.protocol, name) is getattr(module, name), name
                assert name in gochat.protocol.__all__, name


def test_pxd_constants_mirror_python() -> None:
    """codec.pxd repeats op codes, error codes and sizes as C enums; they must not drift."""
    pxd = (ROOT / "_native" / "codec.pxd").read_text()
    enums = {m[1]: int(m[2], 0) for m in re.finditer(r"^\s+([A-Z][A-Z0-9_]*) = (0x[0-9A-Fa-f]+|\d+)", pxd, re.M)}
    ops = {name[3:]: value for name, value in enums.items() if name.startswith("OP_")}
    assert ops == {op.name: int(op) for op in constants.Op}
    for name, value in enums.items():
        if name.startswith("ERR_"):
            assert ErrorCode[name[4:]] == value, name
    for name in ("HEADER_SIZE", "MESSAGE_RECORD_SIZE", "CLIENT_MSG_ID_SIZE", "DEFAULT_MAX_FRAME"):
        assert enums[name] == getattr(constants, name), name
    assert enums["PROTOCOL_VERSION"] == constants.VERSION
    assert enums["DELIVER_FIXED_SIZE"] == constants.HEADER_SIZE + constants.MESSAGE_RECORD_SIZE
