from gochat._native.connection import Connection

class Session(Connection):
    """A client connection whose binary messages are walked natively (see session.pyx)."""
