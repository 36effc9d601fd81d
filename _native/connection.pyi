"""Type stubs for gochat._native.fanout (see fanout.pxd for the data flow)."""

import logging
from asyncio import AbstractEventLoop
from typing import Any

from picows import WSFrame, WSListener, WSTransport

#: SO_SNDBUF given to every accepted WebSocket (Linux accounts twice this)
SOCKET_SNDBUF: int

def set_socket_sndbuf(size: int) -> None: ...
#: longest interval between two WARNINGs about client protocol errors
CLIENT_ERROR_SUMMARY_S: float

class ClientErrors:
    logger: logging.Logger | logging.LoggerAdapter[Any]
    interval: float
    total: int
    pending: int
    last: str
    window_end: float
    def __init__(self, logger: logging.Logger | logging.LoggerAdapter[Any], interval: float = ...) -> None: ...
    def report(self, text: str) -> None: ...

CLIENT_ERRORS: ClientErrors

class ClientErrorLog(logging.LoggerAdapter[logging.Logger]):
    errors: ClientErrors
    def __init__(self, logger: logging.Logger, errors: ClientErrors | None = None) -> None: ...

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
    def send_user_specific_ping(self, transport: WSTransport) -> None: ...
    @property
    def queued_bytes(self) -> int: ...
    def picows_buffer_capacity(self) -> tuple[int, int]: ...

class FanoutWriter:
    frames_out: int
    bytes_out: int
    writes: int
    drops: int
    slow_disconnects: int
    tracked: int
    pings: int
    def __init__(self, loop: AbstractEventLoop) -> None: ...
    def connections(self) -> list[Connection]: ...
    def start_heartbeat(self, idle_timeout: float, reply_timeout: float, logger: Any = None) -> None: ...
    def stop_heartbeat(self) -> None: ...
    @property
    def heartbeat(self) -> tuple[float, float] | None: ...
    def fanout(
        self, conns: list[Connection], data: bytes, skip: Connection | None = None, droppable: bool = False
    ) -> int: ...
    def flush_now(self) -> None: ...
