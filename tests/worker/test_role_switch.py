"""``Worker.SwitchRole``: the worker drains (in-flight requests finish), comes back in the new
role and registers it in etcd, without restarting; bad requests get precise statuses.

In-process worker (real gRPC server, real etcd) over a tiny random model, wired as
``services/worker/server.py`` wires it.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from kvmesh_proto.v1 import worker_pb2
from services.worker.role_switch import RoleSwitch
from tests.worker.test_lifecycle import DrainableWorker
from tests.worker.test_lifecycle import worker as drainable_worker  # noqa: F401 - a fixture
from tests.worker.test_overload import request


@pytest.fixture
def worker(drainable_worker: DrainableWorker) -> DrainableWorker:  # noqa: F811 - the fixture imported above
    """The drain test's worker, with ``SwitchRole`` wired as ``services/worker/server.py`` wires it."""
    w = drainable_worker
    w.servicer.role_switch = RoleSwitch(w.lifecycle, w.servicer, lambda role: w.process.instance_info(role=role), 30.0)
    return w


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
    assert (reply.previous_role, reply.role, reply.finished, reply.evicted) == ("aggregated", "decode", 1, 0)
    assert await _role_in_etcd(worker) == "decode" and worker.servicer.role == "decode"
    assert sum([len(r.token_ids) async for r in worker.stub.Generate(request("after", max_tokens=3))]) == 3


async def test_switching_to_the_current_role_is_a_no_op(worker):
    reply = await worker.stub.SwitchRole(worker_pb2.SwitchRoleRequest(role="aggregated"))
    assert (reply.previous_role, reply.role, reply.seconds) == ("aggregated", "aggregated", 0.0)
    assert await _role_in_etcd(worker) == "aggregated"


@pytest.mark.parametrize(("role", "timeout_s"), [("router", 0.0), ("", 0.0), ("decode", -1.0)])
async def test_a_bad_switch_request_is_invalid_argument(worker, role, timeout_s):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await worker.stub.SwitchRole(worker_pb2.SwitchRoleRequest(role=role, drain_timeout_s=timeout_s))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await _role_in_etcd(worker) == "aggregated"
