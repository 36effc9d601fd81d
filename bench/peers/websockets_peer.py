"""``websockets`` room broadcast (asyncio API, uvloop): ``websockets.broadcast()``, the library's
documented way to fan one message out. Compression is off, as for every target.

    python bench/peers/websockets_peer.py PORT [--relay]

``--relay`` is the direct-message baseline instead: a connection first sends 4 bytes, its id
(u32 LE); then every message ``[u32 LE destination id][payload]`` is forwarded as is to the
connection with that id. Nothing is stored.
"""

from __future__ import annotations

import asyncio
import struct
import sys

import uvloop
from websockets.asyncio.server import ServerConnection, broadcast, serve

CONNS: dict[int, ServerConnection] = {}
BY_ID: dict[int, ServerConnection] = {}


async def room(ws: ServerConnection) -> None:
    CONNS[id(ws)] = ws
    try:
        async for msg in ws:
            others = [c for c in CONNS.values() if c is not ws]
            broadcast(others, msg)
    finally:
        CONNS.pop(id(ws), None)


async def relay(ws: ServerConnection) -> None:
    hello = await ws.recv()
    (me,) = struct.unpack_from("<I", hello)
    BY_ID[me] = ws
    try:
        async for msg in ws:
            (dest,) = struct.unpack_from("<I", msg)
            target = BY_ID.get(dest)
            if target is not None:
                await target.send(msg)
    finally:
        BY_ID.pop(me, None)


async def main(port: int, mode: str) -> None:
    handler = relay if mode == "relay" else room
    async with serve(
        handler, "127.0.0.1", port, compression=None, max_size=1 << 20, ping_interval=None, backlog=4096
    ) as server:
        print(f"listening {next(iter(server.sockets)).getsockname()[1]}", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    args = sys.argv[1:]
    mode = "relay" if "--relay" in args else "room"
    ports = [a for a in args if not a.startswith("--")]
    uvloop.run(main(int(ports[0]) if ports else 0, mode))
