# cython: freethreading_compatible=False
"""A client connection's I/O: the picows listener (WebSocket rules, rate limit), its outbound
buffer, the coalescing fan-out writer that flushes every connection once a tick, and the shared
heartbeat; see connection.pxd. (The frames of a message are walked by session.pyx.)"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy
from libc.stdint cimport uint64_t
from posix.time cimport clock_getres, clock_gettime, timespec

from picows.picows cimport MemoryBuffer, WSFrame, WSListener, WSMsgType, WSTransport, WSCloseCode

import asyncio
import logging
import struct
import time as _time
from gc import get_referents as _get_referents
from operator import index as _index

_log = logging.getLogger("gochat.gateway")

cdef uint64_t _next_conn_id = 0

cdef enum:
    # picows' read buffer after authentication: `size` bytes to read into (+ the 256 bytes picows
    # keeps spare for its SIMD parsers). picows starts every connection at 2048 bytes (it ignores
    # a smaller read_buffer_init_size) and only grows the buffer; an idle connection needs far
    # less. Reads up to READ_TRIM_SIZE - 256 bytes do not grow it again.
    READ_TRIM_SIZE = 384
    READ_SIMD_SPARE = 256

# picows' delay between the CLOSE frame and abort() when a peer misses the PONG deadline.
cdef double _ABORT_DELAY = 0.01

cdef extern from "<sys/socket.h>" nogil:
    enum: SOL_SOCKET
    enum: SO_SNDBUF
    enum: SO_LINGER
    struct linger:
        int l_onoff
        int l_linger
    int setsockopt(int fd, int level, int optname, const void* optval, unsigned int optlen)

# Kernel send buffer of every accepted WebSocket (SO_SNDBUF; Linux doubles it for bookkeeping,
# so a socket holds at most 2 x this in kernel memory). Autotuning would let a client that does
# not read pin up to tcp_wmem[2] (4 MiB) each. 128 KiB still moves ~2.5 MB/s at 50 ms RTT.
# The setting socket_sndbuf sets it (set_socket_sndbuf); 0 leaves the kernel's autotuning.
cdef int _SNDBUF = 128 * 1024
SOCKET_SNDBUF = _SNDBUF


def set_socket_sndbuf(int size):
    """SO_SNDBUF for the WebSockets accepted from now on (0: the kernel's autotuning)."""
    global _SNDBUF, SOCKET_SNDBUF
    if size < 0:
        raise ValueError("socket_sndbuf must be >= 0")
    _SNDBUF = size
    SOCKET_SNDBUF = size


cdef inline bint _valid_close_code(unsigned int code) noexcept:
    """A close code a peer may send (RFC 6455 §7.4): 1000-1003 and 1007-1011 defined there,
    1012-1014 registered with IANA since, 3000-4999 for libraries and applications. 1004-1006
    and 1015 are reserved (never on the wire), 0-999, 1016-2999 and >= 5000 are invalid."""
    return (1000 <= code <= 1003) or (1007 <= code <= 1014) or (3000 <= code <= 4999)


cdef inline Py_ssize_t _frame_len(const char* p, Py_ssize_t left) noexcept:
    """Length of the gochat frame at ``p`` (u32 LE at its start), clamped to 1..``left``: a
    length that does not fit (never produced by the server's encoders) takes the rest."""
    cdef const unsigned char* u = <const unsigned char*>p
    cdef Py_ssize_t n
    if left < 4:
        return left
    n = <Py_ssize_t>(u[0] | (u[1] << 8) | (u[2] << 16) | (<unsigned int>u[3] << 24))
    if n < 1 or n > left:
        return left
    return n


cdef void _abort(WSTransport transport) noexcept:
    """Drop the connection now: RST (SO_LINGER 0) instead of FIN, so that neither uvloop's
    write buffer nor the kernel's send queue keeps the unsent bytes of a peer that does not
    read; on_ws_disconnected follows on the next loop iteration."""
    cdef linger lg
    lg.l_onoff = 1
    lg.l_linger = 0
    setsockopt(transport._socket, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg))
    try:
        transport.underlying_transport.abort()
    except Exception:
        _log.exception("abort failed")


# ---- client-triggered errors: counted, detail at DEBUG, a rate-limited WARNING ------------------
CLIENT_ERROR_SUMMARY_S = 60.0


