"""The KvTransfer gRPC service: the prefill half of disaggregated serving."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from kvmesh.telemetry import incoming_context, start_span
from kvmesh_proto.v1 import transfer_pb2, transfer_pb2_grpc
from services.engine.async_engine import AsyncEngine
from services.worker.disagg import serve_prefill
from services.worker.errors import engine_errors_as_status
from services.worker.kv_tcp import TcpDataListener
from services.worker.kv_wire import WireChunk, encoded_ahead
from services.worker.metrics import observe_transfer
from services.worker.peer_fetch import serve_cached
from services.worker.transfer_streams import MAX_STREAMS, TransferStreams


async def _as_stream(chunks: list[WireChunk]) -> AsyncIterator[WireChunk]:
    for chunk in chunks:
        yield chunk


async def _counted(chunks: AsyncIterator[WireChunk]) -> AsyncIterator[WireChunk]:
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            observe_transfer("sent", chunk.size, len(chunk.header.block_indices) if not chunk.header.layer_start else 0)
            yield chunk


def _on_the_wire(chunks: AsyncIterator[WireChunk]) -> AsyncIterator[bytes]:
    """``chunks`` counted in the transfer metrics and encoded ahead of gRPC asking for them."""
    return encoded_ahead(_counted(chunks))


class TransferSender:
    """Where a pull's chunks go: its own stream, parallel streams (``TransferStreams``) or, when
    asked and offered (``tcp``: a listener, None when the worker runs TLS), TCP connections."""

    def __init__(self, tcp_host: str | None = None, tcp_port: int = 0) -> None:
        self.streams = TransferStreams()
        self.tcp = TcpDataListener(tcp_host, tcp_port, self.follow) if tcp_host is not None else None

    def follow(self, transfer_id: str, index: int) -> AsyncIterator[bytes]:
        """The encoded chunks dealt to stream (or TCP connection) ``index`` of a transfer."""
        return _on_the_wire(self.streams.follow(transfer_id, index))

    async def send(self, chunks: AsyncIterator[WireChunk], pull: transfer_pb2.PullBlocksRequest
                   ) -> AsyncIterator[bytes]:  # fmt: skip
        """Stream 0's messages: its share of ``chunks`` (all of them with one stream) or, over
        TCP, only the offer of the data port, while the chunks are dealt to the connections."""
        connections = pull.tcp_connections  # at most MAX_STREAMS: checked by PullBlocks
        if not connections or self.tcp is None:  # TCP not asked, or not offered: on gRPC streams
            async for message in _on_the_wire(self.streams.deal(chunks, pull.transfer_id, pull.streams)):
                yield message
            return
        token = self.tcp.offer(pull.transfer_id, connections)
        dealt = False
        try:
            yield transfer_pb2.KvBlockChunk(transfer_id=pull.transfer_id, request_id=pull.request_id,
                                            data_port=self.tcp.port, data_token=token).SerializeToString()
            async for _ in self.streams.deal(chunks, pull.transfer_id, connections, keep_own=False):
                pass  # all handed to the connections
            dealt = True
        finally:
            if not dealt:  # the call ended before the deal did (or began): end its connections
                self.tcp.withdraw(token)
                self.streams.end(pull.transfer_id, connections)


class KvTransferServicer(transfer_pb2_grpc.KvTransferServicer):
    def __init__(self, engine: AsyncEngine, prefill_chunk_tokens: int = 0, sender: TransferSender | None = None
                 ) -> None:  # fmt: skip
        self.engine = engine
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.sender = sender or TransferSender()

    async def PullBlocks(
        self, request: transfer_pb2.PullBlocksRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        if request.streams > MAX_STREAMS or request.stream_index >= max(request.streams, 1):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"stream {request.stream_index} of "
                                f"{request.streams}: a transfer takes 1 to {MAX_STREAMS} streams, numbered from 0")
        if request.tcp_connections > MAX_STREAMS or (request.tcp_connections and request.streams > 1):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{request.tcp_connections} TCP connections "
                                f"and {request.streams} streams: a transfer takes up to {MAX_STREAMS} connections, "
                                "on one stream")  # fmt: skip
        if request.stream_index:
            # Another stream of a transfer whose stream 0 carries the request: its share, as dealt.
            async for message in self.sender.follow(request.transfer_id, request.stream_index):
                yield message
            return
        if not request.HasField("request"):
            # A peer fetch: only what this worker already holds, nothing computed.
            async with engine_errors_as_status(context):
                async for message in self.sender.send(_as_stream(await serve_cached(self.engine, request)), request):
                    yield message
            return
        model = self.engine.engine.model_id
        if request.request.model and request.request.model != model:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"this worker serves {model}, not {request.request.model}")  # fmt: skip
        span = start_span("worker.PullBlocks", incoming_context(context), SpanKind.SERVER,
                          attributes={"kvmesh.request_id": request.request_id})  # fmt: skip
        with trace.use_span(span, end_on_exit=True):
            async with engine_errors_as_status(context):
                chunks = serve_prefill(self.engine, request, self.prefill_chunk_tokens)
                async for message in self.sender.send(chunks, request):
                    yield message

