"""One request's span and counters on a worker.

The worker's span is a child of the router's (trace context from the call's metadata);
``queue``, ``prefill`` and ``decode`` are recorded after the fact from times the worker
already has (the engine's queueing time on the first output, the stream's own timestamps),
so tracing adds nothing to the engine loop, and with tracing off (a non-recording span) only
the per-request counters are left.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import grpc
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind

from kvmesh.telemetry import incoming_context, record_span, start_span
from kvmesh_proto.v1 import worker_pb2
from services.worker import metrics


def record_prefill_phases(span: Span, started_s: float, queue_s: float, prefill_s: float, prompt_tokens: int,
                          cached_tokens: int) -> None:  # fmt: skip
    """``queue`` then ``prefill`` spans under ``span``, starting at ``started_s`` (wall clock)."""
    if not span.is_recording():
        return
    record_span("queue", span, started_s, started_s + queue_s)
    record_span("prefill", span, started_s + queue_s, started_s + queue_s + prefill_s, {
        "kvmesh.prefill.cached_tokens": cached_tokens,
        "kvmesh.prefill.computed_tokens": prompt_tokens - cached_tokens,
    })  # fmt: skip


class WorkerRequestTrace:
    """Opened when a Generate/Decode stream starts, finished when it ends."""

    def __init__(self, name: str, grpc_context: grpc.aio.ServicerContext, request: worker_pb2.WorkerGenerateRequest,
                 path: str) -> None:  # fmt: skip
        self.started_s = time.time()
        self.prompt_tokens = len(request.token_ids)
        self.path = path
        self.span = start_span(name, incoming_context(grpc_context), SpanKind.SERVER, self.started_s, {
            "gen_ai.request.model": request.model, "gen_ai.request.max_tokens": request.sampling.max_tokens,
            "gen_ai.usage.input_tokens": self.prompt_tokens, "kvmesh.request_id": request.request_id,
            "kvmesh.prefill.path": path,
        })  # fmt: skip
        self._recording = self.span.is_recording()
        self.tokens = 0
        self.cached_tokens = 0
        self._first_s = self._last_s = 0.0
        self._max_gap_s = 0.0

    def on_response(self, response: worker_pb2.WorkerGenerateResponse) -> None:
        if self.tokens == 0:
            self.cached_tokens = response.cached_tokens
            self._first_s = self._last_s = time.time()
            timings = response.timings
            if self.path == "local":  # remote: the prefill worker's own span holds these phases
                    record_prefill_phases(self.span, self.started_s, timings.queue_s, timings.prefill_s,
                                      self.prompt_tokens, self.cached_tokens)
        elif self._recording:
            now = time.time()
            self._max_gap_s = max(self._max_gap_s, now - self._last_s)
            self._last_s = now
        self.tokens += len(response.token_ids)

    @contextlib.contextmanager
    def kv_transfer(self) -> Iterator[Span]:
        """The current span while the decode worker pulls KV (its metadata carries it on)."""
        with trace.use_span(start_span("kv_transfer", self.span, SpanKind.CLIENT), end_on_exit=True) as span:
            yield span

    def transferred(self, span: Span, size_bytes: int, blocks: int, seconds: float, wire_seconds: float,
                    transport: str) -> None:  # fmt: skip
        metrics.observe_transfer("received", size_bytes, blocks)
        metrics.TRANSFER_SECONDS.observe(seconds)
        span.set_attributes({"kvmesh.transfer.bytes": size_bytes, "kvmesh.transfer.blocks": blocks,
                             "kvmesh.transfer.transport": transport,
                             "kvmesh.transfer.wire_seconds": wire_seconds,
                             "kvmesh.transfer.mb_per_s": size_bytes / 1e6 / wire_seconds if wire_seconds else 0.0})

    def finish(self) -> None:
        metrics.REQUESTS.labels(self.path).inc()
        metrics.PROMPT_TOKENS.inc(self.prompt_tokens)
        metrics.CACHED_TOKENS.inc(self.cached_tokens)
        metrics.GENERATED_TOKENS.inc(self.tokens)
        if not self._recording:
            return
        if self.tokens > 1:
            decoded = self.tokens - 1
            record_span("decode", self.span, self._first_s, self._last_s, {
                "kvmesh.decode.tokens": decoded,
                "kvmesh.decode.itl_mean_s": (self._last_s - self._first_s) / decoded,
                "kvmesh.decode.itl_max_s": self._max_gap_s,
            })  # fmt: skip
        self.span.set_attributes({"gen_ai.usage.output_tokens": self.tokens,
                                  "kvmesh.prefill.cached_tokens": self.cached_tokens,
                                  "kvmesh.prefill.path": self.path})  # fmt: skip
        self.span.end()
