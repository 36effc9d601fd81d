# ruff: noqa: RUF005
"""Generate tests/vectors/protocol_v1.json from docs/protocol.md layouts, with struct only.

Independent of both codecs on purpose: the vectors check the codecs, not the other way round.
"""

from __future__ import annotations

import json
import struct
import sys

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
from gochat.errors import ErrorCode

OPS = {
    "AUTH": 0x01, "PING": 0x02, "SEND": 0x03, "SYNC": 0x04, "HISTORY": 0x05, "READ": 0x06,
    "SUBSCRIBE": 0x07, "UNSUBSCRIBE": 0x08, "TYPING": 0x09, "CALL": 0x0A, "AUTH_OK": 0x81,
    "PONG": 0x82, "SEND_ACK": 0x83, "SYNC_RESULT": 0x84, "HISTORY_RESULT": 0x85, "READ_OK": 0x86,
    "SUBSCRIBE_OK": 0x87, "UNSUBSCRIBE_OK": 0x88, "CALL_RESULT": 0x8A, "DELIVER": 0x40,
    "EVENT": 0x41, "GOAWAY": 0x42, "ERROR": 0x7F,
}
U64_FIELDS = {
    "conv_id", "seq", "msg_id", "sender_id", "ts_ms", "user_id", "session_id", "server_time_ms",
    "from_seq", "last_seq", "read_seq", "room_id", "actor_id", "value",
}
U64MAX = 2**64 - 1


def le(fmt: str, v: int) -> bytes:
    return struct.pack("<" + fmt, v)


def hdr(length: int, op: int, flags: int = 0, rid: int = 0, ver: int = 1) -> list[bytes]:
    return [le("I", length), le("B", ver), le("B", op), le("H", flags), le("I", rid)]


def hx(parts: list[bytes]) -> str:
    return " ".join(p.hex() for p in parts if p)


def record_parts(m: dict) -> list[bytes]:
    body = bytes.fromhex(m["body"])
    return [
        le("B", m["kind"]), le("B", m["content_type"]), le("Q", int(m["conv_id"])),
        le("Q", int(m["seq"])), le("Q", int(m["msg_id"])), le("Q", int(m["sender_id"])),
        le("Q", int(m["ts_ms"])), bytes.fromhex(m["client_msg_id"]), le("I", len(body)), body,
    ]


def body_parts(f: dict) -> list[bytes]:
    op = f["op"]
    g = lambda k: int(f[k])  # noqa: E731
    if op == "AUTH":
        return [f["token"].encode()]
    if op == "AUTH_OK":
        return [le("Q", g("user_id")), le("Q", g("session_id")), le("Q", g("server_time_ms")),
                le("I", g("heartbeat_ms")), le("I", g("max_frame"))]
    if op in ("PING", "PONG", "CALL_RESULT"):
        return [bytes.fromhex(f["payload"])]
    if op == "SEND":
        return [le("B", g("kind")), le("B", g("content_type")), le("Q", g("conv_id")),
                bytes.fromhex(f["client_msg_id"]), bytes.fromhex(f["body"])]
    if op == "SEND_ACK":
        return [le("B", g("kind")), le("Q", g("conv_id")), le("Q", g("seq")), le("Q", g("msg_id")),
                le("Q", g("ts_ms"))]
    if op == "SYNC":
        parts = [le("H", len(f["entries"]))]
        for e in f["entries"]:
            parts += [le("B", e["kind"]), le("Q", int(e["conv_id"])), le("Q", int(e["seq"]))]
        return parts
    if op == "SYNC_RESULT":
        parts = [le("I", len(f["entries"]))]
        for e in f["entries"]:
            parts += [le("B", e["kind"]), le("Q", int(e["conv_id"])), le("Q", int(e["last_seq"])),
                      le("Q", int(e["read_seq"]))]
        return parts
    if op == "HISTORY":
        return [le("B", g("kind")), le("Q", g("conv_id")), le("Q", g("from_seq")), le("H", g("limit"))]
    if op == "HISTORY_RESULT":
        parts = [le("B", g("kind")), le("Q", g("conv_id")), le("H", len(f["messages"]))]
        for m in f["messages"]:
            parts += record_parts(m)
        return parts
    if op == "READ":
        return [le("B", g("kind")), le("Q", g("conv_id")), le("Q", g("seq"))]
    if op == "READ_OK":
        return []
    if op in ("SUBSCRIBE", "SUBSCRIBE_OK", "UNSUBSCRIBE", "UNSUBSCRIBE_OK"):
        return [le("Q", g("room_id"))]
    if op == "TYPING":
        return [le("B", g("kind")), le("Q", g("conv_id"))]
    if op == "CALL":
        method = f["method"].encode()
        return [le("B", len(method)), method, bytes.fromhex(f["payload"])]
    if op == "DELIVER":
        return record_parts(f["message"])
    if op == "EVENT":
        return [le("B", g("type")), le("B", g("kind")), le("Q", g("conv_id")), le("Q", g("actor_id")),
                le("Q", g("value")), bytes.fromhex(f["extra"])]
    if op == "GOAWAY":
        url = f["url"].encode()
        return [le("H", g("code")), le("I", g("retry_after_ms")), le("H", len(url)), url,
                f["reason"].encode()]
    if op == "ERROR":
        return [le("H", g("code")), le("I", g("retry_after_ms")), f["message"].encode()]
    raise KeyError(op)


