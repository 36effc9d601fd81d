"""The dynamic large-group threshold (docs/cluster.md, "Dynamic large-group threshold").

A group above ``Delivery.large_group_threshold`` members fans out through the cluster-wide job
tier (Redis Streams jobs every node consumes); below it, the sender's node routes it inline.
:class:`ThresholdController` moves that threshold between ``large_group_threshold_min`` and
``large_group_threshold_max`` from what it measures, every ``threshold_interval_s``:

* load on this node, each a pressure in [0, 1]: the event loop's lag (a timer's drift, p99 over
  the window, full at :data:`LAG_FULL_S`), the cluster routing queue's depth (EWMA, full at
  :data:`QUEUE_FULL`) and the SEND commit latency (p99 of the per-probe mean of the SEND latency
  histogram, full at ``overload_send_latency_ms``); ``load`` is the largest;
* the registry: ``spread = 1 - 1/n`` for ``n`` live nodes, and ``share``, this node's
  connections over its fair part by weight (1: balanced; clipped to [0, 2]).

``score = clip(load + 0.5 * spread * share, 0, 1)`` and ``target = max - (max - min) * score``:
a loaded node, or one in a large cluster, or one holding more than its share of connections,
hands more groups to the job tier (whose work every node shares); a quiet node in a small
cluster keeps them inline (fewer Redis round trips, lower latency). Hysteresis: the threshold
moves only once the target has been more than :data:`BAND` (10 %) away, on the same side, for
:data:`CONFIRM` consecutive decisions, then by at most :data:`MAX_STEP` of the range per
decision; a target back inside the band, or on the other side, starts the count again. Every
change is logged with its inputs. The value is a plain int on the delivery object: the send path
pays nothing for it.

The statistics are :class:`~gochat.messaging.loadstats.LoadStats`: fixed windows on numpy ring
buffers (percentiles over the last N samples) and an EWMA. The timer probes and decides only
while the registry lists another node (the threshold means nothing alone), and the statistics,
numpy with them, are loaded on the first sample: an embedded node never imports numpy
(docs/dependencies.md, "numpy"). Its event-loop lag gauge is plain Python: the worst probe of
the last interval.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gochat.messaging.loadstats import LoadStats

__all__ = [
    "BAND",
    "CONFIRM",
    "LAG_FULL_S",
    "MAX_STEP",
    "QUEUE_FULL",
    "SendLatencySampler",
    "ThresholdController",
]

log = logging.getLogger("gochat.threshold")

#: event-loop lag (p99) at which the lag pressure is full
LAG_FULL_S = 0.1
#: routing queue depth (EWMA) at which the queue pressure is full (4 router batches behind)
QUEUE_FULL = 16_384
#: the target must differ from the current value by more than this share of it ...
BAND = 0.10
#: ... for this many consecutive decisions, on the same side, before the threshold moves
CONFIRM = 3
#: a change moves the threshold by at most this share of (max - min)
MAX_STEP = 0.25
#: how much the registry (spread x share) weighs against the node's own load
CLUSTER_WEIGHT = 0.5


class SendLatencySampler:
    """The mean SEND latency since the last call, from a
    :class:`~gochat.observability.metrics.LatencyHistogram` (None: no SEND answered since)."""

    __slots__ = ("_count", "_hist", "_total")

    def __init__(self, hist: Any) -> None:
        self._hist = hist
        self._count = sum(hist.counts)
        self._total = hist.total

    def __call__(self) -> float | None:
        count, total = sum(self._hist.counts), self._hist.total
        n, s = count - self._count, total - self._total
        self._count, self._total = count, total
        return s / n if n > 0 else None


def _clip(x: float, lo: float, hi: float) -> float:
    return lo if x < lo else hi if x > hi else x


class ThresholdController:
    """Moves the large-group threshold between ``low`` and ``high`` (module docstring); off when
    ``low == high`` (the static value stays). ``apply(value)`` installs a new value.

    :meth:`observe` takes one probe's samples and :meth:`decide` makes one decision; the task
    :meth:`start` runs calls both on a timer (probes every ``probe_s``, decisions every
    ``interval_s``). Tests drive them directly."""

    def __init__(
        self,
        start: int,
        low: int,
        high: int,
        *,
        apply: Callable[[int], None] | None = None,
        node_id: str = "",
        interval_s: float = 5.0,
        probe_s: float = 0.25,
        commit_full_s: float = 0.25,
        window: int = 64,
    ) -> None:
        self.low, self.high = low, high
        self.enabled = low < high
        self.apply = apply
        self.node_id = node_id
        self.interval_s = interval_s
        self.probe_s = probe_s
        self.commit_full_s = commit_full_s if commit_full_s > 0 else 0.25
        self.window = window
        self._stats: tuple[LoadStats, LoadStats, LoadStats] | None = None
        #: the worst event-loop lag of the last interval (the gauge; probed with or without peers)
        self.lag_s = 0.0
        self._lag_worst = 0.0
        self.value = self._bounded(start)
        #: changes made, and the reason of the last one (its inputs)
        self.changes = 0
        self.last_reason = ""
        #: the last decision's inputs
        self.inputs: dict[str, float] = {}
        self._side = 0
        self._streak = 0
        self._task: asyncio.Task[None] | None = None

    def _load_stats(self) -> tuple[LoadStats, LoadStats, LoadStats]:
        if self._stats is None:
            from gochat.messaging.loadstats import LoadStats  # numpy: on the first sample only

            self._stats = (LoadStats(self.window), LoadStats(self.window), LoadStats(self.window))
        return self._stats

    @property
    def lag(self) -> LoadStats:
        """Event-loop lag samples, seconds."""
        return self._load_stats()[0]

    @property
    def queue(self) -> LoadStats:
        """Routing queue depth samples."""
        return self._load_stats()[1]

    @property
    def commit(self) -> LoadStats:
        """SEND latency samples (mean per probe), seconds."""
        return self._load_stats()[2]

    def _bounded(self, value: int) -> int:
        return int(_clip(value, self.low, self.high)) if self.enabled else value

    def reset(self, value: int) -> None:
        """A new ``large_group_threshold`` (hot reload): the current value, bounded; the count
        of confirming decisions starts again."""
        self.value = self._bounded(value)
        self._side = self._streak = 0
        if self.apply is not None:
            self.apply(self.value)

    def observe(self, lag_s: float | None = None, queue_depth: float | None = None, commit_s: float | None = None) -> None:
        """One probe's samples (None: nothing measured)."""
        lag, queue, commit = self._load_stats()
        if lag_s is not None:
            lag.add(lag_s)
        if queue_depth is not None:
            queue.add(queue_depth)
        if commit_s is not None:
            commit.add(commit_s)

    def target(self, nodes: Iterable[Any]) -> tuple[int, dict[str, float]]:
        """The target threshold for the samples so far and ``nodes`` (NodeInfo), and its inputs."""
        lag_p99, commit_p99 = self.lag.p99, self.commit.p99
        queue = self.queue.ewma
        load = max(lag_p99 / LAG_FULL_S, queue / QUEUE_FULL, commit_p99 / self.commit_full_s)
        live = [n for n in nodes if not n.draining]
        spread = 1.0 - 1.0 / max(len(live), 1)
        weights = sum(max(n.weight, 0) for n in live)
        conns = sum(max(n.connections, 0) for n in live)
        share = 1.0
        mine = next((n for n in live if n.node_id == self.node_id), None)
        if mine is not None and weights > 0 and conns > 0 and mine.weight > 0:
            share = (mine.connections / conns) / (mine.weight / weights)
        share = _clip(share, 0.0, 2.0)
        score = _clip(_clip(load, 0.0, 1.0) + CLUSTER_WEIGHT * spread * share, 0.0, 1.0)
        target = round(self.high - (self.high - self.low) * score)
        inputs = {
            "lag_p99_ms": lag_p99 * 1000,
            "queue_ewma": queue,
            "commit_p99_ms": commit_p99 * 1000,
            "nodes": float(len(live)),
            "share": share,
            "load": load,
            "score": score,
            "target": float(target),
        }
        return target, inputs

    def decide(self, nodes: Iterable[Any]) -> int | None:
        """One decision: the new threshold (applied, logged) or None when it stays."""
        if not self.enabled:
            return None
        target, inputs = self.target(nodes)
        self.inputs = inputs
        diff = target - self.value
        if abs(diff) <= BAND * self.value:
            self._side = self._streak = 0
            return None
        side = 1 if diff > 0 else -1
        self._streak = self._streak + 1 if side == self._side else 1
        self._side = side
        if self._streak < CONFIRM:
            return None
        max_step = max(1, math.ceil(MAX_STEP * (self.high - self.low)))
        new = int(_clip(self.value + _clip(diff, -max_step, max_step), self.low, self.high))
        if new == self.value:
            return None
        old, self.value = self.value, new
        self.changes += 1
        self.last_reason = (
            f"target {target} for {self._streak} decisions (load {inputs['load']:.2f}: lag p99 "
            f"{inputs['lag_p99_ms']:.1f} ms, queue EWMA {inputs['queue_ewma']:.0f}, commit p99 "
            f"{inputs['commit_p99_ms']:.1f} ms; {int(inputs['nodes'])} live nodes, connection share "
            f"{inputs['share']:.2f} of weight)"
        )
        log.info("large_group_threshold %d -> %d: %s", old, new, self.last_reason)
        if self.apply is not None:
            self.apply(new)
        return new

    # ---- the timer --------------------------------------------------------------------------
    def start(
        self,
        nodes: Callable[[], Iterable[Any]],
        queue_depth: Callable[[], int],
        commit: Callable[[], float | None],
        peers: Callable[[], bool] = lambda: True,
    ) -> None:
        """Probe every ``probe_s`` (lag = the timer's drift) and decide every ``interval_s``;
        samples are kept and decisions made only while ``peers()``."""
        self._task = asyncio.get_running_loop().create_task(
            self._run(nodes, queue_depth, commit, peers), name="large-group-threshold"
        )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _run(
        self,
        nodes: Callable[[], Iterable[Any]],
        queue_depth: Callable[[], int],
        commit: Callable[[], float | None],
        peers: Callable[[], bool],
    ) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + self.probe_s
        decide_at = loop.time() + self.interval_s
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            now = loop.time()
            lag = max(0.0, now - due)
            self._lag_worst = max(self._lag_worst, lag)
            commit_s = commit()  # read every probe: each sample covers one probe interval
            if peers():
                self.observe(lag, queue_depth(), commit_s)
            due = now + self.probe_s
            if now >= decide_at:
                decide_at = now + self.interval_s
                self.lag_s, self._lag_worst = self._lag_worst, 0.0
                if peers():
                    try:
                        self.decide(nodes())
                    except Exception:  # a bad registry entry must not end the controller
                        log.exception("large_group_threshold: decision failed")
