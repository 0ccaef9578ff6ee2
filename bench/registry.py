"""Block-registry benchmark: KV-event ingestion rate and FindMatches latency (issue 11).

Starts its own redis-server in a temp dir, fills an index of ``--blocks`` (worker, block)
entries spread over ``--workers`` workers through ``BlockRegistry.apply_batch`` (the path
the kvstore's Publish stream takes), then times ``find_matches`` for 256-block chains.
Measured at the registry level: Python client + one Redis round trip per call, no gRPC.

Run: ``.venv/bin/python bench/registry.py`` (``--help`` for sizes). Writes
``bench/results/registry.json``. Targets: ingestion > 200,000 blocks/s, p99 < 2 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import redis.asyncio as aioredis

from kvmesh.local_stores import StoreProcess, start_redis
from kvmesh_proto.v1.kvstore_pb2 import AllCleared, BlockStored, KvEvent, KvEventBatch
from kvstore.registry import BlockRegistry

MODEL = "bench-model@r1"
RESULTS = Path(__file__).parent / "results" / "registry.json"
TARGET_BLOCKS_PER_S = 200_000
TARGET_P99_MS = 2.0


@dataclass
class Workload:
    """Conversations (hash chains) and which leading part of which one each worker holds.

    Every conversation starts with one of a few system prompts (4-32 blocks, skewed
    popularity), so most workers share the popular prompts' blocks, while a conversation's
    own tail sits on the 1-3 workers that served it, each holding a different length.
    """

    prompts: list[np.ndarray]
    prompt_popularity: np.ndarray
    conversations: list[np.ndarray]  # each chain_len blocks, starting with its prompt
    conversation_prompt: list[int]
    holdings: list[list[tuple[int, int]]]  # per worker: (conversation, leading blocks held)

    def prompt_len(self, conversation: int) -> int:
        return len(self.prompts[self.conversation_prompt[conversation]])


def random_chain(rng: np.random.Generator, length: int) -> np.ndarray:
    return rng.integers(0, 2**64, size=length, dtype=np.uint64)


def build_workload(rng: np.random.Generator, workers: int, blocks: int, chain_len: int) -> Workload:
    """Conversations are added, each on 1-3 workers with room left, until ``blocks`` are held."""
    prompts = [random_chain(rng, int(rng.integers(4, 33))) for _ in range(16)]
    weights = 1.0 / np.arange(1, len(prompts) + 1) ** 1.2
    workload = Workload(prompts, weights / weights.sum(), [], [], [[] for _ in range(workers)])
    room = [blocks // workers + (w < blocks % workers) for w in range(workers)]
    prompts_held: list[set[int]] = [set() for _ in range(workers)]
    while any(room):
        prompt = int(rng.choice(len(prompts), p=workload.prompt_popularity))
        prompt_len = len(prompts[prompt])
        workload.conversations.append(np.concatenate([prompts[prompt], random_chain(rng, chain_len - prompt_len)]))
        workload.conversation_prompt.append(prompt)
        open_workers = [w for w in range(workers) if room[w]]
        replicas = rng.choice(open_workers, size=min(len(open_workers), int(rng.integers(1, 4))), replace=False)
        for worker in replicas.tolist():
            already = prompt_len if prompt in prompts_held[worker] else 0
            new_blocks = min(int(rng.integers(prompt_len + 1, chain_len + 1)) - already, room[worker])
            room[worker] -= new_blocks
            workload.holdings[worker].append((len(workload.conversations) - 1, already + new_blocks))
            if already + new_blocks >= prompt_len:
                prompts_held[worker].add(prompt)
    return workload


def worker_batches(workload: Workload, worker: int, batch_blocks: int) -> list[KvEventBatch]:
    """One worker's event stream: an AllCleared start, then the blocks it stored, in batches.

    A system prompt the worker already reported is not reported again: a real worker
    reports a block once, when it fills it.
    """
    worker_id = f"bench-worker-{worker:02d}"
    batches = [KvEventBatch(worker_id=worker_id, model=MODEL, seq=0, events=[KvEvent(cleared=AllCleared())])]
    pending: list[KvEvent] = []
    pending_blocks = 0
    prompts_reported: set[int] = set()
    for conversation, length in workload.holdings[worker]:
        prompt, prompt_len = workload.conversation_prompt[conversation], workload.prompt_len(conversation)
        first = prompt_len if prompt in prompts_reported else 0
        if length >= prompt_len:
            prompts_reported.add(prompt)
        chain = workload.conversations[conversation][first:length].tolist()
        for start in range(0, len(chain), batch_blocks):
            part = chain[start : start + batch_blocks]
            pending.append(KvEvent(stored=BlockStored(block_hashes=part)))
            pending_blocks += len(part)
            if pending_blocks >= batch_blocks:
                batches.append(KvEventBatch(worker_id=worker_id, model=MODEL, seq=len(batches), events=pending))
                pending, pending_blocks = [], 0
    if pending:
        batches.append(KvEventBatch(worker_id=worker_id, model=MODEL, seq=len(batches), events=pending))
    return batches


async def ingest(registry: BlockRegistry, streams: list[list[KvEventBatch]]) -> float:
    """Every worker streams its batches in order, all workers at once; returns blocks/s."""

    async def publish(batches: list[KvEventBatch]) -> None:
        for batch in batches:
            ack = await registry.apply_batch(batch)
            assert not ack.resync_required, ack

    blocks = sum(len(e.stored.block_hashes) for batches in streams for b in batches for e in b.events)
    started = time.perf_counter()
    await asyncio.gather(*(publish(batches) for batches in streams))
    return blocks / (time.perf_counter() - started)


def make_queries(rng: np.random.Generator, workload: Workload, count: int) -> list[list[int]]:
    """60% continue a stored conversation, 25% open a new one on a known system prompt,
    15% share nothing with the index."""
    chain_len = len(workload.conversations[0])
    queries = []
    for _ in range(count):
        kind = rng.random()
        if kind < 0.6:
            chain = workload.conversations[int(rng.integers(len(workload.conversations)))]
        elif kind < 0.85:
            prompt = workload.prompts[int(rng.choice(len(workload.prompts), p=workload.prompt_popularity))]
            chain = np.concatenate([prompt, random_chain(rng, chain_len - len(prompt))])
        else:
            chain = random_chain(rng, chain_len)
        queries.append(chain.tolist())
    return queries


def stress_batches(rng: np.random.Generator, next_seqs: list[int], chain_len: int) -> tuple[list[int], list]:
    """The worst case for one query: every worker holds a different-length prefix of one chain.

    Each worker's batch continues its sequence after the fill (``next_seqs``).
    """
    chain = random_chain(rng, chain_len).tolist()
    lengths = np.linspace(chain_len / len(next_seqs), chain_len, len(next_seqs)).astype(int).tolist()
    batches = [
        KvEventBatch(
            worker_id=f"bench-worker-{worker:02d}",
            model=MODEL,
            seq=seq,
            events=[KvEvent(stored=BlockStored(block_hashes=chain[:length]))],
        )
        for worker, (seq, length) in enumerate(zip(next_seqs, lengths, strict=True))
    ]
    return chain, batches


async def time_queries(registry: BlockRegistry, queries: list[list[int]]) -> tuple[list[float], list[int]]:
    """Latency of each call in ms, one at a time, and the best match length each got."""
    latencies, best = [], []
    for chain in queries:
        started = time.perf_counter()
        matches = await registry.find_matches(MODEL, chain)
        latencies.append((time.perf_counter() - started) * 1e3)
        best.append(matches[0][1] if matches else 0)
    return latencies, best


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


async def run(args: argparse.Namespace, store: StoreProcess) -> dict:
    load_before = os.getloadavg()[0]
    rng = np.random.default_rng(args.seed)
    workload = build_workload(rng, args.workers, args.blocks, args.chain_len)
    streams = [worker_batches(workload, worker, args.batch_blocks) for worker in range(args.workers)]
    client = aioredis.Redis(host=store.host, port=store.port, max_connections=args.workers + 4)
    rates = []
    for repeat in range(args.ingest_repeats):
        await client.flushall()  # each repeat fills an empty index, as a fresh kvstore would
        registry = BlockRegistry(client, f"bench{repeat}")
        rates.append(await ingest(registry, streams))
    stats = await registry.stats()
    # What is left besides blk keys: per worker wrk + wmeta, plus the workers set and counters.
    block_keys = await client.dbsize() - 2 * len(stats.workers) - 2
    memory = (await client.info("memory"))["used_memory"]
    redis_version = (await client.info("server"))["redis_version"]

    mix_runs, best = [], []
    for _ in range(args.repeats):
        latencies, run_best = await time_queries(registry, make_queries(rng, workload, args.queries))
        mix_runs.append(latencies)
        best += run_best

    stress_chain, batches = stress_batches(rng, [len(stream) for stream in streams], args.chain_len)
    for batch in batches:
        await registry.apply_batch(batch)
    stress_runs = [(await time_queries(registry, [stress_chain] * (args.queries // 5)))[0] for _ in range(args.repeats)]
    await client.aclose()
    return {
        "level": "registry: BlockRegistry over redis.asyncio, one Lua call per operation, no gRPC",
        "python": platform.python_version(),
        # The machine is shared: a load average above its core count means these figures
        # include waiting for a CPU, so compare runs at similar load.
        "cpus": os.cpu_count(),
        "load_average_1m": {"before": load_before, "after": os.getloadavg()[0]},
        "redis_version": redis_version,
        "config": vars(args),
        "index": {
            "worker_blocks": stats.blocks,
            "distinct_block_keys": block_keys,
            "workers": len(stats.workers),
            "redis_used_memory_mb": round(memory / 2**20, 1),
        },
        "ingestion_blocks_per_s": {"median": statistics.median(rates), "runs": rates},
        "find_matches_ms": latency_summary(mix_runs),
        "hit_mix": {
            "miss": sum(b == 0 for b in best) / len(best),
            "partial": sum(0 < b < args.chain_len for b in best) / len(best),
            "full": sum(b == args.chain_len for b in best) / len(best),
            "median_best_match_blocks": statistics.median(best),
        },
        "find_matches_worst_case_ms": {
            "case": f"all {args.workers} workers hold different-length prefixes of the queried chain",
            **latency_summary(stress_runs),
        },
    }


def latency_summary(runs: list[list[float]]) -> dict:
    """p50 and p99 of each repeat, and their medians across repeats."""
    per_run = [{"p50": percentile(r, 50), "p99": percentile(r, 99)} for r in runs]
    return {
        "p50": statistics.median(r["p50"] for r in per_run),
        "p99": statistics.median(r["p99"] for r in per_run),
        "runs": per_run,
    }


def print_table(result: dict) -> None:
    ingest, find, index = result["ingestion_blocks_per_s"], result["find_matches_ms"], result["index"]
    verdict = {True: "ok", False: "MISSED"}
    load = result["load_average_1m"]
    print(f"block registry benchmark ({result['level']})")
    print(f"machine: {result['cpus']} CPUs, 1-min load average {load['before']:.1f} -> {load['after']:.1f}")
    print(
        f"index: {index['worker_blocks']:,} worker-blocks, {index['distinct_block_keys']:,} distinct blocks, "
        f"{index['workers']} workers, redis {result['redis_version']} {index['redis_used_memory_mb']} MB"
    )
    print(f"{'metric':<34}{'value':>14}{'target':>14}  verdict")
    print(
        f"{'ingestion (blocks/s, median)':<34}{ingest['median']:>14,.0f}{TARGET_BLOCKS_PER_S:>14,}  "
        f"{verdict[ingest['median'] > TARGET_BLOCKS_PER_S]}"
    )
    print(f"{'FindMatches p50 (ms, median)':<34}{find['p50']:>14.3f}")
    print(
        f"{'FindMatches p99 (ms, median)':<34}{find['p99']:>14.3f}{TARGET_P99_MS:>14}  "
        f"{verdict[find['p99'] < TARGET_P99_MS]}"
    )
    worst = result["find_matches_worst_case_ms"]
    print(f"{'worst case p50 / p99 (ms)':<34}{worst['p50']:>8.3f} /{worst['p99']:>6.3f}  ({worst['case']})")
    mix = result["hit_mix"]
    print(
        f"hit mix: {mix['miss']:.0%} miss, {mix['partial']:.0%} partial, {mix['full']:.0%} full; "
        f"median best match {mix['median_best_match_blocks']:.0f} blocks"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=1_000_000, help="(worker, block) entries to ingest")
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--chain-len", type=int, default=256, help="blocks per queried chain")
    parser.add_argument("--batch-blocks", type=int, default=1024, help="blocks per published batch")
    parser.add_argument("--ingest-repeats", type=int, default=3)
    parser.add_argument("--queries", type=int, default=5_000, help="FindMatches calls per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=11)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="kvmesh-bench-") as tmp:
        store = start_redis(Path(tmp) / "data", Path(tmp) / "redis.log")
        try:
            result = asyncio.run(run(args, store))
        finally:
            store.stop()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