def frame_parts(f: dict) -> list[bytes]:
    body = body_parts(f)
    return hdr(12 + sum(map(len, body)), OPS[f["op"]], f["flags"], f["rid"]) + body


def fr(op: str, rid: int = 0, flags: int = 0, **fields: object) -> dict:
    out: dict = {"op": op, "rid": rid, "flags": flags}
    for k, v in fields.items():
        out[k] = str(v) if k in U64_FIELDS else v
    return out


def msg(kind: int, ct: int, conv_id: int, seq: int, msg_id: int, sender_id: int, ts_ms: int,
        cmid: bytes, body: bytes) -> dict:
    return {"kind": kind, "content_type": ct, "conv_id": str(conv_id), "seq": str(seq),
            "msg_id": str(msg_id), "sender_id": str(sender_id), "ts_ms": str(ts_ms),
            "client_msg_id": cmid.hex(), "body": body.hex()}


CMID = bytes(range(16))
CMID2 = bytes.fromhex("0f1e2d3c4b5a69788796a5b4c3d2e1f0")
TS = 1_767_225_600_000  # 2026-01-01T00:00:00Z

valid: list[dict] = []


def V(name: str, description: str, frames: list[dict], max_frame: int | None = None) -> None:
    parts: list[bytes] = []
    for f in frames:
        parts += frame_parts(f)
    v = {"name": name, "description": description, "frames": frames, "hex": hx(parts)}
    if max_frame is not None:
        v["max_frame"] = max_frame
    valid.append(v)


V("auth", "AUTH with a short token", [fr("AUTH", rid=1, token="tok.en-1")])
V("auth_token_1", "AUTH token of 1 byte (lower bound)", [fr("AUTH", rid=2, token="x")])
V("auth_token_4096", "AUTH token of 4096 bytes (upper bound)", [fr("AUTH", rid=3, token="a" * 4096)])
V("auth_token_utf8", "AUTH token with 2-, 3- and 4-byte UTF-8 sequences",
  [fr("AUTH", rid=4, token="é€𝄞")])
V("auth_ok", "AUTH_OK echoing rid 1",
  [fr("AUTH_OK", rid=1, user_id=7, session_id=0x0102030405060708, server_time_ms=TS,
      heartbeat_ms=25000, max_frame=65536)])
V("ping_empty", "PING with an empty payload", [fr("PING", rid=9, payload="")])
V("ping_64", "PING with a 64-byte payload (upper bound)", [fr("PING", rid=10, payload=bytes(range(64)).hex())])
V("pong", "PONG echoing a payload", [fr("PONG", rid=10, payload="deadbeef")])
V("send", "SEND of a UTF-8 text to a direct conversation (peer 9)",
  [fr("SEND", rid=5, kind=1, content_type=1, conv_id=9, client_msg_id=CMID.hex(), body=b"hello".hex())])
V("send_empty_body", "SEND with an empty body to a room (the codec accepts it; the server answers 304)",
  [fr("SEND", rid=6, kind=3, content_type=0, conv_id=42, client_msg_id=CMID2.hex(), body="")])
