from gochat._native.fanout import Connection

class Session(Connection):
    """A client connection whose binary messages are walked natively (see session.pyx)."""
