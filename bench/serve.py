"""`kvmesh bench serve`: drive the OpenAI HTTP API and report latency, throughput and cache hits.

Against a running router (``--url``), or, with ``--compare kv,round_robin``, against a
stack it starts itself (``--workers`` workers, one router per mode on the same workers),
running each mode on its own copy of the workload (same shape, different text) so one
mode's cache never helps the other. Reports TTFT, inter-token latency and end-to-end
latency (p50/p90/p99), output tokens/s, requests/s and the prefix-cache hit rate next to
the hit rate a single worker with an infinite cache would get on the same requests.
With ``--overhead`` it also measures the mesh's own TTFT overhead: router vs a direct
worker call, same prompt, same worker.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from bench.disagg import measure_overlap, print_overlap
from bench.workloads import WORKLOADS, Conversation


@dataclass
class RequestResult:
    messages: list[dict[str, str]]
    ttft_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    text: str = ""
    error: str = ""


async def stream_chat(client: httpx.AsyncClient, url: str, messages: list[dict[str, str]], max_tokens: int
                      ) -> RequestResult:  # fmt: skip
    result = RequestResult(messages=messages)
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    usage = event["usage"]
                    result.output_tokens = usage["completion_tokens"]
                    result.prompt_tokens = usage["prompt_tokens"]
                    result.cached_tokens = usage["prompt_tokens_details"]["cached_tokens"]
                for choice in event.get("choices", []):
                    if choice["delta"].get("content") or choice.get("finish_reason"):
                        now = time.perf_counter()
                        if not result.ttft_s:
                            result.ttft_s = now - start
                        else:
                            result.itl_s.append(now - last)
                        last = now
                        result.text += choice["delta"].get("content") or ""
    except httpx.HTTPError as exc:
        result.error = repr(exc)
    result.e2e_s = time.perf_counter() - start
    return result


async def run_conversation(client: httpx.AsyncClient, url: str, conv: Conversation, limiter: asyncio.Semaphore
                           ) -> list[RequestResult]:  # fmt: skip
    history = [{"role": "system", "content": conv.system}]
    results = []
    for turn in conv.turns:
        history.append({"role": "user", "content": turn})
        async with limiter:
            result = await stream_chat(client, url, list(history), conv.max_tokens)
        results.append(result)
        history.append({"role": "assistant", "content": result.text})
    return results


async def run_workload(url: str, conversations: list[Conversation], concurrency: int, rate: float,
                       poisson_seed: int | None = None) -> tuple[list[RequestResult], float]:  # fmt: skip
    """Start conversations ``rate`` per second (evenly, or as a Poisson process when
    ``poisson_seed`` is given); 0 = all at once."""
    arrivals = random.Random(poisson_seed)
    limiter = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency * 2)) as client:
        start = time.perf_counter()
        tasks = []
        for conv in conversations:
            tasks.append(asyncio.create_task(run_conversation(client, url, conv, limiter)))
            if rate > 0:
                await asyncio.sleep(arrivals.expovariate(rate) if poisson_seed is not None else 1.0 / rate)
        nested = await asyncio.gather(*tasks)
        return [r for group in nested for r in group], time.perf_counter() - start


def ideal_hit_rate(results: list[RequestResult], tokenizer, block_size: int = 16) -> float:
    """Hit rate of one worker with an infinite cache: every full block seen before is a hit."""
    from bench.replay import oracle_hit_rate

    return oracle_hit_rate([tokenizer.encode_chat(result.messages) for result in results], block_size)


def _pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def summarize(results: list[RequestResult], wall_s: float) -> dict:
    ok = [r for r in results if not r.error]
    ttft = [r.ttft_s * 1000 for r in ok]
    itl = [x * 1000 for r in ok for x in r.itl_s]
    e2e = [r.e2e_s * 1000 for r in ok]
    summary = {
        "requests": len(results), "errors": len(results) - len(ok), "wall_s": wall_s,
        "requests_per_s": len(ok) / wall_s, "output_tokens_per_s": sum(r.output_tokens for r in ok) / wall_s,
        "cache_hit_rate": sum(r.cached_tokens for r in ok) / max(sum(r.prompt_tokens for r in ok), 1),
    }  # fmt: skip
    for name, values in (("ttft_ms", ttft), ("itl_ms", itl), ("e2e_ms", e2e)):
        summary[name] = {"p50": _pct(values, 0.5), "p90": _pct(values, 0.9), "p99": _pct(values, 0.99)}
    if len(ok) < len(results):
        summary["first_error"] = next(r.error for r in results if r.error)
    return summary


def print_table(rows: list[dict]) -> None:
    header = f"{'mode':<12} {'workload':<14} {'req':>4} {'err':>3} {'TTFT p50':>9} {'p90':>8} {'p99':>8} " \
             f"{'ITL p50':>8} {'p99':>8} {'E2E p50':>8} {'tok/s':>7} {'req/s':>6} {'hit':>6} {'ideal':>6}"
    print(header)
    for row in rows:
        s = row["summary"]
        print(f"{row['mode']:<12} {row['workload']:<14} {s['requests']:>4} {s['errors']:>3} "
              f"{s['ttft_ms']['p50']:>9.1f} {s['ttft_ms']['p90']:>8.1f} {s['ttft_ms']['p99']:>8.1f} "
              f"{s['itl_ms']['p50']:>8.1f} {s['itl_ms']['p99']:>8.1f} {s['e2e_ms']['p50']:>8.1f} "
              f"{s['output_tokens_per_s']:>7.1f} "
              f"{s['requests_per_s']:>6.2f} {s['cache_hit_rate']:>6.1%} {row.get('ideal_hit_rate', 0):>6.1%}")


def print_tracing_cost(tracing: dict) -> None:
    print(f"tracing cost (median over {tracing['runs']} runs per mode; ratios against tracing off):")
    for mode, figures in tracing["modes"].items():
        print(f"  {mode:<12} output tok/s {figures['output_tokens_per_s']:>7.1f} ({figures['throughput_ratio']:.3f})"
              f"   TTFT p50 {figures['ttft_ms_p50']:>7.1f} ms ({figures['ttft_ratio']:.3f})"
              f"   router CPU/request {figures['router_cpu_ms_per_request']:.2f} ms ({figures['router_cpu_ratio']:.3f})"
              f"   router spans {figures['router_spans']}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvmesh bench serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="", help="router base URL (e.g. http://127.0.0.1:8000); omit with --compare")
    parser.add_argument("--compare", default="", help="start a stack and compare modes, e.g. kv,round_robin")
    parser.add_argument("--workers", type=int, default=2, help="workers of the stack --compare starts")
    parser.add_argument("--workload", action="append", choices=sorted(WORKLOADS),
                        help="repeatable; default shared-prefix and multiturn")
    parser.add_argument("--num-requests", type=int, default=32, help="conversations per workload")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rate", type=float, default=0.0, help="conversations started per second; 0 = all at once")
    parser.add_argument("--poisson", action="store_true", help="Poisson arrivals at --rate (seeded by --seed)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--overhead", action="store_true", help="also measure router overhead on TTFT")
    parser.add_argument("--disagg-compare", action="store_true",
                        help="run the workloads on 2 aggregated workers, then on 1 prefill + 1 decode, and report "
                             "KV transfer rate next to a raw loopback copy of the same bytes")  # fmt: skip
    parser.add_argument("--tracing-compare", action="store_true",
                        help="one stack, three routers: tracing off, OTLP at 100%% and at 10%% sampling; "
                             "throughput and TTFT ratios against off")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3, help="--tracing-compare: rounds, mode order rotated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path("bench/results/serve.json"), help="where to write results")
    return parser


def make_conversations(workload: str, n: int, seed: int, max_tokens: int) -> list[Conversation]:
    return WORKLOADS[workload](n, seed, max_tokens=max_tokens)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    workloads = args.workload or ["shared-prefix", "multiturn"]
    if not (args.url or args.compare or args.disagg_compare or args.tracing_compare):
        print("give --url of a running router, --compare kv,round_robin, --disagg-compare or --tracing-compare",
              file=sys.stderr)  # fmt: skip
        return 2
    from services.engine.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("smollm2")
    rows = []
    transfer = tracing = None
    if args.tracing_compare:
        from bench.tracing_cost import tracing_compare

        rows, tracing = tracing_compare(workloads, args, lambda url, mode, workload, seed: run_one(
            url, mode, workload, args, tokenizer, seed))  # fmt: skip
        overhead = None
    elif args.disagg_compare:
        rows, transfer = disagg_compare(workloads, args, tokenizer)
        overhead = None
    elif args.compare:
        from bench.stack import BenchStack

        modes = args.compare.split(",")
        with BenchStack(args.workers, modes) as stack:
            for index, mode in enumerate(modes):
                for workload in workloads:
                    seed = args.seed + 1000 * index
                    rows.append(run_one(stack.http[mode], mode, workload, args, tokenizer, seed=seed))
            overhead = asyncio.run(stack.measure_overhead()) if args.overhead else None
    else:
        rows = [run_one(args.url, "given", w, args, tokenizer, seed=args.seed) for w in workloads]
        overhead = None
    print_table(rows)
    if transfer:
        print_overlap(transfer["overlap"])
        print(f"KV transfer: {transfer['pulls']} pulls in the workload ({transfer['mb']:.1f} MB); "
              f"{transfer['overlap']['transfer_mb_per_s']:.0f} MB/s vs a raw loopback socket copy of the same bytes "
              f"{transfer['loopback_mb_per_s']:.0f} MB/s ({transfer['ratio']:.0%})")
        print(f"1-min load average: {transfer['loadavg_start']:.1f} at start, {transfer['loadavg_end']:.1f} at end")
    if tracing:
        print_tracing_cost(tracing)
    if overhead:
        print(f"mesh overhead on TTFT (p50 of {overhead['samples']}): router {overhead['router_ttft_ms_p50']:.2f} ms, "
              f"direct worker {overhead['direct_ttft_ms_p50']:.2f} ms, "
              f"overhead {overhead['overhead_ms_p50']:.2f} ms")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                     "overhead": overhead, "transfer": transfer, "tracing": tracing},
                                    indent=2))  # fmt: skip
    print(f"results: {args.json}")
    return 0


def disagg_compare(workloads: list[str], args: argparse.Namespace, tokenizer) -> tuple[list[dict], dict]:
    """Same workloads, same total workers: 2 aggregated, then 1 prefill + 1 decode; then, on
    the idle disaggregated stack, the transfer/compute overlap and the transfer rate."""
    from bench.stack import BenchStack

    rows = []
    loadavg_start = os.getloadavg()[0]
    with BenchStack(2, ["kv"]) as stack:
        rows += [run_one(stack.http["kv"], "aggregated-2", w, args, tokenizer, seed=args.seed) for w in workloads]
    with BenchStack(0, ["kv"], prefill=1, decode=1) as stack:
        rows += [run_one(stack.http["kv"], "disagg-1p1d", w, args, tokenizer, seed=args.seed + 1) for w in workloads]
        pulls = stack.transfer_log()
        prefill = asyncio.run(stack.worker_info("prefill"))
        overlap = asyncio.run(measure_overlap(prefill.address, prefill.model, seed=args.seed))
    loopback = loopback_mb_per_s(overlap["bytes"])
    return rows, {"pulls": len(pulls), "mb": sum(pulls) / 1e6, "overlap": overlap, "loopback_mb_per_s": loopback,
                  "ratio": overlap["transfer_mb_per_s"] / loopback, "loadavg_start": loadavg_start,
                  "loadavg_end": os.getloadavg()[0]}  # fmt: skip


def loopback_mb_per_s(size: int, repeats: int = 5) -> float:
    """A raw TCP copy of ``size`` bytes over 127.0.0.1: the ceiling a transfer is compared with."""
    import socket
    import threading

    payload = bytes(size)
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def sink() -> None:
        conn, _ = server.accept()
        with conn:
            while conn.recv(1 << 20):
                pass

    rates = []
    for _ in range(repeats):
        thread = threading.Thread(target=sink)
        thread.start()
        with socket.create_connection(("127.0.0.1", port)) as client:
            start = time.perf_counter()
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)
            thread.join()
            rates.append(size / (time.perf_counter() - start) / 1e6)
    server.close()
    return statistics.median(rates)


def run_one(url: str, mode: str, workload: str, args: argparse.Namespace, tokenizer, seed: int) -> dict:
    conversations = make_conversations(workload, args.num_requests, seed, args.max_tokens)
    # A distinct salt per mode keeps each mode's prompts out of the other's cache.
    for conv in conversations:
        conv.system = f"[{mode}-{uuid.uuid5(uuid.NAMESPACE_DNS, str(seed)).hex[:6]}] {conv.system}"
    poisson_seed = args.seed if args.poisson else None
    results, wall = asyncio.run(run_workload(url, conversations, args.concurrency, args.rate, poisson_seed))
    row = {"mode": mode, "workload": workload, "summary": summarize(results, wall),
           "ideal_hit_rate": ideal_hit_rate([r for r in results if not r.error], tokenizer)}  # fmt: skip
    row["requests"] = [asdict(r) | {"messages": len(r.messages)} for r in results]
    return row


if __name__ == "__main__":
    sys.exit(main())
