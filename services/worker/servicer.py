"""The Worker gRPC service over one engine: Generate and Decode streams, Cancel, Stats.

``Decode`` with prefill addresses is the decode half of disaggregated serving (see
``disagg.py``); the prefill half is the ``KvTransfer.PullBlocks`` service in
``transfer_servicer.py``. The unary ``Worker.Prefill`` of the contract is not used by this
pull design and answers UNIMPLEMENTED (the generated base class does that).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from kvmesh.config import WORKER_ROLES
from kvmesh.grpc_service import cancelled_from_outside
from kvmesh_proto.v1 import worker_pb2, worker_pb2_grpc
from services.engine.async_engine import AsyncEngine, EngineDeadError, RequestEvicted
from services.engine.kv_transfer import KvReservation
from services.engine.llm_engine import NoFreeBlocksError
from services.engine.sampling_params import SamplingParams
from services.worker.convert import output_to_proto, sampling_from_proto
from services.worker.disagg import PulledPrefill, TransferStats, pull_with_retries
from services.worker.errors import engine_errors_as_status
from services.worker.metrics import observe_stats
from services.worker.peer_fetch import PeerFetcher
from services.worker.request_trace import WorkerRequestTrace

if TYPE_CHECKING:
    from services.worker.role_switch import RoleSwitch

log = logging.getLogger(__name__)


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, engine: AsyncEngine, worker_id: str, role: str, stats_interval_ms: int,
                 transfer_timeout_s: float = 60.0, max_waiting_requests: int = 0,
                 peers: PeerFetcher | None = None, transfer_streams: int = 1, transfer_tcp: bool = False
                 ) -> None:  # fmt: skip
        self.engine = engine
        self.peers = peers
        # Requests beyond the running batch wait in the engine; past this many the worker refuses
        # (RESOURCE_EXHAUSTED: the router tries another worker) rather than queue without bound.
        self.max_live = engine.engine.config.max_num_seqs + max_waiting_requests if max_waiting_requests else 0
        self.transfer_timeout_s = transfer_timeout_s
        self.transfer_streams = transfer_streams
        self.transfer_tcp = transfer_tcp
        self.transfers = TransferStats()
        self.worker_id = worker_id
        self.role = role
        self.model_id = engine.engine.model_id
        self.stats_interval_ms = stats_interval_ms
        self.live: set[str] = set()
        # Live requests still pulling their prompt's KV from a prefill worker (not in the engine
        # yet): an eviction cancels the pull.
        self._pulls: dict[str, asyncio.Task] = {}
        # Live requests evicted between two stages (e.g. while a peer fetch ran): ended when the
        # next stage would start.
        self._evicted: set[str] = set()
        # False while the worker drains (see lifecycle.py): new requests get UNAVAILABLE, so the
        # router sends them elsewhere.
        self.accepting = True
        # Set by the worker's wiring (role_switch.py); without it SwitchRole is UNIMPLEMENTED.
        self.role_switch: RoleSwitch | None = None
        self._tokens_done = 0
        self._prompt_tokens = 0
        # Set when a request ends, so subscribers learn about freed blocks at once.
        self._changed = asyncio.Event()
        self._rate = (time.monotonic(), 0)

    async def Generate(
        self, request: worker_pb2.WorkerGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.WorkerGenerateResponse]:
        async for response in self._serve(request, context, prefill_addresses=[], rpc="Generate"):
            yield response

    async def Decode(
        self, request: worker_pb2.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.WorkerGenerateResponse]:
        addresses = [a for a in (request.prefill_address, *request.fallback_prefill_addresses) if a]
        async for response in self._serve(request.request, context, prefill_addresses=addresses, rpc="Decode"):
            yield response

    async def _serve(
        self, request: worker_pb2.WorkerGenerateRequest, context: grpc.aio.ServicerContext,
        prefill_addresses: list[str], rpc: str,
    ) -> AsyncIterator[worker_pb2.WorkerGenerateResponse]:
        if request.model and request.model != self.model_id:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"this worker serves {self.model_id}, not {request.model}")  # fmt: skip
        if not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id is required")
        if not self.accepting:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"worker {self.worker_id} is draining; use another")
        if request.request_id in self.live:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request {request.request_id} is already running")
        if self.max_live and len(self.live) >= self.max_live:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"worker {self.worker_id} has {len(self.live)} requests, its limit; retry shortly",
                                trailing_metadata=(("retry-after", "1"),))  # fmt: skip
        try:
            sampling = sampling_from_proto(request.sampling)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        started = time.monotonic()
        self._prompt_tokens += len(request.token_ids)
        self.live.add(request.request_id)
        trace = WorkerRequestTrace(f"worker.{rpc}", context, request, "remote" if prefill_addresses else "local")
        try:
            if prefill_addresses:
                outputs = self._remote_prefill_outputs(request, sampling, prefill_addresses, started, trace)
            else:
                if request.kv_peer_address and self.peers is not None:
                    await self.peers.fetch(request)
                outputs = self._local_outputs(request, sampling, started)
            async with engine_errors_as_status(context), contextlib.aclosing(outputs):
                async for response in outputs:
                    self._tokens_done += len(response.token_ids)
                    trace.on_response(response)
                    yield response
        finally:
            trace.finish()
            self.live.discard(request.request_id)
            self._evicted.discard(request.request_id)
            self._changed.set()

    async def _local_outputs(
        self, request: worker_pb2.WorkerGenerateRequest, sampling: SamplingParams, started: float, **kv: object,
    ) -> AsyncIterator[worker_pb2.WorkerGenerateResponse]:
        self._check_evicted(request.request_id)
        outputs = self.engine.generate(request.request_id, list(request.token_ids), sampling, **kv)
        async with contextlib.aclosing(outputs):
            async for output in outputs:
                elapsed = time.monotonic() - started
                if output.queue_s is not None and self.peers is not None and not kv:
                    self.peers.observe_prefill(elapsed - output.queue_s,
                                               output.num_prompt_tokens - output.num_cached_tokens)
                yield output_to_proto(output, elapsed)

    async def _remote_prefill_outputs(
        self, request: worker_pb2.WorkerGenerateRequest, sampling: SamplingParams, prefill_addresses: list[str],
        started: float, trace: WorkerRequestTrace,
    ) -> AsyncIterator[worker_pb2.WorkerGenerateResponse]:
        """Hold pool blocks for the prompt, pull its KV (straight into them) and first token from
        a prefill worker, then decode here; when the pool cannot hold the prompt now or no pull
        succeeds (see ``pull_with_retries``), prefill locally."""
        request_id, tokens = request.request_id, list(request.token_ids)
        try:
            try:
                reservation = await self.engine.run(lambda e: e.reserve_kv(request_id, tokens, sampling))
            except NoFreeBlocksError as exc:
                log.warning("no room to receive the KV of %s (%s); prefilling locally", request_id, exc)
                self.transfers.fell_back()
                reservation = None
            pulled = None
            if reservation is not None:
                with trace.kv_transfer() as span:
                    pulled = await self._pull(request, reservation, prefill_addresses)
                    if pulled is not None:
                        trace.transferred(span, pulled.assembler.bytes_received, pulled.assembler.blocks_received,
                                          pulled.seconds, pulled.transfer_seconds, pulled.transport)  # fmt: skip
            if pulled is None:
                self._release(request_id)  # its blocks make room for the local prefill (queued first)
                trace.path = "fallback"
                async for response in self._local_outputs(request, sampling, started):
                    yield response
                return
            received = pulled.assembler
            log.info("pulled %d blocks (%d bytes) of %s from %s over %s in %.4fs (wire %.4fs); %d leading blocks "
                     "were already here", received.blocks_received, received.bytes_received, request_id,
                     pulled.prefill_address, pulled.transport, pulled.seconds, pulled.transfer_seconds,
                     reservation.first_block)  # fmt: skip
            first = pulled.first_token
            eos = first.token_id in self.engine.engine.eos_token_ids and not sampling.ignore_eos
            done = "stop" if eos or first.token_id in sampling.stop_token_ids else (
                "length" if sampling.max_tokens <= 1 else "")  # fmt: skip
            yield worker_pb2.WorkerGenerateResponse(
                request_id=request_id, token_ids=[first.token_id], finish_reason=done,
                cached_tokens=pulled.cached_tokens, worker_time_s=time.monotonic() - started,
                logprobs=[first] if sampling.logprobs else [],
                timings=worker_pb2.WorkerTimings(prefill_s=pulled.seconds - pulled.transfer_seconds,
                                                 transfer_s=pulled.transfer_seconds),
            )  # fmt: skip
            if not done:
                async for response in self._local_outputs(request, sampling, started, kv=reservation,
                                                          output_token_ids=[first.token_id]):  # fmt: skip
                    yield response
        finally:
            self._release(request_id)  # a no-op once decoding started (or if it never reserved)

    def _release(self, request_id: str) -> None:
        """Free the blocks reserved for ``request_id``, if any are still: queued on the engine
        thread, not awaited (a cancelled request cannot lose it; engine calls run in order)."""
        with contextlib.suppress(EngineDeadError):
            self.engine.call(lambda e: e.release_reservation(request_id))

    async def _pull(self, request: worker_pb2.WorkerGenerateRequest, reservation: KvReservation,
                    prefill_addresses: list[str]) -> PulledPrefill | None:  # fmt: skip
        """``pull_with_retries`` as a task ``evict`` can cancel, which ends the request with RequestEvicted."""
        self._check_evicted(request.request_id)
        pull = asyncio.ensure_future(pull_with_retries(prefill_addresses, request, reservation,
                                                       self.transfer_timeout_s, self.transfers,
                                                       self.transfer_streams, self.transfer_tcp))  # fmt: skip
        self._pulls[request.request_id] = pull
        try:
            return await pull
        except asyncio.CancelledError:
            if not cancelled_from_outside():
                raise  # the call itself was cancelled (the router went away)
            raise RequestEvicted(self.eviction_reason) from None
        finally:
            self._pulls.pop(request.request_id, None)

    @property
    def eviction_reason(self) -> str:
        return f"worker {self.worker_id} is draining; resume elsewhere"

    def _check_evicted(self, request_id: str) -> None:
        if request_id in self._evicted:
            raise RequestEvicted(self.eviction_reason)

    async def evict(self) -> int:
        """End every live request with UNAVAILABLE (the router resumes it elsewhere from the tokens
        it has sent), at once: one engine call for all those in the engine, a cancelled pull for
        those still fetching their KV. Returns how many were live."""
        evicted = list(self.live)
        if not evicted:
            return 0
        self._evicted.update(evicted)
        for request_id in evicted:
            pull = self._pulls.get(request_id)
            if pull is not None:
                pull.cancel()
        await self.engine.evict(evicted, self.eviction_reason)
        return len(evicted)

    async def Cancel(
        self, request: worker_pb2.CancelRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.CancelResponse:
        return worker_pb2.CancelResponse(cancelled=await self.engine.abort(request.request_id))

    async def SwitchRole(
        self, request: worker_pb2.SwitchRoleRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.SwitchRoleResponse:
        if self.role_switch is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this worker cannot switch roles")
        if request.role not in WORKER_ROLES:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"role must be one of {', '.join(WORKER_ROLES)}, got {request.role!r}")  # fmt: skip
        if request.drain_timeout_s < 0 or request.drain_timeout_s > 3600:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "drain_timeout_s must be in [0, 3600]")
        if not self.accepting and request.role != self.role:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"worker {self.worker_id} is draining")
        return await self.role_switch.switch(request.role, request.drain_timeout_s)

    async def stats(self) -> worker_pb2.WorkerStats:
        """A load report read on the engine thread between steps, so a finished request's
        blocks are never reported after its last token was sent."""
        s, taken_s = await self.engine.run(lambda engine: (engine.stats(), time.time()))
        now = time.monotonic()
        then, tokens_then = self._rate
        rate = (self._tokens_done - tokens_then) / (now - then) if now > then else 0.0
        if now - then > 1.0:
            self._rate = (now, self._tokens_done)
        report = worker_pb2.WorkerStats(
            worker_id=self.worker_id,
            running_requests=s.running,
            waiting_requests=s.waiting,
            kv_blocks_used=s.blocks_used,
            kv_blocks_cached=s.blocks_cached,
            kv_blocks_total=s.blocks_total,
            prefix_hit_rate=s.prefix_hit_tokens / max(self._prompt_tokens, 1),
            tokens_per_s=rate,
            preemptions=s.preemptions,
            unix_ms=int(taken_s * 1000),
            role=self.role,
            busy_ms=int(self.engine.busy_s * 1000),
            kv_blocks_host=s.host_blocks,
            kv_blocks_disk=s.disk_blocks,
            host_hit_blocks=s.host_hit_blocks,
            disk_hit_blocks=s.disk_hit_blocks,
        )
        observe_stats(report)
        return report

    async def Stats(
        self, request: worker_pb2.WorkerStatsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.WorkerStats]:
        interval_s = (request.interval_ms or self.stats_interval_ms) / 1000
        interval_s = min(max(interval_s, 0.01), 60.0)
        while True:
            yield await self.stats()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), interval_s)
            self._changed.clear()
