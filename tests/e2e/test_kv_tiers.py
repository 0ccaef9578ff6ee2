"""KV tiers in a real worker process: a later turn is served from the worker's host/disk copies
(``cached_tokens`` and stats show it, the kvstore knows the tier), and a restarted worker keeps
its disk blocks, announces them again and reuses them, with output identical to a cold run."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from kvmesh.hashing import block_hashes
from kvmesh.status import collect_status
from kvmesh_proto.v1 import common_pb2, kvstore_pb2, kvstore_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.engine import Engine, SamplingParams

# A 24-block pool and one fp32 block of host memory: the filler pushes the conversation out of
# the pool, and all but its first block on through host memory to disk.
TIERED_ENV = {"KVMESH_KV_CACHE_BLOCKS": "24", "KVMESH_HOST_CACHE_GB": "0.0008"}
INDEX = "tiers"  # a name of its own: other tests add workers 7 and 9 to the shared mesh
MAX_TOKENS = 6


def conversation(tokenizer) -> tuple[list[int], list[int]]:
    messages = [{"role": "system", "content": "You are a careful travel planner. " * 6},
                {"role": "user", "content": "Plan one day in Lisbon."}]
    first = tokenizer.encode_chat(messages)
    messages += [{"role": "assistant", "content": "Morning in Alfama, afternoon in Belém."},
                 {"role": "user", "content": "And the evening?"}]
    return first, tokenizer.encode_chat(messages)


async def generate(address: str, request_id: str, tokens: list[int]) -> tuple[list[int], int]:
    """Output tokens and cached prompt tokens of one greedy request sent to the worker itself."""
    request = worker_pb2.WorkerGenerateRequest(
        request_id=request_id, token_ids=tokens,
        sampling=common_pb2.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))  # fmt: skip
    async with grpc.aio.insecure_channel(address) as channel:
        replies = [r async for r in worker_pb2_grpc.WorkerStub(channel).Generate(request)]
    return [t for r in replies for t in r.token_ids], replies[-1].usage.cached_tokens


async def tier_match(kvstore: str, model: str, worker_id: str, hashes: list[int]) -> kvstore_pb2.WorkerMatch | None:
    async with grpc.aio.insecure_channel(kvstore) as channel:
        reply = await kvstore_pb2_grpc.KvStoreStub(channel).FindMatches(kvstore_pb2.FindMatchesRequest(
            model=model, block_hashes=hashes, worker_ids=[worker_id], by_tier=True))  # fmt: skip
    return next(iter(reply.matches), None)


async def wait_for_lower_tier(kvstore: str, model: str, worker_id: str, hashes: list[int]) -> kvstore_pb2.WorkerMatch:
    deadline = time.monotonic() + 10
    while True:
        match = await tier_match(kvstore, model, worker_id, hashes)
        if match is not None and match.matched_blocks == len(hashes) and match.disk_blocks:
            return match
        assert time.monotonic() < deadline, f"the index never showed the blocks on disk: {match}"
        await asyncio.sleep(0.2)


async def addresses(mesh) -> dict[str, str]:
    return {r["id"]: r["address"] for r in await collect_status(mesh.etcd_endpoint, mesh.namespace)}


def stop(mesh, instance_id: str) -> None:
    """SIGTERM this test's worker (a graceful stop) and forget it, leaving the shared mesh as found."""
    child = mesh.child(instance_id)
    child.proc.terminate()
    child.proc.wait(30)
    mesh.stack.children.remove(child)
    mesh.stack.wait_router_workers(mesh.kv_http, 2, timeout_s=30)


async def worker_stats(address: str) -> worker_pb2.WorkerStats:
    async with grpc.aio.insecure_channel(address) as channel:
        stream = worker_pb2_grpc.WorkerStub(channel).Stats(worker_pb2.WorkerStatsRequest())
        report = await stream.read()
        stream.cancel()
    return report


@pytest.mark.slow
async def test_tiers_serve_a_later_turn_and_survive_a_worker_restart(mesh, tokenizer, engine: Engine):
    first, second = conversation(tokenizer)
    hashes = block_hashes(first)
    filler = tokenizer.encode("Filler that takes the whole device pool. " * 60)[:376]
    engine.reset_prefix_cache()
    expected = engine.generate([second], SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
    expected = expected[0].new_token_ids

    worker = mesh.stack.add_worker("aggregated", INDEX, env=TIERED_ENV)
    try:
        mesh.stack.wait_router_workers(mesh.kv_http, 3, timeout_s=180)
        rows = await addresses(mesh)
        kvstore = rows[f"kvstore-{mesh.namespace}"]
        await generate(rows[worker], "turn-1", first)
        await generate(rows[worker], "filler", filler)
        await wait_for_lower_tier(kvstore, engine.model_id, worker, hashes)

        tokens, cached = await generate(rows[worker], "turn-2", second)
        assert tokens == expected
        assert cached >= len(hashes) * 16
        stats = await worker_stats(rows[worker])
        assert stats.disk_hit_blocks > 0 and stats.host_hit_blocks + stats.disk_hit_blocks >= len(hashes)

        # Restart: a graceful stop writes what host memory holds to disk and finishes the writes;
        # the new process has the same id, so the same disk directory.
        await generate(rows[worker], "filler-2", filler)
        stop(mesh, worker)
        mesh.stack.add_worker("aggregated", INDEX, env=TIERED_ENV)
        mesh.stack.wait_router_workers(mesh.kv_http, 3, timeout_s=180)
        rows = await addresses(mesh)
        announced = await wait_for_lower_tier(kvstore, engine.model_id, worker, hashes)
        assert announced.host_blocks == 0  # a fresh process: nothing in host memory yet

        tokens, cached = await generate(rows[worker], "turn-2-again", second)
        assert tokens == expected
        assert cached >= len(hashes) * 16
        assert (await worker_stats(rows[worker])).disk_hit_blocks >= len(hashes)
    finally:
        stop(mesh, worker)
