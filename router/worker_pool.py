"""The router's live view of the workers: who is alive (etcd), how loaded (their stats
streams), and what this router itself has in flight on each.

Worker and router clocks are compared (a report's ``unix_ms`` against the moment one of
our requests finished), so hosts are expected to run NTP; a skew only delays, by at most
one report, forgetting the load of a finished request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

import grpc

from kvmesh.discovery import Discovery, Membership, MembershipEvent
from kvmesh.grpc_service import mesh_channel
from kvmesh_proto.v1 import common_pb2, worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

_STATS_RETRY_S = 1.0


@dataclass
class WorkerState:
    info: common_pb2.InstanceInfo
    channel: grpc.aio.Channel
    stub: worker_pb2_grpc.WorkerStub
    stats: worker_pb2.WorkerStats | None = None
    # request id -> KV blocks it holds, as far as this router knows
    inflight: dict[str, int] = field(default_factory=dict)
    # Blocks of this router's requests that finished after the last stats report was taken:
    # that report still counts them, so they are subtracted until a newer report arrives.
    released_blocks: int = 0
    # request id -> modelled prefill seconds it owes (kv-cost ttft), until its first token arrives
    prefilling: dict[str, float] = field(default_factory=dict)
    released_at_ms: float = 0.0
    stats_task: asyncio.Task | None = None

    def finish(self, request_id: str) -> None:
        blocks = self.inflight.pop(request_id, None)
        if blocks:
            self.released_blocks += blocks
            self.released_at_ms = time.time() * 1000

    def update_stats(self, stats: worker_pb2.WorkerStats) -> None:
        self.stats = stats
        if stats.unix_ms >= self.released_at_ms:
            self.released_blocks = 0

    @property
    def worker_id(self) -> str:
        return self.info.instance_id

    @property
    def inflight_blocks(self) -> int:
        return sum(self.inflight.values())

    @property
    def active_blocks(self) -> int:
        """Blocks held by running requests: the worker's own report or this router's count,
        whichever is higher (a fresh burst is not in the stats yet)."""
        reported = self.stats.kv_blocks_used if self.stats else 0
        return max(reported - self.released_blocks, self.inflight_blocks, 0)

    @property
    def waiting_requests(self) -> int:
        return self.stats.waiting_requests if self.stats else 0

    @property
    def running_requests(self) -> int:
        """The worker's report or this router's count of its requests there, whichever is higher."""
        reported = self.stats.running_requests if self.stats else 0
        return max(reported, len(self.inflight) - len(self.prefilling))

    @property
    def queued_prefill_s(self) -> float:
        return sum(self.prefilling.values())


class WorkerPool:
    def __init__(self, discovery: Discovery, stats_interval_ms: int = 200, leave_grace_s: float = 120.0) -> None:
        """A worker that leaves (a drain, a lost lease) may still stream requests: its channel
        closes once they end or ``leave_grace_s`` passes; the router resumes those cut then
        elsewhere (``router/migration.py``)."""
        self.discovery = discovery
        self.leave_grace_s = leave_grace_s
        self._membership = Membership(discovery, "worker")
        self._membership.on_change(self._on_change)
        self._stats_interval_ms = stats_interval_ms
        self.workers: dict[str, WorkerState] = {}
        self._closing: set[asyncio.Task] = set()

    async def start(self) -> None:
        await self._membership.start()

    async def stop(self) -> None:
        await self._membership.stop()
        for worker_id in list(self.workers):
            await self._drop(worker_id, at_once=True)
        for task in list(self._closing):
            task.cancel()

    async def _on_change(self, event: MembershipEvent) -> None:
        worker_id = event.info.instance_id
        if event.kind == "leave":
            await self._drop(worker_id)
            log.info("worker %s left", worker_id)
            return
        existing = self.workers.get(worker_id)
        if existing is not None and existing.info.address == event.info.address:
            existing.info = event.info  # e.g. a role change
            return
        await self._drop(worker_id)
        channel = mesh_channel(event.info.address)
        state = WorkerState(event.info, channel, worker_pb2_grpc.WorkerStub(channel))
        state.stats_task = asyncio.create_task(self._follow_stats(state), name=f"stats:{worker_id}")
        self.workers[worker_id] = state
        log.info("worker %s joined at %s (%s, %s)", worker_id, event.info.address, event.info.role, event.info.model)

    async def _drop(self, worker_id: str, at_once: bool = False) -> None:
        """Forget a worker; its channel closes when its streams end or the leave grace passes
        (``at_once``: now, the pool is stopping)."""
        state = self.workers.pop(worker_id, None)
        if state is None:
            return
        if state.stats_task is not None:
            state.stats_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await state.stats_task
        if at_once or not state.inflight:
            await state.channel.close()
            return
        task = asyncio.create_task(state.channel.close(self.leave_grace_s), name=f"close:{worker_id}")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _follow_stats(self, state: WorkerState) -> None:
        request = worker_pb2.WorkerStatsRequest(interval_ms=self._stats_interval_ms)
        while True:
            try:
                async for stats in state.stub.Stats(request):
                    state.update_stats(stats)
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                log.debug("stats stream of %s broke: %s", state.worker_id, exc.code())
            await asyncio.sleep(_STATS_RETRY_S)

    def candidates(self, model: str, roles: tuple[str, ...] = ("aggregated",)) -> list[WorkerState]:
        return [w for w in self.workers.values() if w.info.model == model and w.info.role in roles]

    def models(self) -> dict[str, list[common_pb2.InstanceInfo]]:
        by_model: dict[str, list[common_pb2.InstanceInfo]] = {}
        for state in self.workers.values():
            by_model.setdefault(state.info.model, []).append(state.info)
        return by_model
