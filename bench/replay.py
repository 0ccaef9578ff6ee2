"""`kvmesh bench replay TRACE.jsonl`: replay a Mooncake-format trace against a running router.

Each line is one request: ``timestamp`` (ms), ``input_length``, ``output_length`` and
``hash_ids``, each id naming one 512-token block whose content is shared wherever the id
repeats. Token ids are synthesised so that equal ids give equal 512-token blocks (hence equal
16-token KV blocks: 512 is a multiple of every block size we use); a prompt's last, partial block
is the first tokens of its id's block. Requests are sent at the trace's times divided by
``--speedup``, over the router's gRPC API (token ids in, ``ignore_eos`` so every request decodes
its ``output_length``), and the results — TTFT, end-to-end latency, cached tokens and worker of
every request, per-worker totals and busy time, and the oracle hit rate — are written as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import numpy as np

from bench.serve import _pct
from kvmesh.discovery import Discovery
from kvmesh.hashing import block_hashes
from kvmesh_proto.v1 import common_pb2, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc

TRACE_BLOCK = 512
# Plain-text token ids of the SmolLM2 vocabulary: no special or control tokens.
TOKEN_RANGE = (1000, 49000)


@dataclass
class TraceRequest:
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: list[int]


@dataclass
class ReplayResult:
    index: int
    timestamp_ms: float
    prompt_tokens: int
    output_tokens: int = 0
    cached_tokens: int = 0
    ttft_ms: float = 0.0
    e2e_ms: float = 0.0
    worker_id: str = ""
    error: str = ""


def load_trace(path: Path, limit: int = 0) -> list[TraceRequest]:
    """The trace's requests in time order (``limit`` > 0 keeps the first ones)."""
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append(TraceRequest(float(row["timestamp"]), int(row["input_length"]),
                                         int(row["output_length"]), [int(i) for i in row["hash_ids"]]))  # fmt: skip
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{number}: not a Mooncake trace line ({exc!r})") from exc
    rows.sort(key=lambda r: r.timestamp_ms)
    return rows[:limit] if limit > 0 else rows


class TokenSynth:
    """Token ids for trace requests: one fixed pseudo-random 512-token block per hash id."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._blocks: dict[int, np.ndarray] = {}

    def block(self, hash_id: int) -> np.ndarray:
        block = self._blocks.get(hash_id)
        if block is None:
            rng = np.random.default_rng([self.seed, hash_id])
            block = self._blocks[hash_id] = rng.integers(*TOKEN_RANGE, TRACE_BLOCK, dtype=np.int64)
        return block

    def prompt(self, request: TraceRequest, index: int) -> list[int]:
        """``input_length`` tokens; past the hash ids' blocks (a malformed row) the request's own
        tokens fill in, so nothing is shared by accident."""
        parts = [self.block(h) for h in request.hash_ids]
        missing = request.input_length - TRACE_BLOCK * len(parts)
        if missing > 0:
            parts.append(np.random.default_rng([self.seed, -1, index]).integers(*TOKEN_RANGE, missing))
        return np.concatenate(parts)[: request.input_length].tolist() if parts else []


def oracle_hit_rate(prompts: Sequence[Sequence[int]], block_size: int = 16) -> float:
    """Hit rate of one worker with an infinite cache, requests in order: every leading full
    block seen before is a hit (the best any router can do)."""
    seen: set[int] = set()
    hits = total = 0
    for tokens in prompts:
        hashes = block_hashes(tokens, block_size)
        prefix = 0
        while prefix < len(hashes) and hashes[prefix] in seen:
            prefix += 1
        hits += prefix * block_size
        total += len(tokens)
        seen.update(hashes)
    return hits / max(total, 1)


async def send(stub: router_pb2_grpc.RouterStub, index: int, request: TraceRequest, prompt: list[int],
               max_tokens: int, model: str, timeout_s: float | None = None) -> ReplayResult:  # fmt: skip
    result = ReplayResult(index, request.timestamp_ms, len(prompt))
    sampling = common_pb2.SamplingParams(max_tokens=max(1, min(request.output_length, max_tokens)), ignore_eos=True)
    message = router_pb2.GenerateRequest(model=model, tokens=router_pb2.TokenIds(token_ids=prompt), sampling=sampling)
    start = time.perf_counter()
    try:
        async for response in stub.Generate(message, timeout=timeout_s):
            if not result.ttft_ms:
                result.ttft_ms = (time.perf_counter() - start) * 1000
            result.worker_id = response.worker_id
            result.output_tokens += len(response.token_ids)
            if response.HasField("usage"):
                result.cached_tokens = response.usage.cached_tokens
    except grpc.aio.AioRpcError as exc:
        result.error = f"{exc.code().name}: {exc.details()}"
    result.e2e_ms = (time.perf_counter() - start) * 1000
    return result


async def replay(address: str, requests: list[TraceRequest], prompts: list[list[int]], speedup: float,
                 max_tokens: int = 1 << 20, model: str = "",
                 timeout_s: float | None = None) -> tuple[list[ReplayResult], float]:  # fmt: skip
    """Send every request at its trace time / ``speedup`` (each with a ``timeout_s`` deadline if
    given); (results in trace order, wall seconds)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        t0 = requests[0].timestamp_ms if requests else 0.0
        start = time.perf_counter()
        tasks = []
        for index, (request, prompt) in enumerate(zip(requests, prompts, strict=True)):
            delay = (request.timestamp_ms - t0) / 1000 / speedup - (time.perf_counter() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send(stub, index, request, prompt, max_tokens, model, timeout_s)))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start


