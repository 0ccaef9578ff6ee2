"""`kvmesh bench router-scale`: the router's decision cost with many workers and a big index.

Starts etcd, Redis and a real kvstore process, indexes ``--blocks`` KV blocks spread over
``--workers`` workers (the registry benchmark's conversation-shaped workload, written through
``BlockRegistry.apply_batch`` as the kvstore's Publish path would), and drives the router's own
``RouterCore.route`` — kvstore ``FindMatches`` over gRPC, scoring of every worker — in this one
process, i.e. one core. A decision also hashes the prompt's tokens (``--prompt-tokens``, one
chain per query), as ``RouterCore.open`` does. Reports decision latency p50/p99 one at a time,
and decisions/s with ``--concurrency`` in flight; ``--profile`` writes a CPU-time profile (cProfile)
of the sequential run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import redis.asyncio as aioredis

from bench.registry import MODEL, build_workload, ingest, make_queries, percentile, worker_batches
from kvmesh.config import RouterSettings
from kvmesh.discovery import Discovery
from kvmesh.hashing import block_hashes
from kvmesh.launcher import LocalStack, StackOptions
from kvmesh_proto.v1 import common_pb2
from kvstore.registry import BlockRegistry
from router.kv_index import KvIndexClient
from router.pipeline import RouterCore
from router.worker_pool import WorkerPool, WorkerState


def fake_pool(discovery: Discovery, workers: int) -> WorkerPool:
    """A pool of ``workers`` registered-looking workers the router can score (no connections:
    only routing is measured, so nothing is ever sent to them)."""
    pool = WorkerPool(discovery)
    for index in range(workers):
        info = common_pb2.InstanceInfo(instance_id=f"bench-worker-{index:02d}", kind="worker", role="aggregated",
                                       model=MODEL, block_size=16)  # fmt: skip
        pool.workers[info.instance_id] = WorkerState(info, channel=None, stub=None)  # type: ignore[arg-type]
    return pool


async def decide(core: RouterCore, info: common_pb2.InstanceInfo, tokens: list[int], chain: list[int]) -> None:
    """One routing decision: hash the prompt (the timed cost of ``open``), then route. The index
    is queried with ``chain`` — an indexed conversation's hashes — so overlaps are realistic."""
    hashes = block_hashes(tokens, 16)
    assert len(hashes) == len(chain)
    _, route = await core.route(info, chain, set())
    if route.mode != "kv":  # the index did not answer: a load-only decision would flatter the figures
        raise RuntimeError(f"routing fell back to {route.mode}: the kvstore did not answer in time")


