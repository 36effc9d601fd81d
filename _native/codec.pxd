# cython: language_level=3
"""Wire protocol v1 codec: the C-level surface that other gochat Cython modules cimport.

Data flow
---------
inbound:  WebSocket message bytes
            -> parse_header()   rules 1-7 of docs/protocol.md §2 on one 12-byte header
            -> check_body()     rules 8-9 on that frame's body, field by field in layout order
            -> (codec.decode() only) frames.py objects for the client / control plane
          The gateway can run parse_header() + check_body() and then read fields straight from
          the buffer with read_u*(), building no Python objects in the data plane.
outbound: fan-out encodes each DELIVER once with write_deliver() into a buffer it owns and sends
          the same bytes to every recipient; replies use write_header() + write_u*().

Nothing here does I/O, touches asyncio or applies policy (authentication state, which side may
send which op): that belongs to the session. The helpers below trust their arguments: callers
pass buffers large enough and values already validated.

All integers on the wire are little-endian. The readers and writers assemble bytes with shifts,
which is independent of host byte order and alignment; GCC and Clang fold them into single loads
and stores on little-endian targets.

Frame header (12 bytes)              Message record (62 bytes + body; DELIVER, HISTORY_RESULT)
  @0  u32 len   whole frame, >= 12     @0  u8  kind           @26 u64 sender_id
  @4  u8  ver   1                      @1  u8  content_type   @34 u64 ts_ms
  @5  u8  op                           @2  u64 conv_id        @42 16B client_msg_id
  @6  u16 flags op-specific bits       @10 u64 seq            @58 u32 body_len
  @8  u32 rid   0 for server pushes    @18 u64 msg_id         @62 body (body_len bytes)

A DELIVER frame is the header followed by exactly one record: DELIVER_FIXED_SIZE + body_len bytes.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy


cdef enum:
    HEADER_SIZE = 12
    PROTOCOL_VERSION = 1
    MESSAGE_RECORD_SIZE = 62
    DELIVER_FIXED_SIZE = 74          # HEADER_SIZE + MESSAGE_RECORD_SIZE
    CLIENT_MSG_ID_SIZE = 16
    DEFAULT_MAX_FRAME = 65536        # gochat.protocol.constants.DEFAULT_MAX_FRAME
    # Offsets inside a message record (add HEADER_SIZE for a DELIVER frame). Fan-out patches
    # conv_id per viewer of a direct conversation at DELIVER_CONV_ID_OFFSET.
    REC_KIND = 0
    REC_CONTENT_TYPE = 1
    REC_CONV_ID = 2
    REC_SEQ = 10
    REC_MSG_ID = 18
    REC_SENDER_ID = 26
    REC_TS_MS = 34
    REC_CLIENT_MSG_ID = 42
    REC_BODY_LEN = 58
    DELIVER_CONV_ID_OFFSET = 14      # HEADER_SIZE + REC_CONV_ID


# Operation codes (docs/protocol.md §3); gochat.protocol.constants.Op mirrors them.
cdef enum:
    OP_AUTH = 0x01
    OP_PING = 0x02
    OP_SEND = 0x03
    OP_SYNC = 0x04
    OP_HISTORY = 0x05
    OP_READ = 0x06
    OP_SUBSCRIBE = 0x07
    OP_UNSUBSCRIBE = 0x08
    OP_TYPING = 0x09
    OP_CALL = 0x0A
    OP_DELIVER = 0x40
    OP_EVENT = 0x41
    OP_GOAWAY = 0x42
    OP_ERROR = 0x7F
    OP_AUTH_OK = 0x81
    OP_PONG = 0x82
    OP_SEND_ACK = 0x83
    OP_SYNC_RESULT = 0x84
    OP_HISTORY_RESULT = 0x85
    OP_READ_OK = 0x86
    OP_SUBSCRIBE_OK = 0x87
    OP_UNSUBSCRIBE_OK = 0x88
    OP_CALL_RESULT = 0x8A


# Flag bits the data plane reads (gochat.protocol.constants mirrors them).
cdef enum:
    FLAG_TRACED = 0x0001             # SEND: the body starts with a 55-byte W3C traceparent


# The protocol-violation codes the codec reports; gochat.errors.ErrorCode mirrors them.
cdef enum:
    ERR_MALFORMED_FRAME = 100
    ERR_TRUNCATED_FRAME = 101
    ERR_FRAME_TOO_LARGE = 102
    ERR_UNSUPPORTED_VERSION = 103
    ERR_UNKNOWN_OP = 104
    ERR_BAD_BODY = 105
    ERR_BAD_UTF8 = 106
    ERR_BAD_FLAGS = 109


cdef struct FrameHeader:
    uint32_t len        # whole frame, header included
    uint8_t ver
    uint8_t op
    uint16_t flags
    uint32_t rid


# ---- little-endian readers and writers ----------------------------------------------------------

cdef inline uint16_t read_u16(const unsigned char* p) noexcept nogil:
    return <uint16_t>(p[0] | (<uint16_t>p[1] << 8))


cdef inline uint32_t read_u32(const unsigned char* p) noexcept nogil:
    return (<uint32_t>p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16)
            | (<uint32_t>p[3] << 24))


cdef inline uint64_t read_u64(const unsigned char* p) noexcept nogil:
    return <uint64_t>read_u32(p) | (<uint64_t>read_u32(p + 4) << 32)


cdef inline void write_u16(unsigned char* p, uint16_t v) noexcept nogil:
    p[0] = <unsigned char>v
    p[1] = <unsigned char>(v >> 8)


cdef inline void write_u32(unsigned char* p, uint32_t v) noexcept nogil:
    p[0] = <unsigned char>v
    p[1] = <unsigned char>(v >> 8)
    p[2] = <unsigned char>(v >> 16)
    p[3] = <unsigned char>(v >> 24)


cdef inline void write_u64(unsigned char* p, uint64_t v) noexcept nogil:
    write_u32(p, <uint32_t>v)
    write_u32(p + 4, <uint32_t>(v >> 32))


# ---- header ---------------------------------------------------------------------------------------

cdef inline int op_allowed_flags(uint8_t op) noexcept nogil:
    """Flag bits ``op`` defines, or -1 when ``op`` is not in the v1 table."""
    if op == OP_SEND or op == OP_SEND_ACK or op == OP_HISTORY or op == OP_TYPING:
        return 0x0001  # SEND: TRACED; SEND_ACK: DUPLICATE; HISTORY: BACKWARD; TYPING: STOPPED
    if op == OP_HISTORY_RESULT:
        return 0x0003  # MORE | PARTIAL
    if op == OP_SYNC_RESULT:
        return 0x0002  # PARTIAL
    if (OP_AUTH <= op <= OP_CALL or OP_DELIVER <= op <= OP_GOAWAY or op == OP_ERROR
            or OP_AUTH_OK <= op <= OP_UNSUBSCRIBE_OK or op == OP_CALL_RESULT):
        return 0
    return -1


cdef inline int parse_header(const unsigned char* p, Py_ssize_t avail, Py_ssize_t max_frame,
                             FrameHeader* h) noexcept nogil:
    """Check rules 1-7 on the frame at ``p`` with ``avail`` bytes left in the message.

    Returns 0, or the ERR_* code of the first rule that fails. ``h`` is filled whenever the 12
    header bytes are there, so a caller can still report the rid of a rejected frame. An empty
    message (avail == 0 before the first frame) is MALFORMED_FRAME: that rule is the caller's.
    """
    cdef int allowed
    if avail < HEADER_SIZE:
        return ERR_TRUNCATED_FRAME
    h.len = read_u32(p)
    h.ver = p[4]
    h.op = p[5]
    h.flags = read_u16(p + 6)
    h.rid = read_u32(p + 8)
    if h.len < HEADER_SIZE:
        return ERR_MALFORMED_FRAME
    if <uint64_t>h.len > <uint64_t>max_frame:
        return ERR_FRAME_TOO_LARGE
    if <uint64_t>h.len > <uint64_t>avail:
        return ERR_TRUNCATED_FRAME
    if h.ver != PROTOCOL_VERSION:
        return ERR_UNSUPPORTED_VERSION
    allowed = op_allowed_flags(h.op)
    if allowed < 0:
        return ERR_UNKNOWN_OP
    if h.flags & ~allowed:
        return ERR_BAD_FLAGS
    return 0


cdef inline void write_header(unsigned char* out, uint32_t length, uint8_t op, uint16_t flags,
                              uint32_t rid) noexcept nogil:
    """Write a 12-byte header; ``length`` is the whole frame, header included."""
    write_u32(out, length)
    out[4] = PROTOCOL_VERSION
    out[5] = op
    write_u16(out + 6, flags)
    write_u32(out + 8, rid)


# ---- message records and DELIVER ------------------------------------------------------------------

cdef inline void write_message_record(
        unsigned char* out, uint8_t kind, uint8_t content_type, uint64_t conv_id, uint64_t seq,
        uint64_t msg_id, uint64_t sender_id, uint64_t ts_ms, const unsigned char* client_msg_id,
        const unsigned char* body, uint32_t body_len) noexcept nogil:
    """Write one record (MESSAGE_RECORD_SIZE + body_len bytes); client_msg_id is 16 bytes."""
    out[REC_KIND] = kind
    out[REC_CONTENT_TYPE] = content_type
    write_u64(out + REC_CONV_ID, conv_id)
    write_u64(out + REC_SEQ, seq)
    write_u64(out + REC_MSG_ID, msg_id)
    write_u64(out + REC_SENDER_ID, sender_id)
    write_u64(out + REC_TS_MS, ts_ms)
    memcpy(out + REC_CLIENT_MSG_ID, client_msg_id, CLIENT_MSG_ID_SIZE)
    write_u32(out + REC_BODY_LEN, body_len)
    if body_len:  # memcpy from a NULL body is undefined even for 0 bytes
        memcpy(out + MESSAGE_RECORD_SIZE, body, body_len)


cdef inline Py_ssize_t write_deliver(
        unsigned char* out, uint8_t kind, uint8_t content_type, uint64_t conv_id, uint64_t seq,
        uint64_t msg_id, uint64_t sender_id, uint64_t ts_ms, const unsigned char* client_msg_id,
        const unsigned char* body, uint32_t body_len) noexcept nogil:
    """Write a whole DELIVER frame (rid 0, flags 0) and return its size.

    ``out`` must hold DELIVER_FIXED_SIZE + body_len bytes, and body_len must keep the frame
    under 2**32 bytes (in practice: under the connection's max_frame).
    """
    cdef uint32_t total = DELIVER_FIXED_SIZE + body_len
    write_header(out, total, OP_DELIVER, 0, 0)
    write_message_record(out + HEADER_SIZE, kind, content_type, conv_id, seq, msg_id, sender_id,
                         ts_ms, client_msg_id, body, body_len)
    return total


# ---- body validation (defined in codec.pyx; callable from other modules) -------------------------

# Rules 8-9 for the body of one frame whose header passed parse_header(). Returns 0 or
# ERR_BAD_BODY / ERR_BAD_UTF8; when ``why`` is not NULL it receives a static English reason.
cdef int check_body(uint8_t op, const unsigned char* body, Py_ssize_t n,
                    const char** why) noexcept nogil

# Strict UTF-8 as Python's "utf-8" codec accepts it: no overlongs, no surrogates, <= U+10FFFF.
cdef bint utf8_valid(const unsigned char* s, Py_ssize_t n) noexcept nogil
