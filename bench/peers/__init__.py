"""Minimal room-broadcast servers the fan-out benchmark compares gochat with.

Shared protocol (so one load generator drives them all): a client connects to ``ws://HOST:PORT/``;
every binary message a connection sends is broadcast, unchanged, to every *other* open
connection, in connection order. Each peer prints ``listening PORT`` once it accepts.
"""