V("send_u64_max", "SEND with conv_id 2**64-1 and content_type 255",
  [fr("SEND", rid=0xFFFFFFFF, kind=2, content_type=255, conv_id=U64MAX, client_msg_id=CMID.hex(), body="00ff")])
TRACEPARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
V("send_traced", "SEND with the TRACED flag: the body starts with a 55-byte W3C traceparent, which "
  "the codec leaves in 'body' (the server checks and strips it)",
  [fr("SEND", rid=7, flags=1, kind=2, content_type=1, conv_id=77, client_msg_id=CMID.hex(),
      body=(TRACEPARENT + b"hello").hex())])
V("send_ack", "SEND_ACK", [fr("SEND_ACK", rid=5, kind=1, conv_id=9, seq=1, msg_id=1001, ts_ms=TS)])
V("send_ack_duplicate", "SEND_ACK with the DUPLICATE flag",
  [fr("SEND_ACK", rid=5, flags=1, kind=1, conv_id=9, seq=1, msg_id=1001, ts_ms=TS)])
V("send_ack_room", "SEND_ACK for a room: seq 0",
  [fr("SEND_ACK", rid=6, kind=3, conv_id=42, seq=0, msg_id=1002, ts_ms=TS)])
V("sync_empty", "SYNC with no entries: the client knows nothing", [fr("SYNC", rid=11, entries=[])])
V("sync", "SYNC with two entries",
  [fr("SYNC", rid=12, entries=[{"kind": 1, "conv_id": "9", "seq": "17"},
                               {"kind": 2, "conv_id": "300", "seq": "0"}])])
V("sync_result", "SYNC_RESULT with one entry",
  [fr("SYNC_RESULT", rid=12, entries=[{"kind": 2, "conv_id": "300", "last_seq": "25", "read_seq": "20"}])])
V("sync_result_empty", "SYNC_RESULT with no entries", [fr("SYNC_RESULT", rid=11, entries=[])])
V("history", "HISTORY forward from seq 18, limit 50",
  [fr("HISTORY", rid=13, kind=1, conv_id=9, from_seq=18, limit=50)])
V("history_backward_1000", "HISTORY backward with limit 1000 (upper bound)",
  [fr("HISTORY", rid=14, flags=1, kind=2, conv_id=300, from_seq=U64MAX, limit=1000)])
V("history_limit_1", "HISTORY with limit 1 (lower bound)",
  [fr("HISTORY", rid=15, kind=1, conv_id=9, from_seq=1, limit=1)])
V("history_result", "HISTORY_RESULT with two records and MORE",
  [fr("HISTORY_RESULT", rid=13, flags=1, kind=1, conv_id=9, messages=[
      msg(1, 1, 9, 18, 2001, 9, TS, CMID, b"hi"),
      msg(1, 2, 9, 19, 2002, 7, TS + 1, CMID2, b'{"a":1}'),
  ])])
V("history_result_empty", "HISTORY_RESULT with no records",
  [fr("HISTORY_RESULT", rid=14, kind=2, conv_id=300, messages=[])])
V("read", "READ up to seq 19", [fr("READ", rid=16, kind=1, conv_id=9, seq=19)])
V("read_ok", "READ_OK: empty body", [fr("READ_OK", rid=16)])
V("subscribe", "SUBSCRIBE", [fr("SUBSCRIBE", rid=17, room_id=42)])
V("subscribe_ok", "SUBSCRIBE_OK", [fr("SUBSCRIBE_OK", rid=17, room_id=42)])
V("unsubscribe", "UNSUBSCRIBE", [fr("UNSUBSCRIBE", rid=18, room_id=42)])
V("unsubscribe_ok", "UNSUBSCRIBE_OK", [fr("UNSUBSCRIBE_OK", rid=18, room_id=42)])
V("typing", "TYPING", [fr("TYPING", kind=1, conv_id=9)])
V("typing_stopped", "TYPING with the STOPPED flag", [fr("TYPING", flags=1, kind=2, conv_id=300)])
V("call", "CALL with a JSON payload",
  [fr("CALL", rid=19, method="group.create", payload=b'{"name":"ops"}'.hex())])
V("call_empty_payload", "CALL with a 64-byte method and no payload (means {})",
  [fr("CALL", rid=20, method="m" * 64, payload="")])
V("call_opaque_payload", "CALL payload is opaque to the codec: not JSON, not UTF-8, still valid",
  [fr("CALL", rid=21, method="x", payload="ff00")])
