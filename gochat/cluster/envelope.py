"""Node-to-node envelopes carried by the Broker.

Binary, little-endian, versioned by the first byte. A DELIVER crosses the cluster already encoded
as client frame bytes: the receiving node copies them into its local connections' buffers and
never re-encodes (the same bytes a client receives).

| type | layout after the type byte |
|---|---|
| 1 USERS | flags u8 (bit 0: droppable, bit 1: unordered, bits 2–3: fan-out tier), count u32, count x user_id u64, frame bytes |
| 2 ROOM | room_id u64, origin_conn u64 (0 = none), frame bytes |
| 3 PRESENCE | user_id u64, online u8 |
| 4 REVOKE | user_id u64, expires_ms u64, revoked_id UTF-8 |
| 5 KICK | user_id u64, code u16, reason UTF-8 |
| 6 BATCH | count u32, then count x (length u32, envelope) — several envelopes in one publish |
| 7 TRACE | ctx_len u8, ctx (ctx_len bytes), then one envelope (not BATCH or TRACE) |
| 9 RESYNC | flags u8 (bit 0: every session of the node), count u32, count x user_id u64 |
| 8 CASCADE | flags u8 (bit 0: droppable), conv_id u64, members_version u64, members u32, origin_len u8, origin UTF-8, job_len u8, job_id UTF-8, frame bytes |

RESYNC tells a node that pushes to some of its users (or to all, bit 0) were lost on the way (a
publish that failed): it sends those users' sessions EVENT RESYNC, and their clients SYNC.

CASCADE is the cascaded fan-out tier's one envelope, broadcast to every node: each node delivers
``frame`` to its own sessions of group ``conv_id``'s members, read at ``members_version`` or newer
(gochat/cluster/fanout.py). The USERS tier bits are the sender's tier (0 inline, 1 batched,
2 sharded), the label of ``gochat_delivery_latency_seconds`` on the receiving node; a node whose
code predates them sends 0 (and bit 1 for sharded), read as inline or sharded.

TRACE carries the trace context of a sampled message (docs/observability.md, "Tracing") around
the envelope it belongs to. ``ctx`` is versioned by its first byte; version 1 is ``1 u8,
trace_id 16 bytes, span_id 8 bytes, trace_flags u8`` (ids big-endian, as in a traceparent). A
decoder that does not know the context's version skips ``ctx_len`` bytes and decodes the inner
envelope without context; a node whose code predates type 7 drops the envelope with a logged
error (its recipients see a seq gap and fetch the message with HISTORY), so a cluster in a rolling
upgrade keeps ``trace_sample_rate`` at 0 until every node runs code that knows type 7. Only
sampled messages travel in TRACE envelopes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from gochat.errors import ErrorCode, GochatError

__all__ = [
    "CascadeEnvelope",
    "KickEnvelope",
    "PresenceEnvelope",
    "ResyncEnvelope",
    "RevokeEnvelope",
    "RoomEnvelope",
    "TracedEnvelope",
    "UsersEnvelope",
    "decode_envelope",
    "encode_batch",
    "encode_cascade",
    "encode_kick",
    "encode_presence",
    "encode_resync",
    "encode_revoke",
    "encode_room",
    "encode_traced",
    "encode_users",
    "encode_users_packed",
    "split_batch",
]

T_USERS: Final = 1
T_ROOM: Final = 2
T_PRESENCE: Final = 3
T_REVOKE: Final = 4
T_KICK: Final = 5
T_BATCH: Final = 6
T_TRACE: Final = 7
T_CASCADE: Final = 8
T_RESYNC: Final = 9
#: the trace context a TRACE envelope carries, version 1
TRACE_CONTEXT_V1: Final = 1

_U64 = struct.Struct("<Q")
_USERS_HEAD = struct.Struct("<BBI")
_ROOM_HEAD = struct.Struct("<BQQ")
_PRESENCE = struct.Struct("<BQB")
_REVOKE_HEAD = struct.Struct("<BQQ")
_KICK_HEAD = struct.Struct("<BQH")
_BATCH_HEAD = struct.Struct("<BI")
_U32 = struct.Struct("<I")
_TRACE_HEAD = struct.Struct("<BB")
_TRACE_CTX_V1 = struct.Struct(">B16s8sB")
_CASCADE_HEAD = struct.Struct("<BBQQI")
_RESYNC_HEAD = struct.Struct("<BBI")
#: the tier bits of a USERS envelope's flags
_TIER_SHIFT = 2
_TIER_SHARDED = 2


@dataclass(frozen=True, slots=True)
class UsersEnvelope:
    user_ids: tuple[int, ...]
    frame: bytes
    droppable: bool
    #: the large-group tier: one message reaches a node in several shards, in no order, so the
    #: receiving node's seq-order gate does not apply (docs/consistency.md, "Delivery order")
    unordered: bool = False
    #: the sender's fan-out tier (gochat.cluster.fanout.Tier: 0 inline, 1 batched, 2 sharded)
    tier: int = 0


@dataclass(frozen=True, slots=True)
class RoomEnvelope:
    room_id: int
    origin_conn: int
    frame: bytes


@dataclass(frozen=True, slots=True)
class PresenceEnvelope:
    user_id: int
    online: bool


@dataclass(frozen=True, slots=True)
class RevokeEnvelope:
    user_id: int
    expires_ms: int
    revoked_id: str


@dataclass(frozen=True, slots=True)
class KickEnvelope:
    user_id: int
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class TracedEnvelope:
    """An envelope of a sampled message, with the trace context of the span that sent it."""

    trace_id: int
    span_id: int
    trace_flags: int
    inner: UsersEnvelope | RoomEnvelope | PresenceEnvelope | RevokeEnvelope | KickEnvelope | CascadeEnvelope | ResyncEnvelope


@dataclass(frozen=True, slots=True)
class CascadeEnvelope:
    """The cascaded tier: deliver ``frame`` to this node's sessions of group ``conv_id``."""

    conv_id: int
    members_version: int
    members: int
    origin: str
    job_id: str
    frame: bytes
    droppable: bool


