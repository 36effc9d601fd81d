"""Tracing with OpenTelemetry: the spans of a SEND's way through the cluster (docs/observability.md,
"Tracing").

Off by default, and then free: a node without tracing has no :class:`Tracing`, its send path is
the untraced ``SendPath.send`` itself (not even a flag is tested per SEND), and nothing imports
OpenTelemetry. With ``trace_sample_rate`` > 0 the send path samples each SEND (one
``random()`` call); only a sampled SEND gets a :class:`SendTrace` and spans, made with the
OpenTelemetry API. The SDK and the OTLP/HTTP exporter (the ``gochat[otel]`` extra) are loaded
only by :func:`setup_tracing`; without them a configured node logs it once and traces nothing.

The spans of one sampled SEND::

    gochat.receive        SERVER: SEND received → SEND_ACK queued (child of a client's traceparent)
    ├── validate          checks, conversation lookup → handed to the store
    ├── commit            store append → its callback
    └── route             fan-out decision → SEND_ACK queued
        ├── fanout.local  this node's sessions (one per recipient list)
        └── cluster.publish   PRODUCER, one per other node, from the link's router task
                └── gochat.deliver   CONSUMER, on that node (context in the cluster envelope)
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final

from gochat import __version__
from gochat.ids import MAX_ID

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Tracer, TracerProvider

    from gochat.config import Settings

__all__ = ["SendTrace", "Tracing", "setup_tracing"]

log = logging.getLogger("gochat.tracing")

KIND_NAMES: Final = {1: "direct", 2: "group", 3: "room"}
#: a DELIVER frame's kind, conv_id, seq, msg_id (message record at offset 12)
_DELIVER_KEY = struct.Struct("<BxQQQ")
_OP_DELIVER = 0x40
#: how long a stopping node waits for its last spans to be exported
SHUTDOWN_TIMEOUT_S = 5.0

_warned_no_sdk = False


def _id(value: int) -> int | str:
    """An id as a span attribute: OTLP integers are signed 64-bit, wire ids are u64."""
    return value if value <= MAX_ID else str(value)


class Tracing:
    """A node's tracer and head-sampling rate (exists only on a node configured for tracing)."""

    def __init__(self, provider: TracerProvider, node: str, rate: float, *, owned: bool = False) -> None:
        from opentelemetry import trace

        self._api = trace
        self.provider = provider
        self.tracer: Tracer = provider.get_tracer("gochat", __version__)
        self.node = node
        #: share of this node's own SENDs traced (a client's sampled traceparent always is)
        self.rate = rate
        self._owned = owned

    def send(
        self, parent: tuple[int, int, int] | None, started: float, kind: int, conv_id: int, body_len: int
    ) -> SendTrace:
        """The spans of one sampled SEND, from ``started`` (monotonic clock, as ``loop.time()``)."""
        ctx = None
        if parent is not None:
            ctx = self._remote(*parent)
        start_ns = time.time_ns() - int((time.monotonic() - started) * 1e9)
        return SendTrace(self, ctx, start_ns, kind, conv_id, body_len)

    def deliver(self, trace_id: int, span_id: int, flags: int, recipients: int, frame: bytes) -> Span:
        """``gochat.deliver`` on a node that received a traced envelope: a child of the origin's
        ``cluster.publish`` span. End it with :meth:`delivered`."""
        attributes: dict[str, Any] = {"gochat.node": self.node, "gochat.recipients": recipients}
        if len(frame) >= 12 + _DELIVER_KEY.size and frame[5] == _OP_DELIVER:
            kind, conv, seq, msg_id = _DELIVER_KEY.unpack_from(frame, 12)
            attributes.update(
                {
                    "gochat.conv.kind": KIND_NAMES.get(kind, str(kind)),
                    "gochat.conv.id": _id(conv),
                    "gochat.seq": _id(seq),
                    "gochat.msg_id": _id(msg_id),
                }
            )
        return self.tracer.start_span(
            "gochat.deliver",
            self._remote(trace_id, span_id, flags),
            kind=self._api.SpanKind.CONSUMER,
            attributes=attributes,
        )

    @staticmethod
    def delivered(span: Span, connections: int) -> None:
        span.set_attribute("gochat.connections", connections)
        span.end()

    def _remote(self, trace_id: int, span_id: int, flags: int) -> Context:
        api = self._api
        parent = api.SpanContext(trace_id, span_id, is_remote=True, trace_flags=api.TraceFlags(flags & 0xFF))
        ctx: Context = api.set_span_in_context(api.NonRecordingSpan(parent))
        return ctx

    async def shutdown(self) -> None:
        """Export what is still queued and stop the exporter (a provider this node built)."""
        if not self._owned:
            return
        shutdown = getattr(self.provider, "shutdown", None)
        if shutdown is None:
            return
        try:
            await asyncio.wait_for(asyncio.to_thread(shutdown), SHUTDOWN_TIMEOUT_S)
        except TimeoutError:
            log.warning("tracing: spans not exported within %.0f s of stopping", SHUTDOWN_TIMEOUT_S)


