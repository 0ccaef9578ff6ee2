"""The KvTransfer gRPC service: the prefill half of disaggregated serving."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from kvmesh.telemetry import incoming_context, start_span
from kvmesh_proto.v1 import transfer_pb2, transfer_pb2_grpc
from services.engine.async_engine import AsyncEngine
from services.worker.disagg import serve_prefill
from services.worker.errors import engine_errors_as_status
from services.worker.kv_wire import WireChunk
from services.worker.metrics import observe_transfer
from services.worker.peer_fetch import serve_cached


class KvTransferServicer(transfer_pb2_grpc.KvTransferServicer):
    def __init__(self, engine: AsyncEngine, prefill_chunk_tokens: int = 0) -> None:
        self.engine = engine
        self.prefill_chunk_tokens = prefill_chunk_tokens

    async def PullBlocks(
        self, request: transfer_pb2.PullBlocksRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[WireChunk]:
        if not request.HasField("request"):
            # A peer fetch: only what this worker already holds, nothing computed.
            async with engine_errors_as_status(context):
                for chunk in await serve_cached(self.engine, request):
                    observe_transfer("sent", chunk.size, len(chunk.header.block_indices))
                    yield chunk
            return
        model = self.engine.engine.model_id
        if request.request.model and request.request.model != model:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"this worker serves {model}, not {request.request.model}")  # fmt: skip
        span = start_span("worker.PullBlocks", incoming_context(context), SpanKind.SERVER,
                          attributes={"kvmesh.request_id": request.request_id})  # fmt: skip
        with trace.use_span(span, end_on_exit=True):
            async with engine_errors_as_status(context):
                async for chunk in serve_prefill(self.engine, request, self.prefill_chunk_tokens):
                    observe_transfer("sent", chunk.size,
                                     len(chunk.header.block_indices) if not chunk.header.layer_start else 0)
                    yield chunk
