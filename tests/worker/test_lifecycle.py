"""Draining a worker (SIGTERM, a role switch): it leaves etcd first, refuses new requests with
UNAVAILABLE, lets in-flight ones finish within the deadline, evicts the rest with UNAVAILABLE
(freeing their blocks), and serves again after ``resume``.

The worker runs in-process (real gRPC server, real etcd) over a tiny random model; its engine
thread is held between steps where the test needs a request to still be running.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from kvmesh.config import WorkerSettings
from kvmesh.grpc_service import ServiceProcess
from kvmesh_proto.v1 import transfer_pb2, transfer_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.engine.async_engine import AsyncEngine
from services.engine.config import EngineConfig
from services.engine.llm_engine import Engine
from services.engine.outputs import RequestOutput
from services.worker.lifecycle import WorkerLifecycle
from services.worker.servicer import WorkerServicer
from tests.worker.test_overload import Worker, request


class DrainableWorker(Worker):
    def __init__(self, servicer, stub, engine, process: ServiceProcess, lifecycle: WorkerLifecycle) -> None:
        super().__init__(servicer, stub, engine)
        self.process = process
        self.lifecycle = lifecycle

    async def registered(self) -> bool:
        return self.servicer.worker_id in await self.process.discovery.list("worker")


@pytest.fixture
async def worker(etcd_server, namespace) -> AsyncIterator[DrainableWorker]:
    settings = WorkerSettings(etcd_endpoint=etcd_server.endpoint, namespace=namespace, metrics_port=-1,
                              instance_id="worker-drain")  # fmt: skip
    async_engine = AsyncEngine(Engine(EngineConfig(model="random:tiny", max_num_seqs=4, num_kv_blocks=64)))
    process = ServiceProcess(settings, [])
    servicer = WorkerServicer(async_engine, settings.instance_id, "aggregated", 200)
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, process.server)
    await process.start(process.instance_info(role="aggregated"))
    channel = grpc.aio.insecure_channel(process.address)
    handle = DrainableWorker(servicer, worker_pb2_grpc.WorkerStub(channel), async_engine, process,
                             WorkerLifecycle(process, servicer))  # fmt: skip
    try:
        yield handle
    finally:
        handle.release_engine()
        await channel.close()
        await process.shutdown()
        async_engine.shutdown()


async def _tokens(call) -> int:
    return sum([len(r.token_ids) async for r in call])


async def test_drain_deregisters_refuses_new_work_and_lets_in_flight_finish(worker):
    assert await worker.registered()
    worker.hold_engine()
    in_flight = worker.stub.Generate(request("in-flight", max_tokens=12))
    await worker.wait_live(1)
    drain = asyncio.create_task(worker.lifecycle.drain(timeout_s=30))
    while await worker.registered():
        await asyncio.sleep(0.02)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await worker.stub.Generate(request("late")).read()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert not drain.done()  # still waiting for the request in flight
    worker.release_engine()
    assert await _tokens(in_flight) == 12
    result = await drain
    assert (result.finished, result.evicted) == (1, 0)

    await worker.lifecycle.resume(worker.process.instance_info(role="aggregated"))
    assert await worker.registered()
    assert await _tokens(worker.stub.Generate(request("after", max_tokens=4))) == 4


async def test_past_the_deadline_requests_are_evicted_at_once_with_unavailable_and_free_their_blocks(worker):
    stuck = [worker.stub.Generate(request(f"stuck-{i}", max_tokens=150)) for i in range(4)]
    firsts = [await call.read() for call in stuck]  # all four running, with blocks
    worker.hold_engine()
    drain = asyncio.create_task(worker.lifecycle.drain(timeout_s=0.3))
    await asyncio.sleep(0.5)  # the deadline passes with the requests still running
    steps = _count_steps(worker.engine)
    worker.release_engine()  # the eviction (queued behind the hold) is applied
    result = await drain
    assert (result.finished, result.evicted) == (0, 4)
    # One engine call evicts all four: at most the step already due runs before it (one call
    # per request would wait for a step boundary each).
    assert len(steps) <= 1, steps
    for call in stuck:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            while await call.read() is not grpc.aio.EOF:
                pass
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in err.value.details()
    assert all(len(first.token_ids) >= 1 for first in firsts)
    unfinished, used = await worker.engine.run(lambda e: (e.has_unfinished(), e.stats().blocks_used))
    assert (unfinished, used) == (False, 0)


def _count_steps(engine: AsyncEngine) -> list[float]:
    """The times of the engine's steps from now on (the engine thread calls ``step`` per step)."""
    steps: list[float] = []
    step = engine.engine.step

    def counted() -> list[RequestOutput]:
        steps.append(time.monotonic())
        return step()

    engine.engine.step = counted
    return steps


class StalledPrefill(transfer_pb2_grpc.KvTransferServicer):
    """A prefill worker that never delivers: a decode request pulling from it stays in its pull."""

    async def PullBlocks(
        self, request: transfer_pb2.PullBlocksRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[transfer_pb2.KvBlockChunk]:
        await asyncio.Event().wait()
        yield transfer_pb2.KvBlockChunk()


async def test_a_request_still_pulling_its_kv_is_evicted_too(worker):
    """Not yet in the engine, it would outlive the drain (and decode on the worker in its new role)."""
    server = grpc.aio.server()
    transfer_pb2_grpc.add_KvTransferServicer_to_server(StalledPrefill(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        pulling = worker.stub.Decode(worker_pb2.DecodeRequest(request=request("pulling"),
                                                              prefill_address=f"127.0.0.1:{port}"))  # fmt: skip
        await worker.wait_live(1)
        result = await worker.lifecycle.drain(timeout_s=0.3)
        assert (result.finished, result.evicted) == (0, 1) and result.seconds < 5  # not the 60 s pull timeout
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pulling.read()
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in err.value.details()
        assert not worker.servicer.live
    finally:
        await server.stop(0)
