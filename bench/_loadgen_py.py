"""Pure-Python twin of ``bench/_loadgen.pyx`` (same classes, same behaviour), used when the Cython
listener cannot be built (no Cython in the environment) or when ``BENCH_PURE_PYTHON_LOADGEN=1``.
It costs more CPU per delivery on the load generator side; every run reports which one was used
(``machine.loadgen``) and the generator's CPU."""

from __future__ import annotations

import struct
import time
from typing import Any

import numpy as np
from picows import WSFrame, WSListener, WSMsgType, WSTransport

NBUCKETS = 2048
GOCHAT_DELIVER = 0x40
DELIVER_BODY_OFFSET = 74
_TS = struct.Struct("<QI")
_LEN = struct.Struct("<I")

monotonic_ns = time.monotonic_ns


def bucket_of(v: int) -> int:
    if v < 64:
        return v if v > 0 else 0
    e = v.bit_length() - 1
    idx = (e - 5) * 32 + (v >> (e - 5))
    return idx if idx < NBUCKETS else NBUCKETS - 1


class Recorder:
    def __init__(self, maxseq: int = 1 << 20, offset: int = 0) -> None:
        self.maxseq = maxseq
        self.offset = offset
        self._hist = np.zeros(NBUCKETS, dtype=np.int64)
        self._first = np.zeros(maxseq, dtype=np.int64)
        self._last = np.zeros(maxseq, dtype=np.int64)
        self.reset()

    def reset(self) -> None:
        self.deliveries = 0
        self.messages = 0
        self.bytes_in = 0
        self.first_ns = 0
        self.last_ns = 0
        self.max_seq_seen = -1
        self._hist[:] = 0
        self._first[:] = 0
        self._last[:] = 0

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = min(self.max_seq_seen + 1, self.maxseq) if self.max_seq_seen >= 0 else 0
        return self._hist.copy(), self._first[:n].copy(), self._last[:n].copy()

    def record(self, p: bytes, start: int, size: int, now: int) -> int:
        if size < self.offset + 12:
            return -1
        sent, seq = _TS.unpack_from(p, start + self.offset)
        self._hist[bucket_of((now - sent) // 1000)] += 1
        self.deliveries += 1
        if self.first_ns == 0:
            self.first_ns = now
        self.last_ns = now
        if seq < self.maxseq:
            if self._first[seq] == 0 or now < self._first[seq]:
                self._first[seq] = now
            if now > self._last[seq]:
                self._last[seq] = now
            if seq > self.max_seq_seen:
                self.max_seq_seen = seq
        return int(seq)


class SubListener(WSListener):  # type: ignore[misc]
    def __init__(self, rec: Recorder, gochat: bool, ctrl: Any = None, notify: Any = None, index: int = 0) -> None:
        super().__init__()
        self.rec = rec
        self.gochat = gochat
        self.ctrl = ctrl
        self.notify = notify
        self.index = index
        self.transport: WSTransport | None = None
        self.done: Any = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        t = frame.msg_type
        if t == WSMsgType.BINARY:
            now = time.monotonic_ns()
            p = frame.get_payload_as_bytes()
            size = len(p)
            rec = self.rec
            rec.messages += 1
            rec.bytes_in += size
            if not self.gochat:
                seq = rec.record(p, 0, size, now)
                if self.notify is not None:
                    self.notify(seq)
                return
            off = 0
            while size - off >= 12:
                (flen,) = _LEN.unpack_from(p, off)
                if flen < 12 or flen > size - off:
                    break
                op = p[off + 5]
                if op == GOCHAT_DELIVER:
                    seq = rec.record(p, off + DELIVER_BODY_OFFSET, flen - DELIVER_BODY_OFFSET, now)
                    if self.notify is not None:
                        self.notify(seq)
                elif self.ctrl is not None:
                    self.ctrl(self, op, p[off:off + flen])
                off += flen
        elif t == WSMsgType.CLOSE:
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(None)
