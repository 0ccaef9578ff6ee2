"""A worker under overload: beyond its waiting-queue limit it refuses with RESOURCE_EXHAUSTED, and a
request whose deadline passes while it is queued leaves no blocks behind.

The worker runs in-process over a tiny random model; its engine thread is held between steps
(a call that waits on an event), so "queued" is a state the test controls, not a race.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import grpc
import pytest

from kvmesh_proto.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from services.engine.async_engine import AsyncEngine
from services.engine.config import EngineConfig
from services.engine.llm_engine import Engine
from services.worker.servicer import WorkerServicer


class Worker:
    def __init__(self, servicer: WorkerServicer, stub: worker_pb2_grpc.WorkerStub, engine: AsyncEngine) -> None:
        self.servicer = servicer
        self.stub = stub
        self.engine = engine
        self._gate = threading.Event()

    def hold_engine(self) -> None:
        """Block the engine thread between steps until ``release_engine``."""
        self._gate.clear()
        self.engine.call(lambda e: self._gate.wait())

    def release_engine(self) -> None:
        self._gate.set()

    async def wait_live(self, count: int) -> None:
        while len(self.servicer.live) != count:
            await asyncio.sleep(0.01)


@pytest.fixture
async def worker() -> AsyncIterator[Worker]:
    async_engine = AsyncEngine(Engine(EngineConfig(model="random:tiny", max_num_seqs=1, num_kv_blocks=64)))
    servicer = WorkerServicer(async_engine, "worker-overload", "aggregated", 200, max_waiting_requests=1)
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    handle = Worker(servicer, worker_pb2_grpc.WorkerStub(channel), async_engine)
    try:
        yield handle
    finally:
        handle.release_engine()
        await channel.close()
        await server.stop(0)
        async_engine.shutdown()


def request(request_id: str, max_tokens: int = 8) -> worker_pb2.WorkerGenerateRequest:
    return worker_pb2.WorkerGenerateRequest(request_id=request_id, token_ids=list(range(1, 40)),
                                            sampling=common_pb2.SamplingParams(max_tokens=max_tokens))  # fmt: skip


async def test_beyond_the_waiting_limit_the_worker_refuses_with_retry_after(worker):
    worker.hold_engine()
    # max_num_seqs 1 + max_waiting_requests 1: two requests fit, the third is refused at once.
    admitted = [worker.stub.Generate(request(f"r{i}")) for i in range(2)]
    await worker.wait_live(2)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await worker.stub.Generate(request("r2")).read()
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(err.value.trailing_metadata())["retry-after"] == "1"
    worker.release_engine()
    for call in admitted:
        assert sum([len(r.token_ids) async for r in call]) == 8
    assert len([r async for r in worker.stub.Generate(request("r3"))]) > 0  # room again


async def test_a_deadline_passing_in_the_queue_frees_everything(worker):
    worker.hold_engine()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await worker.stub.Generate(request("late", max_tokens=50), timeout=0.5).read()
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await worker.wait_live(0)
    worker.release_engine()
    # The engine thread applies queued calls in order: the request's add, then its abort, then this.
    unfinished, used = await worker.engine.run(lambda e: (e.has_unfinished(), e.stats().blocks_used))
    assert (unfinished, used) == (False, 0)
