# Connection state and the coalescing fan-out writer (the data plane's output side).
#
# Data flow:  messaging core encodes a DELIVER/EVENT/reply ONCE into a `bytes`
#   -> FanoutWriter.push / RoutingTable.fanout_* append those bytes to each recipient
#      Connection's outbound buffer (a malloc'ed block with HEADROOM free bytes in front)
#   -> at the end of the event-loop tick FanoutWriter._flush() sends each dirty connection's
#      buffer as ONE WebSocket binary message through picows' send_reuse_external_buffer,
#      which writes the WS header into the headroom and does one send(2).
# So N frames queued to one socket in one tick cost one syscall, and no per-recipient Python
# object is created.
#
# Slow consumers: while picows reports the transport paused (kernel + transport buffers full),
# frames accumulate in `out`; above `soft_limit` droppable frames (typing, presence, room
# messages) are dropped; above `hard_limit` the connection is closed with 4401 SLOW_CONSUMER.

from libc.stdint cimport uint64_t
from picows.picows cimport WSListener, WSTransport

cdef enum:
    HEADROOM = 16            # picows needs <= 10 bytes in front for a server-side header

cdef class FanoutWriter

cdef class Connection(WSListener):
    cdef:
        readonly WSTransport transport
        readonly object handler          # Python gateway: on_connected/on_message/on_disconnected
        readonly FanoutWriter writer
        public uint64_t user_id
        public uint64_t session_id
        readonly uint64_t conn_id
        public bint authenticated
        public object state              # control-plane session state (Python object)
        char* out                        # outbound block; frames start at out + HEADROOM
        Py_ssize_t out_size              # bytes of frames queued (after HEADROOM)
        Py_ssize_t out_cap               # allocated bytes (HEADROOM included)
        readonly bint dirty
        readonly bint paused
        readonly bint closing
        Py_ssize_t soft_limit
        Py_ssize_t hard_limit
        double tokens                    # rate limiter (token bucket)
        double rate
        double burst
        double last_refill
        object fragments                 # bytearray while a fragmented WS message arrives
        Py_ssize_t max_message
        readonly uint64_t dropped

    cdef int _append(self, const char* data, Py_ssize_t size) except -1
    cdef int queue_frame(self, bytes data, bint droppable) except -1
    cdef int flush(self) except -1
    cpdef bint take_tokens(self, double now, double n)
    cpdef push(self, bytes data, bint droppable=*)
    cpdef close_with(self, int close_code, str reason=*)


cdef class FanoutWriter:
    cdef:
        object loop
        list dirty
        bint scheduled
        object _flush_cb
        readonly uint64_t frames_out
        readonly uint64_t bytes_out
        readonly uint64_t writes
        readonly uint64_t drops
        readonly uint64_t slow_disconnects

    cdef inline int mark(self, Connection c) except -1
    cpdef int fanout(self, list conns, bytes data, Connection skip=*, bint droppable=*) except -1
    cpdef flush_now(self)