V("call_result", "CALL_RESULT", [fr("CALL_RESULT", rid=19, payload=b'{"group_id":300}'.hex())])
V("deliver", "DELIVER of a direct message as Bob (id 9) sees it: conv_id is the sender, 7",
  [fr("DELIVER", message=msg(1, 1, 7, 1, 1001, 7, TS, CMID, b"hello"))])
V("deliver_empty_body", "DELIVER with an empty body",
  [fr("DELIVER", message=msg(2, 0, 300, 5, 1003, 7, TS, CMID2, b""))])
V("event_presence", "EVENT PRESENCE: kind 0, no conversation",
  [fr("EVENT", type=1, kind=0, conv_id=0, actor_id=7, value=1, extra="")])
V("event_updated", "EVENT CONVERSATION_UPDATED with extra JSON",
  [fr("EVENT", type=6, kind=2, conv_id=300, actor_id=7, value=0, extra=b'{"name":"ops"}'.hex())])
V("goaway", "GOAWAY: draining, reconnect elsewhere after 2 s",
  [fr("GOAWAY", code=502, retry_after_ms=2000, url="ws://10.0.0.2:8700/ws", reason="draining")])
V("goaway_empty", "GOAWAY with empty url and reason",
  [fr("GOAWAY", code=202, retry_after_ms=0, url="", reason="")])
V("goaway_utf8", "GOAWAY with a non-ASCII reason",
  [fr("GOAWAY", code=502, retry_after_ms=0, url="", reason="redémarrage")])
V("error", "ERROR replying to rid 5", [fr("ERROR", rid=5, code=302, retry_after_ms=0, message="not a member")])
V("error_retry_empty", "ERROR with retry_after_ms and an empty message",
  [fr("ERROR", code=400, retry_after_ms=1500, message="")])
V("multi_frame", "One WebSocket message with three frames back to back",
  [fr("DELIVER", message=msg(1, 1, 7, 2, 1004, 7, TS, CMID, b"a")),
   fr("DELIVER", message=msg(1, 1, 7, 3, 1005, 7, TS, CMID2, b"bc")),
   fr("EVENT", type=3, kind=1, conv_id=7, actor_id=7, value=3, extra="")])
V("max_frame_exact", "A frame exactly max_frame bytes long is accepted (max_frame 100)",
  [fr("CALL_RESULT", rid=1, payload=bytes(88).hex())], max_frame=100)

# ---- invalid ---------------------------------------------------------------------------------------

invalid: list[dict] = []


def X(name: str, rule: int | str, error: str, description: str, parts: list[bytes],
      max_frame: int | None = None, frames_before: list[dict] | None = None) -> None:
    v = {"name": name, "rule": rule, "error": error, "code": int(ErrorCode[error]),
         "description": description, "hex": hx(parts)}
    if max_frame is not None:
        v["max_frame"] = max_frame
    if frames_before:
        v["frames_before"] = frames_before
    invalid.append(v)


def F(op: str, body: list[bytes], flags: int = 0, rid: int = 0) -> list[bytes]:
    return hdr(12 + sum(map(len, body)), OPS[op], flags, rid) + body


def B(fmt: str, *vals: int) -> bytes:
    return struct.pack("<" + fmt, *vals)


ping = fr("PING", rid=1, payload="")
ping_parts = frame_parts(ping)
rec_ok = record_parts(msg(1, 1, 9, 1, 1, 9, TS, CMID, b"xy"))


def rec(kind: int = 1, body: bytes = b"xy", body_len: int | None = None) -> list[bytes]:
    return [B("B", kind), B("B", 1), B("Q", 9), B("Q", 1), B("Q", 1), B("Q", 9), B("Q", TS), CMID,
            B("I", len(body) if body_len is None else body_len), body]


# empty message, rules 1-4
X("empty_message", "empty", "MALFORMED_FRAME", "a message with zero bytes", [])
X("header_11_bytes", 1, "TRUNCATED_FRAME", "11 bytes: less than a header", [bytes.fromhex("0c00000001020000000000")])
X("trailing_partial_header", 1, "TRUNCATED_FRAME", "a valid PING, then 5 stray bytes",
  ping_parts + [bytes(5)], frames_before=[ping])
