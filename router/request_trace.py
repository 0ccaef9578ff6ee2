"""One request's trace, metrics and timeline at the router.

The root span (``generate``) lives from arrival to the last token; ``tokenize`` and ``route``
are its children here, the worker's span is its child across gRPC (the call's metadata
carries it), and ``detokenize`` is recorded when the stream ends. Each finished request also
leaves a ``RequestRecord`` (the same phases, from the router's clocks and the worker's
``WorkerTimings``) in a bounded buffer that ``GET /dashboard`` reads, so the dashboard works
whether or not tracing is on or this request was sampled.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import grpc
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from kvmesh.telemetry import outgoing_metadata, record_span, start_span, tracer
from kvmesh_proto.v1 import worker_pb2
from router import metrics

if TYPE_CHECKING:
    from router.pipeline import GenerationInput, RouteInfo

RECENT_REQUESTS = 200
ITL_SAMPLES = 4096


@dataclasses.dataclass
class RequestRecord:
    """Where one finished request's time went, in seconds (0 for phases it did not have)."""

    request_id: str
    finished_unix: float
    status: str
    route: str = "none"
    worker: str = ""
    prefill_worker: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    tokenize_s: float = 0.0
    route_s: float = 0.0
    queue_s: float = 0.0
    prefill_s: float = 0.0
    transfer_s: float = 0.0
    decode_s: float = 0.0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    trace_id: str = ""


class RecentRequests:
    """The router's memory for the dashboard: the last requests, recent ITLs, all-time counts."""

    def __init__(self, size: int = RECENT_REQUESTS) -> None:
        self.records: collections.deque[RequestRecord] = collections.deque(maxlen=size)
        self.itl_s: collections.deque[float] = collections.deque(maxlen=ITL_SAMPLES)
        self.by_route: collections.Counter[str] = collections.Counter()
        self.by_status: collections.Counter[str] = collections.Counter()

    def add(self, record: RequestRecord) -> None:
        self.records.append(record)
        self.by_route[record.route] += 1
        self.by_status[record.status] += 1


def _status_of(error: BaseException | None, finish_reason: str) -> str:
    if error is None:
        return "ok" if finish_reason else "cancelled"
    code = getattr(error, "code", None)
    return code.name.lower() if isinstance(code, grpc.StatusCode) else "error"