class ClientErrors:
    """Protocol errors a client causes (bad WebSocket frames, invalid close codes, ...). One
    client must not flood the log: each error is logged at DEBUG; the first one after a quiet
    ``interval`` is a WARNING, and the ones after it within the interval are counted and
    reported in ONE summary WARNING when it ends. ``total`` counts every error."""

    def __init__(self, logger, interval=CLIENT_ERROR_SUMMARY_S):
        self.logger = logger
        self.interval = interval
        self.total = 0
        self.pending = 0
        self.last = ""
        self.window_end = 0.0
        self._timer = None

    def report(self, text):
        cdef object logger = self.logger
        self.total += 1
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("client protocol error: %s", text)
        now = _time.monotonic()
        if now >= self.window_end:
            pending = self.pending
            self.pending = 0
            self.window_end = now + self.interval
            if pending:
                logger.warning("client protocol error: %s (and %d more before it since the last report)",
                               text, pending)
            else:
                logger.warning("client protocol error: %s (further ones are counted and summarized "
                               "at most every %.0f s; each is logged at DEBUG)", text, self.interval)
            return
        self.pending += 1
        self.last = text
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop: reported with the next error after the window
            self._timer = loop.call_later(self.window_end - now, self._summary)

    def _summary(self):
        self._timer = None
        if self.pending:
            self.logger.warning("%d more client protocol error(s) in the last %.0f s; the last: %s",
                                self.pending, self.interval, self.last)
            self.pending = 0
            self.window_end = _time.monotonic() + self.interval


#: the gateway's reporter (one per process)
CLIENT_ERRORS = ClientErrors(_log)

# picows' messages for errors a client causes; picows logs them at ERROR, one per bad frame
_CLIENT_TRIGGERED = (
    "WS parser error",
    "on_ws_frame raised WSProtocolError",
    "Disconnect because HTTP request",
)


class ClientErrorLog(logging.LoggerAdapter):
    """The logger to hand picows (``logger_name=``): its messages about client-triggered
    protocol errors go to :data:`CLIENT_ERRORS` (DEBUG + a rate-limited WARNING) instead of one
    ERROR line each; everything else passes through unchanged."""

    def __init__(self, logger, errors=None):
        super().__init__(logger, {})
        self.errors = errors if errors is not None else CLIENT_ERRORS

    def log(self, level, msg, *args, **kwargs):
        if level >= logging.WARNING and isinstance(msg, str) and msg.startswith(_CLIENT_TRIGGERED):
            try:
                text = msg % args if args else msg
            except Exception:
                text = msg
            self.errors.report(text)
            return
        super().log(level, msg, *args, **kwargs)


cdef extern from "<time.h>" nogil:
    # Linux: the monotonic clock as of the last tick (1-4 ms resolution), a few ns to read;
    # plenty for heartbeat deadlines of seconds, and read once per incoming frame.
    enum: CLOCK_MONOTONIC_COARSE


cdef inline double _mono() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


cdef double _coarse_resolution() noexcept:
    cdef timespec ts
    if clock_getres(CLOCK_MONOTONIC_COARSE, &ts) != 0:
        return 0.004
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


# A PING or PONG due within this many seconds is handled now: timers have 1 ms resolution and
# the coarse clock one tick; without it a timer that fires a tick "early" would just re-arm.
cdef double _HB_SLACK = max(0.001, _coarse_resolution())


cdef inline Py_ssize_t _block_size(Py_ssize_t need) noexcept:
    """Bytes of a Connection's outbound block holding ``need`` bytes: 1024 * 2**k."""
    cdef Py_ssize_t size = 1024
    while size < need:
        size <<= 1
    return size


cdef int _send_ping(WSTransport transport) except -1:
    """An empty PING written from a stack buffer: picows' send_ping() would go through the
    transport's write buffer, which on_ws_connected gives back (see _free_write_buffer)."""
    cdef char buf[HEADROOM]
    transport.send_reuse_external_buffer(WSMsgType.PING, buf + HEADROOM, 0)
    return 0


cdef inline void _free_write_buffer(WSTransport transport) noexcept:
    """Give back picows' per-transport write buffer (1 KiB). The data plane never uses it
    (send_reuse_external_buffer writes from the connection's own block); picows' send(),
    send_pong() and send_close() grow it again on demand (PyMem_Realloc(NULL, n) allocates)."""
    cdef MemoryBuffer wb = transport._write_buffer
    if wb is not None and wb.data != NULL:
        PyMem_Free(wb.data)
        wb.data = NULL
        wb.capacity = 0
        wb.size = 0