async def live_workers(etcd_endpoint: str, namespace: str) -> dict[str, common_pb2.InstanceInfo]:
    """The live workers as registered in etcd, by instance id."""
    discovery = Discovery(etcd_endpoint, namespace)
    try:
        return await discovery.list("worker")
    finally:
        await discovery.close()


async def worker_busy_ms(etcd_endpoint: str, namespace: str) -> dict[str, int]:
    """Each live worker's cumulative busy time (its first Stats report)."""
    workers = await live_workers(etcd_endpoint, namespace)

    async def one(address: str) -> int:
        async with grpc.aio.insecure_channel(address) as channel:
            call = worker_pb2_grpc.WorkerStub(channel).Stats(worker_pb2.WorkerStatsRequest(interval_ms=1000))
            stats = await call.read()
            call.cancel()
            return stats.busy_ms

    busy = await asyncio.gather(*(one(info.address) for info in workers.values()))
    return dict(zip(workers, busy, strict=True))


def summarize(results: list[ReplayResult], wall_s: float, busy_ms: dict[str, int] | None = None) -> dict:
    """Latency percentiles, hit rate, and per-worker totals; load balance is max/mean busy time
    over all live workers (an idle worker counts, as it should)."""
    ok = [r for r in results if not r.error]
    summary: dict = {
        "requests": len(results), "errors": len(results) - len(ok), "wall_s": wall_s,
        "cache_hit_rate": sum(r.cached_tokens for r in ok) / max(sum(r.prompt_tokens for r in ok), 1),
    }  # fmt: skip
    for name in ("ttft_ms", "e2e_ms"):
        values = [getattr(r, name) for r in ok]
        summary[name] = {"p50": _pct(values, 0.5), "p90": _pct(values, 0.9), "p99": _pct(values, 0.99),
                         "mean": statistics.fmean(values) if values else float("nan")}  # fmt: skip
    per_worker: dict[str, dict] = {w: {"requests": 0, "prompt_tokens": 0, "cached_tokens": 0}
                                   for w in (busy_ms or {})}  # fmt: skip
    for r in ok:
        row = per_worker.setdefault(r.worker_id, {"requests": 0, "prompt_tokens": 0, "cached_tokens": 0})
        row["requests"] += 1
        row["prompt_tokens"] += r.prompt_tokens
        row["cached_tokens"] += r.cached_tokens
    if busy_ms:
        for worker, ms in busy_ms.items():
            per_worker[worker]["busy_ms"] = ms
        mean = statistics.fmean(busy_ms.values())
        summary["busy_max_over_mean"] = max(busy_ms.values()) / mean if mean else float("nan")
    summary["per_worker"] = per_worker
    if summary["errors"]:
        summary["first_error"] = next(r.error for r in results if r.error)
    return summary


def run_replay(address: str, trace: list[TraceRequest], speedup: float, max_tokens: int = 1 << 20,
               etcd_endpoint: str = "", namespace: str = "", seed: int = 0) -> dict:  # fmt: skip
    """Replay ``trace`` against the router at ``address``; the JSON-ready result."""
    synth = TokenSynth(seed)
    prompts = [synth.prompt(r, i) for i, r in enumerate(trace)]
    busy_before = asyncio.run(worker_busy_ms(etcd_endpoint, namespace)) if etcd_endpoint else None
    results, wall = asyncio.run(replay(address, trace, prompts, speedup, max_tokens))
    busy = None
    if busy_before is not None:
        busy_after = asyncio.run(worker_busy_ms(etcd_endpoint, namespace))
        busy = {w: busy_after[w] - busy_before.get(w, 0) for w in busy_after}
    summary = summarize(results, wall, busy)
    summary["oracle_hit_rate"] = oracle_hit_rate(prompts)
    return {"summary": summary, "requests": [asdict(r) for r in results]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvmesh bench replay", description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", type=Path, help="Mooncake-format JSONL (e.g. bench/traces/conversations.jsonl)")
    parser.add_argument("--router", default="127.0.0.1:50051", help="router gRPC address")
    parser.add_argument("--speedup", type=float, default=1.0, help="trace time is divided by this")
    parser.add_argument("--limit", type=int, default=0, help="replay only the first N requests")
    parser.add_argument("--max-tokens", type=int, default=1 << 20, help="cap on each request's output length")
    parser.add_argument("--etcd-endpoint", default="", help="with --namespace: also report per-worker busy time")
    parser.add_argument("--namespace", default="default")
    parser.add_argument("--seed", type=int, default=0, help="token synthesis seed")
    parser.add_argument("--json", type=Path, default=Path("bench/results/replay.json"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.speedup <= 0:
        print("--speedup must be positive", file=sys.stderr)
        return 2
    trace = load_trace(args.trace, args.limit)
    result = run_replay(args.router, trace, args.speedup, args.max_tokens, args.etcd_endpoint, args.namespace,
                        args.seed)  # fmt: skip
    s = result["summary"]
    print(f"{s['requests']} requests, {s['errors']} errors, {s['wall_s']:.1f} s; TTFT p50 {s['ttft_ms']['p50']:.0f} ms "
          f"p99 {s['ttft_ms']['p99']:.0f} ms; E2E p50 {s['e2e_ms']['p50']:.0f} ms; hit rate "
          f"{s['cache_hit_rate']:.1%} (oracle {s['oracle_hit_rate']:.1%})"
          + (f"; busy max/mean {s['busy_max_over_mean']:.2f}" if "busy_max_over_mean" in s else ""))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **result}, indent=2))
    print(f"results: {args.json}")
    return 0 if not s["errors"] else 1