class RouterRequestTrace:
    def __init__(self, request: GenerationInput, router_mode: str, recent: RecentRequests) -> None:
        self.router_mode = router_mode
        self.recent = recent
        self.started_s = time.time()
        self._t0 = time.perf_counter()
        self.span = start_span("generate", None, SpanKind.SERVER, self.started_s, {
            "gen_ai.operation.name": "chat" if request.messages is not None else "text_completion",
            "gen_ai.request.model": request.model, "gen_ai.request.max_tokens": request.sampling.max_tokens,
            "gen_ai.request.temperature": request.sampling.temperature,
        })  # fmt: skip
        self._recording = self.span.is_recording()
        self.record = RequestRecord("", 0.0, "")
        self.route: RouteInfo | None = None
        self._first_s = self._last_s = 0.0
        self._detokenize_s = 0.0
        self._finished = False
        self._itl = None

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[Span]:
        """A router-side phase (tokenize, route): a child span and its duration in the record."""
        started = time.perf_counter()
        with tracer().start_as_current_span(name, trace.set_span_in_context(self.span)) as span:
            yield span
        setattr(self.record, f"{name}_s", getattr(self.record, f"{name}_s") + time.perf_counter() - started)

    def routed(self, span: Span, route: RouteInfo, prompt_tokens: int) -> None:
        self.route = route
        self._itl = metrics.ITL.labels(route.mode)  # looked up once, observed on every chunk
        self.record.prompt_tokens = prompt_tokens
        ratio = route.prefix_overlap / route.prompt_blocks if route.prompt_blocks else 0.0
        metrics.ROUTING_DECISIONS.labels(route.mode, route.worker_id).inc()
        metrics.OVERLAP_RATIO.labels(route.mode).observe(ratio)
        if span.is_recording():
            span.set_attributes({
                "kvmesh.route.mode": route.mode, "kvmesh.route.worker": route.worker_id,
                "kvmesh.route.index": route.index,
                "kvmesh.route.overlap_blocks": route.prefix_overlap, "kvmesh.route.prompt_blocks": route.prompt_blocks,
                "kvmesh.route.runner_up_score": -1.0 if route.runner_up_cost is None else route.runner_up_cost,
                "kvmesh.route.prefill_worker": route.prefill_worker.worker_id if route.prefill_worker else "",
            })  # fmt: skip

    def call_metadata(self) -> tuple[tuple[str, str], ...] | None:
        return outgoing_metadata(self.span)

    def first_response(self, response: worker_pb2.WorkerGenerateResponse) -> None:
        self._first_s = self._last_s = time.perf_counter()
        timings = response.timings
        self.record.queue_s, self.record.prefill_s = timings.queue_s, timings.prefill_s
        self.record.transfer_s = timings.transfer_s
        self.record.cached_tokens = response.cached_tokens

    def detokenize(self, push: Callable[[list[int]], str], token_ids: list[int]) -> str:
        """Stream text for ``token_ids`` and count the gap since the previous tokens as an ITL."""
        now = time.perf_counter()
        if self.record.output_tokens:
            gap = now - self._last_s
            (self._itl or metrics.ITL.labels("none")).observe(gap)
            self.recent.itl_s.append(gap)
        self._last_s = now
        self.record.output_tokens += len(token_ids)
        delta = push(token_ids)
        if self._recording:
            self._detokenize_s += time.perf_counter() - now
        return delta

    def finish(self, error: BaseException | None = None, request_id: str = "", finish_reason: str = "") -> None:
        """Close the span, count the request and keep its record (once, whatever ends it)."""
        if self._finished:
            return
        self._finished = True
        record, route = self.record, self.route
        record.request_id, record.finished_unix = request_id, time.time()
        record.status = _status_of(error, finish_reason)
        record.e2e_s = time.perf_counter() - self._t0
        if route is not None:
            record.route, record.worker = route.mode, route.worker_id
            record.prefill_worker = route.prefill_worker.worker_id if route.prefill_worker else ""
        if self._first_s:
            record.ttft_s = self._first_s - self._t0
            record.decode_s = self._last_s - self._first_s
            metrics.TTFT.labels(record.route).observe(record.ttft_s)
            metrics.PROMPT_TOKENS.labels(record.route).inc(record.prompt_tokens)
            metrics.CACHED_TOKENS.labels(record.route).inc(record.cached_tokens)
            metrics.OUTPUT_TOKENS.labels(record.route).inc(record.output_tokens)
        if record.status == "ok":
            metrics.E2E.labels(record.route).observe(record.e2e_s)
        metrics.REQUESTS.labels(record.status, self.router_mode, record.route).inc()
        if self._recording:
            record.trace_id = format(self.span.get_span_context().trace_id, "032x")
            self._end_span(error, finish_reason)
        self.recent.add(record)

    def _end_span(self, error: BaseException | None, finish_reason: str) -> None:
        record = self.record
        if self._first_s:
            first_s = self.started_s + record.ttft_s
            record_span("detokenize", self.span, first_s, first_s + record.decode_s,
                        {"kvmesh.detokenize.cpu_s": self._detokenize_s})  # fmt: skip
        self.span.set_attributes({
            "kvmesh.request_id": record.request_id, "kvmesh.route.mode": record.route,
            "gen_ai.usage.input_tokens": record.prompt_tokens, "gen_ai.usage.output_tokens": record.output_tokens,
            "kvmesh.cached_tokens": record.cached_tokens, "kvmesh.ttft_s": record.ttft_s,
            "gen_ai.response.finish_reasons": [finish_reason or record.status],
        })  # fmt: skip
        if error is not None:
            self.span.set_status(Status(StatusCode.ERROR, str(error)))
        self.span.end()

