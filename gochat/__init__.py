"""gochat: a distributed instant-messaging server with a binary WebSocket protocol."""

from gochat.errors import ErrorCode, GochatError

__version__ = "0.1.0"
__all__ = ["ErrorCode", "GochatError", "__version__"]
