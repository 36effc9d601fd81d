"""socketify (Python bindings of uWebSockets) room broadcast: every connection subscribes to one
topic on open, and each binary message is published to it with ``ws.publish`` (uWS' pub/sub), so
the fan-out loop runs in uWebSockets' C++ (corked, one write per socket). socketify's
``ws.publish`` is the app-wide publish, which includes the sender (the write counter showed one
extra write per message), so a connection leaves the topic when it first sends: like the other
peers, a message goes to every other connection.

    python bench/peers/socketify_peer.py PORT   (0: a free port)
"""

from __future__ import annotations

import socket
import sys

from socketify import App, AppListenOptions, CompressOptions, OpCode

TOPIC = "room"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def on_open(ws: object) -> None:
    ws.subscribe(TOPIC)  # type: ignore[attr-defined]


def on_message(ws: object, message: bytes, opcode: OpCode) -> None:
    if opcode == OpCode.BINARY:
        if ws.is_subscribed(TOPIC):  # type: ignore[attr-defined]
            ws.unsubscribe(TOPIC)  # type: ignore[attr-defined]
        ws.publish(TOPIC, message, OpCode.BINARY)  # type: ignore[attr-defined]


def main(port: int) -> None:
    port = port or free_port()
    app = App()
    app.ws(
        "/*",
        {
            "compression": CompressOptions.DISABLED,
            "max_payload_length": 16 * 1024 * 1024,
            "idle_timeout": 900,
            # uWS drops pub/sub messages for a socket past this; large so that nothing is dropped
            "max_backpressure": 256 * 1024 * 1024,
            "close_on_backpressure_limit": False,
            "open": on_open,
            "message": on_message,
        },
    )
    app.listen(
        AppListenOptions(port=port, host="127.0.0.1"), lambda config: print(f"listening {port}", flush=True)
    )
    app.run()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