class SendTrace:
    """The spans of one sampled SEND, opened and closed stage by stage as the send path goes
    (built only for a sampled SEND: an unsampled one has no object at all)."""

    __slots__ = ("_api", "_ctx", "_open", "_tracer", "receive", "route_ctx", "stage")

    def __init__(
        self, tracing: Tracing, parent: Context | None, start_ns: int, kind: int, conv_id: int, body_len: int
    ) -> None:
        api = self._api = tracing._api
        tracer = self._tracer = tracing.tracer
        self.receive: Span = tracer.start_span(
            "gochat.receive",
            parent,
            kind=api.SpanKind.SERVER,
            attributes={
                "gochat.node": tracing.node,
                "gochat.conv.kind": KIND_NAMES.get(kind, str(kind)),
                "gochat.conv.id": _id(conv_id),
                "gochat.body_bytes": body_len,
            },
            start_time=start_ns,
        )
        self._ctx = api.set_span_in_context(self.receive)
        #: the stage now open (validate, commit, route), if any
        self.stage: Span | None = tracer.start_span("validate", self._ctx, start_time=start_ns)
        self._open = True
        #: the route span's context: parent of fanout.local and cluster.publish
        self.route_ctx: Context | None = None

    def _next(self, name: str, attributes: dict[str, Any] | None = None) -> Span:
        if self.stage is not None:
            self.stage.end()
        span = self.stage = self._tracer.start_span(name, self._ctx, attributes=attributes)
        return span

    def committing(self, recipients: int) -> None:
        """Validated: the SEND goes to the store."""
        self.receive.set_attribute("gochat.recipients", recipients)
        self._next("commit")

    def committed(self, seq: int, msg_id: int, duplicate: bool) -> None:
        """The store's callback: the commit span ends; a new message's route span starts."""
        self.receive.set_attributes({"gochat.seq": seq, "gochat.msg_id": msg_id, "gochat.duplicate": duplicate})
        if not duplicate:
            self.route_ctx = self._api.set_span_in_context(self._next("route"))
        elif self.stage is not None:  # a retry: answered with the original's SEND_ACK, no fan-out
            self.stage.end()
            self.stage = None

    def routing(self) -> None:
        """A room message: no store, straight to the fan-out."""
        self.route_ctx = self._api.set_span_in_context(self._next("route"))

    def fanout_local(self, recipients: int) -> Span:
        """``fanout.local``: end it with :meth:`fanned_out`."""
        return self._tracer.start_span("fanout.local", self.route_ctx, attributes={"gochat.recipients": recipients})

    @staticmethod
    def fanned_out(span: Span, connections: int) -> None:
        span.set_attribute("gochat.connections", connections)
        span.end()

    def publish(self, node: str, recipients: int) -> tuple[Span, int, int, int]:
        """``cluster.publish`` to ``node`` (the link's router): the span, and the trace id, span id
        and trace flags the envelope carries. End it with :func:`end_spans`."""
        span = self._tracer.start_span(
            "cluster.publish",
            self.route_ctx,
            kind=self._api.SpanKind.PRODUCER,
            attributes={"gochat.peer": node, "gochat.recipients": recipients},
        )
        c = span.get_span_context()
        return span, c.trace_id, c.span_id, int(c.trace_flags)

    def end(self) -> None:
        """Answered: SEND_ACK queued."""
        if self._open:
            self._open = False
            if self.stage is not None:
                self.stage.end()
                self.stage = None
            self.receive.end()

    def failed(self, code: int, message: str = "") -> None:
        """Answered with ERROR ``code``: the open stage and the SEND's span end in error."""
        if not self._open:
            return
        self._open = False
        status = self._api.Status(self._api.StatusCode.ERROR, message or f"error {int(code)}")
        if self.stage is not None:
            self.stage.set_status(status)
            self.stage.end()
            self.stage = None
        self.receive.set_attribute("gochat.error.code", int(code))
        self.receive.set_status(status)
        self.receive.end()

    def error(self, exc: BaseException) -> None:
        """Answered with the ERROR for ``exc`` (INTERNAL for anything not a GochatError)."""
        code = getattr(exc, "code", 500)
        self.failed(int(code), str(getattr(exc, "message", "")) or type(exc).__name__)


