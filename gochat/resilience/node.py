"""One node's resilience state: its retry policy, its breakers, its degradation switches, and
the link between them (docs/resilience.md).

A breaker of a dependency that is not closed is a *cause* for the switches it is watched for
(:meth:`NodeResilience.watch`): the store's turns ``read_only`` and ``cache_only`` on, Redis'
``non_core_off``. While any watched breaker is not closed, a probe task calls the dependency's
probe (a cheap ping through the breaker) every ``open_s / 2``, so a breaker that has no traffic
(SENDs are refused while read-only) still half-opens, probes and closes once the dependency is
back; the switches then turn off by themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from gochat.config import Settings
from gochat.errors import GochatError
from gochat.resilience.breaker import BreakerRegistry, BreakerState, CircuitBreaker
from gochat.resilience.degradation import Degradation, Switch
from gochat.resilience.policy import breaker_config, retry_policy
from gochat.resilience.retry import RetryPolicy

__all__ = ["BREAKER_STATE_VALUES", "NodeResilience"]

log = logging.getLogger("gochat.resilience")

#: the gauge value of each state in ``gochat_breaker_state`` (docs/http-api.md)
BREAKER_STATE_VALUES: dict[BreakerState, int] = {
    BreakerState.CLOSED: 0,
    BreakerState.OPEN: 1,
    BreakerState.HALF_OPEN: 2,
    BreakerState.FORCED_OPEN: 3,
    BreakerState.FORCED_CLOSED: 4,
}

_HEALTHY = (BreakerState.CLOSED, BreakerState.FORCED_CLOSED)


class NodeResilience:
    def __init__(self, settings: Settings) -> None:
        self.retry: RetryPolicy = retry_policy(settings)
        self.breakers = BreakerRegistry(breaker_config(settings))
        self.degradation = Degradation(read_only=settings.degrade_read_only, non_core_off=settings.degrade_non_core_off)
        self._probes: dict[str, Callable[[], Awaitable[None]]] = {}
        self._switches_of: dict[str, Switch] = {}
        self._probe_task: asyncio.Task[None] | None = None
        self._probe_every_s = settings.breaker_open_s / 2
        self.breakers.on_change(self._changed)

    def breaker(self, name: str) -> CircuitBreaker:
        """The breaker of dependency ``name`` (created on first use)."""
        return self.breakers.get(name)

    def watch(self, breaker: CircuitBreaker, switches: Switch, probe: Callable[[], Awaitable[None]]) -> None:
        """While ``breaker`` is not closed, ``switches`` are on (unless forced off) and
        ``probe()`` runs every ``open_s / 2``."""
        self._probes[breaker.name] = probe
        self._switches_of[breaker.name] = switches

    def _changed(self, breaker: CircuitBreaker, old: BreakerState, new: BreakerState, reason: str) -> None:
        switches = self._switches_of.get(breaker.name, Switch(0))
        # one cause per breaker: the old state's text goes, the new one's comes unless healthy
        cause = f"{breaker.name} breaker {new.value}"
        self.degradation.replace_cause(
            switches,
            f"{breaker.name} breaker {old.value}",
            cause if new not in _HEALTHY else "",
            cause if new not in _HEALTHY else f"{cause} ({reason})",
        )
        if new not in _HEALTHY and breaker.name in self._probes:
            self._start_probing()

    def _start_probing(self) -> None:
        if self._probe_task is None or self._probe_task.done():
            self._probe_task = asyncio.get_running_loop().create_task(self._probe_loop(), name="breaker-probes")

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self._probe_every_s)
            sick = [name for name in self._probes if self.breakers[name].state not in _HEALTHY]
            if not sick:
                return
            for name in sick:
                breaker = self.breakers[name]
                # enough probes in a row to close a half-open breaker (each one a ping)
                for _ in range(breaker.config.half_open_calls):
                    if breaker.state in _HEALTHY or breaker.state == BreakerState.FORCED_OPEN:
                        break
                    try:
                        await self._probes[name]()
                    except GochatError:
                        break

    async def close(self) -> None:
        task, self._probe_task = self._probe_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