X("len_0", 2, "MALFORMED_FRAME", "len 0", hdr(0, 0x02))
X("len_11", 2, "MALFORMED_FRAME", "len 11, one below the header size", hdr(11, 0x02))
X("len_11_bad_version", 2, "MALFORMED_FRAME", "len 11 and version 9: rule 2 comes before rule 5",
  hdr(11, 0x02, ver=9))
X("too_large_default", 3, "FRAME_TOO_LARGE", "len 65537 > default max 65536; rule 3 comes before rule 4 "
  "(only the header is present)", hdr(65537, 0x03))
X("too_large_custom", 3, "FRAME_TOO_LARGE", "a complete 101-byte frame with max_frame 100",
  F("CALL_RESULT", [bytes(89)]), max_frame=100)
X("too_large_bad_version", 3, "FRAME_TOO_LARGE", "len above max and version 2: rule 3 first",
  hdr(70000, 0x02, ver=2))
X("len_beyond_message", 4, "TRUNCATED_FRAME", "len 20 but 16 bytes in the message", hdr(20, 0x02) + [bytes(4)])
X("len_beyond_bad_version", 4, "TRUNCATED_FRAME", "len 13 with 12 bytes and version 2: rule 4 first",
  hdr(13, 0x02, ver=2))
X("second_frame_truncated", 4, "TRUNCATED_FRAME", "a valid PING, then a frame whose len overruns",
  ping_parts + hdr(30, 0x02) + [bytes(2)], frames_before=[ping])
# rules 5-7
X("version_0", 5, "UNSUPPORTED_VERSION", "ver 0", hdr(12, 0x02, ver=0))
X("version_2", 5, "UNSUPPORTED_VERSION", "ver 2", hdr(12, 0x02, ver=2))
X("version_2_unknown_op", 5, "UNSUPPORTED_VERSION", "ver 2 and op 0x00: rule 5 before rule 6",
  hdr(12, 0x00, ver=2))
for op in (0x00, 0x0B, 0x3F, 0x43, 0x7E, 0x80, 0x89, 0x8B, 0xFF):
    X(f"unknown_op_{op:02x}", 6, "UNKNOWN_OP", f"op 0x{op:02x} is not in the table", hdr(12, op))
X("unknown_op_with_flags", 6, "UNKNOWN_OP", "op 0x0B with flags 0xffff: rule 6 before rule 7",
  hdr(12, 0x0B, flags=0xFFFF))
X("flags_send", 7, "BAD_FLAGS", "SEND defines only 0x0001 (TRACED)",
  F("SEND", [B("BBQ", 1, 1, 9), CMID], flags=0x0002))
X("flags_send_ack_bit1", 7, "BAD_FLAGS", "SEND_ACK defines only 0x0001",
  F("SEND_ACK", [B("BQQQQ", 1, 9, 1, 1, TS)], flags=0x0002))
X("flags_history_high", 7, "BAD_FLAGS", "HISTORY with 0x8001",
  F("HISTORY", [B("BQQH", 1, 9, 1, 10)], flags=0x8001))
X("flags_ping", 7, "BAD_FLAGS", "PING defines no flags", F("PING", [], flags=0x0100))
X("flags_before_body", 7, "BAD_FLAGS", "READ_OK with flags and a body: rule 7 before rule 8",
  F("READ_OK", [b"x"], flags=0x0001))
# rule 8, per op
X("auth_empty", 8, "BAD_BODY", "AUTH token of 0 bytes", F("AUTH", []))
X("auth_4097", 8, "BAD_BODY", "AUTH token of 4097 bytes", F("AUTH", [b"a" * 4097]))
X("auth_4097_bad_utf8", 8, "BAD_BODY", "AUTH token of 4097 invalid bytes: the length is checked first",
  F("AUTH", [b"\xff" * 4097]))