async def measure(args: argparse.Namespace, stack: LocalStack) -> dict:
    rng = np.random.default_rng(args.seed)
    registry = BlockRegistry(aioredis.from_url(stack.redis_url), stack.options.namespace)
    workload = build_workload(rng, args.workers, args.blocks, args.prompt_tokens // 16)
    fill_rate = await ingest(registry, [worker_batches(workload, w, 64) for w in range(args.workers)])
    stats = await registry.stats()
    discovery = Discovery(stack.etcd_endpoint, stack.options.namespace)
    follow = args.kv_index == "follow"
    kv_index = KvIndexClient(discovery, timeout_ms=1000, follow=follow)
    snapshot_start = time.perf_counter()
    await kv_index.start()
    # The kvstore registers once it is up; a following router then reads its snapshot.
    while not (kv_index.following if follow else kv_index._kvstores.instances):
        await asyncio.sleep(0.05)
    snapshot_s = time.perf_counter() - snapshot_start
    settings = RouterSettings(namespace=stack.options.namespace, kv_index=args.kv_index)
    core = RouterCore(settings, fake_pool(discovery, args.workers), kv_index)
    info = common_pb2.InstanceInfo(model=MODEL, block_size=16)
    chains = make_queries(rng, workload, args.queries)
    tokens = [rng.integers(1000, 40000, args.prompt_tokens).tolist() for _ in range(8)]
    for chain in chains[:50]:  # warm-up: channel, Lua script load
        await decide(core, info, tokens[0], chain)
    profiler = None
    if args.profile:
        import cProfile

        # CPU time, not wall time: on a shared machine wall time is mostly waiting for a core.
        profiler = cProfile.Profile(time.process_time)
        profiler.enable()
    latencies = []
    cpu_before = cpu_seconds(stack)
    for index, chain in enumerate(chains):
        start = time.perf_counter()
        await decide(core, info, tokens[index % len(tokens)], chain)
        latencies.append((time.perf_counter() - start) * 1000)
    cpu_ms = {name: (after - cpu_before[name]) * 1000 / len(chains) for name, after in cpu_seconds(stack).items()}
    if profiler is not None:
        import io
        import pstats

        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
        args.profile.write_text(text.getvalue())
    throughput = await concurrent_rate(core, info, tokens, chains, args.concurrency)
    await kv_index.stop()
    await discovery.close()
    return {
        "workers": args.workers, "indexed_blocks": stats.blocks, "kv_index": args.kv_index,
        "snapshot_s": snapshot_s if follow else None, "router_rss_mb": _rss_mb(), "load_average_1m": os.getloadavg()[0],
        "fill_blocks_per_s": fill_rate, "prompt_tokens": args.prompt_tokens, "queries": len(latencies),
        "decision_ms": {"p50": percentile(latencies, 50), "p99": percentile(latencies, 99),
                        "mean": statistics.fmean(latencies)},
        "decisions_per_s": throughput, "concurrency": args.concurrency,
        # CPU time per sequential decision in each process: what the latency would be on idle
        # cores (less the loopback hops), whatever the shared machine's load.
        "cpu_ms_per_decision": cpu_ms,
    }  # fmt: skip


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def cpu_seconds(stack: LocalStack) -> dict[str, float]:
    """User + system CPU seconds so far of this process (the router), the kvstore and Redis."""
    import psutil

    pids = {"router": os.getpid(), **{c.name: c.proc.pid for c in stack.children},
            **{s.name: s.proc.pid for s in stack.stores if s.name == "redis"}}  # fmt: skip
    return {name: sum(psutil.Process(pid).cpu_times()[:2]) for name, pid in pids.items()}


async def concurrent_rate(core: RouterCore, info: common_pb2.InstanceInfo, tokens: list[list[int]],
                          chains: list[list[int]], concurrency: int) -> float:  # fmt: skip
    """Decisions per second with ``concurrency`` decisions in flight (this process: one core)."""
    queue = list(enumerate(chains))

    async def loop() -> None:
        while queue:
            index, chain = queue.pop()
            await decide(core, info, tokens[index % len(tokens)], chain)

    start = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return len(chains) / (time.perf_counter() - start)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvmesh bench router-scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=1_000_000, help="indexed (worker, block) entries")
    parser.add_argument("--prompt-tokens", type=int, default=4096, help="prompt length of every query")
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kv-index", choices=("follow", "query"), default="follow",
                        help="follow: the router's own copy of the index; query: FindMatches per decision")
    parser.add_argument("--profile", type=Path, default=None, help="write a CPU-time profile here")
    parser.add_argument("--json", type=Path, default=Path("bench/results/router_scale.json"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    state = Path(tempfile.mkdtemp(prefix="kvmesh-router-scale-"))
    stack = LocalStack(StackOptions(workers=0, namespace=f"scale{time.time_ns() % 10**8}", state_dir=state))
    try:
        stack.start_stores()
        stack.start_kvstore()
        stack.wait_healthy()
        result = asyncio.run(measure(args, stack))
    finally:
        stack.stop()
    d = result["decision_ms"]
    print(f"kv index {args.kv_index}: {result['workers']} workers, {args.blocks:,} indexed blocks, "
          f"{args.prompt_tokens}-token prompts: "
          f"decision p50 {d['p50']:.3f} ms p99 {d['p99']:.3f} ms; {result['decisions_per_s']:.0f} decisions/s "
          f"at concurrency {args.concurrency} (one process); CPU ms per decision: "
          + ", ".join(f"{k} {v:.3f}" for k, v in result["cpu_ms_per_decision"].items()))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, default=str))
    print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
