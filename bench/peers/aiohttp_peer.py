"""aiohttp room broadcast (uvloop): ``await ws.send_bytes`` per message per socket, the way an
aiohttp application broadcasts.

    python bench/peers/aiohttp_peer.py PORT
"""

from __future__ import annotations

import asyncio
import socket
import sys

import uvloop
from aiohttp import WSMsgType, web

CONNS: dict[int, web.WebSocketResponse] = {}


async def handler(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(compress=False, max_msg_size=1 << 20)
    await ws.prepare(request)
    CONNS[id(ws)] = ws
    try:
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                data = msg.data
                for other in list(CONNS.values()):
                    if other is not ws and not other.closed:
                        await other.send_bytes(data)
    finally:
        CONNS.pop(id(ws), None)
    return ws


async def main(port: int) -> None:
    app = web.Application()
    app.router.add_get("/", handler)
    app.router.add_get("/ws", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    site = web.SockSite(runner, sock, backlog=4096)
    await site.start()
    print(f"listening {sock.getsockname()[1]}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
