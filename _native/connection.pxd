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
# messages) are dropped; above `hard_limit` (`out` + uvloop's write buffer) the connection is
# closed at once: its buffers are freed, ERROR 401 + CLOSE 4401 are sent only if they can still
# be written, else the transport is aborted (RST). Accepted sockets get a bounded SO_SNDBUF.
#
# Message size: a flush larger than `max_message` (the inbound limit, 4 x max_frame) leaves as
# several WebSocket messages cut at frame boundaries (Connection._send_split).
#
# WebSocket conformance picows leaves to the listener (RFC 6455 §5.2, §5.4, §7.4): reserved
# bits, fragmentation order and close codes are checked in Connection.on_ws_frame; violations
# fail the connection with 1002 (1007 for a close reason that is not UTF-8).
#
# Registry and heartbeat: the writer lists every connected Connection in two intrusive lists
# (links in the Connection, no allocation): `idle` ordered by the last incoming frame (a frame
# moves its connection to the tail) and `wait` (PING sent) ordered by the PONG deadline.
# FanoutWriter.start_heartbeat runs picows' PING_WHEN_IDLE rules on them with ONE timer that
# only looks at the two heads: PING after `idle` seconds without an incoming frame, close
# (1001) when no PONG follows within `reply` seconds. picows' own auto-ping costs a Task, two
# coroutines, a Future and a timer handle per connection (~1.8 KiB per idle connection).
#
# Memory per idle connection is a target: the fields below are ordered and typed to keep a
# Connection small, settings shared by every connection live in one ConnShared object.

from libc.stdint cimport uint64_t
from picows.picows cimport WSFrame, WSListener, WSMsgType, WSTransport

cdef enum:
    HEADROOM = 16            # picows needs <= 10 bytes in front for a server-side header

cdef class FanoutWriter

cdef bytes with_headroom(bytes data)

cdef class ConnShared:
    # what every connection of one gateway shares: handler, writer and limits
    cdef:
        object handler
        FanoutWriter writer
        Py_ssize_t soft_limit
        Py_ssize_t hard_limit
        double rate
        double burst
        Py_ssize_t max_message
        object on_send                   # the handler's on_send, looked up once (native Session)


cdef class Connection(WSListener):
    cdef:
        readonly WSTransport transport
        ConnShared shared                # handler (Python gateway), writer, limits
        object uid                       # user_id: an int in 0..2**64-1, kept as the object
                                         # the gateway set, so that the routing table's and
                                         # presence's dict keys share it (no int per lookup)
        public uint64_t session_id
        readonly uint64_t conn_id
        public object state              # control-plane session state (Python object)
        object solo                      # a shared buffer queued alone this tick: HEADROOM
                                         # spare bytes, then the frame (see queue_shared)
        char* out                        # outbound block; frames start at out + HEADROOM
        Py_ssize_t out_size              # bytes of frames queued (after HEADROOM); the block
                                         # is 1024 * 2**k bytes, the least >= HEADROOM + out_size
        double tokens                    # rate limiter (token bucket)
        double last_refill
        object fragments                 # bytearray while a fragmented WS message arrives
        readonly uint64_t dropped
        Connection hb_prev               # heartbeat list links (see above)
        Connection hb_next
        double hb_at                     # idle list: last frame in; wait list: PONG deadline
        unsigned char is_authenticated
        unsigned char is_dirty
        unsigned char is_paused
        unsigned char is_closing
        unsigned char hb_state           # 0 not listed, 1 idle, 2 wait (PING out), 3 closed
        unsigned char trim_pending       # read buffer not yet trimmed after authentication

    cdef int _append(self, const char* data, Py_ssize_t size) except -1
    cdef int queue_frame(self, bytes data, bint droppable) except -1
    cdef int queue_shared(self, bytes framed, bint droppable) except -1
    cdef int _admit(self, Py_ssize_t size, bint droppable) except -1
    cdef int _materialize(self) except -1
    cdef int flush(self) except -1
    cdef int _trim_buffers(self) except -1
    cpdef bint take_tokens(self, double now, double n)
    cpdef push(self, bytes data, bint droppable=*)
    cpdef close_with(self, int close_code, str reason=*)
    # (after the methods above: modules compiled against an older pxd keep their vtable offsets)
    cdef Py_ssize_t _buffered(self) except -1
    cdef int _release_out(self) noexcept
    cdef int _slow_consumer(self) except -1
    cdef int _send_split(self, char* data, Py_ssize_t size) except -1
    cdef int _fragment(self, WSFrame frame, WSMsgType t) except -1
    cdef int _on_close(self, WSTransport transport, WSFrame frame) except -1
    cdef int _ws_fail(self, int code, str reason) except -1
    cdef int _on_payload(self, const unsigned char* data, Py_ssize_t size) except -1


cdef class FanoutWriter:
    cdef:
        object loop
        list dirty
        bint scheduled
        object _flush_cb
        ConnShared _shared               # the last ConnShared handed out (usually the only one)
        readonly uint64_t frames_out
        readonly uint64_t bytes_out
        readonly uint64_t writes
        readonly uint64_t drops
        readonly uint64_t slow_disconnects
        # heartbeat
        double hb_idle                   # 0: no heartbeat
        double hb_reply
        object hb_logger
        object hb_timer                  # asyncio.TimerHandle while armed
        object _hb_cb
        Connection idle_head
        Connection idle_tail
        Connection wait_head
        Connection wait_tail
        readonly Py_ssize_t tracked      # connected Connections (in the idle + wait lists)
        readonly uint64_t pings

    cdef inline int mark(self, Connection c) except -1
    cdef ConnShared shared_for(self, handler, Py_ssize_t soft_limit, Py_ssize_t hard_limit,
                               double rate, double burst, Py_ssize_t max_message)
    cdef inline void _append(self, Connection c, unsigned char state) noexcept
    cdef inline void _unlink(self, Connection c) noexcept
    cdef int track(self, Connection c) except -1
    cdef int untrack(self, Connection c) except -1
    cdef int hb_frame(self, Connection c, bint is_pong) except -1
    cdef int _hb_arm(self, double now) except -1
    cdef _pong_missed(self, Connection c)
    cpdef int fanout(self, list conns, bytes data, Connection skip=*, bint droppable=*) except -1
    cpdef flush_now(self)
