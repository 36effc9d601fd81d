"""Load generator process: ``python -m bench.loadgen '<json config>'``.

Started by the bench driver (pinned with ``taskset`` to the load core), one process per role:

- ``sub``    N subscriber connections (gochat: AUTH + SUBSCRIBE; peers: just connect); every
             delivery is recorded by the Cython listener (``bench/_loadgen.pyx``).
- ``pub``    one publisher connection and one probe subscriber (connected after every other
             subscriber, so the server writes to it last). ``capacity`` runs closed loop: a batch
             of K messages goes out in one write and the next batch only after the probe got the
             last one, so each server tick sees exactly one batch. ``rate`` runs open loop on a
             fixed schedule.
- ``direct`` P sender/receiver pairs for one-to-one messages, open loop at a fixed total rate.
- ``idle``   authenticated connections that do nothing (memory scenario); ``add N`` opens more.
- ``storm``  on ``go``, open N connections with bounded concurrency and authenticate each.

Control: one command per stdin line, one JSON object per stdout line. Each message payload starts
with ``[u64 LE send time (CLOCK_MONOTONIC ns)][u32 LE seq]`` so receivers compute latency
without a clock sync (same machine).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import resource
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np
import uvloop
from picows import WSMsgType, ws_connect

from bench import _loadgen_py, native
from bench.peers import brokers

lg = native.loadgen()
now_ns = lg.monotonic_ns

OP_AUTH, OP_SEND, OP_SUBSCRIBE = 0x01, 0x03, 0x07
OP_AUTH_OK, OP_SUBSCRIBE_OK, OP_ERROR = 0x81, 0x87, 0x7F
KIND_DIRECT, KIND_ROOM = 1, 3
_HDR = struct.Struct("<IBBHI")


def emit(**kw: Any) -> None:
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()


def gframe(op: int, body: bytes, rid: int = 0) -> bytes:
    return _HDR.pack(12 + len(body), 1, op, 0, rid) + body


def ws_client_frame(payload: bytes) -> bytes:
    """A masked client binary frame with a zero mask key (payload unchanged on the wire)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x82, 0x80 | n))
    elif n < 65536:
        head = bytes((0x82, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x82, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


class Role:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.url: str = cfg["url"]
        self.gochat: bool = cfg.get("gochat", False)
        # "ws" (gochat and the WebSocket peers), or a broker adapter: "nats" (NATS text protocol over
        # WebSocket), "redis" (RESP over TCP); those record with the Python Recorder
        self.proto: str = cfg.get("proto", "ws")
        self.Recorder = lg.Recorder if self.proto == "ws" else _loadgen_py.Recorder
        srcs = cfg.get("src") or ["127.0.0.1"]
        self.srcs = itertools.cycle(srcs if isinstance(srcs, list) else [srcs])
        tokens = cfg.get("tokens") or [""]
        if cfg.get("tokens_file"):  # one token per line: too many for the command line
            tokens = Path(cfg["tokens_file"]).read_text().split()
        self.tokens = itertools.cycle(tokens)
        self.ready: dict[int, asyncio.Future[Any]] = {}
        self.want: dict[int, int] = {}
        self.errors: list[str] = []
        #: gochat ERROR frames by code since the last reset (OVERLOADED: load shed by the server)
        self.error_counts: dict[int, int] = {}
        self.listeners: list[Any] = []
        self.loop = asyncio.get_running_loop()
        self._ids = itertools.count()

    # ---- gochat control frames ---------------------------------------------------------------
    def ctrl(self, listener: Any, op: int, frame: bytes) -> None:
        """Non-DELIVER gochat frames: resolve the connection's AUTH_OK / SUBSCRIBE_OK wait."""
        fut = self.ready.get(listener.index)
        if op == OP_ERROR:
            code = struct.unpack_from("<H", frame, 12)[0]
            msg = frame[18:].decode(errors="replace")
            self.error_counts[code] = self.error_counts.get(code, 0) + 1
            if len(self.errors) < 20:
                self.errors.append(f"{code} {msg}")
            if fut is not None and not fut.done():
                fut.set_exception(RuntimeError(f"gochat error {code}: {msg}"))
        elif fut is not None and not fut.done() and op == self.want.get(listener.index):
            fut.set_result(None)

    async def connect(
        self, recorder: Any, *, subscribe: int | None = None, authenticate: bool = True, notify: Any = None,
        listen: bool = True,
    ) -> Any:
        if self.proto != "ws":
            t, lst = await brokers.connect(self.proto, self.url, next(self.srcs), recorder, notify, listen)
            if lst is not None:
                self.listeners.append(lst)
            return t, lst
        index = next(self._ids)
        token = next(self.tokens)
        fut: asyncio.Future[Any] = self.loop.create_future()
        self.ready[index] = fut

        def factory() -> Any:
            return lg.SubListener(recorder, self.gochat, self.ctrl if self.gochat else None, notify, index)

        transport, listener = await ws_connect(
            factory,
            self.url,
            local_addr=(next(self.srcs), 0),
            read_buffer_init_size=int(self.cfg.get("read_buffer", 2048)),
            websocket_handshake_timeout=60,
            enable_auto_pong=True,
        )
        self.listeners.append(listener)
        if self.gochat and authenticate:
            frames = gframe(OP_AUTH, token.encode(), rid=1)
            if subscribe is not None:
                frames += gframe(OP_SUBSCRIBE, struct.pack("<Q", subscribe), rid=2)
            self.want[index] = OP_AUTH_OK if subscribe is None else OP_SUBSCRIBE_OK
            transport.underlying_transport.write(ws_client_frame(frames))
            try:
                await asyncio.wait_for(fut, 60)
            finally:
                self.ready.pop(index, None)
                self.want.pop(index, None)
        else:
            self.ready.pop(index, None)
        return transport, listener

    async def connect_many(self, n: int, conc: int, **kw: Any) -> tuple[int, int]:
        sem = asyncio.Semaphore(conc)
        ok = 0
        bad = 0

        async def one() -> None:
            nonlocal ok, bad
            async with sem:
                try:
                    await self.connect(**kw)
                    ok += 1
                except Exception as exc:
                    bad += 1
                    if len(self.errors) < 20:
                        self.errors.append(repr(exc))

        await asyncio.gather(*(one() for _ in range(n)))
        return ok, bad


# ---- payloads --------------------------------------------------------------------------------
class Payloads:
    """Builds the wire bytes of message ``seq`` for one target (room or direct)."""

    def __init__(
        self, gochat: bool, size: int, kind: int, conv: int, prefix: bytes = b"", proto: str = "ws"
    ) -> None:
        self.gochat = gochat
        self.proto = proto
        self.size = size
        self.kind = kind
        self.conv = conv
        self.prefix = prefix
        self.pad = b"\x5a" * max(0, size - 12 - len(prefix))

    def message(self, seq: int, ts: int, conv: int | None = None, prefix: bytes | None = None) -> bytes:
        body = (self.prefix if prefix is None else prefix) + struct.pack("<QI", ts, seq) + self.pad
        if self.gochat:
            cmid = struct.pack(">QQ", os.getpid(), seq)  # big-endian: time-ordered per sender, as the SDK's UUIDv7
            send = struct.pack("<BBQ", self.kind, 0, self.conv if conv is None else conv) + cmid + body
            body = gframe(OP_SEND, send, rid=seq & 0xFFFFFFFF)
        if self.proto != "ws":
            return brokers.wrap(self.proto, body, ws_client_frame)
        return ws_client_frame(body)


# ---- roles ---------------------------------------------------------------------------------
class Sub(Role):
    async def start(self) -> None:
        c = self.cfg
        self.rec = self.Recorder(int(c.get("maxseq", 1 << 20)), int(c.get("offset", 0)))
        ok, bad = await self.connect_many(
            int(c["count"]), int(c.get("conc", 100)), recorder=self.rec, subscribe=c.get("room")
        )
        emit(event="ready", connected=ok, failed=bad, errors=self.errors[:5])

    async def command(self, cmd: list[str]) -> None:
        if cmd[0] == "reset":
            self.rec.reset()
            emit(event="reset")
        elif cmd[0] == "stats":
            emit(event="stats", deliveries=self.rec.deliveries, last_ns=self.rec.last_ns)
        elif cmd[0] == "report":
            hist, first, last = self.rec.arrays()
            np.savez(cmd[1], hist=hist, first=first, last=last)
            emit(
                event="report",
                deliveries=self.rec.deliveries,
                messages=self.rec.messages,
                bytes_in=self.rec.bytes_in,
                first_ns=self.rec.first_ns,
                last_ns=self.rec.last_ns,
                path=cmd[1],
                errors=self.errors[:5],
            )


class Pub(Role):
    async def start(self) -> None:
        c = self.cfg
        room = int(c.get("room", 1))
        self.probe_rec = self.Recorder(int(c.get("maxseq", 1 << 20)), 0)
        self.waiting: tuple[int, asyncio.Future[None]] | None = None
        self.pub_t, _ = await self.connect(self.Recorder(16, 0), subscribe=room if self.gochat else None,
                                           listen=False)
        await self.connect(self.probe_rec, subscribe=room if self.gochat else None, notify=self._probe)
        self.payloads = Payloads(self.gochat, int(c["size"]), KIND_ROOM, room, proto=self.proto)
        self.seq = 0
        emit(event="ready", errors=self.errors[:5])

    def _probe(self, seq: int) -> None:
        w = self.waiting
        if w is not None and seq >= w[0] and not w[1].done():
            w[1].set_result(None)

    def _batch(self, k: int) -> bytes:
        ts = now_ns()
        parts = [self.payloads.message(self.seq + i, ts) for i in range(k)]
        self.seq += k
        return b"".join(parts)

    async def command(self, cmd: list[str]) -> None:
        write = self.pub_t.underlying_transport.write
        if cmd[0] == "capacity":
            duration, k = float(cmd[1]), int(cmd[2])
            start = now_ns()
            end_at = start + int(duration * 1e9)
            sent = stalls = 0
            while now_ns() < end_at:
                last = self.seq + k - 1
                fut = self.loop.create_future()
                self.waiting = (last, fut)
                write(self._batch(k))
                sent += k
                try:
                    await asyncio.wait_for(fut, 5.0)
                except TimeoutError:
                    stalls += 1
                    if stalls > 3:
                        break
            self.waiting = None
            emit(event="done", sent=sent, start_ns=start, end_ns=now_ns(), stalls=stalls, seq_end=self.seq)
        elif cmd[0] == "rate":
            # Open loop on a fixed schedule: every timer tick (>= 1 ms, the loop's resolution)
            # sends the batches that are due, each as its own write, stamped with the send time.
            rate, k, duration = float(cmd[1]), int(cmd[2]), float(cmd[3])
            interval = k / rate * 1e9
            start = now_ns()
            n_batches = max(1, int(duration * rate / k))
            sent = 0
            max_lag = 0
            i = 0
            while i < n_batches:
                t = now_ns()
                due = min(n_batches, int((t - start) / interval) + 1)
                if due <= i:
                    await asyncio.sleep(max(0.001, (start + i * interval - t) / 1e9))
                    continue
                max_lag = max(max_lag, t - start - int(i * interval))
                while i < due:
                    write(self._batch(k))
                    sent += k
                    i += 1
                await asyncio.sleep(0)
            emit(event="done", sent=sent, start_ns=start, end_ns=now_ns(), max_lag_ns=max_lag, seq_end=self.seq)


class Direct(Role):
    """``pairs``: [[sender token, receiver token, receiver user id], ...] (gochat) or a count."""

    async def start(self) -> None:
        c = self.cfg
        self.rec = lg.Recorder(int(c.get("maxseq", 1 << 21)), 0 if self.gochat else 4)
        pairs = c["pairs"]
        self.senders: list[Any] = []
        self.dests: list[int] = []
        size = int(c["size"])
        for i, pair in enumerate(pairs):
            if self.gochat:
                self.tokens = iter([pair[1]])
                await self.connect(self.rec, subscribe=None)
                self.tokens = iter([pair[0]])
                t, _ = await self.connect(lg.Recorder(16, 0), subscribe=None)
                self.dests.append(int(pair[2]))
            else:
                # relay peer: hello with our id, then [u32 dest][payload]
                r, _ = await self.connect(self.rec, authenticate=False)
                r.underlying_transport.write(ws_client_frame(struct.pack("<I", 100000 + i)))
                t, _ = await self.connect(lg.Recorder(16, 0), authenticate=False)
                t.underlying_transport.write(ws_client_frame(struct.pack("<I", i)))
                self.dests.append(100000 + i)
            self.senders.append(t.underlying_transport)
        self.payloads = Payloads(self.gochat, size, KIND_DIRECT, 0, b"" if self.gochat else b"\0\0\0\0")
        self.seq = 0
        await asyncio.sleep(0.2)
        emit(event="ready", pairs=len(pairs), errors=self.errors[:5])

    async def command(self, cmd: list[str]) -> None:
        if cmd[0] == "reset":
            self.rec.reset()
            self.error_counts.clear()
            emit(event="reset")
        elif cmd[0] == "stats":
            emit(event="stats", deliveries=self.rec.deliveries, last_ns=self.rec.last_ns)
        elif cmd[0] == "report":
            hist, first, last = self.rec.arrays()
            np.savez(cmd[1], hist=hist, first=first, last=last)
            emit(event="report", deliveries=self.rec.deliveries, first_ns=self.rec.first_ns,
                 last_ns=self.rec.last_ns, path=cmd[1], errors=self.errors[:5], error_counts=self.error_counts)
        elif cmd[0] == "rate":
            rate, duration = float(cmd[1]), float(cmd[2])
            start = now_ns()
            total = max(1, int(rate * duration))
            n = len(self.senders)
            i = 0
            max_lag = 0
            while i < total:
                t = now_ns()
                due_count = min(total, int((t - start) * rate / 1e9) + 1)
                if due_count <= i:
                    await asyncio.sleep(max(0.001, ((i * 1e9 / rate) + start - t) / 1e9))
                    continue
                max_lag = max(max_lag, t - start - int(i * 1e9 / rate))
                while i < due_count:
                    j = i % n
                    prefix = b"" if self.gochat else struct.pack("<I", self.dests[j])
                    self.senders[j].write(self.payloads.message(self.seq, t, conv=self.dests[j], prefix=prefix))
                    self.seq += 1
                    i += 1
                await asyncio.sleep(0)
            emit(event="done", sent=total, start_ns=start, end_ns=now_ns(), max_lag_ns=max_lag)


class Idle(Role):
    async def start(self) -> None:
        self.rec = lg.Recorder(16, 0)
        self.open = 0
        emit(event="ready")

    async def _auth_many(self, n: int) -> tuple[int, int]:
        sem = asyncio.Semaphore(int(self.cfg.get("conc", 100)))
        ok = bad = 0

        async def one() -> None:
            nonlocal ok, bad
            async with sem:
                try:
                    await self.connect(self.rec, subscribe=None, authenticate=self.gochat)
                    ok += 1
                except Exception as exc:
                    bad += 1
                    if len(self.errors) < 20:
                        self.errors.append(repr(exc))

        await asyncio.gather(*(one() for _ in range(n)))
        return ok, bad

    async def command(self, cmd: list[str]) -> None:
        if cmd[0] == "add":
            ok, bad = await self._auth_many(int(cmd[1]))
            self.open += ok
            emit(event="added", open=self.open, failed=bad, errors=self.errors[:5])
        elif cmd[0] == "go":  # storm: time the whole batch
            start = now_ns()
            ok, bad = await self._auth_many(int(cmd[1]))
            emit(event="storm", ok=ok, failed=bad, start_ns=start, end_ns=now_ns(), errors=self.errors[:5])


ROLES = {"sub": Sub, "pub": Pub, "direct": Direct, "idle": Idle}


async def main(cfg: dict[str, Any]) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    role = ROLES[cfg["role"]](cfg)
    await role.start()
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            break
        cmd = line.decode().split()
        if not cmd:
            continue
        if cmd[0] == "quit":
            break
        try:
            await role.command(cmd)
        except Exception as exc:
            emit(event="error", error=repr(exc))
    for lst in role.listeners:
        t = lst.transport
        if t is not None and not t.is_disconnected:
            t.send(WSMsgType.CLOSE, b"")
            t.disconnect()
    emit(event="bye")


if __name__ == "__main__":
    uvloop.run(main(json.loads(sys.argv[1])))