X("auth_ok_31", 8, "BAD_BODY", "AUTH_OK body of 31 bytes", F("AUTH_OK", [bytes(31)]))
X("auth_ok_33", 8, "BAD_BODY", "AUTH_OK body of 33 bytes", F("AUTH_OK", [bytes(33)]))
X("ping_65", 8, "BAD_BODY", "PING payload of 65 bytes", F("PING", [bytes(65)]))
X("pong_65", 8, "BAD_BODY", "PONG payload of 65 bytes", F("PONG", [bytes(65)]))
X("send_25", 8, "BAD_BODY", "SEND body of 25 bytes", F("SEND", [B("BBQ", 1, 1, 9), CMID[:15]]))
X("send_kind_0", 8, "BAD_BODY", "SEND kind 0", F("SEND", [B("BBQ", 0, 1, 9), CMID, b"x"]))
X("send_kind_4", 8, "BAD_BODY", "SEND kind 4", F("SEND", [B("BBQ", 4, 1, 9), CMID, b"x"]))
X("send_ack_32", 8, "BAD_BODY", "SEND_ACK body of 32 bytes", F("SEND_ACK", [B("BQQQQ", 1, 9, 1, 1, TS)[:32]]))
X("send_ack_34", 8, "BAD_BODY", "SEND_ACK body of 34 bytes", F("SEND_ACK", [B("BQQQQ", 1, 9, 1, 1, TS), b"\x00"]))
X("send_ack_kind_0", 8, "BAD_BODY", "SEND_ACK kind 0", F("SEND_ACK", [B("BQQQQ", 0, 9, 1, 1, TS)]))
X("sync_1", 8, "BAD_BODY", "SYNC body of 1 byte", F("SYNC", [b"\x00"]))
X("sync_count_high", 8, "BAD_BODY", "SYNC count 2 with one entry",
  F("SYNC", [B("H", 2), B("BQQ", 1, 9, 1)]))
X("sync_count_low", 8, "BAD_BODY", "SYNC count 0 with one entry",
  F("SYNC", [B("H", 0), B("BQQ", 1, 9, 1)]))
X("sync_entry_short", 8, "BAD_BODY", "SYNC count 1 with a 16-byte entry",
  F("SYNC", [B("H", 1), B("BQQ", 1, 9, 1)[:16]]))
X("sync_entry_kind", 8, "BAD_BODY", "SYNC second entry with kind 4",
  F("SYNC", [B("H", 2), B("BQQ", 1, 9, 1), B("BQQ", 4, 9, 1)]))
X("sync_result_3", 8, "BAD_BODY", "SYNC_RESULT body of 3 bytes", F("SYNC_RESULT", [bytes(3)]))
X("sync_result_count", 8, "BAD_BODY", "SYNC_RESULT count 2 with one entry",
  F("SYNC_RESULT", [B("I", 2), B("BQQQ", 1, 9, 5, 5)]))
X("sync_result_count_huge", 8, "BAD_BODY", "SYNC_RESULT count 0xffffffff with one entry",
  F("SYNC_RESULT", [B("I", 0xFFFFFFFF), B("BQQQ", 1, 9, 5, 5)]))
X("sync_result_kind", 8, "BAD_BODY", "SYNC_RESULT entry with kind 0",
  F("SYNC_RESULT", [B("I", 1), B("BQQQ", 0, 9, 5, 5)]))
X("history_18", 8, "BAD_BODY", "HISTORY body of 18 bytes", F("HISTORY", [B("BQQH", 1, 9, 1, 10)[:18]]))
X("history_20", 8, "BAD_BODY", "HISTORY body of 20 bytes", F("HISTORY", [B("BQQH", 1, 9, 1, 10), b"\x00"]))
X("history_kind", 8, "BAD_BODY", "HISTORY kind 0", F("HISTORY", [B("BQQH", 0, 9, 1, 10)]))
X("history_limit_0", 8, "BAD_BODY", "HISTORY limit 0", F("HISTORY", [B("BQQH", 1, 9, 1, 0)]))
X("history_limit_1001", 8, "BAD_BODY", "HISTORY limit 1001", F("HISTORY", [B("BQQH", 1, 9, 1, 1001)]))
X("history_result_10", 8, "BAD_BODY", "HISTORY_RESULT body of 10 bytes",
  F("HISTORY_RESULT", [B("BQ", 1, 9), b"\x00"]))
X("history_result_kind", 8, "BAD_BODY", "HISTORY_RESULT kind 4",
  F("HISTORY_RESULT", [B("BQH", 4, 9, 0)]))
X("history_result_record_short", 8, "BAD_BODY", "HISTORY_RESULT count 1 with 61 bytes of record",
  F("HISTORY_RESULT", [B("BQH", 1, 9, 1), b"".join(rec(body=b""))[:61]]))
