"""Peer fetch: pull a prompt's leading KV blocks from another worker instead of recomputing them.

The router names a peer that holds more of the prompt's prefix than the chosen worker
(``kv_peer_address``, ``kv_peer_blocks``). The worker pulls the blocks it lacks over the
KV-transfer stream (``KvTransfer.PullBlocks`` without a request: the peer only reads what it
holds, in any tier, and computes nothing), checks each chunk, and keeps them as cached blocks,
so the request's own prefix match then finds them. It does so only while its measured cost of
a block over the wire is below its measured cost of computing one; both are running averages
of what this worker saw. A failed pull costs only the time it took: the blocks are recomputed.
"""

from __future__ import annotations

import logging
import time
import uuid

import grpc

from kvmesh.hashing import block_hashes
from kvmesh_proto.v1 import transfer_pb2, worker_pb2
from services.engine.async_engine import AsyncEngine
from services.engine.kv_transfer import KvExport
from services.worker.kv_receive import ChunkAssembler, receive_into
from services.worker.kv_wire import TransferError, WireChunk, closing_chunks
from services.worker.metrics import observe_transfer

log = logging.getLogger(__name__)

# Weight of the newest sample in the running averages.
_SMOOTHING = 0.3


class PeerFetcher:
    """One worker's peer fetches and the two per-block costs that decide them."""

    def __init__(self, engine: AsyncEngine, block_size: int, timeout_s: float, transfer_s_per_block: float,
                 prefill_s_per_block: float) -> None:
        self.engine = engine
        self.block_size = block_size
        self.timeout_s = timeout_s
        self.transfer_s_per_block = transfer_s_per_block
        self.prefill_s_per_block = prefill_s_per_block
        self.fetched_blocks = 0
        self.failures = 0

    def observe_prefill(self, seconds: float, computed_tokens: int) -> None:
        """A local prefill's time (first token) over the blocks it computed."""
        blocks = computed_tokens / self.block_size
        if blocks >= 1:
            self.prefill_s_per_block += _SMOOTHING * (seconds / blocks - self.prefill_s_per_block)

    async def fetch(self, request: worker_pb2.WorkerGenerateRequest) -> int:
        """Pull the hinted peer's blocks this worker lacks, when cheaper than computing them;
        returns how many blocks were kept."""
        tokens = list(request.token_ids)
        want = min(request.kv_peer_blocks, (len(tokens) - 1) // self.block_size)
        held = await self.engine.run(lambda e: e.held_prefix_blocks(tokens))
        if want <= held or self.transfer_s_per_block >= self.prefill_s_per_block:
            return 0
        started = time.monotonic()
        try:
            hashes = block_hashes(tokens[: want * self.block_size], self.block_size)
            kv = await pull_cached(request.kv_peer_address, hashes, held, self.timeout_s)
            if kv is None:
                return 0
            kept = await self.engine.run(lambda e: e.import_cached(tokens, kv))
        except (grpc.aio.AioRpcError, TransferError, ValueError) as exc:
            self.failures += 1
            log.warning("peer fetch of %s from %s failed (%s); recomputing", request.request_id,
                        request.kv_peer_address, exc)
            return 0
        seconds = (time.monotonic() - started) / kv.num_blocks
        self.transfer_s_per_block += _SMOOTHING * (seconds - self.transfer_s_per_block)
        self.fetched_blocks += kept
        return kept



async def pull_cached(address: str, hashes: list[int], skip: int, timeout_s: float) -> KvExport | None:
    """The blocks ``skip..`` of the chain ``hashes`` that the worker at ``address`` holds, checked
    chunk by chunk; None when it holds none of them (raises TransferError or gRPC's error)."""
    assembler = ChunkAssembler(skip)
    pull = transfer_pb2.PullBlocksRequest(transfer_id=uuid.uuid4().hex, block_hashes=hashes, skip_blocks=skip)
    await receive_into(assembler, address, pull, timeout_s)
    if not assembler.blocks_received:
        return None
    observe_transfer("received", assembler.bytes_received, assembler.blocks_received)
    return assembler.kv([])


async def serve_cached(engine: AsyncEngine, pull: transfer_pb2.PullBlocksRequest) -> list[WireChunk]:
    """The peer's side: the leading blocks of ``pull.block_hashes`` held here (any tier) from
    ``skip_blocks`` on, as chunks; the last chunk says how many tokens they cover."""
    export = await engine.run(lambda e: e.export_cached(list(pull.block_hashes), pull.skip_blocks))
    return closing_chunks(export, export.first_block, pull.chunk_blocks, pull.transfer_id, pull.request_id)
