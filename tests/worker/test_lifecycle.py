"""Draining a worker (SIGTERM, a role switch): it leaves etcd first, refuses new requests with
UNAVAILABLE, lets in-flight ones finish within the deadline, evicts the rest with UNAVAILABLE
(freeing their blocks), and serves again after ``resume``.

The worker runs in-process (real gRPC server, real etcd) over a tiny random model; its engine
thread is held between steps where the test needs a request to still be running.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from kvmesh.config import WorkerSettings
from kvmesh.grpc_service import ServiceProcess
from kvmesh_proto.v1 import worker_pb2_grpc
from services.engine.async_engine import AsyncEngine
from services.engine.config import EngineConfig
from services.engine.llm_engine import Engine
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


async def test_past_the_deadline_requests_are_evicted_with_unavailable_and_free_their_blocks(worker):
    stuck = worker.stub.Generate(request("stuck", max_tokens=50))
    first = await stuck.read()  # running, with blocks
    worker.hold_engine()
    drain = asyncio.create_task(worker.lifecycle.drain(timeout_s=0.3))
    await asyncio.sleep(0.5)  # the deadline passes with the request still running
    worker.release_engine()  # the eviction (queued behind the hold) is applied
    result = await drain
    assert (result.finished, result.evicted) == (0, 1)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        while await stuck.read() is not grpc.aio.EOF:
            pass
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "draining" in err.value.details() and len(first.token_ids) >= 1
    unfinished, used = await worker.engine.run(lambda e: (e.has_unfinished(), e.stats().blocks_used))
    assert (unfinished, used) == (False, 0)
