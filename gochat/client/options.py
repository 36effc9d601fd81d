"""Client settings: :class:`ClientOptions`, the keyword arguments of
:meth:`gochat.client.Client.connect` (reconnect, backoff, timeouts, frame limit, heartbeat, gap
fill, send retries, state callback) as one dataclass, and the reconnect :class:`Backoff` built
from them. No I/O and no state beyond the values themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gochat.client.state import Backoff
from gochat.protocol.constants import DEFAULT_MAX_FRAME

__all__ = ["Backoff", "ClientOptions"]


@dataclass(frozen=True, slots=True)
class ClientOptions:
    """What :meth:`gochat.client.Client.connect` takes besides the URLs, the token and
    ``resume`` (see its docstring for each one)."""

    reconnect: bool = True
    backoff_initial: float = 0.2
    backoff_max: float = 10.0
    request_timeout: float = 10.0
    max_frame: int = DEFAULT_MAX_FRAME
    connect_timeout: float | None = None
    heartbeat_interval: float | None = None
    gap_fill_delay: float = 0.1
    max_send_retries: int = 8
    on_state: Callable[[str], None] | None = None

    def backoff(self) -> Backoff:
        """A fresh reconnect schedule: ``backoff_initial`` doubling up to ``backoff_max`` (never
        below ``backoff_initial``), with the default jitter."""
        return Backoff(self.backoff_initial, max(self.backoff_max, self.backoff_initial))

    @property
    def first_connect_timeout(self) -> float:
        """How long the first connection may take, retries included."""
        return self.request_timeout if self.connect_timeout is None else self.connect_timeout
