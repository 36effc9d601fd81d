"""A WebSocket client on a plain blocking TCP socket, for RFC 6455 conformance tests.

It writes exactly the frames a test builds (any opcode, RSV bits, fragmentation, close payload)
and reads the server's frames one by one, so a test can see what a library client would hide or
refuse to send. Client frames are masked, as RFC 6455 §5.1 requires.
"""

from __future__ import annotations

import base64
import os
import socket
import struct
from urllib.parse import urlsplit

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

# Linux <netinet/tcp.h>: TCP_INFO's first byte is the socket state
_TCP_ESTABLISHED = 1


class Closed(Exception):
    """The server closed the TCP connection (EOF or reset) before the frame was complete."""


def frame_bytes(
    opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0, mask: bool = True
) -> bytes:
    """One WebSocket frame; ``rsv`` is the raw RSV bits (0x40, 0x20, 0x10)."""
    head = bytearray([(0x80 if fin else 0) | rsv | opcode])
    n = len(payload)
    mbit = 0x80 if mask else 0
    if n < 126:
        head.append(mbit | n)
    elif n < 1 << 16:
        head.append(mbit | 126)
        head += struct.pack("!H", n)
    else:
        head.append(mbit | 127)
        head += struct.pack("!Q", n)
    if not mask:
        return bytes(head) + payload
    key = os.urandom(4)
    head += key
    masked = bytes(b ^ key[i & 3] for i, b in enumerate(payload))
    return bytes(head) + masked


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


class RawWS:
    def __init__(self, url: str, *, token: str | None = None, rcvbuf: int = 0, timeout: float = 10.0) -> None:
        parts = urlsplit(url)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            # before connect(), so that the window the server sees is small from the start
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((parts.hostname, parts.port))
        self.buf = b""
        key = base64.b64encode(os.urandom(16)).decode()
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        self.sock.sendall(
            (
                f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\n"
                f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\n{auth}\r\n"
            ).encode()
        )
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0]
        assert b" 101 " in status, f"upgrade refused: {head!r}"

    # ---- writing ----------------------------------------------------------------------------
    def send(self, opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0) -> None:
        self.sock.sendall(frame_bytes(opcode, payload, fin=fin, rsv=rsv))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    # ---- reading ----------------------------------------------------------------------------
    def _fill(self) -> None:
        try:
            data = self.sock.recv(1 << 16)
        except ConnectionResetError as exc:
            raise Closed("reset") from exc
        if not data:
            raise Closed("eof")
        self.buf += data

    def _need(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv_frame(self) -> tuple[bool, int, int, bytes]:
        """(fin, rsv bits, opcode, payload) of the server's next frame."""
        b0, b1 = self._need(2)
        n = b1 & 0x7F
        assert not b1 & 0x80, "server frames are never masked"
        if n == 126:
            (n,) = struct.unpack("!H", self._need(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", self._need(8))
        return bool(b0 & 0x80), b0 & 0x70, b0 & 0x0F, self._need(n)

    def recv_message(self) -> tuple[int, bytes]:
        """The next data message (opcode, payload), reassembled; control frames are skipped
        (a PING is answered). A CLOSE raises :class:`Closed` with its code."""
        opcode, parts = -1, []
        while True:
            fin, _, op, payload = self.recv_frame()
            if op == PING:
                self.send(PONG, payload)
                continue
            if op == PONG:
                continue
            if op == CLOSE:
                raise Closed(f"close {struct.unpack('!H', payload[:2])[0] if len(payload) >= 2 else None}")
            if op != CONT:
                opcode = op
            parts.append(payload)
            if fin:
                return opcode, b"".join(parts)

    def close_code(self) -> int | None:
        """Read frames up to the server's CLOSE and return its code (None: an empty CLOSE);
        data frames before it are skipped. Raises :class:`Closed` if the TCP connection ends
        without a CLOSE."""
        while True:
            _, _, op, payload = self.recv_frame()
            if op == CLOSE:
                return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None

    def wait_eof(self) -> str:
        """Read (and discard) until the server ends the TCP connection: 'eof' or 'reset'."""
        self.buf = b""
        while True:
            try:
                self._fill()
            except Closed as exc:
                return str(exc)
            self.buf = b""

    def tcp_established(self) -> bool:
        """Whether this socket is still ESTABLISHED: False once the server sent FIN or RST,
        read or not (Linux TCP_INFO)."""
        info = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
        return info[0] == _TCP_ESTABLISHED

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
