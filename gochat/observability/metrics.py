"""Prometheus metrics of one node.

The data plane keeps plain C counters (``FanoutWriter``); they are read only when ``/metrics`` is
scraped, through a custom collector, so delivering a message costs no Python metric call.
Control-plane and per-request metrics use ``prometheus_client`` directly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["Metrics"]

_SEND_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _DataPlaneCollector(Collector):
    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        v = self._read()
        yield GaugeMetricFamily("gochat_connections", "Open WebSocket connections", value=v["connections"])
        yield GaugeMetricFamily(
            "gochat_authenticated_connections", "Authenticated connections", value=v["authenticated"]
        )
        yield CounterMetricFamily("gochat_frames_out", "Frames queued to clients", value=v["frames_out"])
        yield CounterMetricFamily("gochat_bytes_out", "Bytes written to clients", value=v["bytes_out"])
        yield CounterMetricFamily(
            "gochat_socket_writes", "WebSocket messages written (coalesced frames)", value=v["writes"]
        )
        yield CounterMetricFamily(
            "gochat_dropped_frames", "Droppable frames dropped for slow consumers", value=v["drops"]
        )
        yield CounterMetricFamily(
            "gochat_slow_consumer_disconnects", "Connections closed with 4401", value=v["slow_disconnects"]
        )


class Metrics:
    """The metric set of one gochat node, in its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.messages_in = Counter(
            "gochat_messages_in", "SEND requests accepted", ["kind"], registry=self.registry
        )
        self.messages_delivered = Counter(
            "gochat_deliveries", "DELIVER frames queued to connections", registry=self.registry
        )
        self.errors = Counter(
            "gochat_errors", "ERROR frames sent, by code", ["code"], registry=self.registry
        )
        self.send_latency = Histogram(
            "gochat_send_latency_seconds",
            "SEND received to SEND_ACK queued (includes the durable commit)",
            buckets=_SEND_BUCKETS,
            registry=self.registry,
        )
        self.http_requests = Counter(
            "gochat_http_requests", "HTTP API requests", ["route", "status"], registry=self.registry
        )

    def attach_data_plane(self, read: Callable[[], dict[str, Any]]) -> None:
        self.registry.register(_DataPlaneCollector(read))

    def render(self) -> bytes:
        return generate_latest(self.registry)