cdef int _trim_read_buffer(WSTransport transport) except -1:
    """Shrink picows' read buffer to READ_TRIM_SIZE (+ spare) when it is larger and the unparsed
    bytes it holds fit. Only called between reads (never from a picows callback), so no frame
    points into it; picows addresses the buffer by offsets, which the copy keeps. A fresh block
    (not an in-place realloc) leaves fewer small holes in the heap: ~350 B less RSS a connection."""
    proto = transport.underlying_transport.get_protocol()
    if getattr(proto, "transport", None) is not transport:
        return 0
    cdef MemoryBuffer rb = None
    for ref in _get_referents(proto):
        if type(ref) is MemoryBuffer:
            rb = <MemoryBuffer>ref
            break
    if rb is None or rb.data == NULL or rb.capacity <= READ_TRIM_SIZE + READ_SIMD_SPARE:
        return 0
    # get_buffer() is the free tail picows would hand to the next read: size - unparsed bytes
    cdef Py_ssize_t pending = rb.size - len(proto.get_buffer(-1))
    # picows grows the buffer after a read that leaves <= 256 bytes free or fills it > 90 %
    if pending < 0 or READ_TRIM_SIZE - pending <= READ_SIMD_SPARE or pending * 10 > READ_TRIM_SIZE * 9:
        return 0
    cdef char* data = <char*>PyMem_Malloc(READ_TRIM_SIZE + READ_SIMD_SPARE)
    if data == NULL:
        return 0
    if pending:
        memcpy(data, rb.data, pending)
    PyMem_Free(rb.data)
    rb.data = data
    rb.capacity = READ_TRIM_SIZE + READ_SIMD_SPARE
    rb.size = READ_TRIM_SIZE
    return 0


cdef bytes with_headroom(bytes data):
    """``data`` after HEADROOM spare bytes: the form :meth:`Connection.queue_shared` takes."""
    cdef Py_ssize_t size = PyBytes_GET_SIZE(data)
    cdef bytes framed = PyBytes_FromStringAndSize(NULL, HEADROOM + size)
    memcpy(PyBytes_AS_STRING(framed) + HEADROOM, PyBytes_AS_STRING(data), size)
    return framed


# ERROR 401 SLOW_CONSUMER (rid 0) after HEADROOM spare bytes, sent as is by a slow consumer's close
_SLOW_TEXT = b"outbound buffer limit exceeded: the client does not read fast enough"
cdef bytes _SLOW_CONSUMER_ERROR = with_headroom(
    struct.pack("<IBBHIHI", 18 + len(_SLOW_TEXT), 1, 0x7F, 0, 0, 401, 0) + _SLOW_TEXT
)


@cython.final
cdef class ConnShared:
    pass


