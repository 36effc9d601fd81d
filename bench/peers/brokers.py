"""Brokers as fan-out targets: a private ``redis-server`` (PUBLISH over RESP/TCP, the C reference
for the broker hop, not WebSocket) and a private ``nats-server`` with its WebSocket listener.

Server side: :func:`available` / :func:`server_command` (a config file in the run's work
directory, loopback, a free port; readiness is the server's own "ready" log line, see ``READY``).
Client side (used by ``bench/loadgen.py`` when its config has ``"proto": "redis"`` or ``"nats"``):
:func:`connect` opens one connection (subscribed to ``room`` when ``listen``), :func:`wrap` frames a
payload as one publish. Deliveries are recorded with the same ``Recorder`` (payload = the same
``[u64 send ns][u32 seq][pad]`` bytes) as the WebSocket peers, parsed in Python.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

SUBJECT = b"room"
READY = {"redis": re.compile(rb"Ready to accept connections"), "nats": re.compile(rb"Server is ready")}
_SBIN = ("/usr/sbin", "/usr/local/sbin", "/usr/local/bin", "/usr/bin")


def _binary(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=":".join(_SBIN))


def available(proto: str) -> str | None:
    exe = {"redis": "redis-server", "nats": "nats-server"}[proto]
    return None if _binary(exe) else f"{exe} not installed"


def versions() -> dict[str, str]:
    """``redis-server`` / ``nats-server`` versions, for the machine facts (absent: not installed)."""
    import subprocess

    out: dict[str, str] = {}
    for exe, flag in (("redis-server", "--version"), ("nats-server", "--version")):
        path = _binary(exe)
        if path:
            r = subprocess.run([path, flag], capture_output=True, text=True, timeout=10)
            out[exe] = (r.stdout or r.stderr).strip().splitlines()[0] if (r.stdout or r.stderr) else "?"
    return out


def server_command(proto: str, port: int, workdir: Path) -> list[str]:
    if proto == "redis":
        conf = workdir / "redis.conf"
        conf.write_text(
            f'port {port}\nbind 127.0.0.1\nprotected-mode no\nsave ""\nappendonly no\n'
            f'dir {workdir}\nlogfile ""\ndaemonize no\nmaxclients 60000\n'
            # the slow-subscriber policy would disconnect the load generator's sockets under load
            "client-output-buffer-limit pubsub 0 0 0\n"
        )
        return [str(_binary("redis-server")), str(conf)]
    if proto == "nats":
        conf = workdir / "nats.conf"
        conf.write_text(
            'listen: "127.0.0.1:-1"\n'  # the TCP client port: unused, random
            'max_payload: 1048576\nmax_pending: 268435456\nwrite_deadline: "60s"\n'
            f'websocket {{\n  host: "127.0.0.1"\n  port: {port}\n  no_tls: true\n  compression: false\n}}\n'
        )
        return [str(_binary("nats-server")), "-c", str(conf)]
    raise ValueError(proto)


def wrap(proto: str, body: bytes, ws_frame: Any) -> bytes:
    """One publish of ``body`` on the wire."""
    if proto == "redis":
        return b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(SUBJECT), SUBJECT, len(body), body)
    return ws_frame(b"PUB %s %d\r\n%s\r\n" % (SUBJECT, len(body), body))


# ---- NATS over WebSocket -----------------------------------------------------------------------
def _nats_listener(rec: Any, notify: Any, ready: asyncio.Future[None]) -> Any:
    from picows import WSFrame, WSListener, WSMsgType, WSTransport

    class NatsListener(WSListener):  # type: ignore[misc]
        """NATS text protocol carried in WebSocket frames (a message may span frames)."""

        def __init__(self) -> None:
            super().__init__()
            self.transport: WSTransport | None = None
            self.buf = bytearray()

        def on_ws_connected(self, transport: WSTransport) -> None:
            self.transport = transport

        def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
            t = frame.msg_type
            if t in (WSMsgType.BINARY, WSMsgType.TEXT, WSMsgType.CONTINUATION):
                self.buf += frame.get_payload_as_bytes()
                self._parse(transport, time.monotonic_ns())
            elif t == WSMsgType.CLOSE:
                transport.disconnect()

        def _parse(self, transport: WSTransport, now: int) -> None:
            buf = self.buf
            off = 0
            n = len(buf)
            while True:
                eol = buf.find(b"\r\n", off)
                if eol < 0:
                    break
                if buf.startswith(_NATS_MSG, off):
                    size = int(buf[off + len(_NATS_MSG) : eol])
                    start = eol + 2
                    if n < start + size + 2:
                        break
                    rec.messages += 1
                    rec.bytes_in += size
                    seq = rec.record(buf, start, size, now)
                    if notify is not None:
                        notify(seq)
                    off = start + size + 2
                    continue
                line = bytes(buf[off:eol])
                off = eol + 2
                if line == b"PING":
                    transport.send(WSMsgType.BINARY, b"PONG\r\n")
                elif line == b"PONG" and not ready.done():
                    ready.set_result(None)
                elif line.startswith(b"-ERR") and not ready.done():
                    ready.set_exception(RuntimeError(line.decode(errors="replace")))
            if off:
                del buf[:off]

    return NatsListener()


# ---- Redis RESP over TCP -----------------------------------------------------------------------
_RESP_MSG = b"*3\r\n$7\r\nmessage\r\n$%d\r\n%s\r\n$" % (len(SUBJECT), SUBJECT)
_NATS_MSG = b"MSG %s 1 " % SUBJECT


class RespSubscriber(asyncio.Protocol):
    """Parses the RESP pushes of a SUBSCRIBEd connection: ``*3 $message $room $<payload>``."""

    def __init__(self, rec: Any, notify: Any, ready: asyncio.Future[None]) -> None:
        self.rec = rec
        self.notify = notify
        self.ready = ready
        self.buf = bytearray()
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(RuntimeError(f"redis connection lost: {exc!r}"))

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        now = time.monotonic_ns()
        off = 0
        n = len(buf)
        rec = self.rec
        while True:
            if buf.startswith(_RESP_MSG, off):  # fast path: a message push
                p = off + len(_RESP_MSG)
                eol = buf.find(b"\r\n", p)
                if eol < 0:
                    break
                start = eol + 2
                ln = int(buf[p:eol])
                if n < start + ln + 2:
                    break
                rec.messages += 1
                rec.bytes_in += ln
                seq = rec.record(buf, start, ln, now)
                if self.notify is not None:
                    self.notify(seq)
                off = start + ln + 2
                continue
            items = []
            p = off
            eol = buf.find(b"\r\n", p)
            if eol < 0:
                break
            if buf[p] != 0x2A:  # not '*': the publisher's ':N' replies, or a '-' error
                if buf[p] == 0x2D and not self.ready.done():
                    self.ready.set_exception(RuntimeError(bytes(buf[p:eol]).decode(errors="replace")))
                off = eol + 2
                continue
            count = int(bytes(buf[p + 1 : eol]))
            p = eol + 2
            complete = True
            for _ in range(count):
                eol = buf.find(b"\r\n", p)
                if eol < 0:
                    complete = False
                    break
                if buf[p] == 0x24:  # '$' bulk string
                    ln = int(bytes(buf[p + 1 : eol]))
                    start = eol + 2
                    if n < start + ln + 2:
                        complete = False
                        break
                    items.append((start, ln))
                    p = start + ln + 2
                else:  # ':' integer
                    items.append((p + 1, eol - p - 1))
                    p = eol + 2
            if not complete:
                break
            off = p
            kind = bytes(buf[items[0][0] : items[0][0] + items[0][1]])
            if kind == b"message":
                start, ln = items[2]
                rec.messages += 1
                rec.bytes_in += ln
                seq = rec.record(buf, start, ln, now)
                if self.notify is not None:
                    self.notify(seq)
            elif kind == b"subscribe" and not self.ready.done():
                self.ready.set_result(None)
        if off:
            del buf[:off]


async def connect(proto: str, url: str, src: str, rec: Any, notify: Any, listen: bool) -> tuple[Any, Any]:
    """One connection; subscribed to ``room`` when ``listen``. Returns (transport-like, listener):
    ``transport.underlying_transport.write(wrap(...))`` publishes."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    if proto == "redis":
        host, port = url.split("://", 1)[1].rsplit(":", 1)
        transport, _ = await loop.create_connection(
            lambda: RespSubscriber(rec, notify, ready), host, int(port), local_addr=(src, 0)
        )
        if listen:
            transport.write(b"*2\r\n$9\r\nSUBSCRIBE\r\n$%d\r\n%s\r\n" % (len(SUBJECT), SUBJECT))
            await asyncio.wait_for(ready, 60)
        else:
            ready.cancel()
        return SimpleNamespace(underlying_transport=transport), None
    from picows import WSMsgType, ws_connect

    transport, listener = await ws_connect(
        lambda: _nats_listener(rec, notify, ready),
        url,
        local_addr=(src, 0),
        websocket_handshake_timeout=60,
        enable_auto_pong=True,
    )
    hello = b'CONNECT {"verbose":false,"pedantic":false,"echo":false}\r\n'
    if listen:
        hello += b"SUB %s 1\r\n" % SUBJECT
    transport.send(WSMsgType.BINARY, hello + b"PING\r\n")  # PONG: the SUB is in place
    await asyncio.wait_for(ready, 60)
    return transport, listener
