"""The planner on a real mesh of processes: kvstore, a kv router, mock workers (two fleets:
prefill and decode), the planner with its local connector — on the session's etcd and Redis.

- The planner adds a worker (one in-process step on synthetic metrics, the real local connector):
  the new worker process registers and serves; a remove stops it.
- Role switches under load: every request is answered in full, whether a worker's streams were
  evicted at its drain deadline or cut by the router when it left; the workers come back in
  their new role.
- Prompts turning from short to long: the planner moves decode workers to prefill and TTFT p90
  comes back under target within a bounded time; then long answers move one back to decode;
  decisions are never closer than the cooldown.

The mock engine's profile is cpu-smollm2 (a step sleeps what the real engine's would take on
this CPU); windows and cooldowns are seconds, so the whole story fits in under a minute of load.
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

import grpc
import pytest

from bench.planner import Phase, workload
from bench.replay import ReplayResult, TokenSynth, replay
from kvmesh.config import PlannerSettings
from kvmesh.discovery import Discovery
from kvmesh.grpc_service import mesh_channel
from kvmesh.launcher import LocalStack, StackOptions
from kvmesh.local_stores import free_port
from kvmesh.status import collect_status, format_table
from kvmesh_proto.v1 import router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from planner.connectors.local import LocalConnector
from planner.decision_log import read_decisions
from planner.policy import Decision
from planner.server import Planner
from tests.planner.test_planner_loop import FixedSource
from tests.planner.test_policy import window

pytestmark = pytest.mark.slow

TTFT_TARGET_MS = 6000.0
ITL_TARGET_MS = 150.0
COOLDOWN_S = 5.0
WINDOW_S = 6.0


@dataclass
class Mesh:
    stack: LocalStack
    grpc: str
    # The settings of the fixture's one in-process planner step, and the reason it gave for adding a worker.
    planner_settings: PlannerSettings
    add_reason: str

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.stack.options.http_port}"

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
    settings = PlannerSettings(etcd_endpoint=etcd_server.endpoint, namespace=options.namespace, metrics_port=-1,
                               ttft_p90_ms=2000, itl_p90_ms=100, min_workers=4, max_workers=5, worker_engine="mock",
                               state_dir=str(options.state_dir))  # fmt: skip
    stack = LocalStack(options)
    stack.log_dir.mkdir(parents=True, exist_ok=True)
    # The connector starts workers from a thread of this loop's executor, and a child dies with
    # the thread that started it (PR_SET_PDEATHSIG): the loop lives as long as the mesh.
    loop = asyncio.new_event_loop()
    adder: LocalConnector | None = None
    try:
        stack.start_kvstore()
        stack.add_mock_fleet(0, 1, "prefill")
        stack.add_mock_fleet(1, 3, "decode")
        stack.add_router("router", "kv", options.grpc_port, options.http_port, ["--worker-leave-grace-s", "2"])
        # Started beside the fleets, so its start-up costs no extra wait.
        adder, reason = loop.run_until_complete(_planner_step_that_adds_a_worker(settings))
        stack.wait_healthy()
        stack.wait_router_workers(f"http://127.0.0.1:{options.http_port}", 5, timeout_s=240)
        yield Mesh(stack, f"127.0.0.1:{options.grpc_port}", settings, reason)
    finally:
        if adder is not None:
            loop.run_until_complete(adder.close())
        loop.close()
        stack.stop(grace_s=3)  # idle services exit at once; one waiting out a stream's grace is killed


async def _planner_step_that_adds_a_worker(settings: PlannerSettings) -> tuple[LocalConnector, str]:
    """One planner step whose metrics say TTFT is over target on decode (short prompts) and the
    one prefill worker cannot spare itself: below --max-workers, the decision is to add a decode
    worker, which the local connector starts as a process. Returns the connector and the reason."""
    discovery = Discovery(settings.etcd_endpoint, settings.namespace)
    connector = LocalConnector(settings, discovery)
    try:
        planner = Planner(settings, discovery, connector)
        planner.source = FixedSource(window(1, 3, ttft=5.0, itl=0.09, prefill_running=1))
        await planner.step()
        (decision,) = await read_decisions(discovery)
    finally:
        await discovery.close()
    assert (decision["action"], decision["role"], decision["outcome"]) == ("add", "decode", "done"), decision
    return connector, decision["reason"]


def test_a_worker_the_planner_adds_registers_and_serves_then_a_remove_stops_it(mesh):
    """The fixture's planner step decided to add a decode worker; the local connector started it
    as a process of its own, which registered (the router counts 5 workers) and serves."""
    fleet = {f"{role}-{mesh.stack.options.namespace}-{i}" for role, i in (("prefill", 0), ("decode", 1))}
    roles = asyncio.run(mesh.workers())
    (added,) = [w for w in roles if w.rpartition(".")[0] not in fleet]
    assert roles[added] == "decode" and "TTFT p90" in mesh.add_reason
    requests, _ = workload([Phase("probe", 2.0, 6.0, 64, 4)], seed=3)
    synth = TokenSynth(3)
    results, _ = asyncio.run(replay(mesh.grpc, requests, [synth.prompt(r, i) for i, r in enumerate(requests)], 1))
    assert [r.error for r in results if r.error] == [] and added in {r.worker_id for r in results}

    async def remove() -> None:
        discovery = Discovery(mesh.stack.etcd_endpoint, mesh.stack.options.namespace)
        try:
            await LocalConnector(mesh.planner_settings, discovery).apply(Decision("remove", "decode", "", (added,)))
        finally:
            await discovery.close()

    asyncio.run(remove())  # SIGTERM to its process: it drains and leaves
    mesh.stack.wait_router_workers(mesh.http, 4, timeout_s=60)
    assert added not in asyncio.run(mesh.workers())


def _send(mesh: Mesh, phases: list[Phase], seed: int) -> tuple[list[ReplayResult], list[str]]:
    requests, names = workload(phases, seed)
    synth = TokenSynth(seed)
    results, _ = asyncio.run(replay(mesh.grpc, requests, [synth.prompt(r, i) for i, r in enumerate(requests)], 1.0))
    return results, names


def test_role_switches_under_load_answer_every_request(mesh):
    """Two decode workers switch to prefill while streams run on them, and every stream ends in
    full. One drains for 0.5 s: streams outlasting it are evicted and the router resumes them
    elsewhere. The other drains for 8 s, longer than the router's leave grace (2 s here): the
    router cuts its streams itself and must resume them too. (Such a cut once read as the
    router's own cancellation: its handler ended with no status and the client's stream hung —
    the hang of `kvmesh bench planner`.)"""

    async def scenario() -> tuple[list[ReplayResult], list[worker_pb2.SwitchRoleResponse], list[str], int]:
        requests, _ = workload([Phase("load", 4.0, 4.0, 128, 96)], seed=7)
        synth = TokenSynth(7)
        before = _router_migrations(mesh)
        # A deadline: a stream that never ends fails the test instead of hanging it.
        load = asyncio.create_task(replay(mesh.grpc, requests, [synth.prompt(r, i) for i, r in enumerate(requests)],
                                          1, timeout_s=60))  # fmt: skip
        await asyncio.sleep(2.5)
        targets = sorted(w for w, role in (await mesh.workers()).items() if role == "decode")[:2]
        replies = await asyncio.gather(_switch(mesh, targets[0], "prefill", drain_timeout_s=0.5),
                                       _switch(mesh, targets[1], "prefill", drain_timeout_s=8.0))  # fmt: skip
        results, _ = await load
        return results, list(replies), targets, _router_migrations(mesh) - before

    results, (evicting, outlasted), switched, migrations = asyncio.run(scenario())
    assert [r.error for r in results if r.error] == []
    assert all(r.output_tokens == 96 for r in results), [r.output_tokens for r in results]
    assert evicting.evicted >= 1, evicting  # path 1: evicted at the drain's deadline
    # Path 2: the router cut the streams 2 s after the worker left, long before its 8 s drain ended.
    assert (outlasted.finished, outlasted.evicted) != (0, 0) and outlasted.seconds < 6.0, outlasted
    assert migrations >= evicting.evicted + outlasted.finished, (migrations, evicting, outlasted)
    roles = asyncio.run(mesh.workers())
    assert [roles[w] for w in switched] == ["prefill", "prefill"]
    # Back to 1 prefill + 3 decode for the planner's test.
    for worker_id in switched:
        asyncio.run(_switch(mesh, worker_id, "decode"))


def _router_migrations(mesh: Mesh) -> int:
    with grpc.insecure_channel(mesh.grpc) as channel:
        return router_pb2_grpc.RouterStub(channel).Status(router_pb2.StatusRequest(), timeout=10).migrations


async def _switch(mesh: Mesh, worker_id: str, role: str,
                  drain_timeout_s: float = 0.0) -> worker_pb2.SwitchRoleResponse:  # fmt: skip
    discovery = Discovery(mesh.stack.etcd_endpoint, mesh.stack.options.namespace)
    try:
        info = (await discovery.list("worker"))[worker_id]
    finally:
        await discovery.close()
    async with mesh_channel(info.address) as channel:
        return await worker_pb2_grpc.WorkerStub(channel).SwitchRole(
            worker_pb2.SwitchRoleRequest(role=role, drain_timeout_s=drain_timeout_s), timeout=60)


def _p90(values: list[float]) -> float:
    values = sorted(values)
    return values[int(0.9 * (len(values) - 1))]


def test_the_planner_follows_prompts_turning_long_then_answers_turning_long(mesh):
    mesh.stack.options.planner_args = [
        "--ttft-p90-ms", str(TTFT_TARGET_MS), "--itl-p90-ms", str(ITL_TARGET_MS), "--interval-s", "1",
        "--window-s", str(WINDOW_S), "--cooldown-s", str(COOLDOWN_S), "--switch-timeout-s", "2",
        "--min-workers", "4", "--max-workers", "4",
    ]  # fmt: skip
    start = time.time()
    # The load starts with the planner's process, not after its seconds of imports: it comes up
    # during the first phase or soon after, and must still move workers within 20 s of the change.
    mesh.stack.add_planner()
    short = Phase("short-prompts", 4.0, 1.0, 64, 16)
    long_prompts = Phase("long-prompts", 30.0, 0.7, 1024, 8)  # one prefill worker carries ~0.4/s
    results, names = _send(mesh, [short, long_prompts], seed=1)
    mesh.stack.wait_healthy()
    assert [r.error for r in results if r.error] == []
    decisions = asyncio.run(mesh.decisions())
    to_prefill = [d for d in decisions if d["action"] == "switch" and d["role"] == "prefill" and d["outcome"] == "done"]
    assert to_prefill, decisions
    assert to_prefill[0]["at_unix"] - start < short.seconds + 20.0  # moved within 20 s of the change
    # The last 10 s of the long-prompt phase: TTFT p90 back under target.
    phase_end_ms = (short.seconds + long_prompts.seconds) * 1000
    tail = [r.ttft_ms for r, n in zip(results, names, strict=True)
            if n == "long-prompts" and r.timestamp_ms >= phase_end_ms - 10_000]  # fmt: skip
    assert tail and _p90(tail) <= TTFT_TARGET_MS, (tail, decisions)
    roles = asyncio.run(mesh.workers())
    assert list(roles.values()).count("prefill") >= 2

    answers_start = time.time()
    # Answers 8× those of the long prompts, short prompts prefilled on the decode workers themselves.
    answers = Phase("long-answers", 10.0, 3.0, 128, 64)
    results, _ = _send(mesh, [answers], seed=2)
    assert [r.error for r in results if r.error] == []
    decisions = asyncio.run(mesh.decisions())
    assert any(d["action"] == "switch" and d["role"] == "decode" and d["at_unix"] > answers_start for d in decisions)
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
