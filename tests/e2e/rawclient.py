"""A raw protocol client for end-to-end tests: sends exactly the bytes a test wants.

Unlike ``gochat.client`` it never retries, reconnects or fixes anything, so tests can send
garbage and observe the server's exact ERROR frames and close codes.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from gochat.protocol import Kind, decode, encode_many
from gochat.protocol.frames import Auth, Error, Frame, Send


class RawClient(WSListener):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.frames: asyncio.Queue[Any] = asyncio.Queue()
        self.transport: WSTransport | None = None
        self.close_code: int | None = None
        self.closed = asyncio.Event()
        self.messages = 0
        self.paused_reading = False

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.BINARY:
            self.messages += 1
            for f in decode(frame.get_payload_as_bytes(), 1 << 24):
                self.frames.put_nowait(f)
        elif frame.msg_type == WSMsgType.CLOSE:
            self.close_code = int(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closed.set()

    # ---- sending -------------------------------------------------------------------------
    def send(self, *frames: Frame) -> None:
        assert self.transport is not None
        self.transport.send(WSMsgType.BINARY, encode_many(list(frames)))

    def send_raw(self, data: bytes, msg_type: WSMsgType = WSMsgType.BINARY) -> None:
        assert self.transport is not None
        self.transport.send(msg_type, data)

    # ---- receiving ---------------------------------------------------------------------------
    async def recv(self, timeout: float = 5.0) -> Any:
        return await asyncio.wait_for(self.frames.get(), timeout)

    async def expect(self, cls: type, timeout: float = 5.0, skip: tuple[type, ...] = ()) -> Any:
        """Next frame that is not an instance of ``skip``; assert it is ``cls``."""
        while True:
            f = await self.recv(timeout)
            if skip and isinstance(f, skip):
                continue
            assert isinstance(f, cls), f"expected {cls.__name__}, got {f!r}"
            return f

    async def expect_error(self, code: int, timeout: float = 5.0) -> Error:
        f = await self.expect(Error, timeout)
        assert f.code == code, f"expected error {code}, got {f!r}"
        return f

    async def wait_closed(self, timeout: float = 5.0) -> int | None:
        await asyncio.wait_for(self.closed.wait(), timeout)
        return self.close_code

    async def no_frame(self, within: float = 0.3) -> None:
        try:
            f = await asyncio.wait_for(self.frames.get(), within)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected frame {f!r}")

    def close(self) -> None:
        if self.transport is not None and not self.closed.is_set():
            self.transport.disconnect()


async def connect(url: str, token: str | None = None, *, header_token: str | None = None) -> RawClient:
    headers = {"Authorization": f"Bearer {header_token}"} if header_token else None
    _, client = await ws_connect(RawClient, url, extra_headers=headers)
    assert isinstance(client, RawClient)
    if token is not None:
        client.send(Auth(token, rid=1))
    return client


def new_cmid() -> bytes:
    return os.urandom(16)


def send_frame(kind: Kind | int, conv_id: int, body: bytes, rid: int, cmid: bytes | None = None) -> Send:
    return Send(int(kind), 1, conv_id, cmid or new_cmid(), body, rid=rid)
