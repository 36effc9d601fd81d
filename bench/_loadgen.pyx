# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The load generator's receive path, in Cython on picows: counts deliveries and puts the
publish→receive latency of each one into an HDR-style histogram without creating a Python object
per message.

Payload convention (every target): ``[u64 LE send time, CLOCK_MONOTONIC ns][u32 LE seq]...`` at
``offset`` bytes into the delivered payload. For gochat the WebSocket message holds one or more
protocol frames; each DELIVER (op 0x40) carries the payload as its record body (header 12 B +
record 62 B before it).

Histogram: value v in µs; v < 64 → bucket v; above, 32 sub-buckets per power of two (≤ 3 %
relative error). ``bench.hist`` decodes it.
"""

from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

import numpy as np

from picows.picows cimport WSFrame, WSListener, WSMsgType, WSTransport

cdef enum:
    NBUCKETS = 2048
    GOCHAT_DELIVER = 0x40
    DELIVER_BODY_OFFSET = 74   # 12-byte frame header + 62-byte message record


cdef extern from *:
    int __builtin_clzll(unsigned long long) nogil


cdef inline int64_t now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline int bucket_of(int64_t v) noexcept nogil:
    cdef int e
    cdef int idx
    if v < 64:
        return <int>(v if v > 0 else 0)
    e = 63 - __builtin_clzll(<unsigned long long>v)
    idx = (e - 5) * 32 + <int>(v >> (e - 5))
    return idx if idx < NBUCKETS else NBUCKETS - 1


def monotonic_ns():
    return now_ns()


cdef class Recorder:
    """Delivery counters and latency histogram shared by the connections of one process."""

    cdef public int64_t deliveries
    cdef public int64_t messages
    cdef public int64_t bytes_in
    cdef public int64_t first_ns
    cdef public int64_t last_ns
    cdef public int64_t max_seq_seen
    cdef public int offset
    cdef int64_t maxseq
    cdef object _hist_arr
    cdef object _first_arr
    cdef object _last_arr
    cdef int64_t[::1] hist
    cdef int64_t[::1] first
    cdef int64_t[::1] last

    def __init__(self, int64_t maxseq=1 << 20, int offset=0):
        self.maxseq = maxseq
        self.offset = offset
        self._hist_arr = np.zeros(NBUCKETS, dtype=np.int64)
        self._first_arr = np.zeros(maxseq, dtype=np.int64)
        self._last_arr = np.zeros(maxseq, dtype=np.int64)
        self.hist = self._hist_arr
        self.first = self._first_arr
        self.last = self._last_arr
        self.reset()

    def reset(self):
        self.deliveries = 0
        self.messages = 0
        self.bytes_in = 0
        self.first_ns = 0
        self.last_ns = 0
        self.max_seq_seen = -1
        self._hist_arr[:] = 0
        self._first_arr[:] = 0
        self._last_arr[:] = 0

    def arrays(self):
        """(histogram, first receive ns per seq, last receive ns per seq) as numpy arrays."""
        n = self.max_seq_seen + 1 if self.max_seq_seen >= 0 else 0
        if n > self.maxseq:
            n = self.maxseq
        return self._hist_arr.copy(), self._first_arr[:n].copy(), self._last_arr[:n].copy()

    cdef inline int64_t record(self, const uint8_t* p, Py_ssize_t size, int64_t now) noexcept:
        cdef int64_t sent
        cdef uint32_t seq
        cdef int64_t lat
        if size < self.offset + 12:
            return -1
        memcpy(&sent, p + self.offset, 8)
        memcpy(&seq, p + self.offset + 8, 4)
        lat = (now - sent) // 1000
        self.hist[bucket_of(lat)] += 1
        self.deliveries += 1
        if self.first_ns == 0:
            self.first_ns = now
        self.last_ns = now
        if seq < self.maxseq:
            if self.first[seq] == 0 or now < self.first[seq]:
                self.first[seq] = now
            if now > self.last[seq]:
                self.last[seq] = now
            if seq > self.max_seq_seen:
                self.max_seq_seen = seq
        return seq


cdef class SubListener(WSListener):
    """One subscriber connection. ``gochat``: the payload is gochat frames (DELIVERs recorded,
    other frames handed to ``ctrl(listener, op, frame_bytes)``); otherwise the whole WebSocket
    payload is one delivery."""

    cdef Recorder rec
    cdef bint gochat
    cdef public object ctrl
    cdef public object notify
    cdef public WSTransport transport
    cdef public object done
    cdef public int index

    def __init__(self, Recorder rec, bint gochat, ctrl=None, notify=None, int index=0):
        self.rec = rec
        self.gochat = gochat
        self.ctrl = ctrl
        self.notify = notify
        self.index = index
        self.done = None

    cpdef on_ws_connected(self, WSTransport transport):
        self.transport = transport

    cpdef on_ws_frame(self, WSTransport transport, WSFrame frame):
        cdef WSMsgType t = frame.msg_type
        cdef const uint8_t* p
        cdef Py_ssize_t size
        cdef Py_ssize_t off = 0
        cdef uint32_t flen
        cdef int64_t now
        cdef int64_t seq
        cdef uint8_t op
        if t == WSMsgType.BINARY:
            now = now_ns()
            p = <const uint8_t*>frame.payload_ptr
            size = frame.payload_size
            self.rec.messages += 1
            self.rec.bytes_in += size
            if not self.gochat:
                seq = self.rec.record(p, size, now)
                if self.notify is not None:
                    self.notify(seq)
                return
            while size - off >= 12:
                memcpy(&flen, p + off, 4)
                if flen < 12 or flen > size - off:
                    break
                op = p[off + 5]
                if op == GOCHAT_DELIVER:
                    seq = self.rec.record(p + off + DELIVER_BODY_OFFSET, flen - DELIVER_BODY_OFFSET, now)
                    if self.notify is not None:
                        self.notify(seq)
                elif self.ctrl is not None:
                    self.ctrl(self, op, (<char*>p)[off:off + flen])
                off += flen
        elif t == WSMsgType.CLOSE:
            transport.disconnect()

    cpdef on_ws_disconnected(self, WSTransport transport):
        if self.done is not None and not self.done.done():
            self.done.set_result(None)
