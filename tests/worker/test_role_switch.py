"""``Worker.SwitchRole``: the worker drains (in-flight requests finish), comes back in the new
role and registers it in etcd, without restarting; bad requests get precise statuses.

In-process worker (real gRPC server, real etcd) over a tiny random model, wired as
``services/worker/server.py`` wires it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from kvmesh.config import WorkerSettings
from kvmesh.grpc_service import ServiceProcess
from kvmesh_proto.v1 import worker_pb2, worker_pb2_grpc
from services.engine.async_engine import AsyncEngine
from services.engine.config import EngineConfig
from services.engine.llm_engine import Engine
from services.worker.lifecycle import WorkerLifecycle
from services.worker.role_switch import RoleSwitch
from services.worker.servicer import WorkerServicer
from tests.worker.test_lifecycle import DrainableWorker
from tests.worker.test_overload import request


@pytest.fixture
async def worker(etcd_server, namespace) -> AsyncIterator[DrainableWorker]:
    settings = WorkerSettings(etcd_endpoint=etcd_server.endpoint, namespace=namespace, metrics_port=-1,
                              instance_id="worker-switch", role="prefill")  # fmt: skip
    async_engine = AsyncEngine(Engine(EngineConfig(model="random:tiny", max_num_seqs=4, num_kv_blocks=64)))
    process = ServiceProcess(settings, [])
    servicer = WorkerServicer(async_engine, settings.instance_id, "prefill", 200)
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, process.server)
    lifecycle = WorkerLifecycle(process, servicer)
    servicer.role_switch = RoleSwitch(lifecycle, servicer, lambda role: process.instance_info(role=role), 30.0)
    await process.start(process.instance_info(role="prefill"))
    channel = grpc.aio.insecure_channel(process.address)
    handle = DrainableWorker(servicer, worker_pb2_grpc.WorkerStub(channel), async_engine, process, lifecycle)
    try:
        yield handle
    finally:
        handle.release_engine()
        await channel.close()
        await process.shutdown()
        async_engine.shutdown()


async def _role_in_etcd(worker: DrainableWorker) -> str | None:
    info = (await worker.process.discovery.list("worker")).get(worker.servicer.worker_id)
    return info.role if info is not None else None


async def test_a_switch_waits_for_in_flight_requests_then_registers_the_new_role(worker):
    worker.hold_engine()
    in_flight = worker.stub.Generate(request("in-flight", max_tokens=10))
    await worker.wait_live(1)
    switch = asyncio.ensure_future(worker.stub.SwitchRole(worker_pb2.SwitchRoleRequest(role="decode")))
    while await _role_in_etcd(worker) is not None:  # left etcd: no router sends it anything new
        await asyncio.sleep(0.02)
    assert not switch.done()
    worker.release_engine()
    assert sum([len(r.token_ids) async for r in in_flight]) == 10  # the in-flight request is answered in full
    reply = await switch
    assert (reply.previous_role, reply.role, reply.finished, reply.evicted) == ("prefill", "decode", 1, 0)
    assert await _role_in_etcd(worker) == "decode" and worker.servicer.role == "decode"
    assert sum([len(r.token_ids) async for r in worker.stub.Generate(request("after", max_tokens=3))]) == 3


async def test_switching_to_the_current_role_is_a_no_op(worker):
    reply = await worker.stub.SwitchRole(worker_pb2.SwitchRoleRequest(role="prefill"))
    assert (reply.previous_role, reply.role, reply.seconds) == ("prefill", "prefill", 0.0)
    assert await _role_in_etcd(worker) == "prefill"


@pytest.mark.parametrize(("role", "timeout_s"), [("router", 0.0), ("", 0.0), ("decode", -1.0)])
async def test_a_bad_switch_request_is_invalid_argument(worker, role, timeout_s):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await worker.stub.SwitchRole(worker_pb2.SwitchRoleRequest(role=role, drain_timeout_s=timeout_s))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await _role_in_etcd(worker) == "prefill"
