"""What the fault tests (store failures, rolling restarts, chaos) look at and do, on a ``FaultMesh``:
the router's and kvstore's own reports, the workers' block pools, and a steady greedy load
whose every answer is checked against the in-process engine."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import httpx

from kvmesh.discovery import Discovery
from kvmesh.grpc_service import mesh_channel
from kvmesh_proto.v1 import kvstore_pb2, kvstore_pb2_grpc, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.engine.llm_engine import Engine
from services.engine.sampling_params import SamplingParams
from services.engine.tokenizer import Tokenizer
from tests.e2e.test_routing import system_prompt
from tests.fixtures.mesh import FaultMesh

# Statuses a client may retry: the router's own refusal (429), nobody to serve right now (503).
RETRIABLE_HTTP = (429, 503)


async def wait_for(condition: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> float:
    """Poll until ``condition`` holds; returns the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            if await condition():
                return time.monotonic() - started
        except (grpc.aio.AioRpcError, OSError, ConnectionError):
            pass
        await asyncio.sleep(0.2)
    raise AssertionError(f"not within {timeout_s}s: {what}")


async def router_status(mesh: FaultMesh) -> router_pb2.StatusResponse:
    async with grpc.aio.insecure_channel(mesh.grpc) as channel:
        return await router_pb2_grpc.RouterStub(channel).Status(router_pb2.StatusRequest(), timeout=5)


async def registered(mesh: FaultMesh, kind: str | None = None) -> dict[str, object]:
    discovery = Discovery(mesh.etcd.endpoint, mesh.namespace)
    try:
        return await discovery.list(kind)
    finally:
        await discovery.close()


async def kvstore_stats(mesh: FaultMesh) -> kvstore_pb2.KvStoreStatsResponse:
    (info,) = (await registered(mesh, "kvstore")).values()
    async with mesh_channel(info.address) as channel:
        return await kvstore_pb2_grpc.KvStoreStub(channel).Stats(kvstore_pb2.KvStoreStatsRequest(), timeout=5)


async def worker_stats(mesh: FaultMesh) -> dict[str, worker_pb2.WorkerStats]:
    """One load report from every registered worker."""
    reports = {}
    for worker_id, info in (await registered(mesh, "worker")).items():
        async with mesh_channel(info.address) as channel:
            call = worker_pb2_grpc.WorkerStub(channel).Stats(worker_pb2.WorkerStatsRequest(interval_ms=50), timeout=5)
            reports[worker_id] = await call.read()
            call.cancel()
    return reports


async def pools_idle_and_indexed(mesh: FaultMesh, workers: int = 2) -> bool:
    """Every worker's pool is back to baseline (no block in use: nothing leaked) and the index
    holds exactly the blocks each worker can serve (idle, those are its cached blocks)."""
    stats = await worker_stats(mesh)
    if len(stats) != workers or any(s.kv_blocks_used or s.running_requests or s.waiting_requests
                                     for s in stats.values()):  # fmt: skip
        return False
    index = {w.worker_id: w.blocks for w in (await kvstore_stats(mesh)).workers}
    return all(index.get(worker_id, 0) == s.kv_blocks_cached for worker_id, s in stats.items())


@dataclass
class Outcome:
    status: int
    route: str = ""
    error: str = ""


@dataclass
class GreedyLoad:
    """Requests through the router's HTTP API, ``concurrency`` at a time, each checked against
    the in-process engine's greedy output for its prompt."""

    http: str
    prompts: list[list[dict[str, str]]]
    expected: list[str]
    max_tokens: int
    concurrency: int = 2
    outcomes: list[Outcome] = field(default_factory=list)

    @classmethod
    def build(cls, http: str, engine: Engine, tokenizer: Tokenizer, topics: list[str], max_tokens: int,
              concurrency: int = 2) -> GreedyLoad:  # fmt: skip
        prompts = [[{"role": "system", "content": system_prompt(topic, "faults")},
                    {"role": "user", "content": f"Tell me one fact about {topic}."}] for topic in topics]  # fmt: skip
        sampling = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        outputs = engine.generate([tokenizer.encode_chat(p) for p in prompts], sampling)
        return cls(http, prompts, [tokenizer.decode(o.new_token_ids) for o in outputs], max_tokens, concurrency)

    async def one(self, client: httpx.AsyncClient, index: int) -> Outcome:
        body = {"messages": self.prompts[index], "max_tokens": self.max_tokens, "temperature": 0,
                "ignore_eos": True}  # fmt: skip
        try:
            response = await client.post(f"{self.http}/v1/chat/completions", json=body)
        except httpx.HTTPError as exc:
            return Outcome(0, error=f"{type(exc).__name__}: {exc}")
        if response.status_code != 200:
            return Outcome(response.status_code, error=response.text[:300])
        text = response.json()["choices"][0]["message"]["content"]
        wrong = "" if text == self.expected[index] else f"wrong text {text!r} != {self.expected[index]!r}"
        return Outcome(200, response.headers.get("x-kvmesh-route", ""), wrong)

    async def run(self, stop: asyncio.Event) -> None:
        """Until ``stop`` is set; every request's outcome lands in ``outcomes``."""
        async with httpx.AsyncClient(timeout=120) as client:

            async def loop(lane: int) -> None:
                turn = lane
                while not stop.is_set():
                    self.outcomes.append(await self.one(client, turn % len(self.prompts)))
                    turn += 1

            await asyncio.gather(*(loop(lane) for lane in range(self.concurrency)))

    def completed(self) -> int:
        return sum(o.status == 200 for o in self.outcomes)

    async def completed_at_least(self, count: int) -> bool:
        return self.completed() >= count

    def failures(self) -> list[Outcome]:
        """Outcomes that are neither a correct answer nor a clear retriable refusal."""
        return [o for o in self.outcomes if o.error and o.status not in RETRIABLE_HTTP]
