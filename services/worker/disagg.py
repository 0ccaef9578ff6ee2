"""Disaggregated serving, both halves.

Who initiates: the **decode worker pulls**. The router sends the request to the decode
worker (with the chosen prefill worker's address); the decode worker tells the prefill
worker which leading blocks it already holds (``skip_blocks``), and the prefill worker
computes the prompt and the first token and streams back only the missing blocks on the
same call. Pull keeps one owner for the request's life (the decode worker, whose memory
the blocks land in), needs no transfer ids or rendezvous between two calls, gives
backpressure for free, and makes failure simple: if the stream breaks or a chunk is
corrupt, the decode worker prefills locally and the client sees only latency.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc

from kvmesh.grpc_service import mesh_channel
from kvmesh_proto.v1 import common_pb2, transfer_pb2, transfer_pb2_grpc, worker_pb2
from services.engine.async_engine import AsyncEngine
from services.engine.sampling_params import SamplingParams
from services.worker.convert import sampling_from_proto
from services.worker.kv_wire import DEFAULT_CHUNK_BLOCKS, ChunkAssembler, export_to_chunks

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PulledPrefill:
    """What a decode worker got from a prefill worker."""

    first_token: common_pb2.TokenLogprob
    cached_tokens: int
    assembler: ChunkAssembler
    seconds: float
    # From the first chunk's arrival to the last's: the wire's share (the rest is prefill compute).
    transfer_seconds: float


@dataclasses.dataclass
class TransferStats:
    """Decode-side totals, for stats and metrics."""

    transfers: int = 0
    bytes: int = 0
    seconds: float = 0.0
    fallbacks: int = 0

    def record(self, pulled: PulledPrefill) -> None:
        self.transfers += 1
        self.bytes += pulled.assembler.bytes_received
        self.seconds += pulled.seconds


async def serve_prefill(
    engine: AsyncEngine, pull: transfer_pb2.PullBlocksRequest
) -> AsyncIterator[transfer_pb2.KvBlockChunk]:
    """The prefill worker's side: compute prompt + first token, keep the blocks cached here,
    stream the blocks the decode worker lacks."""
    request = pull.request
    sampling: SamplingParams = dataclasses.replace(sampling_from_proto(request.sampling), max_tokens=1, stop=[])
    prefill_id = f"prefill-{request.request_id}-{uuid.uuid4().hex[:6]}"
    last = None
    async for output in engine.generate(prefill_id, list(request.token_ids), sampling, keep_kv=True):
        last = output
    export = await engine.run(lambda e: e.export_kv(prefill_id, release=True))
    chunks = list(export_to_chunks(export, pull.skip_blocks, pull.chunk_blocks or DEFAULT_CHUNK_BLOCKS,
                                   pull.transfer_id, request.request_id))  # fmt: skip
    if not chunks:
        chunks = [transfer_pb2.KvBlockChunk(transfer_id=pull.transfer_id, request_id=request.request_id)]
    final = chunks[-1]
    final.last = True
    final.num_tokens = export.num_tokens
    final.cached_tokens = last.num_cached_tokens
    lp = (last.logprobs or [None])[0]
    final.first_token.CopyFrom(common_pb2.TokenLogprob(
        token_id=last.new_token_ids[0], logprob=lp.logprob if lp else 0.0,
        top_token_ids=lp.top_token_ids if lp else [], top_logprobs=lp.top_logprobs if lp else [],
    ))  # fmt: skip
    for chunk in chunks:
        yield chunk


async def pull_prefill(
    prefill_address: str, request: worker_pb2.WorkerGenerateRequest, skip_blocks: int, timeout_s: float
) -> PulledPrefill:
    """The decode worker's side: ask the prefill worker for the prompt's KV and first token."""
    started = time.monotonic()
    first_chunk_at = None
    assembler = ChunkAssembler(skip_blocks)
    pull = transfer_pb2.PullBlocksRequest(transfer_id=uuid.uuid4().hex, request_id=request.request_id,
                                          request=request, skip_blocks=skip_blocks)  # fmt: skip
    async with mesh_channel(prefill_address) as channel:
        async for chunk in transfer_pb2_grpc.KvTransferStub(channel).PullBlocks(pull, timeout=timeout_s):
            first_chunk_at = first_chunk_at or time.monotonic()
            assembler.add(chunk)
    last = assembler.last
    if last is None:
        raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, None, None, "prefill stream ended early")
    done = time.monotonic()
    return PulledPrefill(last.first_token, last.cached_tokens, assembler, done - started, done - first_chunk_at)
