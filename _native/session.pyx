# cython: freethreading_compatible=False
"""The native session state machine: each binary WebSocket message of a client, walked in C.

A :class:`Session` is the gateway's :class:`~gochat._native.connection.Connection` with its
message handling done here instead of in Python (``Gateway.on_message`` stays as the reference
implementation, and the tests run both against the same frames):

1. every frame of the message is checked first, with the codec's ``parse_header`` and
   ``check_body`` (``codec.pxd``): a message with a bad frame is rejected whole, and then the
   reference path words the error exactly as it always has;
2. the per-connection rate limit takes one token per frame (per frame, also within a message,
   once the message's frames exceed the tokens left: each frame past the budget is answered
   RATE_LIMITED, a TYPING is dropped);
3. the operation switch: PING is answered here (PONG, no Python); before authentication only
   AUTH and PING pass (anything else: 108 and close); a server-to-client op is 110 and close;
   a SEND reaches the send path as plain values — ``on_send(conn, rid, kind, content_type,
   conv_id, client_msg_id, body, started)`` — with no frame object; AUTH goes to ``on_auth``;
   every other (control-plane) operation to ``on_request`` with that one frame's bytes, and so
   does a SEND with the TRACED flag (rare: the gateway decodes it and the send path checks and
   strips its traceparent, docs/observability.md, "Tracing").

The handler is the Python gateway; its coarse methods are all this module calls.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy
from posix.time cimport clock_gettime, timespec

from gochat._native.codec cimport (
    HEADER_SIZE,
    OP_AUTH,
    OP_CALL,
    OP_PING,
    OP_PONG,
    OP_SEND,
    OP_TYPING,
    CLIENT_MSG_ID_SIZE,
    FLAG_TRACED,
    FrameHeader,
    check_body,
    parse_header,
    read_u16,
    read_u32,
    read_u64,
    write_header,
)
from gochat._native.connection cimport ConnShared, Connection

cdef extern from "<time.h>" nogil:
    enum: CLOCK_MONOTONIC

cdef enum:
    ERR_NOT_AUTHENTICATED = 108
    ERR_UNEXPECTED_OP = 110
    SEND_FIXED = 26            # kind, content_type, conv_id, client_msg_id


cdef inline double _now() noexcept nogil:
    """The event loop's clock (CLOCK_MONOTONIC, as uvloop's and asyncio's loop.time()), in s."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


cdef class Session(Connection):
    """A client connection whose messages are walked natively (see the module docstring)."""

    cdef int _on_payload(self, const unsigned char* data, Py_ssize_t size) except -1:
        cdef ConnShared shared = self.shared
        # the gateway's message limit is 4 x max_frame (docs/protocol.md, "Message size")
        cdef Py_ssize_t max_frame = shared.max_message >> 2
        cdef Py_ssize_t off = 0
        cdef Py_ssize_t count = 0
        cdef FrameHeader h
        cdef const char* why = NULL
        cdef int err
        cdef uint32_t length
        cdef bint limited = False
        cdef double now
        if self.is_closing:
            return 0
        if size == 0:
            return Connection._on_payload(self, data, size)
        # 1. the whole message first: a bad frame rejects every frame of it
        while off < size:
            err = parse_header(data + off, size - off, max_frame, &h)
            if err == 0:
                err = check_body(h.op, data + off + HEADER_SIZE, h.len - HEADER_SIZE, &why)
            if err != 0:
                # rare: the reference path decodes it again and words the error as ever
                return Connection._on_payload(self, data, size)
            off += h.len
            count += 1
        # 2. the rate limit, 3. the operation switch
        now = _now()
        if self.is_authenticated:
            limited = not self.take_tokens(now, <double>count)
        off = 0
        while off < size:
            if self.is_closing:
                return 0
            length = read_u32(data + off)
            if limited and not self.take_tokens(now, 1.0):
                if data[off + 5] != OP_TYPING:
                    shared.handler.on_rate_limited(self, read_u32(data + off + 8))
            else:
                self._frame(data + off, now)
            off += length
        return 0

    cdef int _frame(self, const unsigned char* p, double now) except -1:
        """One valid frame (``p`` at its header)."""
        cdef ConnShared shared = self.shared
        cdef uint32_t length = read_u32(p)
        cdef uint8_t op = p[5]
        cdef uint32_t rid = read_u32(p + 8)
        cdef const unsigned char* body = p + HEADER_SIZE
        cdef Py_ssize_t n = length - HEADER_SIZE
        if op == OP_PING:
            return self._pong(rid, body, n)
        if op < OP_AUTH or op > OP_CALL:
            shared.handler.on_violation(self, rid, ERR_UNEXPECTED_OP, f"op 0x{op:02x} is server-to-client")
            return 0
        if op == OP_SEND and self.is_authenticated and not (read_u16(p + 6) & FLAG_TRACED):
            on_send = shared.on_send
            if on_send is None:
                on_send = shared.on_send = shared.handler.on_send
            on_send(
                self,
                rid,
                body[0],
                body[1],
                read_u64(body + 2),
                PyBytes_FromStringAndSize(<const char*>body + 10, CLIENT_MSG_ID_SIZE),
                PyBytes_FromStringAndSize(<const char*>body + SEND_FIXED, n - SEND_FIXED),
                now,
            )
        elif op == OP_AUTH:
            shared.handler.on_auth(self, rid, PyUnicode_DecodeUTF8(<const char*>body, n, NULL))
        elif not self.is_authenticated:
            shared.handler.on_violation(self, rid, ERR_NOT_AUTHENTICATED, "AUTH first")
        else:
            shared.handler.on_request(self, PyBytes_FromStringAndSize(<const char*>p, length))
        return 0

    cdef int _pong(self, uint32_t rid, const unsigned char* payload, Py_ssize_t n) except -1:
        cdef bytes frame = PyBytes_FromStringAndSize(NULL, HEADER_SIZE + n)
        cdef unsigned char* out = <unsigned char*>PyBytes_AS_STRING(frame)
        write_header(out, <uint32_t>(HEADER_SIZE + n), OP_PONG, 0, rid)
        if n:
            memcpy(out + HEADER_SIZE, payload, n)
        self.queue_frame(frame, False)
        return 0
