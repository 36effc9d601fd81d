"""Presence watchers of one node: which local sessions watch which users.

Presence is subscription based: a session that asks ``presence.query`` for some users is told
(EVENT PRESENCE) when any of them goes online or offline, until it disconnects. Broadcasting every
status change to every contact would cost O(contacts) writes per connect, which large groups make
unbounded; watching keeps it proportional to interest. Who is online is the cluster
:class:`~gochat.cluster.base.Presence` seam's (in memory in embedded mode, Redis in a cluster);
this class only remembers, per node, who asked.
"""

from __future__ import annotations

from collections.abc import Iterable

from gochat._native.connection import Connection

__all__ = ["MAX_WATCHES_PER_SESSION", "PresenceWatchers"]

MAX_WATCHES_PER_SESSION = 1000


class PresenceWatchers:
    def __init__(self) -> None:
        # Keyed by the Connection itself (identity hash), not by an int conn_id object per entry;
        # the inner dicts are insertion-ordered sets.
        self._watchers: dict[int, dict[Connection, None]] = {}  # watched user -> watching conns
        self._watching: dict[Connection, set[int]] = {}  # conn -> watched users

    def watch(self, conn: Connection, user_ids: Iterable[int]) -> None:
        watching = self._watching.setdefault(conn, set())
        for uid in user_ids:
            if len(watching) >= MAX_WATCHES_PER_SESSION:
                break
            watching.add(uid)
            self._watchers.setdefault(uid, {})[conn] = None

    def unwatch_all(self, conn: Connection) -> None:
        for uid in self._watching.pop(conn, ()):
            watchers = self._watchers.get(uid)
            if watchers is not None:
                watchers.pop(conn, None)
                if not watchers:
                    del self._watchers[uid]

    def watchers(self, user_id: int) -> list[Connection]:
        w = self._watchers.get(user_id)
        return [] if not w else list(w)
