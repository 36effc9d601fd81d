# cython: freethreading_compatible=False
"""Per-connection outbound buffers and the coalescing fan-out writer; see fanout.pxd."""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy
from libc.stdint cimport uint64_t

from picows.picows cimport WSFrame, WSListener, WSMsgType, WSTransport, WSCloseCode

import logging

_log = logging.getLogger("gochat.gateway")

cdef uint64_t _next_conn_id = 0


cdef class Connection(WSListener):
    """One client WebSocket. The gateway (Python) gets ``on_message(conn, bytes)``."""

    def __init__(self, handler, FanoutWriter writer, Py_ssize_t soft_limit, Py_ssize_t hard_limit,
                 double rate, double burst, Py_ssize_t max_message):
        global _next_conn_id
        _next_conn_id += 1
        self.conn_id = _next_conn_id
        self.handler = handler
        self.writer = writer
        self.soft_limit = soft_limit
        self.hard_limit = hard_limit
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.last_refill = 0.0
        self.max_message = max_message
        self.state = None

    def __dealloc__(self):
        if self.out is not NULL:
            free(self.out)
            self.out = NULL

    # ---- picows callbacks ------------------------------------------------------------------
    cpdef on_ws_connected(self, WSTransport transport):
        self.transport = transport
        # The upgrade request and response (headers in multidicts, ~2 KiB) are not needed once
        # the handshake is done; the gateway read the Authorization header in its factory.
        transport.request = None
        transport.response = None
        self.handler.on_connected(self)

    cpdef on_ws_frame(self, WSTransport transport, WSFrame frame):
        cdef WSMsgType t = frame.msg_type
        if t == WSMsgType.BINARY and frame.fin and self.fragments is None:
            self.handler.on_message(self, frame.get_payload_as_bytes())
        elif t == WSMsgType.BINARY or (t == WSMsgType.CONTINUATION and self.fragments is not None):
            # Rare: a fragmented message. Reassemble within the message size limit.
            if self.fragments is None:
                self.fragments = bytearray()
            self.fragments += frame.get_payload_as_memoryview()
            if len(self.fragments) > self.max_message:
                self.fragments = None
                self.handler.on_oversize(self)
            elif frame.fin:
                data = bytes(self.fragments)
                self.fragments = None
                self.handler.on_message(self, data)
        elif t == WSMsgType.TEXT or t == WSMsgType.CONTINUATION:
            self.handler.on_text(self)
        elif t == WSMsgType.CLOSE:
            if not self.closing:
                self.closing = True
                self.flush()
                transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()
        # PING is answered by picows (auto pong); PONG feeds picows' auto-ping liveness check.

    cpdef on_ws_disconnected(self, WSTransport transport):
        self.closing = True
        self.out_size = 0
        if self.out is not NULL:
            free(self.out)
            self.out = NULL
            self.out_cap = 0
        self.handler.on_disconnected(self)

    cpdef pause_writing(self):
        self.paused = True

    cpdef resume_writing(self):
        self.paused = False
        if self.out_size:
            self.writer.mark(self)

    # ---- outbound ----------------------------------------------------------------------------
    cdef int _append(self, const char* data, Py_ssize_t size) except -1:
        cdef Py_ssize_t need = HEADROOM + self.out_size + size
        cdef Py_ssize_t cap
        cdef char* grown
        if need > self.out_cap:
            cap = self.out_cap * 2 if self.out_cap else 1024
            while cap < need:
                cap *= 2
            grown = <char*>realloc(self.out, cap)
            if grown is NULL:
                raise MemoryError()
            self.out = grown
            self.out_cap = cap
        memcpy(self.out + HEADROOM + self.out_size, data, size)
        self.out_size += size
        return 0

    cdef int queue_frame(self, bytes data, bint droppable) except -1:
        """Queue encoded frame(s); 1 if queued, 0 if dropped or the connection is gone."""
        cdef Py_ssize_t size = PyBytes_GET_SIZE(data)
        if self.closing:
            return 0
        if self.out_size + size > self.soft_limit and (droppable or self.paused):
            if droppable:
                self.dropped += 1
                self.writer.drops += 1
                return 0
            if self.out_size + size > self.hard_limit:
                self.writer.slow_disconnects += 1
                self.close_with(4401, "slow consumer")
                return 0
        self._append(PyBytes_AS_STRING(data), size)
        self.writer.frames_out += 1
        self.writer.mark(self)
        return 1

    cdef int flush(self) except -1:
        self.dirty = False
        if self.out_size == 0 or self.transport is None or self.transport.is_disconnected:
            return 0
        if self.paused and not self.closing:
            return 0  # resume_writing marks us dirty again
        self.writer.writes += 1
        self.writer.bytes_out += self.out_size
        self.transport.send_reuse_external_buffer(WSMsgType.BINARY, self.out + HEADROOM, self.out_size)
        self.out_size = 0
        # Give the block back after every flush: an idle connection then holds no outbound
        # memory, and malloc+free per tick is noise next to the send(2) it accompanies.
        free(self.out)
        self.out = NULL
        self.out_cap = 0
        return 0

    cpdef bint take_tokens(self, double now, double n):
        """Token-bucket rate limit: False when ``n`` requests exceed the budget."""
        self.tokens += (now - self.last_refill) * self.rate
        self.last_refill = now
        if self.tokens > self.burst:
            self.tokens = self.burst
        if self.tokens < n:
            return False
        self.tokens -= n
        return True

    cpdef push(self, bytes data, bint droppable=False):
        """Queue encoded frames for this connection; they go out at the end of the tick."""
        self.queue_frame(data, droppable)

    cpdef close_with(self, int close_code, str reason=""):
        """Flush what is queued, then close the WebSocket with ``close_code``."""
        if self.closing or self.transport is None:
            return
        self.flush()
        self.closing = True
        self.transport.send_close(<WSCloseCode>close_code, reason.encode())
        self.transport.disconnect()

    @property
    def queued_bytes(self):
        return self.out_size

    def __repr__(self):
        return f"<Connection {self.conn_id} user={self.user_id} session={self.session_id}>"


cdef class FanoutWriter:
    """Coalesces everything queued to each connection during one loop tick into one write."""

    def __init__(self, loop):
        self.loop = loop
        self.dirty = []
        self._flush_cb = self._flush

    cdef inline int mark(self, Connection c) except -1:
        if not c.dirty:
            c.dirty = True
            self.dirty.append(c)
            if not self.scheduled:
                self.scheduled = True
                self.loop.call_soon(self._flush_cb)
        return 0

    cpdef int fanout(self, list conns, bytes data, Connection skip=None, bint droppable=False) except -1:
        """Queue the same encoded bytes to every connection in ``conns`` except ``skip``."""
        cdef Connection c
        cdef int n = 0
        for c in conns:
            if c is not skip:
                n += c.queue_frame(data, droppable)
        return n

    def _flush(self):
        cdef list dirty = self.dirty
        cdef Py_ssize_t i = 0, n = len(dirty)
        self.scheduled = False
        self.dirty = []
        # One try block around the whole loop (not one per connection); a failing connection
        # is logged and the loop resumes after it.
        while i < n:
            try:
                while i < n:
                    (<Connection>dirty[i]).flush()
                    i += 1
            except Exception:
                _log.exception("flush failed for %r", dirty[i])
                i += 1

    cpdef flush_now(self):
        """Flush immediately (shutdown paths)."""
        self._flush()