X("history_result_count_high", 8, "BAD_BODY", "HISTORY_RESULT count 2 with one record",
  F("HISTORY_RESULT", [B("BQH", 1, 9, 2)] + rec()))
X("history_result_body_overrun", 8, "BAD_BODY", "HISTORY_RESULT record whose body_len overruns by 1",
  F("HISTORY_RESULT", [B("BQH", 1, 9, 1)] + rec(body=b"xy", body_len=3)))
X("history_result_trailing", 8, "BAD_BODY", "HISTORY_RESULT with a byte after the last record",
  F("HISTORY_RESULT", [B("BQH", 1, 9, 1)] + rec() + [b"\x00"]))
X("history_result_record_kind", 8, "BAD_BODY", "HISTORY_RESULT record with kind 0",
  F("HISTORY_RESULT", [B("BQH", 1, 9, 1)] + rec(kind=0)))
X("read_16", 8, "BAD_BODY", "READ body of 16 bytes", F("READ", [B("BQQ", 1, 9, 1)[:16]]))
X("read_kind", 8, "BAD_BODY", "READ kind 4", F("READ", [B("BQQ", 4, 9, 1)]))
X("read_ok_1", 8, "BAD_BODY", "READ_OK with a 1-byte body", F("READ_OK", [b"\x00"]))
for name in ("SUBSCRIBE", "SUBSCRIBE_OK", "UNSUBSCRIBE", "UNSUBSCRIBE_OK"):
    X(f"{name.lower()}_7", 8, "BAD_BODY", f"{name} body of 7 bytes", F(name, [bytes(7)]))
    X(f"{name.lower()}_9", 8, "BAD_BODY", f"{name} body of 9 bytes", F(name, [bytes(9)]))
X("typing_8", 8, "BAD_BODY", "TYPING body of 8 bytes", F("TYPING", [B("BQ", 1, 9)[:8]]))
X("typing_kind", 8, "BAD_BODY", "TYPING kind 0", F("TYPING", [B("BQ", 0, 9)]))
X("call_empty", 8, "BAD_BODY", "CALL with an empty body", F("CALL", []))
X("call_method_0", 8, "BAD_BODY", "CALL method_len 0", F("CALL", [b"\x00", b"{}"]))
X("call_method_65", 8, "BAD_BODY", "CALL method_len 65", F("CALL", [b"\x41", b"m" * 65]))
X("call_method_65_bad_utf8", 8, "BAD_BODY", "CALL method_len 65 of invalid bytes: length first",
  F("CALL", [b"\x41", b"\xff" * 65]))
X("call_method_overrun", 8, "BAD_BODY", "CALL method_len 5 with 4 bytes left", F("CALL", [b"\x05", b"ping"]))
X("deliver_61", 8, "BAD_BODY", "DELIVER body of 61 bytes", F("DELIVER", [b"".join(rec(body=b""))[:61]]))
X("deliver_kind", 8, "BAD_BODY", "DELIVER kind 0", F("DELIVER", rec(kind=0)))
X("deliver_body_len_plus_1", 8, "BAD_BODY", "DELIVER body_len one more than the bytes left",
  F("DELIVER", rec(body=b"xy", body_len=3)))
X("deliver_body_len_minus_1", 8, "BAD_BODY", "DELIVER body_len one less than the bytes left",
  F("DELIVER", rec(body=b"xy", body_len=1)))
X("event_25", 8, "BAD_BODY", "EVENT body of 25 bytes", F("EVENT", [B("BBQQQ", 1, 0, 0, 7, 1)[:25]]))
X("event_kind_4", 8, "BAD_BODY", "EVENT kind 4", F("EVENT", [B("BBQQQ", 2, 4, 9, 7, 1)]))
X("goaway_7", 8, "BAD_BODY", "GOAWAY body of 7 bytes", F("GOAWAY", [B("HIH", 502, 0, 0)[:7]]))
X("goaway_url_overrun", 8, "BAD_BODY", "GOAWAY url_len 10 with 9 bytes left",
  F("GOAWAY", [B("HIH", 502, 0, 10), b"ws://a/ws"]))
X("goaway_url_overrun_bad_utf8", 8, "BAD_BODY", "GOAWAY url_len overruns, the bytes are invalid UTF-8: "
  "the length field decides", F("GOAWAY", [B("HIH", 502, 0, 3), b"\xff\xff"]))
