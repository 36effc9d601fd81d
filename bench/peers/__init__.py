"""Minimal room-broadcast servers the fan-out benchmark compares gochat with.

Shared protocol (so one load generator drives them all): a client connects to ``ws://HOST:PORT/``;
every binary message a connection sends is broadcast, unchanged, to every *other* open
connection, in connection order. Each peer prints ``listening PORT`` once it accepts.

The exception is ``brokers.py``: redis-server (RESP over TCP) and nats-server (NATS protocol over
WebSocket) run unchanged from their own binaries, and the load generator adapts to their framing.
"""
