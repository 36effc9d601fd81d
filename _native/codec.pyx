# cython: language_level=3
"""Wire protocol v1 codec (Cython). The pure-Python twin is ``gochat.protocol._codec_py``.

Both implementations have the same public API and behaviour, down to the error messages of
``decode``; ``tests/test_codec_*.py`` run every test on both. The C-level helpers that other
Cython modules cimport are declared (and mostly defined) in ``codec.pxd``.

Decoding reads straight from the caller's buffer (no copies, no ``struct``), validates a frame
completely (rules 1-9 of docs/protocol.md §2) before building anything, then builds the
``gochat.protocol.frames`` objects, filling their slots from C (see ``_Builder``). Encoding
writes into one bytes object that grows in place, so ``encode`` allocates the result once and
``encode_many`` amortises growth.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.long cimport PyLong_CheckExact
from cpython.number cimport PyNumber_Index
from cpython.object cimport PyObject, PyTypeObject
from cpython.ref cimport Py_DECREF, Py_XDECREF
from cpython.unicode cimport PyUnicode_Check, PyUnicode_DecodeUTF8
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

from gochat.errors import ProtocolError

__all__ = [
    "decode", "encode", "encode_deliver", "encode_error", "encode_event", "encode_many",
    "encode_send_ack", "iter_frames", "peek_header",
]


cdef extern from "Python.h":
    # Raw-pointer variants: the write buffer manages one reference by hand so that it can be
    # resized in place (_PyBytes_Resize needs a PyObject** it may replace).
    PyObject* _bytes_new "PyBytes_FromStringAndSize"(const char* s, Py_ssize_t n)
    int _PyBytes_Resize(PyObject** obj, Py_ssize_t n)
    char* _bytes_data "PyBytes_AS_STRING"(PyObject* obj) noexcept
    # Error checked by hand (result -1 and an exception set) to avoid try/except per field.
    unsigned long long _as_u64 "PyLong_AsUnsignedLongLong"(object v) noexcept
    PyObject* PyErr_Occurred() noexcept
    void PyErr_Clear() noexcept
    const char* PyUnicode_AsUTF8AndSize(object s, Py_ssize_t* n) except NULL
    # The two type slots _Builder uses: allocation, and a data descriptor's __set__.
    ctypedef PyObject* (*allocfunc)(PyTypeObject* tp, Py_ssize_t n)
    ctypedef int (*descrsetfunc)(PyObject* descr, PyObject* obj, PyObject* value) except -1
    ctypedef struct _TypeSlots "PyTypeObject":
        allocfunc tp_alloc
        descrsetfunc tp_descr_set


# Frame classes and the op table live in gochat.protocol, whose __init__ imports this module;
# they are bound at the very end of this file (see there), hence declared here and filled later.
cdef _Builder Auth, AuthOk, Ping, Pong, Send, SendAck, Sync, SyncEntry, SyncResult, SyncResultEntry
cdef _Builder History, HistoryResult, Message, Read, ReadOk, Subscribe, SubscribeOk, Unsubscribe
cdef _Builder UnsubscribeOk, Typing, Call, CallResult, Deliver, Event, GoAway, Error
cdef object _Op
cdef dict _OP_OF_TYPE   # type -> op; encode() dispatches on the exact class, then on the MRO

cdef uint64_t U8_MAX = 0xFF
cdef uint64_t U16_MAX = 0xFFFF
cdef uint64_t U32_MAX = 0xFFFFFFFF
cdef uint64_t U64_MAX = 0xFFFFFFFFFFFFFFFF

# Reasons shared by decode and encode; the twin uses the same strings.
cdef const char* R_SIZE = "body size does not match the layout"
cdef const char* R_SHORT = "body shorter than its fixed fields"
cdef const char* R_TOKEN_LEN = "token length out of range 1-4096"
cdef const char* R_TOKEN_UTF8 = "token is not valid UTF-8"
cdef const char* R_PAYLOAD_LEN = "payload longer than 64 bytes"
cdef const char* R_KIND = "kind out of range"
cdef const char* R_COUNT = "count does not match the body size"
cdef const char* R_LIMIT = "limit out of range 1-1000"
cdef const char* R_RECORD = "message record overruns the body"
cdef const char* R_TRAILING = "bytes left after the last message record"
cdef const char* R_METHOD_LEN = "method length out of range 1-64"
cdef const char* R_METHOD_OVERRUN = "method overruns the body"
cdef const char* R_METHOD_UTF8 = "method is not valid UTF-8"
cdef const char* R_URL_OVERRUN = "url overruns the body"
cdef const char* R_URL_UTF8 = "url is not valid UTF-8"
cdef const char* R_REASON_UTF8 = "reason is not valid UTF-8"
cdef const char* R_MESSAGE_UTF8 = "message is not valid UTF-8"
cdef const char* R_BODY_LEN = "body_len does not match the bytes left"
cdef const char* R_UNKNOWN_OP = "unknown op"


# ==== validation (rules 8-9) =========================================================================

cdef bint utf8_valid(const unsigned char* s, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i = 0
    cdef unsigned char c, c1
    while i < n:
        # ASCII runs 8 bytes at a time: most text fields are ASCII.
        while i + 8 <= n and (read_u64(s + i) & 0x8080808080808080ULL) == 0:
            i += 8
        if i >= n:
            break
        c = s[i]
        if c < 0x80:
            i += 1
        elif c < 0xC2:                      # continuation byte, or overlong 2-byte lead
            return False
        elif c < 0xE0:
            if n - i < 2 or (s[i + 1] & 0xC0) != 0x80:
                return False
            i += 2
        elif c < 0xF0:
            if n - i < 3:
                return False
            c1 = s[i + 1]
            if (c1 & 0xC0) != 0x80 or (s[i + 2] & 0xC0) != 0x80:
                return False
            if (c == 0xE0 and c1 < 0xA0) or (c == 0xED and c1 > 0x9F):  # overlong, surrogate
                return False
            i += 3
        elif c < 0xF5:
            if n - i < 4:
                return False
            c1 = s[i + 1]
            if (c1 & 0xC0) != 0x80 or (s[i + 2] & 0xC0) != 0x80 or (s[i + 3] & 0xC0) != 0x80:
                return False
            if (c == 0xF0 and c1 < 0x90) or (c == 0xF4 and c1 > 0x8F):  # overlong, > U+10FFFF
                return False
            i += 4
        else:
            return False
    return True


cdef inline int _fail(int code, const char* reason, const char** why) noexcept nogil:
    if why != NULL:
        why[0] = reason
    return code


cdef inline bint _kind_ok(uint8_t kind) noexcept nogil:
    return 1 <= kind <= 3


cdef int check_body(uint8_t op, const unsigned char* b, Py_ssize_t n,
                    const char** why) noexcept nogil:
    cdef uint64_t count, i
    cdef Py_ssize_t off, m
    cdef uint32_t body_len
    if op == OP_SEND:
        if n < 26:
            return _fail(ERR_BAD_BODY, R_SHORT, why)
        if not _kind_ok(b[0]):
            return _fail(ERR_BAD_BODY, R_KIND, why)
    elif op == OP_DELIVER:
        if n < MESSAGE_RECORD_SIZE:
            return _fail(ERR_BAD_BODY, R_SHORT, why)
        if not _kind_ok(b[REC_KIND]):
            return _fail(ERR_BAD_BODY, R_KIND, why)
        if <uint64_t>read_u32(b + REC_BODY_LEN) != <uint64_t>(n - MESSAGE_RECORD_SIZE):
            return _fail(ERR_BAD_BODY, R_BODY_LEN, why)
    elif op == OP_SEND_ACK:
        if n != 33:
            return _fail(ERR_BAD_BODY, R_SIZE, why)
        if not _kind_ok(b[0]):
            return _fail(ERR_BAD_BODY, R_KIND, why)
    elif op == OP_PING or op == OP_PONG:
        if n > 64:
            return _fail(ERR_BAD_BODY, R_PAYLOAD_LEN, why)
    elif op == OP_EVENT:
        if n < 26:
            return _fail(ERR_BAD_BODY, R_SHORT, why)
        if b[1] > 3:
            return _fail(ERR_BAD_BODY, R_KIND, why)
    elif op == OP_AUTH:
        if n < 1 or n > 4096:
            return _fail(ERR_BAD_BODY, R_TOKEN_LEN, why)
        if not utf8_valid(b, n):
            return _fail(ERR_BAD_UTF8, R_TOKEN_UTF8, why)
    elif op == OP_AUTH_OK:
        if n != 32:
            return _fail(ERR_BAD_BODY, R_SIZE, why)
    elif op == OP_SYNC:
        if n < 2:
            return _fail(ERR_BAD_BODY, R_SHORT, why)
        count = read_u16(b)
        if <uint64_t>n != 2 + 17 * count:
            return _fail(ERR_BAD_BODY, R_COUNT, why)
        for i in range(count):
            if not _kind_ok(b[2 + 17 * i]):
                return _fail(ERR_BAD_BODY, R_KIND, why)
    elif op == OP_SYNC_RESULT:
        if n < 4:
            return _fail(ERR_BAD_BODY, R_SHORT, why)
        count = read_u32(b)
        if <uint64_t>n != 4 + 25 * count:   # 64-bit: a u32 count cannot overflow it
            return _fail(ERR_BAD_BODY, R_COUNT, why)
        for i in range(count):
            if not _kind_ok(b[4 + 25 * i]):
                return _fail(ERR_BAD_BODY, R_KIND, why)
    elif op == OP_HISTORY:
        if n != 19:
            return _fail(ERR_BAD_BODY, R_SIZE, why)
        if not _kind_ok(b[0]):
            return _fail(ERR_BAD_BODY, R_KIND, why)
        count = read_u16(b + 17)
        if count < 1 or count > 1000:
            return _fail(ERR_BAD_BODY, R_LIMIT, why)
    elif op == OP_HISTORY_RESULT:
        if n < 11:
            return _fail(ERR_BAD_BODY, R_SHORT, why)
        if not _kind_ok(b[0]):
            return _fail(ERR_BAD_BODY, R_KIND, why)
        count = read_u16(b + 9)
        off = 11
        for i in range(count):
            if n - off < MESSAGE_RECORD_SIZE:
                return _fail(ERR_BAD_BODY, R_RECORD, why)
            if not _kind_ok(b[off + REC_KIND]):
                return _fail(ERR_BAD_BODY, R_KIND, why)
            body_len = read_u32(b + off + REC_BODY_LEN)
            if <uint64_t>body_len > <uint64_t>(n - off - MESSAGE_RECORD_SIZE):
                return _fail(ERR_BAD_BODY, R_RECORD, why)
            off += MESSAGE_RECORD_SIZE + body_len
        if off != n:
            return _fail(ERR_BAD_BODY, R_TRAILING, why)
    elif op == OP_READ:
        if n != 17:
            return _fail(ERR_BAD_BODY, R_SIZE, why)
        if not _kind_ok(b[0]):
            return _fail(ERR_BAD_BODY, R_KIND, why)
    elif op == OP_READ_OK:
        if n != 0:
            return _fail(ERR_BAD_BODY, R_SIZE, why)
    elif (op == OP_SUBSCRIBE or op == OP_SUBSCRIBE_OK or op == OP_UNSUBSCRIBE
            or op == OP_UNSUBSCRIBE_OK):
        if n != 8:
            return _fail(ERR_BAD_BODY, R_SIZE, why)
    elif op == OP_TYPING:
        if n != 9:
            return _fail(ERR_BAD_BODY, R_SIZE, why)
        if not _kind_ok(b[0]):
            return _fail(ERR_BAD_BODY, R_KIND, why)
    elif op == OP_CALL:
        if n < 1:
            return _fail(ERR_BAD_BODY, R_SHORT, why)
        m = b[0]
        if m < 1 or m > 64:
            return _fail(ERR_BAD_BODY, R_METHOD_LEN, why)
        if 1 + m > n:
            return _fail(ERR_BAD_BODY, R_METHOD_OVERRUN, why)
        if not utf8_valid(b + 1, m):
            return _fail(ERR_BAD_UTF8, R_METHOD_UTF8, why)
    elif op == OP_CALL_RESULT:
        pass
    elif op == OP_GOAWAY:
        if n < 8:
            return _fail(ERR_BAD_BODY, R_SHORT, why)
        m = read_u16(b + 6)
        if 8 + m > n:
            return _fail(ERR_BAD_BODY, R_URL_OVERRUN, why)
        if not utf8_valid(b + 8, m):
            return _fail(ERR_BAD_UTF8, R_URL_UTF8, why)
        if not utf8_valid(b + 8 + m, n - 8 - m):
            return _fail(ERR_BAD_UTF8, R_REASON_UTF8, why)
    elif op == OP_ERROR:
        if n < 6:
            return _fail(ERR_BAD_BODY, R_SHORT, why)
        if not utf8_valid(b + 6, n - 6):
            return _fail(ERR_BAD_UTF8, R_MESSAGE_UTF8, why)
    else:
        return _fail(ERR_UNKNOWN_OP, R_UNKNOWN_OP, why)
    return 0


# ==== errors (cold path: formatting happens only here) ===============================================

cdef str _op_name(int op):
    try:
        return _Op(op).name
    except ValueError:
        return f"op 0x{op:02x}"


cdef object _header_error(int code, const FrameHeader* h, Py_ssize_t off, Py_ssize_t avail,
                          Py_ssize_t max_frame):
    cdef str where = f"frame at byte {off}"
    cdef str msg
    if code == ERR_TRUNCATED_FRAME and avail < HEADER_SIZE:
        msg = f"{where}: {avail} bytes left, a header needs 12"
    elif code == ERR_MALFORMED_FRAME:
        msg = f"{where}: length {h.len} is below 12"
    elif code == ERR_FRAME_TOO_LARGE:
        msg = f"{where}: length {h.len} is above the maximum frame size {max_frame}"
    elif code == ERR_TRUNCATED_FRAME:
        msg = f"{where}: length {h.len} is beyond the {avail} bytes left"
    elif code == ERR_UNSUPPORTED_VERSION:
        msg = f"{where}: unsupported version {h.ver}"
    elif code == ERR_UNKNOWN_OP:
        msg = f"{where}: unknown op 0x{h.op:02x}"
    else:
        msg = f"{_op_name(h.op)} {where}: undefined flag bits 0x{h.flags:04x}"
    return ProtocolError(msg, code=code)


cdef object _body_error(int code, const FrameHeader* h, Py_ssize_t off, const char* why):
    return ProtocolError(f"{_op_name(h.op)} frame at byte {off}: {why.decode('ascii')}", code=code)


cdef object _encode_error(int code, int op, str reason):
    return ProtocolError(f"{_op_name(op)}: {reason}", code=code)


# ==== decoding ========================================================================================

@cython.final
cdef class _Builder:
    """Builds instances of one frames.py class without running its dataclass ``__init__``.

    ``__init__`` is Python code: calling it was more than half the cost of decoding a frame.
    The classes are ``slots=True`` dataclasses, so a field is a member descriptor; allocating
    the object and storing each field through its descriptor's ``__set__`` does exactly what
    ``__init__``'s assignments do, from C. The result is an ordinary instance (``==``, ``repr``,
    pickling all behave). Checked at import: a field that is not a slot fails loudly.
    """

    cdef object cls
    cdef tuple slots            # member descriptors of the fields, in __init__ order
    cdef Py_ssize_t nfields
    cdef descrsetfunc set_slot

    def __cinit__(self, cls):
        import dataclasses
        import types

        self.cls = cls
        self.slots = tuple(cls.__dict__.get(f.name) for f in dataclasses.fields(cls))
        self.nfields = len(self.slots)
        if not all(type(d) is types.MemberDescriptorType for d in self.slots):
            raise ImportError(f"{cls.__qualname__} must be a dataclass(slots=True) for the native codec")
        self.set_slot = (<_TypeSlots*><PyObject*>types.MemberDescriptorType).tp_descr_set

    cdef object make(self, object a0=None, object a1=None, object a2=None, object a3=None,
                     object a4=None, object a5=None, object a6=None, object a7=None,
                     object a8=None, object a9=None):
        """An instance with fields a0, a1, ... (decoded values are never None, which ends them)."""
        cdef PyObject* raw = (<_TypeSlots*><PyObject*>self.cls).tp_alloc(<PyTypeObject*>self.cls, 0)
        if raw == NULL:
            raise MemoryError()
        cdef object obj = <object>raw
        Py_DECREF(obj)  # the cast took a second reference to the new object
        cdef PyObject* values[10]
        values[0], values[1], values[2], values[3], values[4] = (
            <PyObject*>a0, <PyObject*>a1, <PyObject*>a2, <PyObject*>a3, <PyObject*>a4)
        values[5], values[6], values[7], values[8], values[9] = (
            <PyObject*>a5, <PyObject*>a6, <PyObject*>a7, <PyObject*>a8, <PyObject*>a9)
        cdef Py_ssize_t n = 0
        while n < 10 and values[n] != <PyObject*>None and n < self.nfields:
            self.set_slot(<PyObject*>self.slots[n], <PyObject*>obj, values[n])
            n += 1
        if n != self.nfields or (n < 10 and values[n] != <PyObject*>None):
            raise AssertionError(f"{self.cls.__qualname__} takes {self.nfields} fields")
        return obj


cdef inline bytes _bytes(const unsigned char* p, Py_ssize_t n):
    return PyBytes_FromStringAndSize(<const char*>p, n)


cdef inline str _text(const unsigned char* p, Py_ssize_t n):
    # Already validated by check_body, so this cannot fail.
    return PyUnicode_DecodeUTF8(<const char*>p, n, NULL)


cdef object _message(const unsigned char* r):
    cdef uint32_t body_len = read_u32(r + REC_BODY_LEN)
    return Message.make(
        r[REC_KIND], r[REC_CONTENT_TYPE], read_u64(r + REC_CONV_ID), read_u64(r + REC_SEQ),
        read_u64(r + REC_MSG_ID), read_u64(r + REC_SENDER_ID), read_u64(r + REC_TS_MS),
        _bytes(r + REC_CLIENT_MSG_ID, CLIENT_MSG_ID_SIZE),
        _bytes(r + MESSAGE_RECORD_SIZE, body_len),
    )


cdef object _build(const FrameHeader* h, const unsigned char* b, Py_ssize_t n):
    """The frames.py object for a frame that passed parse_header() and check_body()."""
    cdef uint8_t op = h.op
    cdef uint32_t rid = h.rid
    cdef uint16_t flags = h.flags
    cdef uint64_t i, count
    cdef Py_ssize_t off
    cdef list items
    cdef uint16_t m
    if op == OP_SEND:
        return Send.make(b[0], b[1], read_u64(b + 2), _bytes(b + 10, 16), _bytes(b + 26, n - 26),
                    rid, flags)
    if op == OP_DELIVER:
        return Deliver.make(_message(b), rid, flags)
    if op == OP_SEND_ACK:
        return SendAck.make(b[0], read_u64(b + 1), read_u64(b + 9), read_u64(b + 17),
                       read_u64(b + 25), rid, flags)
    if op == OP_PING:
        return Ping.make(_bytes(b, n), rid, flags)
    if op == OP_PONG:
        return Pong.make(_bytes(b, n), rid, flags)
    if op == OP_EVENT:
        return Event.make(b[0], b[1], read_u64(b + 2), read_u64(b + 10), read_u64(b + 18),
                     _bytes(b + 26, n - 26), rid, flags)
    if op == OP_AUTH:
        return Auth.make(_text(b, n), rid, flags)
    if op == OP_AUTH_OK:
        return AuthOk.make(read_u64(b), read_u64(b + 8), read_u64(b + 16), read_u32(b + 24),
                      read_u32(b + 28), rid, flags)
    if op == OP_SYNC:
        count = read_u16(b)
        items = []
        for i in range(count):
            off = 2 + 17 * i
            items.append(SyncEntry.make(b[off], read_u64(b + off + 1), read_u64(b + off + 9)))
        return Sync.make(items, rid, flags)
    if op == OP_SYNC_RESULT:
        count = read_u32(b)
        items = []
        for i in range(count):
            off = 4 + 25 * i
            items.append(SyncResultEntry.make(b[off], read_u64(b + off + 1), read_u64(b + off + 9),
                                         read_u64(b + off + 17)))
        return SyncResult.make(items, rid, flags)
    if op == OP_HISTORY:
        return History.make(b[0], read_u64(b + 1), read_u64(b + 9), read_u16(b + 17), rid, flags)
    if op == OP_HISTORY_RESULT:
        count = read_u16(b + 9)
        items = []
        off = 11
        for i in range(count):
            items.append(_message(b + off))
            off += MESSAGE_RECORD_SIZE + read_u32(b + off + REC_BODY_LEN)
        return HistoryResult.make(b[0], read_u64(b + 1), items, rid, flags)
    if op == OP_READ:
        return Read.make(b[0], read_u64(b + 1), read_u64(b + 9), rid, flags)
    if op == OP_READ_OK:
        return ReadOk.make(rid, flags)
    if op == OP_SUBSCRIBE:
        return Subscribe.make(read_u64(b), rid, flags)
    if op == OP_SUBSCRIBE_OK:
        return SubscribeOk.make(read_u64(b), rid, flags)
    if op == OP_UNSUBSCRIBE:
        return Unsubscribe.make(read_u64(b), rid, flags)
    if op == OP_UNSUBSCRIBE_OK:
        return UnsubscribeOk.make(read_u64(b), rid, flags)
    if op == OP_TYPING:
        return Typing.make(b[0], read_u64(b + 1), rid, flags)
    if op == OP_CALL:
        m = b[0]
        return Call.make(_text(b + 1, m), _bytes(b + 1 + m, n - 1 - m), rid, flags)
    if op == OP_CALL_RESULT:
        return CallResult.make(_bytes(b, n), rid, flags)
    if op == OP_GOAWAY:
        m = read_u16(b + 6)
        return GoAway.make(read_u16(b), read_u32(b + 2), _text(b + 8, m), _text(b + 8 + m, n - 8 - m),
                      rid, flags)
    if op == OP_ERROR:
        return Error.make(read_u16(b), read_u32(b + 2), _text(b + 6, n - 6), rid, flags)
    raise AssertionError(f"no builder for validated op {op}")  # unreachable: check_body knows every op


cdef Py_ssize_t _max_frame_arg(object max_frame) except -1:
    cdef object v = PyNumber_Index(max_frame)
    if v < 0:
        raise ValueError("max_frame must be >= 0")
    # A frame length is a u32, so any larger maximum behaves like 2**32 - 1.
    return <Py_ssize_t>min(v, U32_MAX)


cdef object _next_frame(const unsigned char* p, Py_ssize_t total, Py_ssize_t* off,
                        Py_ssize_t max_frame):
    """Validate and build the frame at ``off[0]``, then advance ``off[0]`` past it."""
    cdef FrameHeader h = FrameHeader(0, 0, 0, 0, 0)  # set even when the header is short
    cdef const char* why = NULL
    cdef Py_ssize_t at = off[0]
    cdef Py_ssize_t avail = total - at
    cdef int rc = parse_header(p + at, avail, max_frame, &h)
    if rc:
        raise _header_error(rc, &h, at, avail, max_frame)
    rc = check_body(h.op, p + at + HEADER_SIZE, h.len - HEADER_SIZE, &why)
    if rc:
        raise _body_error(rc, &h, at, why)
    frame = _build(&h, p + at + HEADER_SIZE, h.len - HEADER_SIZE)
    off[0] = at + h.len
    return frame


def decode(data, max_frame=DEFAULT_MAX_FRAME):
    """Decode every frame of one WebSocket message; raise ProtocolError at the first bad one."""
    cdef Py_ssize_t mf = _max_frame_arg(max_frame)
    cdef Py_buffer view
    cdef Py_ssize_t off = 0
    cdef list out = []
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        if view.len == 0:
            raise ProtocolError("empty message", code=ERR_MALFORMED_FRAME)
        while off < view.len:
            out.append(_next_frame(<const unsigned char*>view.buf, view.len, &off, mf))
    finally:
        PyBuffer_Release(&view)
    return out


@cython.final
cdef class _FrameIterator:
    """iter_frames(): holds the buffer export until the message is consumed or found bad."""

    cdef Py_buffer view
    cdef bint held
    cdef bint started
    cdef Py_ssize_t off
    cdef Py_ssize_t max_frame

    def __cinit__(self, data, Py_ssize_t max_frame):
        PyObject_GetBuffer(data, &self.view, PyBUF_SIMPLE)
        self.held = True
        self.max_frame = max_frame

    def __dealloc__(self):
        self._release()

    cdef void _release(self) noexcept:
        if self.held:
            self.held = False
            PyBuffer_Release(&self.view)

    def __iter__(self):
        return self

    def __next__(self):
        if not self.held:
            raise StopIteration
        if not self.started:
            self.started = True
            if self.view.len == 0:
                self._release()
                raise ProtocolError("empty message", code=ERR_MALFORMED_FRAME)
        if self.off >= self.view.len:
            self._release()
            raise StopIteration
        try:
            return _next_frame(<const unsigned char*>self.view.buf, self.view.len, &self.off,
                               self.max_frame)
        except BaseException:
            self._release()  # a bad frame ends the message
            raise


def iter_frames(data, max_frame=DEFAULT_MAX_FRAME):
    """Yield the frames of one message in order; raise ProtocolError at the first bad one."""
    return _FrameIterator(data, _max_frame_arg(max_frame))


def peek_header(data, offset=0):
    """(len, ver, op, flags, rid) of the header at ``offset``, without validating anything else."""
    cdef Py_buffer view
    cdef Py_ssize_t off = offset
    cdef const unsigned char* p
    if off < 0:
        raise ValueError("offset must be >= 0")
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        if view.len - off < HEADER_SIZE:
            raise ProtocolError(
                f"frame at byte {off}: {max(view.len - off, 0)} bytes left, a header needs 12",
                code=ERR_TRUNCATED_FRAME)
        p = <const unsigned char*>view.buf + off
        return (read_u32(p), p[4], p[5], read_u16(p + 6), read_u32(p + 8))
    finally:
        PyBuffer_Release(&view)


# ==== encoding ========================================================================================

cdef struct WBuf:
    PyObject* obj       # the bytes object being filled (owned reference), or NULL
    Py_ssize_t n        # bytes written
    Py_ssize_t cap      # bytes allocated in obj


cdef unsigned char* _reserve(WBuf* w, Py_ssize_t k) except NULL:
    """Room for ``k`` more bytes at the end of ``w``; advances ``w.n`` past them."""
    cdef Py_ssize_t need = w.n + k
    cdef Py_ssize_t cap
    if need > w.cap:
        if w.obj == NULL:
            w.obj = _bytes_new(NULL, need)  # one frame: exactly its size, no resize later
            if w.obj == NULL:
                return NULL
            w.cap = need
        else:
            cap = max(need, 2 * w.cap)
            if _PyBytes_Resize(&w.obj, cap) < 0:  # resizes in place: we hold the only reference
                w.obj = NULL
                return NULL
            w.cap = cap
    cdef unsigned char* p = <unsigned char*>_bytes_data(w.obj) + w.n
    w.n = need
    return p


cdef bytes _finish(WBuf* w):
    cdef bytes out
    if w.obj == NULL:
        return b""
    if w.n != w.cap and _PyBytes_Resize(&w.obj, w.n) < 0:
        w.obj = NULL
        raise MemoryError()
    out = <bytes>w.obj
    Py_DECREF(out)  # the cast took a reference; hand over the one WBuf owned
    w.obj = NULL
    return out


cdef uint64_t _uint(object v, uint64_t maxv, int op, str field) except? 0xFFFFFFFFFFFFFFFF:
    """An unsigned integer field: TypeError for a non-integer, BAD_BODY when out of range."""
    cdef unsigned long long x
    if not PyLong_CheckExact(v):
        v = PyNumber_Index(v)  # ints, bools, numpy integers; not floats (as struct does)
    x = _as_u64(v)
    if x == <unsigned long long>-1 and PyErr_Occurred() != NULL:
        PyErr_Clear()          # OverflowError: negative or above 2**64 - 1
        raise _encode_error(ERR_BAD_BODY, op, f"{field} out of range")
    if x > maxv:
        raise _encode_error(ERR_BAD_BODY, op, f"{field} out of range")
    return x


cdef inline uint8_t _kind(object v, int op, uint64_t lo, uint64_t hi) except? 0xFF:
    cdef uint64_t k = _uint(v, U64_MAX, op, "kind")
    if k < lo or k > hi:
        raise _encode_error(ERR_BAD_BODY, op, "kind out of range")
    return <uint8_t>k


cdef inline bytes _bytes_arg(object v):
    """A bytes-like field as bytes (bytes pass through; others are copied as struct would)."""
    if type(v) is bytes:
        return <bytes>v
    return memoryview(v).tobytes()


cdef bytes _cmid_arg(object v, int op):
    cdef bytes cmid = _bytes_arg(v)
    if len(cmid) != CLIENT_MSG_ID_SIZE:
        raise _encode_error(ERR_BAD_BODY, op, "client_msg_id is not 16 bytes")
    return cmid


cdef const char* _utf8_arg(object v, int op, str field, Py_ssize_t* n) except NULL:
    """UTF-8 of a str field, cached on the str object (no copy for ASCII).

    The pointer lives as long as ``v``: callers keep their own reference to it.
    """
    if not PyUnicode_Check(v):
        raise TypeError(f"{_op_name(op)} {field} must be str, not {type(v).__name__}")
    try:
        return PyUnicode_AsUTF8AndSize(v, n)
    except UnicodeEncodeError:  # lone surrogates
        raise _encode_error(ERR_BAD_UTF8, op, f"{field} is not valid UTF-8") from None


cdef inline unsigned char* _start_frame(WBuf* w, int op, Py_ssize_t body, uint32_t rid,
                                        uint16_t flags) except NULL:
    cdef unsigned char* p
    if body > <Py_ssize_t>(U32_MAX - HEADER_SIZE):
        raise _encode_error(ERR_BAD_BODY, op, "frame longer than 4294967295 bytes")
    p = _reserve(w, HEADER_SIZE + body)
    write_header(p, <uint32_t>(HEADER_SIZE + body), <uint8_t>op, flags, rid)
    return p + HEADER_SIZE


cdef int _frame_op(object frame) except -1:
    cdef object op = _OP_OF_TYPE.get(type(frame))
    if op is None:
        for base in type(frame).__mro__[1:]:
            op = _OP_OF_TYPE.get(base)
            if op is not None:
                break
        else:
            raise TypeError(f"cannot encode {type(frame).__name__}: not a protocol frame")
    return op


cdef uint16_t _flags_arg(object v, int op) except? 0xFFFF:
    cdef object f = PyNumber_Index(v) if not PyLong_CheckExact(v) else v
    cdef int allowed = op_allowed_flags(<uint8_t>op)
    if f < 0 or f & ~allowed:
        raise _encode_error(ERR_BAD_FLAGS, op, f"flags {f} set bits the operation does not define")
    return <uint16_t>f


cdef int _write_record(WBuf* w, object msg, int op) except -1:
    """Append one message record (DELIVER body, HISTORY_RESULT entry)."""
    cdef uint8_t kind = _kind(msg.kind, op, 1, 3)
    cdef uint8_t ct = <uint8_t>_uint(msg.content_type, U8_MAX, op, "content_type")
    cdef uint64_t conv_id = _uint(msg.conv_id, U64_MAX, op, "conv_id")
    cdef uint64_t seq = _uint(msg.seq, U64_MAX, op, "seq")
    cdef uint64_t msg_id = _uint(msg.msg_id, U64_MAX, op, "msg_id")
    cdef uint64_t sender_id = _uint(msg.sender_id, U64_MAX, op, "sender_id")
    cdef uint64_t ts_ms = _uint(msg.ts_ms, U64_MAX, op, "ts_ms")
    cdef bytes cmid = _cmid_arg(msg.client_msg_id, op)
    cdef bytes body = _bytes_arg(msg.body)
    if len(body) > <Py_ssize_t>(U32_MAX - DELIVER_FIXED_SIZE):
        raise _encode_error(ERR_BAD_BODY, op, "frame longer than 4294967295 bytes")
    cdef unsigned char* p = _reserve(w, MESSAGE_RECORD_SIZE + len(body))
    write_message_record(p, kind, ct, conv_id, seq, msg_id, sender_id, ts_ms,
                         <const unsigned char*>PyBytes_AS_STRING(cmid),
                         <const unsigned char*>PyBytes_AS_STRING(body), <uint32_t>len(body))
    return 0


cdef int _write_payload(WBuf* w, int op, object payload, uint32_t rid, uint16_t flags,
                        Py_ssize_t limit) except -1:
    """Frames whose whole body is one opaque byte string (PING, PONG, CALL_RESULT)."""
    cdef bytes data = _bytes_arg(payload)
    cdef Py_ssize_t n = len(data)
    if limit >= 0 and n > limit:
        raise _encode_error(ERR_BAD_BODY, op, "payload longer than 64 bytes")
    cdef unsigned char* p = _start_frame(w, op, n, rid, flags)
    if n:
        memcpy(p, PyBytes_AS_STRING(data), n)
    return 0


cdef int _write_frame(WBuf* w, object f) except -1:
    cdef int op = _frame_op(f)
    cdef uint32_t rid = <uint32_t>_uint(f.rid, U32_MAX, op, "rid")
    cdef uint16_t flags = _flags_arg(f.flags, op)
    cdef unsigned char* p
    cdef const char* s
    cdef const char* s2
    cdef Py_ssize_t n, n2, start
    cdef bytes b1, b2
    cdef uint8_t kind, u8
    cdef uint64_t a, c, d, e, u64
    cdef object items, text, text2

    if op == OP_SEND:
        kind = _kind(f.kind, op, 1, 3)
        u8 = <uint8_t>_uint(f.content_type, U8_MAX, op, "content_type")
        a = _uint(f.conv_id, U64_MAX, op, "conv_id")
        b1 = _cmid_arg(f.client_msg_id, op)
        b2 = _bytes_arg(f.body)
        p = _start_frame(w, op, 26 + len(b2), rid, flags)
        p[0] = kind
        p[1] = u8
        write_u64(p + 2, a)
        memcpy(p + 10, PyBytes_AS_STRING(b1), CLIENT_MSG_ID_SIZE)
        if len(b2):
            memcpy(p + 26, PyBytes_AS_STRING(b2), len(b2))
    elif op == OP_DELIVER:
        start = w.n
        _start_frame(w, op, 0, rid, flags)
        _write_record(w, f.message, op)
        write_u32(<unsigned char*>_bytes_data(w.obj) + start, <uint32_t>(w.n - start))
    elif op == OP_SEND_ACK:
        kind = _kind(f.kind, op, 1, 3)
        a = _uint(f.conv_id, U64_MAX, op, "conv_id")
        c = _uint(f.seq, U64_MAX, op, "seq")
        d = _uint(f.msg_id, U64_MAX, op, "msg_id")
        e = _uint(f.ts_ms, U64_MAX, op, "ts_ms")
        p = _start_frame(w, op, 33, rid, flags)
        p[0] = kind
        write_u64(p + 1, a)
        write_u64(p + 9, c)
        write_u64(p + 17, d)
        write_u64(p + 25, e)
    elif op == OP_PING or op == OP_PONG:
        _write_payload(w, op, f.payload, rid, flags, 64)
    elif op == OP_CALL_RESULT:
        _write_payload(w, op, f.payload, rid, flags, -1)
    elif op == OP_EVENT:
        u8 = <uint8_t>_uint(f.type, U8_MAX, op, "type")
        kind = _kind(f.kind, op, 0, 3)
        a = _uint(f.conv_id, U64_MAX, op, "conv_id")
        c = _uint(f.actor_id, U64_MAX, op, "actor_id")
        d = _uint(f.value, U64_MAX, op, "value")
        b1 = _bytes_arg(f.extra)
        p = _start_frame(w, op, 26 + len(b1), rid, flags)
        p[0] = u8
        p[1] = kind
        write_u64(p + 2, a)
        write_u64(p + 10, c)
        write_u64(p + 18, d)
        if len(b1):
            memcpy(p + 26, PyBytes_AS_STRING(b1), len(b1))
    elif op == OP_AUTH:
        text = f.token  # keeps the str (and its cached UTF-8, which s points into) alive
        s = _utf8_arg(text, op, "token", &n)
        if n < 1 or n > 4096:
            raise _encode_error(ERR_BAD_BODY, op, "token length out of range 1-4096")
        p = _start_frame(w, op, n, rid, flags)
        memcpy(p, s, n)
    elif op == OP_AUTH_OK:
        a = _uint(f.user_id, U64_MAX, op, "user_id")
        c = _uint(f.session_id, U64_MAX, op, "session_id")
        d = _uint(f.server_time_ms, U64_MAX, op, "server_time_ms")
        e = _uint(f.heartbeat_ms, U32_MAX, op, "heartbeat_ms")
        u64 = _uint(f.max_frame, U32_MAX, op, "max_frame")
        p = _start_frame(w, op, 32, rid, flags)
        write_u64(p, a)
        write_u64(p + 8, c)
        write_u64(p + 16, d)
        write_u32(p + 24, <uint32_t>e)
        write_u32(p + 28, <uint32_t>u64)
    elif op == OP_SYNC or op == OP_SYNC_RESULT:
        items = f.entries
        if type(items) is not list:
            items = list(items)
        n = len(items)
        if n > <Py_ssize_t>(U16_MAX if op == OP_SYNC else U32_MAX):
            raise _encode_error(ERR_BAD_BODY, op, "too many entries for the count field")
        if op == OP_SYNC:
            p = _start_frame(w, op, 2 + 17 * n, rid, flags)
            write_u16(p, <uint16_t>n)
            p += 2
            for entry in items:
                kind = _kind(entry.kind, op, 1, 3)
                a = _uint(entry.conv_id, U64_MAX, op, "conv_id")
                c = _uint(entry.seq, U64_MAX, op, "seq")
                # _start_frame reserved the whole body up front, so p stays valid.
                p[0] = kind
                write_u64(p + 1, a)
                write_u64(p + 9, c)
                p += 17
        else:
            p = _start_frame(w, op, 4 + 25 * n, rid, flags)
            write_u32(p, <uint32_t>n)
            p += 4
            for entry in items:
                kind = _kind(entry.kind, op, 1, 3)
                a = _uint(entry.conv_id, U64_MAX, op, "conv_id")
                c = _uint(entry.last_seq, U64_MAX, op, "last_seq")
                d = _uint(entry.read_seq, U64_MAX, op, "read_seq")
                p[0] = kind
                write_u64(p + 1, a)
                write_u64(p + 9, c)
                write_u64(p + 17, d)
                p += 25
    elif op == OP_HISTORY:
        kind = _kind(f.kind, op, 1, 3)
        a = _uint(f.conv_id, U64_MAX, op, "conv_id")
        c = _uint(f.from_seq, U64_MAX, op, "from_seq")
        d = _uint(f.limit, U64_MAX, op, "limit")
        if d < 1 or d > 1000:
            raise _encode_error(ERR_BAD_BODY, op, "limit out of range 1-1000")
        p = _start_frame(w, op, 19, rid, flags)
        p[0] = kind
        write_u64(p + 1, a)
        write_u64(p + 9, c)
        write_u16(p + 17, <uint16_t>d)
    elif op == OP_HISTORY_RESULT:
        kind = _kind(f.kind, op, 1, 3)
        a = _uint(f.conv_id, U64_MAX, op, "conv_id")
        items = f.messages
        if type(items) is not list:
            items = list(items)
        n = len(items)
        if n > <Py_ssize_t>U16_MAX:
            raise _encode_error(ERR_BAD_BODY, op, "too many messages for the count field")
        start = w.n
        p = _start_frame(w, op, 11, rid, flags)
        p[0] = kind
        write_u64(p + 1, a)
        write_u16(p + 9, <uint16_t>n)
        for msg in items:  # the buffer may move while records are appended: p is stale now
            _write_record(w, msg, op)
        if <uint64_t>(w.n - start) > U32_MAX:
            raise _encode_error(ERR_BAD_BODY, op, "frame longer than 4294967295 bytes")
        write_u32(<unsigned char*>_bytes_data(w.obj) + start, <uint32_t>(w.n - start))
    elif op == OP_READ:
        kind = _kind(f.kind, op, 1, 3)
        a = _uint(f.conv_id, U64_MAX, op, "conv_id")
        c = _uint(f.seq, U64_MAX, op, "seq")
        p = _start_frame(w, op, 17, rid, flags)
        p[0] = kind
        write_u64(p + 1, a)
        write_u64(p + 9, c)
    elif op == OP_READ_OK:
        _start_frame(w, op, 0, rid, flags)
    elif (op == OP_SUBSCRIBE or op == OP_SUBSCRIBE_OK or op == OP_UNSUBSCRIBE
            or op == OP_UNSUBSCRIBE_OK):
        a = _uint(f.room_id, U64_MAX, op, "room_id")
        p = _start_frame(w, op, 8, rid, flags)
        write_u64(p, a)
    elif op == OP_TYPING:
        kind = _kind(f.kind, op, 1, 3)
        a = _uint(f.conv_id, U64_MAX, op, "conv_id")
        p = _start_frame(w, op, 9, rid, flags)
        p[0] = kind
        write_u64(p + 1, a)
    elif op == OP_CALL:
        text = f.method
        s = _utf8_arg(text, op, "method", &n)
        if n < 1 or n > 64:
            raise _encode_error(ERR_BAD_BODY, op, "method length out of range 1-64")
        b1 = _bytes_arg(f.payload)
        p = _start_frame(w, op, 1 + n + len(b1), rid, flags)
        p[0] = <uint8_t>n
        memcpy(p + 1, s, n)
        if len(b1):
            memcpy(p + 1 + n, PyBytes_AS_STRING(b1), len(b1))
    elif op == OP_GOAWAY:
        a = _uint(f.code, U16_MAX, op, "code")
        c = _uint(f.retry_after_ms, U32_MAX, op, "retry_after_ms")
        text = f.url
        s = _utf8_arg(text, op, "url", &n)
        if n > <Py_ssize_t>U16_MAX:
            raise _encode_error(ERR_BAD_BODY, op, "url longer than 65535 bytes")
        text2 = f.reason
        s2 = _utf8_arg(text2, op, "reason", &n2)
        p = _start_frame(w, op, 8 + n + n2, rid, flags)
        write_u16(p, <uint16_t>a)
        write_u32(p + 2, <uint32_t>c)
        write_u16(p + 6, <uint16_t>n)
        memcpy(p + 8, s, n)
        memcpy(p + 8 + n, s2, n2)
    elif op == OP_ERROR:
        _write_error(w, rid, f.code, f.retry_after_ms, f.message)
    else:
        raise AssertionError(f"no encoder for op {op}")  # unreachable: _OP_OF_TYPE lists them
    return 0


cdef int _write_error(WBuf* w, uint32_t rid, object code, object retry_after_ms,
                      object message) except -1:
    cdef uint64_t c = _uint(code, U16_MAX, OP_ERROR, "code")
    cdef uint64_t r = _uint(retry_after_ms, U32_MAX, OP_ERROR, "retry_after_ms")
    cdef Py_ssize_t n
    cdef const char* s = _utf8_arg(message, OP_ERROR, "message", &n)
    cdef unsigned char* p = _start_frame(w, OP_ERROR, 6 + n, rid, 0)
    write_u16(p, <uint16_t>c)
    write_u32(p + 2, <uint32_t>r)
    memcpy(p + 6, s, n)
    return 0


def encode(frame):
    """The wire bytes of one frame; ProtocolError for a field the protocol cannot carry."""
    cdef WBuf w = WBuf(NULL, 0, 0)
    try:
        _write_frame(&w, frame)
        return _finish(&w)
    finally:
        Py_XDECREF(w.obj)


def encode_many(frames):
    """Frames back to back, as one WebSocket message carries them."""
    cdef WBuf w = WBuf(NULL, 0, 0)
    try:
        for frame in frames:
            _write_frame(&w, frame)
        return _finish(&w)
    finally:
        Py_XDECREF(w.obj)


def encode_deliver(kind, content_type, conv_id, seq, msg_id, sender_id, ts_ms, client_msg_id,
                   body):
    """DELIVER (rid 0, flags 0) from plain values; equal to encode(Deliver(Message(...)))."""
    cdef uint8_t k = _kind(kind, OP_DELIVER, 1, 3)
    cdef uint8_t ct = <uint8_t>_uint(content_type, U8_MAX, OP_DELIVER, "content_type")
    cdef uint64_t conv = _uint(conv_id, U64_MAX, OP_DELIVER, "conv_id")
    cdef uint64_t sq = _uint(seq, U64_MAX, OP_DELIVER, "seq")
    cdef uint64_t mid = _uint(msg_id, U64_MAX, OP_DELIVER, "msg_id")
    cdef uint64_t snd = _uint(sender_id, U64_MAX, OP_DELIVER, "sender_id")
    cdef uint64_t ts = _uint(ts_ms, U64_MAX, OP_DELIVER, "ts_ms")
    cdef bytes cmid = _cmid_arg(client_msg_id, OP_DELIVER)
    cdef bytes data = _bytes_arg(body)
    cdef Py_ssize_t n = len(data)
    if n > <Py_ssize_t>(U32_MAX - DELIVER_FIXED_SIZE):
        raise _encode_error(ERR_BAD_BODY, OP_DELIVER, "frame longer than 4294967295 bytes")
    cdef bytes out = PyBytes_FromStringAndSize(NULL, DELIVER_FIXED_SIZE + n)
    write_deliver(<unsigned char*>PyBytes_AS_STRING(out), k, ct, conv, sq, mid, snd, ts,
                  <const unsigned char*>PyBytes_AS_STRING(cmid),
                  <const unsigned char*>PyBytes_AS_STRING(data), <uint32_t>n)
    return out


def encode_send_ack(rid, flags, kind, conv_id, seq, msg_id, ts_ms):
    """SEND_ACK from plain values; equal to encode(SendAck(...))."""
    cdef uint32_t r = <uint32_t>_uint(rid, U32_MAX, OP_SEND_ACK, "rid")
    cdef uint16_t fl = _flags_arg(flags, OP_SEND_ACK)
    cdef uint8_t k = _kind(kind, OP_SEND_ACK, 1, 3)
    cdef uint64_t a = _uint(conv_id, U64_MAX, OP_SEND_ACK, "conv_id")
    cdef uint64_t c = _uint(seq, U64_MAX, OP_SEND_ACK, "seq")
    cdef uint64_t d = _uint(msg_id, U64_MAX, OP_SEND_ACK, "msg_id")
    cdef uint64_t e = _uint(ts_ms, U64_MAX, OP_SEND_ACK, "ts_ms")
    cdef bytes out = PyBytes_FromStringAndSize(NULL, HEADER_SIZE + 33)
    cdef unsigned char* p = <unsigned char*>PyBytes_AS_STRING(out)
    write_header(p, HEADER_SIZE + 33, OP_SEND_ACK, fl, r)
    p += HEADER_SIZE
    p[0] = k
    write_u64(p + 1, a)
    write_u64(p + 9, c)
    write_u64(p + 17, d)
    write_u64(p + 25, e)
    return out


def encode_error(rid, code, retry_after_ms, message):
    """ERROR from plain values; equal to encode(Error(code, retry_after_ms, message, rid))."""
    cdef WBuf w = WBuf(NULL, 0, 0)
    try:
        _write_error(&w, <uint32_t>_uint(rid, U32_MAX, OP_ERROR, "rid"), code, retry_after_ms,
                     message)
        return _finish(&w)
    finally:
        Py_XDECREF(w.obj)


def encode_event(type, kind, conv_id, actor_id, value, extra=b""):
    """EVENT (rid 0, flags 0) from plain values; equal to encode(Event(...))."""
    cdef uint8_t t = <uint8_t>_uint(type, U8_MAX, OP_EVENT, "type")
    cdef uint8_t k = _kind(kind, OP_EVENT, 0, 3)
    cdef uint64_t a = _uint(conv_id, U64_MAX, OP_EVENT, "conv_id")
    cdef uint64_t c = _uint(actor_id, U64_MAX, OP_EVENT, "actor_id")
    cdef uint64_t d = _uint(value, U64_MAX, OP_EVENT, "value")
    cdef bytes data = _bytes_arg(extra)
    cdef Py_ssize_t n = len(data)
    if n > <Py_ssize_t>(U32_MAX - HEADER_SIZE - 26):
        raise _encode_error(ERR_BAD_BODY, OP_EVENT, "frame longer than 4294967295 bytes")
    cdef bytes out = PyBytes_FromStringAndSize(NULL, HEADER_SIZE + 26 + n)
    cdef unsigned char* p = <unsigned char*>PyBytes_AS_STRING(out)
    write_header(p, <uint32_t>(HEADER_SIZE + 26 + n), OP_EVENT, 0, 0)
    p += HEADER_SIZE
    p[0] = t
    p[1] = k
    write_u64(p + 2, a)
    write_u64(p + 10, c)
    write_u64(p + 18, d)
    if n:
        memcpy(p + 26, PyBytes_AS_STRING(data), n)
    return out


# ==== late binding ====================================================================================
# gochat.protocol's __init__ imports this module to re-export its functions, and frames.py lives
# in that package. Importing it here, after every function above is defined, makes the cycle
# harmless whichever side is imported first: a re-entrant ``from gochat._native import codec``
# finds all public functions already in place, and nothing calls them before this block ran.
from gochat.protocol import frames as _frames
from gochat.protocol.constants import Op as _OpEnum

_Op = _OpEnum
Auth, AuthOk = _Builder(_frames.Auth), _Builder(_frames.AuthOk)
Ping, Pong = _Builder(_frames.Ping), _Builder(_frames.Pong)
Send, SendAck = _Builder(_frames.Send), _Builder(_frames.SendAck)
Deliver, Message = _Builder(_frames.Deliver), _Builder(_frames.Message)
Sync, SyncEntry = _Builder(_frames.Sync), _Builder(_frames.SyncEntry)
SyncResult, SyncResultEntry = _Builder(_frames.SyncResult), _Builder(_frames.SyncResultEntry)
History, HistoryResult = _Builder(_frames.History), _Builder(_frames.HistoryResult)
Read, ReadOk = _Builder(_frames.Read), _Builder(_frames.ReadOk)
Subscribe, SubscribeOk = _Builder(_frames.Subscribe), _Builder(_frames.SubscribeOk)
Unsubscribe, UnsubscribeOk = _Builder(_frames.Unsubscribe), _Builder(_frames.UnsubscribeOk)
Typing, Call, CallResult = _Builder(_frames.Typing), _Builder(_frames.Call), _Builder(_frames.CallResult)
Event, GoAway, Error = _Builder(_frames.Event), _Builder(_frames.GoAway), _Builder(_frames.Error)
_OP_OF_TYPE = {cls: int(op) for op, cls in _frames.FRAME_TYPES.items()}
