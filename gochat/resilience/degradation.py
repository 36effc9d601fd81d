"""Degradation switches: what a node stops doing on purpose so that the rest keeps working.

Three switches (docs/resilience.md):

* ``read_only``: SENDs are refused with 504 READ_ONLY (retryable, ``retry_after_ms``); reads,
  CALLs that only read and everything already connected keep working;
* ``cache_only``: reads that need the database are answered from what the node has cached
  (HISTORY from its recent-messages cache, marked partial) while the database is out of reach;
* ``non_core_off``: typing indicators, presence events and read-receipt events are not sent
  (READ still stores the read position; presence.query answers 501).

Each switch is *manual* (forced on or off by configuration or the admin API, cluster-wide
through the event bus) or *automatic* (``None``): then it follows its cause, set by the node's
breakers (:meth:`Degradation.set_cause`): the store's breaker not closed turns ``read_only``
and ``cache_only`` on, the Redis breaker not closed turns ``non_core_off`` on; each turns off by
itself when its cause clears. Listeners hear every change of the effective switches (the node
announces them to clients in an EVENT DEGRADED and counts them).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from typing import TypedDict

__all__ = ["SWITCH_NAMES", "Degradation", "DegradationSnapshot", "Switch"]

log = logging.getLogger("gochat.resilience")


class Switch(enum.IntFlag):
    """The switches, as the bits of EVENT DEGRADED's ``value``."""

    READ_ONLY = 1
    CACHE_ONLY = 2
    NON_CORE_OFF = 4


#: wire/API names of the switches, in bit order
SWITCH_NAMES: dict[Switch, str] = {
    Switch.READ_ONLY: "read_only",
    Switch.CACHE_ONLY: "cache_only",
    Switch.NON_CORE_OFF: "non_core_off",
}

#: ``listener(active, previous, reason)``
DegradationListener = Callable[[Switch, Switch, str], None]


class DegradationSnapshot(TypedDict):
    active: list[str]
    manual: dict[str, bool | None]
    causes: dict[str, list[str]]


class Degradation:
    """The effective switches of one node: ``manual`` where set, else on while any cause holds."""

    def __init__(self, *, read_only: bool = False, non_core_off: bool = False) -> None:
        #: None: automatic; True/False: forced by the operator
        self._manual: dict[Switch, bool | None] = {s: None for s in SWITCH_NAMES}
        if read_only:
            self._manual[Switch.READ_ONLY] = True
        if non_core_off:
            self._manual[Switch.NON_CORE_OFF] = True
        #: switch -> the causes holding it on (e.g. "postgres breaker open")
        self._causes: dict[Switch, set[str]] = {s: set() for s in SWITCH_NAMES}
        self._listeners: list[DegradationListener] = []
        self.active = Switch(0)
        #: what a refused SEND is told to wait (read_only); the node sets it to its breakers'
        #: open interval
        self.retry_after_ms = 1000
        # plain booleans: what hot paths read (one attribute each, no flag arithmetic)
        self.read_only = False
        self.cache_only = False
        self.non_core_off = False
        self._recompute("configuration")

    def on_change(self, listener: DegradationListener) -> None:
        self._listeners.append(listener)

    def set_manual(self, switch: Switch, value: bool | None, reason: str = "operator") -> None:
        """Force ``switch`` on (True) or off (False), or hand it back to its causes (None)."""
        self._manual[switch] = value
        self._recompute(reason)

    def manual(self, switch: Switch) -> bool | None:
        return self._manual[switch]

    def set_cause(self, switches: Switch, cause: str, holds: bool) -> None:
        """``cause`` (a stable text, e.g. "postgres breaker open") now holds, or no longer does,
        for each of ``switches``."""
        if holds:
            self.replace_cause(switches, "", cause)
        else:
            self.replace_cause(switches, cause, "")

    def replace_cause(self, switches: Switch, old: str, new: str, reason: str = "") -> None:
        """For each of ``switches``: ``old`` no longer holds and ``new`` does (either may be
        empty); one change, so listeners hear the end state once (not a passing one)."""
        changed = False
        for switch in SWITCH_NAMES:
            if switch in switches:
                causes = self._causes[switch]
                if old and old in causes:
                    causes.discard(old)
                    changed = True
                if new and new not in causes:
                    causes.add(new)
                    changed = True
        if changed:
            self._recompute(reason or new or f"{old}: cleared")

    def _recompute(self, reason: str) -> None:
        active = Switch(0)
        for switch in SWITCH_NAMES:
            forced = self._manual[switch]
            if forced if forced is not None else bool(self._causes[switch]):
                active |= switch
        previous, self.active = self.active, active
        self.read_only = Switch.READ_ONLY in active
        self.cache_only = Switch.CACHE_ONLY in active
        self.non_core_off = Switch.NON_CORE_OFF in active
        if active == previous:
            return
        (log.warning if active else log.info)(
            "degradation: %s (%s)", ",".join(self.names(active)) or "none", reason
        )
        for listener in list(self._listeners):
            try:
                listener(active, previous, reason)
            except Exception:
                log.exception("degradation listener failed")

    @staticmethod
    def names(switches: Switch) -> list[str]:
        return [name for s, name in SWITCH_NAMES.items() if s in switches]

    def snapshot(self) -> DegradationSnapshot:
        return {
            "active": self.names(self.active),
            "manual": {SWITCH_NAMES[s]: v for s, v in self._manual.items()},
            "causes": {SWITCH_NAMES[s]: sorted(c) for s, c in self._causes.items()},
        }