@dataclass(frozen=True, slots=True)
class ResyncEnvelope:
    """Pushes to ``user_ids`` on this node (``None``: to every session) were lost."""

    user_ids: tuple[int, ...] | None


Envelope = ResyncEnvelope | CascadeEnvelope | UsersEnvelope | RoomEnvelope | PresenceEnvelope | RevokeEnvelope | KickEnvelope | TracedEnvelope


def _users_flags(droppable: bool, unordered: bool, tier: int) -> int:
    if unordered and not tier:
        tier = _TIER_SHARDED
    return (1 if droppable else 0) | (2 if unordered else 0) | (tier << _TIER_SHIFT)


def encode_users(
    user_ids: tuple[int, ...] | list[int],
    frame: bytes,
    droppable: bool = False,
    unordered: bool = False,
    tier: int = 0,
) -> bytes:
    head = _USERS_HEAD.pack(T_USERS, _users_flags(droppable, unordered, tier), len(user_ids))
    return head + struct.pack(f"<{len(user_ids)}Q", *user_ids) + frame


def encode_users_packed(
    count: int, packed_ids: bytes, frame: bytes, droppable: bool = False, unordered: bool = False, tier: int = 0
) -> bytes:
    """:func:`encode_users` with the ids already packed (``count`` little-endian u64 in
    ``packed_ids``, e.g. a numpy ``<u8`` array's bytes): the same envelope, byte for byte."""
    if len(packed_ids) != 8 * count:
        raise ValueError(f"{len(packed_ids)} bytes do not hold {count} u64 ids")
    head = _USERS_HEAD.pack(T_USERS, _users_flags(droppable, unordered, tier), count)
    return head + packed_ids + frame


def encode_resync(user_ids: tuple[int, ...] | list[int] | None) -> bytes:
    """RESYNC for ``user_ids`` (None: every session of the receiving node)."""
    if user_ids is None:
        return _RESYNC_HEAD.pack(T_RESYNC, 1, 0)
    return _RESYNC_HEAD.pack(T_RESYNC, 0, len(user_ids)) + struct.pack(f"<{len(user_ids)}Q", *user_ids)


def encode_cascade(
    conv_id: int, members_version: int, members: int, origin: str, job_id: str, frame: bytes, droppable: bool = False
) -> bytes:
    o, j = origin.encode(), job_id.encode()
    head = _CASCADE_HEAD.pack(T_CASCADE, 1 if droppable else 0, conv_id, members_version, members)
    return head + bytes((len(o),)) + o + bytes((len(j),)) + j + frame


def encode_room(room_id: int, origin_conn: int, frame: bytes) -> bytes:
    return _ROOM_HEAD.pack(T_ROOM, room_id, origin_conn) + frame


def encode_presence(user_id: int, online: bool) -> bytes:
    return _PRESENCE.pack(T_PRESENCE, user_id, 1 if online else 0)


def encode_revoke(user_id: int, expires_ms: int, revoked_id: str) -> bytes:
    return _REVOKE_HEAD.pack(T_REVOKE, user_id, expires_ms) + revoked_id.encode()


def encode_kick(user_id: int, code: int, reason: str) -> bytes:
    return _KICK_HEAD.pack(T_KICK, user_id, code) + reason.encode()


def encode_traced(trace_id: int, span_id: int, trace_flags: int, envelope: bytes) -> bytes:
    """``envelope`` with a trace context (version 1)."""
    ctx = _TRACE_CTX_V1.pack(TRACE_CONTEXT_V1, trace_id.to_bytes(16), span_id.to_bytes(8), trace_flags)
    return _TRACE_HEAD.pack(T_TRACE, len(ctx)) + ctx + envelope


