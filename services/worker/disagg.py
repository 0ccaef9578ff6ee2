"""Disaggregated serving, both halves.

Who initiates: the **decode worker pulls**. The router sends the request to the decode
worker (with the chosen prefill worker's address); the decode worker tells the prefill
worker which leading blocks it already holds (``skip_blocks``), and the prefill worker
computes the prompt and the first token and streams back only the missing blocks on the
same call. Pull keeps one owner for the request's life (the decode worker, whose memory
the blocks land in), needs no transfer ids or rendezvous between two calls, gives
backpressure for free, and makes failure simple. Before pulling, the decode worker reserves
pool blocks for the prompt (``Engine.reserve_kv``) and each chunk is written straight into
them as it arrives; they are named (matchable) only once the last chunk has arrived and
checked out, and freed when no pull succeeds, so a broken, corrupt or timed-out stream
leaves nothing behind.

Retry: the router names the chosen prefill worker and, best first, the other prefill workers
it could have chosen. A failed pull (worker gone, corrupt chunk, timeout) moves to the next
one; with none left, a corrupt chunk (a fault of the bytes, not of the worker) is retried
once on the same worker, which by then holds the prompt's blocks cached; after that the
decode worker prefills locally. The client sees latency, never an error.

Overlap: the prefill worker computes the prompt in steps of ``prefill_chunk_tokens`` and,
after each engine step, exports the blocks that became full and streams them while the
engine computes the next step; the last chunk carries the partial tail block and the first
token.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc
from opentelemetry import trace

from kvmesh_proto.v1 import common_pb2, transfer_pb2, worker_pb2
from services.engine.async_engine import AsyncEngine, EngineDeadError
from services.engine.kv_transfer import KvExport, KvReservation
from services.engine.llm_engine import Engine
from services.engine.sampling_params import SamplingParams
from services.worker.convert import sampling_from_proto
from services.worker.kv_receive import ChunkAssembler, receive_into, spread
from services.worker.kv_tcp import DataConnectionError
from services.worker.kv_wire import TransferError, WireChunk, closing_chunks, export_to_chunks
from services.worker.metrics import TRANSFER_FALLBACKS
from services.worker.request_trace import record_prefill_phases

log = logging.getLogger(__name__)

NO_TCP_S = 600.0


@dataclasses.dataclass
class PulledPrefill:
    """What a decode worker got from a prefill worker."""

    prefill_address: str
    first_token: common_pb2.TokenLogprob
    cached_tokens: int
    assembler: ChunkAssembler
    seconds: float
    # From the first chunk's arrival to the last's (with overlap, compute runs meanwhile).
    transfer_seconds: float
    first_chunk_bytes: int
    transport: str  # what carried the chunks: "tcp" connections or "grpc" streams


@dataclasses.dataclass
class TransferStats:
    """Decode-side counts of pulls retried elsewhere and of local-prefill fallbacks."""

    retries: int = 0
    fallbacks: int = 0
    # Prefill workers whose offered TCP data port could not be reached, and until when (monotonic)
    # they are pulled from over gRPC instead.
    no_tcp: dict[str, float] = dataclasses.field(default_factory=dict)

    def tcp_reachable(self, address: str) -> bool:
        until = self.no_tcp.get(address)
        if until is not None and time.monotonic() >= until:
            del self.no_tcp[address]
        return address not in self.no_tcp

    def fell_back(self) -> None:
        """A request meant for remote prefill was prefilled here after all."""
        self.fallbacks += 1
        TRANSFER_FALLBACKS.inc()


class FinishedBlocks:
    """The prefill's blocks not sent yet; ``__call__`` runs on the engine thread after every
    step and hands the blocks that became full to the event loop (read only there)."""

    def __init__(self, request_id: str, first_block: int, queue: asyncio.Queue) -> None:
        self.request_id = request_id
        self.next_block = first_block
        self.queue = queue
        self.loop = asyncio.get_running_loop()

    def __call__(self, engine: Engine) -> None:
        seq = engine.requests.get(self.request_id)
        # Runs after every engine step: no export (and on a GPU no device sync) until a block filled.
        if seq is None or seq.num_computed_tokens // engine.config.block_size <= self.next_block:
            return
        export = engine.export_kv(self.request_id, release=False, first_block=self.next_block,
                                  full_blocks_only=True)  # fmt: skip
        if export.num_blocks:
            self.next_block += export.num_blocks
            self.loop.call_soon_threadsafe(self.queue.put_nowait, export)

    def rest(self, engine: Engine) -> KvExport:
        """The blocks still unsent, trailing partial block included; frees the request."""
        return engine.export_kv(self.request_id, release=True, first_block=self.next_block)


async def _last_output(outputs: AsyncIterator, queue: asyncio.Queue) -> object:
    try:
        last = None
        async for last in outputs:  # noqa: B007 - only the last output (the first token) is kept
            pass
        return last
    finally:
        queue.put_nowait(None)  # no more blocks before the rest


async def serve_prefill(
    engine: AsyncEngine, pull: transfer_pb2.PullBlocksRequest, prefill_chunk_tokens: int
) -> AsyncIterator[WireChunk]:
    """The prefill worker's side: compute prompt + first token, keep the blocks cached here,
    stream the blocks the decode worker lacks as each step finishes them."""
    request = pull.request
    sampling: SamplingParams = dataclasses.replace(sampling_from_proto(request.sampling), max_tokens=1, stop=[])
    prefill_id = f"prefill-{request.request_id}-{uuid.uuid4().hex[:6]}"
    started_s = time.time()
    queue: asyncio.Queue[KvExport | None] = asyncio.Queue()
    blocks = FinishedBlocks(prefill_id, pull.skip_blocks, queue)
    outputs = engine.generate(prefill_id, list(request.token_ids), sampling, keep_kv=True, on_step=blocks,
                              max_tokens_per_step=pull.prefill_chunk_tokens or prefill_chunk_tokens)  # fmt: skip
    prefill = asyncio.create_task(_last_output(outputs, queue))
    sent = 0
    released = False
    try:
        while (export := await queue.get()) is not None:
            for chunk in export_to_chunks(export, export.first_block, pull.chunk_blocks, pull.transfer_id,
                                          request.request_id, sent):  # fmt: skip
                sent += 1
                yield chunk
        last = await prefill
        record_prefill_phases(trace.get_current_span(), started_s, last.queue_s or 0.0,
                              time.time() - started_s - (last.queue_s or 0.0), len(request.token_ids),
                              last.num_cached_tokens)  # fmt: skip
        rest = await engine.run(blocks.rest)
        released = True
        chunks = closing_chunks(rest, rest.first_block, pull.chunk_blocks, pull.transfer_id, request.request_id, sent)
        final = chunks[-1].header
        final.cached_tokens = last.num_cached_tokens
        lp = (last.logprobs or [None])[0]
        final.first_token.CopyFrom(common_pb2.TokenLogprob(
            token_id=last.new_token_ids[0], logprob=lp.logprob if lp else 0.0,
            top_token_ids=lp.top_token_ids if lp else [], top_logprobs=lp.top_logprobs if lp else [],
        ))  # fmt: skip
        for chunk in chunks:
            yield chunk
    finally:
        prefill.cancel()
        if not released:
            # The receiver went away (or the prefill failed): free the blocks kept for it.
            with contextlib.suppress(EngineDeadError):
                engine.call(lambda e: e.abort(prefill_id))


async def pull_prefill(
    prefill_address: str, request: worker_pb2.WorkerGenerateRequest, timeout_s: float, *,
    into: KvReservation | None = None, skip_blocks: int = 0, prefill_chunk_tokens: int = 0, streams: int = 1,
    tcp: bool = False,
) -> PulledPrefill:
    """The decode worker's side: ask the prefill worker for the prompt's KV and first token
    (over ``streams`` parallel streams, or TCP connections with ``tcp`` when the prefill worker
    offers them), each chunk written into the reserved pool blocks
    ``into`` as it arrives; the blocks the reservation reuses are not asked for. Without
    ``into`` (a measurement with no pool: ``bench/disagg.py``), the blocks from ``skip_blocks``
    on are kept as they came."""
    started = time.monotonic()
    first_block = into.first_block if into is not None else skip_blocks
    assembler = ChunkAssembler(first_block, into)
    pull = transfer_pb2.PullBlocksRequest(transfer_id=uuid.uuid4().hex, request_id=request.request_id,
                                          request=request, skip_blocks=first_block,
                                          prefill_chunk_tokens=prefill_chunk_tokens,
                                          **spread(streams, tcp))  # fmt: skip
    arrival = await receive_into(assembler, prefill_address, pull, timeout_s)
    last = assembler.last
    done = time.monotonic()
    return PulledPrefill(prefill_address, last.first_token, last.cached_tokens, assembler, done - started,
                         done - arrival.first_at, arrival.first_bytes, arrival.transport)  # fmt: skip


async def pull_with_retries(
    prefill_addresses: list[str], request: worker_pb2.WorkerGenerateRequest, into: KvReservation, timeout_s: float,
    stats: TransferStats, streams: int = 1, tcp: bool = False,
) -> PulledPrefill | None:
    """Pull from the first prefill worker that delivers (see the module doc); None when none
    did and the caller must prefill locally. A failed pull may have written some of the
    reserved blocks: the next one writes them all again, and none is named before the last
    pull checked out. A prefill worker whose TCP data port cannot be reached is asked again
    at once, and for ``NO_TCP_S``, over gRPC."""
    pending = list(prefill_addresses)
    retried_same = False
    while pending:
        address = pending.pop(0)
        try:
            return await pull_prefill(address, request, timeout_s, into=into, streams=streams,
                                      tcp=tcp and stats.tcp_reachable(address))  # fmt: skip
        except DataConnectionError as exc:
            log.warning("KV data port of %s unreachable (%s); pulling from it over gRPC for %.0fs", address, exc,
                        NO_TCP_S)  # fmt: skip
            stats.no_tcp[address] = time.monotonic() + NO_TCP_S
            pending.insert(0, address)
        except (grpc.aio.AioRpcError, TransferError) as exc:
            if not pending and isinstance(exc, TransferError) and not retried_same:
                pending.append(address)
                retried_same = True
            action = f"retrying via {pending[0]}" if pending else "prefilling locally"
            log.warning("remote prefill of %s via %s failed (%s); %s", request.request_id, address, exc, action)
            stats.retries += bool(pending)
    stats.fell_back()
    return None