def end_spans(spans: Iterable[Span], error: BaseException | None = None) -> None:
    """End ``spans`` (``cluster.publish``), in error when the publish failed."""
    status = None
    for span in spans:
        if error is not None:
            if status is None:
                from opentelemetry.trace import Status, StatusCode

                status = Status(StatusCode.ERROR, repr(error))
            span.set_status(status)
        span.end()


def setup_tracing(settings: Settings, node: str, provider: TracerProvider | None = None) -> Tracing | None:
    """The node's :class:`Tracing`, or None: tracing off (``trace_sample_rate`` 0 and no
    ``otlp_endpoint``), or the SDK is missing. ``provider`` (tests: an SDK provider with an
    in-memory exporter) replaces the one built from the settings."""
    if provider is not None:
        return Tracing(provider, node, settings.trace_sample_rate)
    if settings.trace_sample_rate <= 0 and not settings.otlp_endpoint:
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ALWAYS_ON
    except ImportError as exc:
        global _warned_no_sdk
        if not _warned_no_sdk:
            _warned_no_sdk = True
            log.warning(
                "tracing configured (trace_sample_rate=%s, otlp_endpoint=%r) but the OpenTelemetry SDK "
                "is not installed (pip install 'gochat[otel]'): nothing is traced (%s)",
                settings.trace_sample_rate,
                settings.otlp_endpoint,
                exc,
            )
        return None
    resource = Resource.create(
        {
            "service.name": os.environ.get("OTEL_SERVICE_NAME", "gochat"),
            "service.version": __version__,
            "service.instance.id": node,
            "gochat.node": node,
        }
    )
    # gochat samples at the head (the send path); the SDK records every span it is asked for
    sdk = SdkTracerProvider(resource=resource, sampler=ALWAYS_ON)
    endpoint = settings.otlp_endpoint or None  # None: the SDK's OTEL_EXPORTER_OTLP_* variables
    if endpoint is not None and endpoint.rstrip("/").count("/") <= 2:  # no path: the OTLP default
        endpoint = endpoint.rstrip("/") + "/v1/traces"
    sdk.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    log.info(
        "tracing on: sample rate %s, OTLP/HTTP to %s", settings.trace_sample_rate, endpoint or "the SDK default"
    )
    return Tracing(sdk, node, settings.trace_sample_rate, owned=True)