cdef class Connection(WSListener):
    """One client WebSocket: the picows listener, its outbound buffer and rate limiter. Each
    binary message goes to :meth:`_on_payload`: here the gateway (Python) gets
    ``on_message(conn, bytes)``; :class:`gochat._native.session.Session` walks it natively."""

    def __init__(self, handler, FanoutWriter writer not None, Py_ssize_t soft_limit, Py_ssize_t hard_limit,
                 double rate, double burst, Py_ssize_t max_message):
        global _next_conn_id
        _next_conn_id += 1
        self.conn_id = _next_conn_id
        self.shared = writer.shared_for(handler, soft_limit, hard_limit, rate, burst, max_message)
        self.tokens = burst
        self.last_refill = 0.0
        self.state = None
        self.uid = 0

    def __dealloc__(self):
        if self.out is not NULL:
            free(self.out)
            self.out = NULL

    # ---- attributes (flags are bytes, shared settings live in ConnShared) ----------------------
    @property
    def user_id(self):
        return self.uid

    @user_id.setter
    def user_id(self, value):
        # as a uint64_t field converts: any integer (__index__) in range, else an error
        v = _index(value)
        if v < 0 or v > 0xFFFFFFFFFFFFFFFF:
            raise OverflowError("user_id out of range for a 64-bit unsigned integer")
        self.uid = v

    @property
    def handler(self):
        return self.shared.handler

    @property
    def writer(self):
        return self.shared.writer

    @property
    def authenticated(self):
        return self.is_authenticated != 0

    @authenticated.setter
    def authenticated(self, bint value):
        self.is_authenticated = value

    @property
    def dirty(self):
        return self.is_dirty != 0

    @property
    def paused(self):
        return self.is_paused != 0

    @property
    def closing(self):
        return self.is_closing != 0

    # ---- picows callbacks ------------------------------------------------------------------
    cpdef on_ws_connected(self, WSTransport transport):
        self.transport = transport
        # The upgrade request and response (headers in multidicts, ~2 KiB) are not needed once
        # the handshake is done; the gateway read the Authorization header in its factory.
        transport.request = None
        transport.response = None
        # Only measure_roundtrip_time() (never called on a server) uses this weak proxy.
        transport.listener_proxy = None
        _free_write_buffer(transport)
        # bound the kernel's send queue (see _SNDBUF); a failure leaves the default
        cdef int sndbuf = _SNDBUF
        if sndbuf > 0:
            setsockopt(transport._socket, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf))
        self.trim_pending = True
        self.shared.writer.track(self)
        self.shared.handler.on_connected(self)

    cpdef on_ws_frame(self, WSTransport transport, WSFrame frame):
        cdef WSMsgType t = frame.msg_type
        cdef FanoutWriter writer = self.shared.writer
        if writer.hb_idle > 0.0:
            writer.hb_frame(self, t == WSMsgType.PONG)
        if frame.rsv1 | frame.rsv2 | frame.rsv3:
            # RFC 6455 §5.2: no extension is negotiated, so a reserved bit fails the connection
            # (picows hands such frames on unchecked)
            if not self.is_closing:
                self._ws_fail(1002, "reserved bit set, no extension negotiated")
            return
        if t == WSMsgType.BINARY and frame.fin and self.fragments is None:
            self._on_payload(<const unsigned char*>frame.payload_ptr, frame.payload_size)
        elif t == WSMsgType.BINARY or t == WSMsgType.CONTINUATION:
            self._fragment(frame, t)
        elif t == WSMsgType.TEXT:
            if self.fragments is not None:
                if not self.is_closing:
                    self._ws_fail(1002, "new data frame inside a fragmented message")
            else:
                self.shared.handler.on_text(self)
        elif t == WSMsgType.CLOSE:
            self._on_close(transport, frame)
        elif t == WSMsgType.PING:
            # Reached only with picows' enable_auto_pong=False (the server: the heartbeat then
            # sees every frame); answered as picows' auto-pong does.
            transport.send_pong(frame.get_payload_as_bytes())
        # PONG: consumed by the heartbeat above (or by picows' own auto-ping when enabled).

    cdef int _fragment(self, WSFrame frame, WSMsgType t) except -1:
        """Rare: a fragmented message (RFC 6455 §5.4), reassembled within the message size
        limit. A data frame inside an open message, or a continuation without one, fails the
        connection (picows does not track fragmentation)."""
        if self.is_closing:
            return 0
        if t == WSMsgType.BINARY:
            if self.fragments is not None:
                return self._ws_fail(1002, "new data frame inside a fragmented message")
            self.fragments = bytearray()
        elif self.fragments is None:
            return self._ws_fail(1002, "continuation frame without a message to continue")
        self.fragments += frame.get_payload_as_memoryview()
        if len(self.fragments) > self.shared.max_message:
            self.fragments = None
            self.shared.handler.on_oversize(self)
        elif frame.fin:
            data = bytes(self.fragments)
            self.fragments = None
            self._on_payload(<const unsigned char*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
        return 0

    cdef int _on_payload(self, const unsigned char* data, Py_ssize_t size) except -1:
        """One whole WebSocket binary message (valid only during this call). Here: handed to
        the gateway as bytes (``on_message``, the reference path); the native session
        (gochat._native.session.Session) overrides it to walk the frames itself."""
        self.shared.handler.on_message(self, PyBytes_FromStringAndSize(<const char*>data, size))
        return 0

    cdef int _on_close(self, WSTransport transport, WSFrame frame) except -1:
        """A CLOSE from the peer: echo a valid code (1000 for an empty CLOSE); an invalid one
        (RFC 6455 §5.5.1, §7.4) fails the connection with 1002, a reason that is not UTF-8
        with 1007. picows checks some of this itself (and then never calls us), but lets
        0, 1006 and codes >= 5000 through."""
        cdef Py_ssize_t n = frame.payload_size
        cdef unsigned int code = 1000
        cdef bytes message = None
        if not self.is_closing:
            if n == 1:
                return self._ws_fail(1002, "close frame with a 1-byte payload")
            if n >= 2:
                code = <unsigned int>frame.get_close_code()
                if not _valid_close_code(code):
                    return self._ws_fail(1002, f"invalid close code {code}")
                try:
                    frame.get_close_reason()
                except UnicodeDecodeError:
                    return self._ws_fail(1007, "close reason is not valid UTF-8")
                message = frame.get_close_message()
            self.is_closing = True
            self.flush()
            self._release_out()
            transport.send_close(<WSCloseCode>code, message)
        transport.disconnect()
        return 0

    cdef int _ws_fail(self, int code, str reason) except -1:
        """Fail the WebSocket connection (RFC 6455 §7.1.7): CLOSE with ``code``, then close
        the TCP connection; nothing more this peer sends is processed. Logged through
        CLIENT_ERRORS (rate-limited)."""
        self.fragments = None
        CLIENT_ERRORS.report(f"{reason} (closing with {code})")
        self.close_with(code, reason)
        return 0

    cpdef on_ws_disconnected(self, WSTransport transport):
        self.is_closing = True
        self._release_out()
        self.shared.writer.untrack(self)
        self.shared.handler.on_disconnected(self)

    cpdef send_user_specific_ping(self, WSTransport transport):
        # picows' auto-ping (when enabled instead of the writer's heartbeat) calls this.
        _send_ping(transport)

    cpdef pause_writing(self):
        self.is_paused = True

    cpdef resume_writing(self):
        self.is_paused = False
        if self.out_size:
            self.shared.writer.mark(self)

    # ---- outbound ----------------------------------------------------------------------------
    cdef int _append(self, const char* data, Py_ssize_t size) except -1:
        # The block is 1024 * 2**k bytes, the smallest that holds HEADROOM + out_size (it is
        # freed whenever out_size drops to 0), so its size needs no field of its own.
        cdef Py_ssize_t need = HEADROOM + self.out_size + size
        cdef char* grown
        if self.out is NULL or need > _block_size(HEADROOM + self.out_size):
            grown = <char*>realloc(self.out, _block_size(need))
            if grown is NULL:
                raise MemoryError()
            self.out = grown
        memcpy(self.out + HEADROOM + self.out_size, data, size)
        self.out_size += size
        return 0

    cdef int _admit(self, Py_ssize_t size, bint droppable) except -1:
        """1 if ``size`` more bytes may be queued; 0 if dropped (droppable above the soft
        limit) or the connection is closing or was just closed (hard limit: what is queued here
        and in the transport's buffer)."""
        cdef ConnShared shared = self.shared
        if self.is_closing:
            return 0
        if self.out_size + size > shared.soft_limit:
            if droppable:
                self.dropped += 1
                shared.writer.drops += 1
                return 0
            # queued to this client: our block and what uvloop holds. Checked paused or not:
            # one tick can queue any amount (a group commit delivers a whole batch at once).
            if self.out_size + size + self._buffered() > shared.hard_limit:
                self._slow_consumer()
                return 0
        return 1

    cdef Py_ssize_t _buffered(self) except -1:
        """Bytes waiting in the transport's (uvloop's) write buffer."""
        if self.transport is None or self.transport.is_disconnected:
            return 0
        return <Py_ssize_t>self.transport._tr_get_write_buffer_size()

    cdef int _release_out(self) noexcept:
        """Drop what is queued (nothing queued after a CLOSE can be sent: picows ignores it)."""
        self.out_size = 0
        self.solo = None
        if self.out is not NULL:
            free(self.out)
            self.out = NULL
        return 0

    cdef int _slow_consumer(self) except -1:
        """Past the hard limit: close the connection now and free its buffers. ERROR 401 and
        CLOSE 4401 go out only when they can still be written (the transport holds nothing, so
        they reach the kernel at once), then a graceful close; otherwise (the usual case: the
        peer does not read and uvloop's buffer is full) the connection is aborted with a RST,
        which frees uvloop's write buffer and the kernel's send queue at once."""
        cdef WSTransport t = self.transport
        self.shared.writer.slow_disconnects += 1
        self.is_closing = True
        self.fragments = None
        self._release_out()
        if t is None or t.is_disconnected:
            return 0
        if not t.is_close_frame_sent and self._buffered() == 0:
            t.send_reuse_external_buffer(
                WSMsgType.BINARY, PyBytes_AS_STRING(_SLOW_CONSUMER_ERROR) + HEADROOM,
                PyBytes_GET_SIZE(_SLOW_CONSUMER_ERROR) - HEADROOM
            )
            t.send_close(<WSCloseCode>4401, b"slow consumer")
            if self._buffered() == 0:
                t.disconnect()
                return 0
        _abort(t)
        return 0

    cdef int queue_frame(self, bytes data, bint droppable) except -1:
        """Queue encoded frame(s); 1 if queued, 0 if dropped or the connection is gone."""
        cdef Py_ssize_t size = PyBytes_GET_SIZE(data)
        if not self._admit(size, droppable):
            return 0
        if self.solo is not None:
            self._materialize()
        self._append(PyBytes_AS_STRING(data), size)
        self.shared.writer.frames_out += 1
        self.shared.writer.mark(self)
        return 1

    cdef int queue_shared(self, bytes framed, bint droppable) except -1:
        """Queue the frame(s) in ``framed[HEADROOM:]`` (see :func:`with_headroom`), the same
        bytes many connections get. A connection with nothing else queued this tick keeps a
        reference instead of a copy, and its flush sends straight from ``framed``: picows writes
        the WebSocket header into the headroom, and that header is the same for every recipient
        (server frames are unmasked), so sharing the buffer is safe. No block, no memcpy."""
        cdef Py_ssize_t size = PyBytes_GET_SIZE(framed) - HEADROOM
        if not self._admit(size, droppable):
            return 0
        if self.out_size == 0:
            self.solo = framed
            self.out_size = size
        else:
            if self.solo is not None:
                self._materialize()
            self._append(PyBytes_AS_STRING(framed) + HEADROOM, size)
        self.shared.writer.frames_out += 1
        self.shared.writer.mark(self)
        return 1

    cdef int _materialize(self) except -1:
        """A second frame joins the shared one: copy it into this connection's own block."""
        cdef bytes solo = <bytes>self.solo
        cdef Py_ssize_t size = self.out_size
        self.solo = None
        self.out_size = 0
        self._append(PyBytes_AS_STRING(solo) + HEADROOM, size)
        return 0

    cdef int flush(self) except -1:
        self.is_dirty = False
        if self.out_size == 0 or self.transport is None or self.transport.is_disconnected:
            return 0
        if self.is_paused and not self.is_closing:
            return 0  # resume_writing marks us dirty again
        cdef FanoutWriter writer = self.shared.writer
        cdef bytes solo
        cdef Py_ssize_t size = self.out_size
        writer.writes += 1
        writer.bytes_out += size
        self.out_size = 0
        if self.solo is not None:
            solo = <bytes>self.solo
            self.solo = None
            if size <= self.shared.max_message:
                self.transport.send_reuse_external_buffer(
                    WSMsgType.BINARY, PyBytes_AS_STRING(solo) + HEADROOM, size
                )
            else:
                self._send_split(PyBytes_AS_STRING(solo) + HEADROOM, size)
            return 0
        if size <= self.shared.max_message:
            self.transport.send_reuse_external_buffer(WSMsgType.BINARY, self.out + HEADROOM, size)
        else:
            self._send_split(self.out + HEADROOM, size)
        # Give the block back after every flush: an idle connection then holds no outbound
        # memory, and malloc+free per tick is noise next to the send(2) it accompanies.
        free(self.out)
        self.out = NULL
        return 0

    cdef int _send_split(self, char* data, Py_ssize_t size) except -1:
        """Send the ``size`` bytes of frames at ``data`` (HEADROOM spare bytes in front) as
        several WebSocket messages of at most ``max_message`` bytes (the limit clients are told
        to accept, 4 x max_frame), cut at frame boundaries; a frame larger than that goes alone.
        The first message is sent from ``data`` in place, as a single one is; the later ones from
        fresh buffers: picows writes each header into the bytes in front of its message, which
        in place would be the end of the previous message, already handed to the transport (and
        ``data`` may be a buffer shared by many connections)."""
        cdef Py_ssize_t limit = self.shared.max_message
        cdef Py_ssize_t start = 0, end, flen
        cdef WSTransport t = self.transport
        cdef bytes chunk
        while start < size:
            end = start
            while end < size:
                flen = _frame_len(data + end, size - end)
                if end > start and end - start + flen > limit:
                    break
                end += flen
            if start == 0:
                t.send_reuse_external_buffer(WSMsgType.BINARY, data, end)
            else:
                chunk = PyBytes_FromStringAndSize(NULL, HEADROOM + end - start)
                memcpy(PyBytes_AS_STRING(chunk) + HEADROOM, data + start, end - start)
                t.send_reuse_external_buffer(WSMsgType.BINARY, PyBytes_AS_STRING(chunk) + HEADROOM, end - start)
                self.shared.writer.writes += 1
            start = end
        return 0

    cdef int _trim_buffers(self) except -1:
        """Give back picows' buffers an idle connection does not need. Call only between reads
        (FanoutWriter._flush, the heartbeat timer), never from a picows callback."""
        cdef WSTransport t = self.transport
        if t is None or t.is_disconnected or self.is_closing:
            return 0
        _free_write_buffer(t)
        _trim_read_buffer(t)
        return 0

    cpdef bint take_tokens(self, double now, double n):
        """Token-bucket rate limit: False when ``n`` requests exceed the budget."""
        cdef ConnShared shared = self.shared
        self.tokens += (now - self.last_refill) * shared.rate
        self.last_refill = now
        if self.tokens > shared.burst:
            self.tokens = shared.burst
        if self.tokens < n:
            return False
        self.tokens -= n
        return True

    cpdef push(self, bytes data, bint droppable=False):
        """Queue encoded frames for this connection; they go out at the end of the tick."""
        self.queue_frame(data, droppable)

    cpdef close_with(self, int close_code, str reason=""):
        """Flush what is queued, then close the WebSocket with ``close_code``."""
        if self.is_closing or self.transport is None:
            return
        self.flush()
        self.is_closing = True
        # still queued after the flush (a paused transport): unsendable after the CLOSE
        self._release_out()
        self.transport.send_close(<WSCloseCode>close_code, reason.encode())
        self.transport.disconnect()

    @property
    def queued_bytes(self):
        return self.out_size

    def picows_buffer_capacity(self):
        """(read, write): bytes allocated for picows' read and write buffers of this connection
        (-1: not found). For tests and memory accounting."""
        cdef WSTransport t = self.transport
        cdef MemoryBuffer rb = None
        cdef Py_ssize_t read_cap = -1, write_cap = -1
        if t is None:
            return (read_cap, write_cap)
        if t._write_buffer is not None:
            write_cap = t._write_buffer.capacity
        for ref in _get_referents(t.underlying_transport.get_protocol()):
            if type(ref) is MemoryBuffer:
                rb = <MemoryBuffer>ref
                read_cap = rb.capacity
                break
        return (read_cap, write_cap)

    def __repr__(self):
        return f"<Connection {self.conn_id} user={self.user_id} session={self.session_id}>"


cdef class FanoutWriter:
    """Coalesces everything queued to each connection during one loop tick into one write."""

    def __init__(self, loop):
        self.loop = loop
        self.dirty = []
        self._flush_cb = self._flush
        self._hb_cb = self._hb_fire

    cdef ConnShared shared_for(self, handler, Py_ssize_t soft_limit, Py_ssize_t hard_limit,
                               double rate, double burst, Py_ssize_t max_message):
        """One ConnShared per distinct (handler, limits): a gateway's connections share one."""
        cdef ConnShared s = self._shared
        if (s is not None and s.handler is handler and s.soft_limit == soft_limit
                and s.hard_limit == hard_limit and s.rate == rate and s.burst == burst
                and s.max_message == max_message):
            return s
        s = ConnShared.__new__(ConnShared)
        s.handler = handler
        s.writer = self
        s.soft_limit = soft_limit
        s.hard_limit = hard_limit
        s.rate = rate
        s.burst = burst
        s.max_message = max_message
        self._shared = s
        return s

    cdef inline int mark(self, Connection c) except -1:
        if not c.is_dirty:
            c.is_dirty = True
            self.dirty.append(c)
            if not self.scheduled:
                self.scheduled = True
                self.loop.call_soon(self._flush_cb)
        return 0

    cpdef int fanout(self, list conns, bytes data, Connection skip=None, bint droppable=False) except -1:
        """Queue the same encoded bytes to every connection in ``conns`` except ``skip``."""
        cdef Connection c
        cdef int n = 0
        cdef bytes framed = with_headroom(data)
        for c in conns:
            if c is not skip:
                n += c.queue_shared(framed, droppable)
        return n

    def _flush(self):
        cdef list dirty = self.dirty
        cdef Py_ssize_t i = 0, n = len(dirty)
        cdef Connection c
        self.scheduled = False
        self.dirty = []
        # One try block around the whole loop (not one per connection); a failing connection
        # is logged and the loop resumes after it.
        while i < n:
            try:
                while i < n:
                    c = <Connection>dirty[i]
                    c.flush()
                    if c.trim_pending and c.is_authenticated:
                        # the first flush after authentication (AUTH_OK): the handshake and
                        # AUTH are done, so picows' buffers can shrink to an idle connection's
                        c.trim_pending = False
                        c._trim_buffers()
                    i += 1
            except Exception:
                _log.exception("flush failed for %r", dirty[i])
                i += 1

    cpdef flush_now(self):
        """Flush immediately (shutdown paths)."""
        self._flush()

    # ---- connection registry and heartbeat -----------------------------------------------------
    # Every connected Connection is in one of two intrusive lists (no per-connection allocation):
    #   idle: ordered by hb_at = time of the last incoming frame (a frame moves it to the tail)
    #   wait: a PING is out; ordered by hb_at = the PONG deadline
    # hb_state: 0 not listed, 1 idle, 2 wait, 3 idle but closed for a missed PONG (never pinged)

    cdef inline void _append(self, Connection c, unsigned char state) noexcept:
        c.hb_next = None
        if state == 2:
            c.hb_prev = self.wait_tail
            if self.wait_tail is None:
                self.wait_head = c
            else:
                self.wait_tail.hb_next = c
            self.wait_tail = c
        else:
            c.hb_prev = self.idle_tail
            if self.idle_tail is None:
                self.idle_head = c
            else:
                self.idle_tail.hb_next = c
            self.idle_tail = c
        c.hb_state = state

    cdef inline void _unlink(self, Connection c) noexcept:
        if c.hb_state == 2:
            if c.hb_prev is None:
                self.wait_head = c.hb_next
            else:
                c.hb_prev.hb_next = c.hb_next
            if c.hb_next is None:
                self.wait_tail = c.hb_prev
            else:
                c.hb_next.hb_prev = c.hb_prev
        else:
            if c.hb_prev is None:
                self.idle_head = c.hb_next
            else:
                c.hb_prev.hb_next = c.hb_next
            if c.hb_next is None:
                self.idle_tail = c.hb_prev
            else:
                c.hb_next.hb_prev = c.hb_prev
        c.hb_prev = None
        c.hb_next = None
        c.hb_state = 0

    cdef int track(self, Connection c) except -1:
        """``c`` connected (Connection.on_ws_connected)."""
        cdef double now = _mono()
        if c.hb_state:
            return 0
        c.hb_at = now
        self._append(c, 1)
        self.tracked += 1
        if self.hb_idle > 0.0 and self.hb_timer is None:
            self._hb_arm(now)
        return 0

    cdef int untrack(self, Connection c) except -1:
        """``c`` disconnected (Connection.on_ws_disconnected)."""
        if c.hb_state:
            self._unlink(c)
            self.tracked -= 1
        return 0

    cdef int hb_frame(self, Connection c, bint is_pong) except -1:
        """A frame arrived on ``c`` (heartbeat on): it is not idle. While a PING is out, only
        the PONG counts (as in picows' auto-ping)."""
        if c.hb_state == 1:
            c.hb_at = _mono()
            if c.hb_next is None:
                return 0  # already the most recently active
        elif c.hb_state != 2 or not is_pong:
            return 0
        else:
            c.hb_at = _mono()
        self._unlink(c)
        self._append(c, 1)
        return 0

    def connections(self):
        """Every connected Connection (connected through picows to a listener built on this
        writer), oldest activity first."""
        cdef list out = []
        cdef Connection c = self.wait_head
        while c is not None:
            out.append(c)
            c = c.hb_next
        c = self.idle_head
        while c is not None:
            out.append(c)
            c = c.hb_next
        return out

    def start_heartbeat(self, double idle_timeout, double reply_timeout, logger=None):
        """PING a connection after ``idle_timeout`` s without an incoming frame; close it (1001)
        if no PONG follows within ``reply_timeout`` s: picows' PING_WHEN_IDLE auto-ping, one
        timer for all connections. Use with picows' enable_auto_ping=False and
        enable_auto_pong=False (Connection answers PINGs, so every frame counts)."""
        cdef Connection c
        cdef double now = _mono()
        if not (idle_timeout > 0.0 and reply_timeout > 0.0):
            raise ValueError("heartbeat timeouts must be positive")
        self.stop_heartbeat()
        self.hb_idle = idle_timeout
        self.hb_reply = reply_timeout
        self.hb_logger = logger if logger is not None else _log
        c = self.idle_head  # connections from before: idle from now
        while c is not None:
            c.hb_at = now
            c = c.hb_next
        self._hb_arm(now)

    def stop_heartbeat(self):
        """No more PINGs (connections stay listed)."""
        cdef Connection c
        cdef double now = _mono()
        self.hb_idle = 0.0
        if self.hb_timer is not None:
            self.hb_timer.cancel()
            self.hb_timer = None
        while self.wait_head is not None:
            c = self.wait_head
            self._unlink(c)
            c.hb_at = now
            self._append(c, 1)

    @property
    def heartbeat(self):
        """(idle_timeout, reply_timeout), or None when the heartbeat is off."""
        return (self.hb_idle, self.hb_reply) if self.hb_idle > 0.0 else None

    cdef int _hb_arm(self, double now) except -1:
        cdef double when = -1.0
        if self.wait_head is not None:
            when = self.wait_head.hb_at
        if self.idle_head is not None and (when < 0.0 or self.idle_head.hb_at + self.hb_idle < when):
            when = self.idle_head.hb_at + self.hb_idle
        if when >= 0.0:
            self.hb_timer = self.loop.call_later(max(when - now, 0.0), self._hb_cb)
        return 0

    def _hb_fire(self):
        cdef Connection c
        cdef unsigned char state
        cdef double now = _mono()
        cdef double due = now + _HB_SLACK
        self.hb_timer = None
        if self.hb_idle <= 0.0:
            return
        # PONG deadlines first
        while self.wait_head is not None and self.wait_head.hb_at <= due:
            c = self.wait_head
            self._unlink(c)
            c.hb_at = now
            self._append(c, 3)  # listed until it disconnects, never pinged again
            try:
                self._pong_missed(c)
            except Exception:
                _log.exception("heartbeat close failed for %r", c)
        # then idle connections: PING them
        while self.idle_head is not None and self.idle_head.hb_at + self.hb_idle <= due:
            c = self.idle_head
            state = c.hb_state
            self._unlink(c)
            if state == 3 or c.transport.pong_received_at_future is not None:
                # closed already; or measure_roundtrip_time() runs its own PINGs (picows then
                # counts the time as activity)
                c.hb_at = now
                self._append(c, state)
                continue
            c.hb_at = now + self.hb_reply
            self._append(c, 2)
            self.pings += 1
            try:
                _send_ping(c.transport)
                # idle for a while: give back the buffer space a burst of traffic grew
                c._trim_buffers()
            except Exception:
                _log.exception("heartbeat PING failed for %r", c)
        self._hb_arm(now)

    cdef _pong_missed(self, Connection c):
        # as picows' auto-ping loop does it
        cdef WSTransport t = c.transport
        self.hb_logger.info("Initiating disconnect because no PONG was received within %s seconds", self.hb_reply)
        t.send_close(WSCloseCode.GOING_AWAY,
                     f"peer has not replied to ping/heartbeat request within {self.hb_reply} second(s)")
        self.loop.call_later(_ABORT_DELAY, t.underlying_transport.abort)
