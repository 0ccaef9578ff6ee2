"""The one telemetry setup every kvmesh service runs: traces (OpenTelemetry) and metrics (Prometheus).

Tracing: one trace per request, router → (prefill worker) → decode/aggregated worker →
kvstore. The W3C trace context travels in gRPC metadata (``traceparent``), injected by
``outgoing_metadata`` at the few call sites that carry a request and read back by
``incoming_context`` in the servicers; the gRPC instrumentation package is not used because
it would also trace every stats and KV-event stream, which are not part of any request.
Sampling is decided once, at the router (ratio sampler); downstream services follow the
parent's decision. With the exporter ``off`` no tracer provider is installed, so every span
is OpenTelemetry's no-op span and no metadata is sent: a few attribute-free calls per
request, nothing per token.

Metrics: each service defines its own metrics (``router/metrics.py``, ...) on the default
Prometheus registry; this module serves them over HTTP on ``--metrics-port`` (0 = a free
port, -1 = off). The port is published in the instance's etcd registration
(``InstanceInfo.metrics_port``), so ``kvmesh status`` and scrapers can find it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind

log = logging.getLogger(__name__)

_TRACER_NAME = "kvmesh"
_enabled = False


@dataclass
class Telemetry:
    """What one process set up: where its metrics are served and how to flush its spans."""

    service: str
    metrics_port: int = 0
    _provider: object | None = None
    _metrics_server: object | None = None

    def shutdown(self) -> None:
        """Flush pending spans (a batch exporter holds up to its schedule delay's worth)."""
        if self._provider is not None:
            self._provider.shutdown()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()


def setup_telemetry(
    service: str, host: str, metrics_port: int, trace_exporter: str, otlp_endpoint: str, sample_ratio: float,
    attributes: dict[str, str] | None = None,
) -> Telemetry:
    """Install the process's tracer provider (unless tracing is off) and start its metrics server."""
    telemetry = Telemetry(service)
    if trace_exporter != "off":
        telemetry._provider = _install_tracer_provider(service, trace_exporter, otlp_endpoint, sample_ratio,
                                                       attributes or {})  # fmt: skip
    if metrics_port >= 0:
        from prometheus_client import start_http_server

        server, _thread = start_http_server(metrics_port, addr=host)
        telemetry._metrics_server = server
        telemetry.metrics_port = server.server_port
        log.info("%s metrics on http://%s:%d/metrics", service, host, telemetry.metrics_port)
    return telemetry


def _install_tracer_provider(
    service: str, exporter_name: str, otlp_endpoint: str, sample_ratio: float, attributes: dict[str, str]
) -> object:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    global _enabled
    resource = Resource.create({"service.name": f"kvmesh-{service}", "service.namespace": "kvmesh", **attributes})
    provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(sample_ratio)))
    if exporter_name == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True)
    else:
        exporter = ConsoleSpanExporter(service_name=f"kvmesh-{service}")
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _enabled = True
    log.info("%s tracing: %s exporter%s, sampling %.3g", service, exporter_name,
             f" to {otlp_endpoint}" if exporter_name == "otlp" else "", sample_ratio)  # fmt: skip
    return provider


def tracer() -> trace.Tracer:
    """The kvmesh tracer (a no-op tracer while tracing is off)."""
    return trace.get_tracer(_TRACER_NAME)


def tracing_enabled() -> bool:
    return _enabled


def incoming_context(grpc_context: grpc.aio.ServicerContext) -> otel_context.Context | None:
    """The caller's trace context from the call's metadata (None when tracing is off)."""
    if not _enabled:
        return None
    metadata = grpc_context.invocation_metadata() or ()
    return propagate.extract({key: value for key, value in metadata if isinstance(value, str)})


def outgoing_metadata(parent: Span | None = None) -> Sequence[tuple[str, str]] | None:
    """gRPC metadata carrying ``parent``'s (default: the current span's) trace context."""
    if not _enabled:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(parent) if parent is not None else None)
    return tuple(carrier.items()) or None


def start_span(
    name: str, parent: Span | otel_context.Context | None = None, kind: SpanKind = SpanKind.INTERNAL,
    start_time_s: float | None = None, attributes: dict | None = None,
) -> Span:
    """A span that is not made current (for spans that outlive one coroutine step, e.g. a
    stream); children name it as ``parent``. Times are ``time.time()`` seconds."""
    ctx = trace.set_span_in_context(parent) if isinstance(parent, Span) else parent
    start_ns = int(start_time_s * 1e9) if start_time_s is not None else None
    return tracer().start_span(name, context=ctx, kind=kind, start_time=start_ns, attributes=attributes)


def record_span(
    name: str, parent: Span, start_s: float, end_s: float, attributes: dict | None = None
) -> None:
    """A finished span for a phase measured after the fact (queue, prefill, decode ...)."""
    if not parent.is_recording():
        return
    span = start_span(name, parent, start_time_s=start_s, attributes=attributes)
    span.end(end_time=int(end_s * 1e9))
