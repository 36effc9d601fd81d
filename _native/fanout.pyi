"""Type stubs for gochat._native.fanout (see fanout.pxd for the data flow)."""

from asyncio import AbstractEventLoop
from typing import Any

from picows import WSFrame, WSListener, WSTransport

class Connection(WSListener):
    transport: WSTransport
    handler: Any
    writer: FanoutWriter
    user_id: int
    session_id: int
    conn_id: int
    authenticated: bool
    state: Any
    dirty: bool
    paused: bool
    closing: bool
    dropped: int
    def __init__(
        self,
        handler: Any,
        writer: FanoutWriter,
        soft_limit: int,
        hard_limit: int,
        rate: float,
        burst: float,
        max_message: int,
    ) -> None: ...
    def on_ws_connected(self, transport: WSTransport) -> None: ...
    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None: ...
    def on_ws_disconnected(self, transport: WSTransport) -> None: ...
    def pause_writing(self) -> None: ...
    def resume_writing(self) -> None: ...
    def take_tokens(self, now: float, n: float) -> bool: ...
    def push(self, data: bytes, droppable: bool = False) -> None: ...
    def close_with(self, close_code: int, reason: str = "") -> None: ...
    @property
    def queued_bytes(self) -> int: ...

class FanoutWriter:
    frames_out: int
    bytes_out: int
    writes: int
    drops: int
    slow_disconnects: int
    def __init__(self, loop: AbstractEventLoop) -> None: ...
    def fanout(
        self, conns: list[Connection], data: bytes, skip: Connection | None = None, droppable: bool = False
    ) -> int: ...
    def flush_now(self) -> None: ...