def encode_batch(envelopes: list[bytes]) -> bytes:
    """Several envelopes in one broker publish (the router sends one per node per turn)."""
    parts = [_BATCH_HEAD.pack(T_BATCH, len(envelopes))]
    for env in envelopes:
        parts.append(_U32.pack(len(env)))
        parts.append(env)
    return b"".join(parts)


def split_batch(data: bytes) -> list[bytes]:
    """The envelopes of a BATCH (or ``[data]`` for a single envelope)."""
    if not data or data[0] != T_BATCH:
        return [data]
    try:
        _, count = _BATCH_HEAD.unpack_from(data)
        out, pos = [], _BATCH_HEAD.size
        for _ in range(count):
            (size,) = _U32.unpack_from(data, pos)
            pos += 4
            if pos + size > len(data):
                raise ValueError("truncated batch")
            out.append(data[pos : pos + size])
            pos += size
        return out
    except (struct.error, ValueError) as exc:
        raise GochatError(f"malformed cluster batch: {exc}", code=ErrorCode.INTERNAL) from None


def decode_envelope(data: bytes) -> Envelope:
    """Decode one envelope; raises GochatError(INTERNAL) on a malformed one."""
    try:
        kind = data[0]
        if kind == T_USERS:
            _, flags, count = _USERS_HEAD.unpack_from(data)
            end = _USERS_HEAD.size + 8 * count
            ids = struct.unpack_from(f"<{count}Q", data, _USERS_HEAD.size)
            if len(data) < end:
                raise ValueError("truncated user list")
            tier = (flags >> _TIER_SHIFT) & 3
            if flags & 2 and not tier:
                tier = _TIER_SHARDED
            return UsersEnvelope(ids, data[end:], bool(flags & 1), bool(flags & 2), tier)
        if kind == T_RESYNC:
            _, flags, count = _RESYNC_HEAD.unpack_from(data)
            if flags & 1:
                return ResyncEnvelope(None)
            if len(data) < _RESYNC_HEAD.size + 8 * count:
                raise ValueError("truncated user list")
            return ResyncEnvelope(struct.unpack_from(f"<{count}Q", data, _RESYNC_HEAD.size))
        if kind == T_CASCADE:
            _, flags, conv, version, members = _CASCADE_HEAD.unpack_from(data)
            pos = _CASCADE_HEAD.size
            olen = data[pos]
            origin = data[pos + 1 : pos + 1 + olen].decode()
            pos += 1 + olen
            jlen = data[pos]
            job = data[pos + 1 : pos + 1 + jlen].decode()
            pos += 1 + jlen
            if len(data) <= pos:
                raise ValueError("CASCADE envelope without a frame")
            return CascadeEnvelope(conv, version, members, origin, job, data[pos:], bool(flags & 1))
        if kind == T_ROOM:
            _, room, origin = _ROOM_HEAD.unpack_from(data)
            return RoomEnvelope(room, origin, data[_ROOM_HEAD.size :])
        if kind == T_PRESENCE:
            _, uid, online = _PRESENCE.unpack_from(data)
            return PresenceEnvelope(uid, bool(online))
        if kind == T_REVOKE:
            _, uid, exp = _REVOKE_HEAD.unpack_from(data)
            return RevokeEnvelope(uid, exp, data[_REVOKE_HEAD.size :].decode())
        if kind == T_KICK:
            _, uid, code = _KICK_HEAD.unpack_from(data)
            return KickEnvelope(uid, code, data[_KICK_HEAD.size :].decode())
        if kind == T_TRACE:
            _, size = _TRACE_HEAD.unpack_from(data)
            start = _TRACE_HEAD.size + size
            if len(data) <= start or data[start] in (T_TRACE, T_BATCH):
                raise ValueError("TRACE envelope without a single inner envelope")
            inner = decode_envelope(data[start:])
            assert not isinstance(inner, TracedEnvelope)
            if size < _TRACE_CTX_V1.size or data[_TRACE_HEAD.size] != TRACE_CONTEXT_V1:
                return inner  # a context version this node does not know: skipped
            _, trace_id, span_id, flags = _TRACE_CTX_V1.unpack_from(data, _TRACE_HEAD.size)
            return TracedEnvelope(int.from_bytes(trace_id), int.from_bytes(span_id), flags, inner)
    except (IndexError, struct.error, ValueError, UnicodeDecodeError) as exc:
        raise GochatError(f"malformed cluster envelope: {exc}", code=ErrorCode.INTERNAL) from None
    raise GochatError(f"unknown cluster envelope type {data[0] if data else None}", code=ErrorCode.INTERNAL)