X("error_5", 8, "BAD_BODY", "ERROR body of 5 bytes", F("ERROR", [B("HI", 500, 0)[:5]]))
# rule 9
X("auth_bad_utf8_ff", 9, "BAD_UTF8", "AUTH token with byte 0xff", F("AUTH", [b"ab\xffcd"]))
X("auth_bad_utf8_surrogate", 9, "BAD_UTF8", "AUTH token with an encoded surrogate (ed a0 80)",
  F("AUTH", [b"\xed\xa0\x80"]))
X("auth_bad_utf8_overlong", 9, "BAD_UTF8", "AUTH token with an overlong '/' (c0 af)", F("AUTH", [b"\xc0\xaf"]))
X("auth_bad_utf8_truncated", 9, "BAD_UTF8", "AUTH token ending inside a 3-byte sequence (e2 82)",
  F("AUTH", [b"x\xe2\x82"]))
X("auth_bad_utf8_above_max", 9, "BAD_UTF8", "AUTH token with a code point above U+10FFFF (f4 90 80 80)",
  F("AUTH", [b"\xf4\x90\x80\x80"]))
X("call_bad_utf8", 9, "BAD_UTF8", "CALL method with byte 0x80", F("CALL", [b"\x02", b"a\x80", b"{}"]))
X("goaway_bad_url", 9, "BAD_UTF8", "GOAWAY url with byte 0xfe",
  F("GOAWAY", [B("HIH", 502, 0, 2), b"\xfe/", b"ok"]))
X("goaway_bad_reason", 9, "BAD_UTF8", "GOAWAY reason with byte 0xff",
  F("GOAWAY", [B("HIH", 502, 0, 2), b"ws", b"\xff"]))
X("error_bad_message", 9, "BAD_UTF8", "ERROR message with a lone continuation byte",
  F("ERROR", [B("HI", 500, 0), b"oops \x80"]))
X("second_frame_bad_utf8", 9, "BAD_UTF8", "a valid PING, then an ERROR with invalid UTF-8",
  ping_parts + F("ERROR", [B("HI", 500, 0), b"\xc3"]), frames_before=[ping])

FORMAT = {
    "summary": "Hex test vectors for gochat wire protocol v1 (docs/protocol.md). Every vector is one "
               "WebSocket binary message.",
    "hex": "The message bytes in lowercase hex. Spaces separate fields for human readers only: strip "
           "all whitespace before decoding.",
    "valid": "Messages that decode to 'frames' (in order); encoding 'frames' back to back gives "
             "exactly 'hex'. 'max_frame', when present, is the maximum frame size to decode with; "
             "otherwise default_max_frame.",
    "invalid": "Messages a decoder must reject with 'error' (an ErrorCode name; 'code' is its number). "
               "'rule' is the number of the validation rule in docs/protocol.md §2 that fires first "
               "('empty' for an empty message). 'frames_before' lists the valid frames that precede "
               "the bad one (an incremental decoder yields them before failing); absent means none.",
    "frame": "An object with 'op' (operation name from docs/protocol.md §3), 'rid', 'flags' and "
             "the body fields by their protocol names. DELIVER has 'message' (a message record); "
             "HISTORY_RESULT has 'messages' (a list of records); SYNC and SYNC_RESULT have "
             "'entries'. Counts and length fields (count, body_len, method_len, url_len) are "
             "implied by the lists and strings and are not repeated.",
    "values": "Integers are JSON numbers, except u64 fields (ids, seqs, timestamps, value), which "
              "are decimal strings so that readers without 64-bit JSON integers keep them exact. "
              "Opaque byte fields (client_msg_id, body, payload, extra) are lowercase hex; text fields "
              "(token, method, url, reason, message) are JSON strings.",
}

doc = {
    "format": FORMAT,
    "protocol_version": 1,
    "default_max_frame": 65536,
    "valid": valid,
    "invalid": invalid,
}
# sanity: names unique
names = [v["name"] for v in valid + invalid]
assert len(names) == len(set(names)), [n for n in names if names.count(n) > 1]
with open(__import__("pathlib").Path(__file__).with_name("protocol_v1.json"), "w") as fh:
    json.dump(doc, fh, indent=1, ensure_ascii=False)
    fh.write("\n")
print(len(valid), "valid,", len(invalid), "invalid")
