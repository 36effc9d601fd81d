"""Bare picows room broadcast (uvloop): one ``transport.send`` per message per socket.

    python bench/peers/picows_peer.py PORT

Knobs for memory experiments (environment): ``BENCH_PICOWS_READ_BUFFER`` (picows
``read_buffer_init_size``, default 4096 as gochat), ``BENCH_PICOWS_AIOFASTNET`` (``0``/``1``; default:
picows decides).
"""

from __future__ import annotations

import asyncio
import os
import sys

import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_create_server

CONNS: dict[int, WSTransport] = {}


class Peer(WSListener):  # type: ignore[misc]
    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        CONNS[id(self)] = transport

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        CONNS.pop(id(self), None)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.BINARY:
            data = frame.get_payload_as_bytes()
            for t in CONNS.values():
                if t is not transport:
                    t.send(WSMsgType.BINARY, data)
        elif frame.msg_type == WSMsgType.CLOSE:
            transport.disconnect()


async def main(port: int) -> None:
    fast = os.environ.get("BENCH_PICOWS_AIOFASTNET", "")
    server = await ws_create_server(
        lambda _req: Peer(),
        "127.0.0.1",
        port,
        read_buffer_init_size=int(os.environ.get("BENCH_PICOWS_READ_BUFFER", "4096")),
        use_aiofastnet=None if fast == "" else fast == "1",
    )
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
