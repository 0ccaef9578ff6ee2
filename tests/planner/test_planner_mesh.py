"""The planner on a real mesh of processes: kvstore, a kv router, mock workers (two fleets:
prefill and decode), the planner with its local connector — on the session's etcd and Redis.

- A role switch under load: every request is answered in full, the worker comes back in its
  new role.
- Prompts turning from short to long: the planner moves decode workers to prefill and TTFT p90
  comes back under target within a bounded time; then long answers move one back to decode;
  decisions are never closer than the cooldown.

The mock engine's profile is cpu-smollm2 (a step sleeps what the real engine's would take on
this CPU); windows and cooldowns are seconds, so the whole story fits in about two minutes.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from bench.planner import Phase, workload
from bench.replay import ReplayResult, TokenSynth, replay
from kvmesh.discovery import Discovery
from kvmesh.grpc_service import mesh_channel
from kvmesh.launcher import LocalStack, StackOptions
from kvmesh.local_stores import free_port
from kvmesh.status import collect_status, format_table
from kvmesh_proto.v1 import worker_pb2, worker_pb2_grpc
from planner.decision_log import read_decisions

pytestmark = pytest.mark.slow

TTFT_TARGET_MS = 6000.0
ITL_TARGET_MS = 150.0
COOLDOWN_S = 6.0


@dataclass
class Mesh:
    stack: LocalStack
    grpc: str

    async def workers(self) -> dict[str, str]:
        """Registered worker id -> role."""
        discovery = Discovery(self.stack.etcd_endpoint, self.stack.options.namespace)
        try:
            return {i: info.role for i, info in (await discovery.list("worker")).items()}
        finally:
            await discovery.close()

    async def decisions(self) -> list[dict]:
        discovery = Discovery(self.stack.etcd_endpoint, self.stack.options.namespace)
        try:
            return await read_decisions(discovery)
        finally:
            await discovery.close()


@pytest.fixture(scope="module")
def mesh(etcd_server, redis_server, tmp_path_factory) -> Iterator[Mesh]:
    options = StackOptions(
        prefill=1, decode=3, engine="mock", namespace=f"pl{uuid.uuid4().hex[:6]}", etcd_endpoint=etcd_server.endpoint,
        redis_url=f"redis://{redis_server.endpoint}/0", state_dir=tmp_path_factory.mktemp("planner-mesh"),
        grpc_port=free_port(), http_port=free_port(), ready_timeout_s=240,
    )  # fmt: skip
    stack = LocalStack(options)
    stack.log_dir.mkdir(parents=True, exist_ok=True)
    try:
        stack.start_kvstore()
        stack.add_mock_fleet(0, 1, "prefill")
        stack.add_mock_fleet(1, 3, "decode")
        stack.add_router("router", "kv", options.grpc_port, options.http_port)
        stack.wait_healthy()
        stack.wait_router_workers(f"http://127.0.0.1:{options.http_port}", 4)
        yield Mesh(stack, f"127.0.0.1:{options.grpc_port}")
    finally:
        stack.stop()


def _send(mesh: Mesh, phases: list[Phase], seed: int) -> tuple[list[ReplayResult], list[str]]:
    requests, names = workload(phases, seed)
    synth = TokenSynth(seed)
    results, _ = asyncio.run(replay(mesh.grpc, requests, [synth.prompt(r, i) for i, r in enumerate(requests)], 1.0))
    return results, names


def test_a_role_switch_under_load_answers_every_request(mesh):
    """A decode worker switches to prefill while streams run on it: those that outlast the 1 s
    drain are evicted and resumed elsewhere by the router; none fails, none is cut short."""

    async def scenario() -> tuple[list[ReplayResult], worker_pb2.SwitchRoleResponse, str]:
        requests, _ = workload([Phase("load", 4.0, 4.0, 300, 48)], seed=7)
        synth = TokenSynth(7)
        load = asyncio.create_task(replay(mesh.grpc, requests, [synth.prompt(r, i) for i, r in enumerate(requests)], 1))
        await asyncio.sleep(2.0)
        discovery = Discovery(mesh.stack.etcd_endpoint, mesh.stack.options.namespace)
        try:
            workers = await discovery.list("worker")
            target = next(info for info in sorted(workers.values(), key=lambda i: i.instance_id)
                          if info.role == "decode")  # fmt: skip
            async with mesh_channel(target.address) as channel:
                reply = await worker_pb2_grpc.WorkerStub(channel).SwitchRole(
                    worker_pb2.SwitchRoleRequest(role="prefill", drain_timeout_s=1.0), timeout=60)
        finally:
            await discovery.close()
        results, _ = await load
        return results, reply, target.instance_id

    results, reply, switched = asyncio.run(scenario())
    assert (reply.previous_role, reply.role) == ("decode", "prefill")
    assert [r.error for r in results if r.error] == []
    assert all(r.output_tokens == 48 for r in results), [r.output_tokens for r in results]
    roles = asyncio.run(mesh.workers())
    assert roles[switched] == "prefill"
    # Back to 1 prefill + 3 decode for the planner's test.
    asyncio.run(_switch(mesh, switched, "decode"))


async def _switch(mesh: Mesh, worker_id: str, role: str) -> None:
    discovery = Discovery(mesh.stack.etcd_endpoint, mesh.stack.options.namespace)
    try:
        info = (await discovery.list("worker"))[worker_id]
    finally:
        await discovery.close()
    async with mesh_channel(info.address) as channel:
        await worker_pb2_grpc.WorkerStub(channel).SwitchRole(worker_pb2.SwitchRoleRequest(role=role), timeout=60)


def _p90(values: list[float]) -> float:
    values = sorted(values)
    return values[int(0.9 * (len(values) - 1))]


def test_the_planner_follows_prompts_turning_long_then_answers_turning_long(mesh):
    mesh.stack.options.planner_args = [
        "--ttft-p90-ms", str(TTFT_TARGET_MS), "--itl-p90-ms", str(ITL_TARGET_MS), "--interval-s", "1",
        "--window-s", "8", "--cooldown-s", str(COOLDOWN_S), "--switch-timeout-s", "2", "--min-workers", "4",
        "--max-workers", "4",
    ]  # fmt: skip
    mesh.stack.add_planner()
    mesh.stack.wait_healthy()
    start = time.time()
    short = Phase("short-prompts", 10.0, 1.0, 64, 16)
    long_prompts = Phase("long-prompts", 50.0, 0.8, 1024, 8)  # one prefill worker carries ~0.4/s
    results, names = _send(mesh, [short, long_prompts], seed=1)
    assert [r.error for r in results if r.error] == []
    decisions = asyncio.run(mesh.decisions())
    to_prefill = [d for d in decisions if d["action"] == "switch" and d["role"] == "prefill" and d["outcome"] == "done"]
    assert to_prefill, decisions
    assert to_prefill[0]["at_unix"] - start < 10.0 + 30.0  # moved within 30 s of the change
    # The last 10 s of the long-prompt phase: TTFT p90 back under target.
    tail = [r.ttft_ms for r, n in zip(results, names, strict=True) if n == "long-prompts" and r.timestamp_ms >= 50_000]
    assert tail and _p90(tail) <= TTFT_TARGET_MS, tail
    roles = asyncio.run(mesh.workers())
    assert list(roles.values()).count("prefill") >= 2

    answers = Phase("long-answers", 30.0, 2.0, 300, 128)
    results, _ = _send(mesh, [answers], seed=2)
    assert [r.error for r in results if r.error] == []
    decisions = asyncio.run(mesh.decisions())
    assert any(d["action"] == "switch" and d["role"] == "decode" and d["at_unix"] > start + 60 for d in decisions)
    times = [d["at_unix"] for d in decisions]
    assert all(b - a >= COOLDOWN_S * 0.9 for a, b in itertools.pairwise(times)), times

    # Visible in `kvmesh status` and on the router's dashboard.
    rows = asyncio.run(collect_status(mesh.stack.etcd_endpoint, mesh.stack.options.namespace))
    planner = next(row for row in rows if row["kind"] == "planner")
    assert planner["healthy"] and planner["decisions"] and planner["decisions"][0] in decisions
    assert "planner " in format_table(rows) and decisions[-1]["reason"] in format_table(rows)
    with urllib.request.urlopen(f"http://127.0.0.1:{mesh.stack.options.http_port}/dashboard/data") as response:
        shown = json.load(response)["planner"]
    assert all(d in shown for d in decisions[-5:])
