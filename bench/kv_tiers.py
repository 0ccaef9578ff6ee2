"""KV tiers: TTFT of a multi-turn workload whose working set is 4× the device pool.

``python -m bench.kv_tiers`` runs the real engine in-process on ``--conversations`` chats that
take turns (each turn: the whole history, a new user message, a short reply), so between two
turns of one chat the others push its blocks out of the device pool. The same workload runs
with tiers off (every turn recomputes its history), G2 only (host memory of four pools, the
working set), G2+G3 (host memory of one pool, then disk), and with peer fetch (no tiers; before each turn
the blocks it lacks are pulled over a real loopback ``KvTransfer.PullBlocks`` stream from a
peer engine that served the chat's previous turn): four engines in this process, each request
run on each in turn. TTFT is
from ``add_request`` to the request's first token (promotions and demotions included);
the first turn of each chat has nothing to reuse and is left out of the percentiles.

A second scenario times what a promotion from disk costs the requests already running: a
stream decodes on a G3-only engine while another request arrives whose long prefix was pushed
out to disk; the stream's inter-token latency (ITL) is reported quiet and while that prefix is
read back (its worst gap, and how many of its tokens came out meanwhile).

It also times, per block, what the router's tier weights compare: a prefill's compute, a
host-memory promotion and a disk read (page cache warm: the file was just written), and
prints the weights those give (copy time / compute time). Writes JSON (``--out``) and a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import torch

from bench.registry import percentile
from kvmesh.hashing import block_hashes
from services.engine import Engine, EngineConfig, SamplingParams
from services.engine.async_engine import AsyncEngine
from services.engine.kv_tier_files import read_block_file, write_block_file
from services.engine.kv_transfer import tensor_from_bytes
from services.worker.kv_wire import add_transfer_servicer
from services.worker.peer_fetch import pull_cached
from services.worker.transfer_servicer import KvTransferServicer

REPLY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PEER_FETCH = "peer fetch"


def conversations(rng: np.random.Generator, count: int, opening: int, turns: int,
                  message: int) -> list[list[list[int]]]:
    """Per chat, the user messages of each turn (the first one carries the chat's own opening)."""
    return [[rng.integers(100, 40_000, opening if t == 0 else message).tolist() for t in range(turns)]
            for _ in range(count)]


def first_token_s(engine: Engine, request_id: str, prompt: list[int]) -> tuple[float, list[int], int]:
    """Run one request to completion; its TTFT, its output and its cached prompt tokens."""
    start = time.perf_counter()
    engine.add_request(request_id, prompt, REPLY)
    ttft, tokens, cached = None, [], 0
    while engine.has_unfinished():
        for out in engine.step():
            if ttft is None:
                ttft = time.perf_counter() - start
            tokens += out.new_token_ids
            cached = out.num_cached_tokens
    return ttft, tokens, cached


class Peer:
    """Another worker that served each chat's previous turn: a real KvTransfer server on
    loopback (its own event loop thread), whose engine holds every chat's history."""

    def __init__(self, config: EngineConfig) -> None:
        self.engine = AsyncEngine(Engine(config))
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="bench-peer", daemon=True).start()
        self.server, port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result()
        self.address = f"127.0.0.1:{port}"

    async def _start(self) -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        add_transfer_servicer(KvTransferServicer(self.engine), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    def serve_turn(self, prompt: list[int]) -> None:
        """The peer computes this turn too (untimed), so it holds the history's blocks."""
        self.engine.call(lambda e: e.generate([prompt], REPLY)).result()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.engine.shutdown()


def fetch_then_first_token_s(engine: Engine, peer: Peer, request_id: str, prompt: list[int]
                             ) -> tuple[float, list[int], int]:
    """``first_token_s`` after pulling from the peer the prompt's blocks this engine lacks."""
    start = time.perf_counter()
    bs = engine.config.block_size
    want, held = (len(prompt) - 1) // bs, engine.held_prefix_blocks(prompt)
    if want > held:
        kv = asyncio.run(pull_cached(peer.address, block_hashes(prompt[: want * bs], bs), held, 60))
        if kv is not None:
            engine.import_cached(prompt, kv)
    pulled_s = time.perf_counter() - start
    ttft, tokens, cached = first_token_s(engine, request_id, prompt)
    peer.serve_turn(prompt)
    return pulled_s + ttft, tokens, cached


def run_workloads(engines: dict[str, Engine], chats: list[list[list[int]]], peer: Peer | None = None
                  ) -> dict[str, dict]:
    """Every turn of every chat on each engine in turn, so a load change on this shared machine
    hits every configuration alike instead of whichever ran at that moment."""
    histories = {name: [[] for _ in chats] for name in engines}
    ttfts: dict[str, list[float]] = {name: [] for name in engines}
    cached = dict.fromkeys(engines, 0)
    prompt_tokens = dict.fromkeys(engines, 0)
    for turn in range(len(chats[0])):
        for c, chat in enumerate(chats):
            for name, engine in engines.items():
                prompt = histories[name][c] + chat[turn]
                if name == PEER_FETCH:
                    ttft, reply, hit = fetch_then_first_token_s(engine, peer, f"c{c}-t{turn}", prompt)
                else:
                    ttft, reply, hit = first_token_s(engine, f"c{c}-t{turn}", prompt)
                histories[name][c] = prompt + reply
                if turn:
                    ttfts[name].append(ttft)
                    cached[name] += hit
                    prompt_tokens[name] += len(prompt)
    results = {}
    for name, engine in engines.items():
        s = engine.stats()
        results[name] = {"ttft_p50_s": percentile(ttfts[name], 50), "ttft_p90_s": percentile(ttfts[name], 90),
                         "requests": len(ttfts[name]), "cached_token_ratio": cached[name] / max(prompt_tokens[name], 1),
                         "host_hit_blocks": s.host_hit_blocks, "disk_hit_blocks": s.disk_hit_blocks,
                         "outputs": histories[name]}
    return results


def decode_beside_promotion(config: EngineConfig, rng: np.random.Generator, prefix_blocks: int, rounds: int
                            ) -> dict:
    """ITL of a decoding stream quiet and while another request's ``prefix_blocks`` come back
    from disk (their files written, the page cache warm); medians over ``rounds``."""
    engine = Engine(config)
    quiet: list[float] = []
    worst: list[float] = []
    streamed: list[int] = []
    for r in range(rounds):
        q, during = _stream_beside_promotion(engine, rng, prefix_blocks, f"r{r}")
        quiet += q
        worst.append(max(during))
        streamed.append(len(during))
    disk_hits = engine.stats().disk_hit_blocks
    engine.close()
    return {"prefix_blocks": prefix_blocks, "rounds": rounds, "itl_p50_quiet_s": statistics.median(quiet),
            "itl_worst_during_s": statistics.median(worst), "stream_tokens_during": statistics.median(streamed),
            "disk_hit_blocks": disk_hits}


def _stream_beside_promotion(engine: Engine, rng: np.random.Generator, prefix_blocks: int, name: str,
                             stream_tokens: int = 32, arrive_after: int = 12) -> tuple[list[float], list[float]]:
    """One round: the stream's gaps before the other request arrives, and until its first token."""
    bs = engine.config.block_size
    prefix = rng.integers(100, 40_000, prefix_blocks * bs).tolist()
    engine.generate([[*prefix, 1]], REPLY)
    engine.generate([rng.integers(100, 40_000, engine.blocks.num_blocks * bs - 1).tolist()],  # the whole pool
                    SamplingParams(temperature=0, max_tokens=1))
    assert engine.cached_prefix_blocks([*prefix, 1]) == 0, "the filler should have pushed the prefix to disk"
    disk = Path(engine.config.disk_cache_dir)
    while sum(1 for _ in disk.glob("*/*.kvb")) < len(engine.tiers.disk):  # every write landed
        time.sleep(0.01)
    engine.add_request(f"{name}-stream", rng.integers(100, 40_000, 2 * bs).tolist(),
                       SamplingParams(temperature=0, max_tokens=stream_tokens, ignore_eos=True))
    quiet: list[float] = []
    during: list[float] = []
    gaps, last = quiet, None
    while engine.has_unfinished():
        for out in engine.step():
            now = time.perf_counter()
            if out.request_id == f"{name}-loader":
                gaps = []  # the loader decodes beside the stream from now on: neither quiet nor loading
                continue
            if last is not None:
                gaps.append(now - last)
            last = now
            if out.num_output_tokens == arrive_after:
                engine.add_request(f"{name}-loader", prefix + rng.integers(100, 40_000, bs).tolist(), REPLY)
                gaps = during
    return quiet, during


def block_costs(engine: Engine, prompt: list[int], disk_dir: Path, runs: int) -> dict:
    """Seconds per block: prefill compute (a cold prompt), host promotion, disk read + upload."""
    bs = engine.config.block_size
    blocks = (len(prompt) - 1) // bs
    compute = []
    for i in range(runs):
        engine.reset_prefix_cache()
        compute.append(first_token_s(engine, f"cost-{i}", prompt)[0] / blocks)
    pool = engine.runner.kv_cache
    block = pool[:, :, 0].clone()
    host = torch.empty(block.shape, dtype=block.dtype, pin_memory=pool.is_cuda)  # on the CPU, as G2 is
    host_copy, disk_read = [], []
    nbytes = block.numel() * block.element_size()
    for i in range(runs):
        t = time.perf_counter()
        host.copy_(pool[:, :, 1])
        pool[:, :, 1].copy_(host)
        host_copy.append((time.perf_counter() - t) / 2)
        write_block_file(disk_dir, i, block)
        t = time.perf_counter()
        data = tensor_from_bytes(read_block_file(disk_dir, i, nbytes), str(block.dtype).removeprefix("torch."),
                                 list(block.shape))
        pool[:, :, 1].copy_(data)
        disk_read.append(time.perf_counter() - t)
    result = {"compute_s": statistics.median(compute), "host_copy_s": statistics.median(host_copy),
              "disk_read_s": statistics.median(disk_read), "block_bytes": nbytes}
    result["host_weight"] = result["host_copy_s"] / result["compute_s"]
    result["disk_weight"] = result["disk_read_s"] / result["compute_s"]
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.kv_tiers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool-blocks", type=int, default=40, help="device pool (G1) blocks")
    parser.add_argument("--conversations", type=int, default=6)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--opening-tokens", type=int, default=256)
    parser.add_argument("--message-tokens", type=int, default=32)
    parser.add_argument("--model", default=EngineConfig.model, help="engine model spec (random:... on a GPU box)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runs", type=int, default=5,
                        help="repeats of each per-block cost and of the stream beside a promotion")
    parser.add_argument("--configs", default=f"tiers off,G2 only,G2+G3,{PEER_FETCH}",
                        help="comma-separated subset to run")
    parser.add_argument("--promotion-blocks", type=int, default=32,
                        help="prefix read back from disk beside a decoding stream (0: skip that scenario)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/reports/kv-tiers.json"))
    args = parser.parse_args(argv)

    chats = conversations(np.random.default_rng(args.seed), args.conversations, args.opening_tokens, args.turns,
                          args.message_tokens)
    final_tokens = args.opening_tokens + (args.turns - 1) * args.message_tokens + args.turns * REPLY.max_tokens
    working_set = args.conversations * final_tokens // 16
    base = dict(model=args.model, dtype=args.dtype, device=args.device, num_kv_blocks=args.pool_blocks, max_num_seqs=4)
    probe = Engine(EngineConfig(**base))
    block_bytes = probe.runner.kv_cache[:, :, 0].numel() * probe.runner.kv_cache.element_size()
    pool_bytes = args.pool_blocks * block_bytes
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="kvmesh-bench-tiers-") as scratch:
        costs = block_costs(probe, chats[0][0] + chats[0][1], Path(scratch), args.runs)
        del probe
        configs = {
            "tiers off": {},
            "G2 only": {"host_cache_bytes": 4 * pool_bytes},  # holds the whole working set
            "G2+G3": {"host_cache_bytes": pool_bytes, "disk_cache_bytes": 8 * pool_bytes,
                      "disk_cache_dir": os.path.join(scratch, "g3")},
            PEER_FETCH: {},  # no tiers here: what it lacks comes from the peer
        }
        engines = {name: Engine(EngineConfig(**base, **tiers)) for name, tiers in configs.items()
                   if name in args.configs.split(",")}
        peer = Peer(EngineConfig(**{**base, "num_kv_blocks": 2 * working_set})) if PEER_FETCH in engines else None
        results = run_workloads(engines, chats, peer)
        beside = decode_beside_promotion(
            EngineConfig(**base, disk_cache_bytes=8 * pool_bytes, disk_cache_dir=os.path.join(scratch, "itl")),
            np.random.default_rng(args.seed), args.promotion_blocks, args.runs) if args.promotion_blocks else None
        for engine in engines.values():
            engine.close()
        if peer is not None:
            peer.close()
    outputs = {name: r.pop("outputs") for name, r in results.items()}
    report = {
        "pool_blocks": args.pool_blocks, "working_set_blocks": working_set, "block_bytes": block_bytes,
        "model": args.model, "dtype": args.dtype, "device": args.device, "torch_threads": torch.get_num_threads(),
        "load_average": [load_before, os.getloadavg()[0]], "block_costs": costs, "runs": results,
        "decode_beside_promotion": beside,
        "outputs_identical": len({json.dumps(o) for o in outputs.values()}) == 1,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"pool {args.pool_blocks} blocks, working set {working_set} blocks ({working_set / args.pool_blocks:.1f}×), "
          f"{args.device} {args.dtype}, load {load_before:.1f}→{os.getloadavg()[0]:.1f}")
    print(f"{'config':<10} {'TTFT p50':>9} {'TTFT p90':>9} {'cached':>7} {'G2 hits':>8} {'G3 hits':>8}")
    off = next(iter(results.values()))["ttft_p50_s"]
    for name, r in results.items():
        print(f"{name:<10} {r['ttft_p50_s'] * 1000:>7.1f}ms {r['ttft_p90_s'] * 1000:>7.1f}ms "
              f"{r['cached_token_ratio']:>7.0%} {r['host_hit_blocks']:>8} {r['disk_hit_blocks']:>8}"
              f"   p50 {r['ttft_p50_s'] / off:.2f}× the first row")
    print(f"per block: compute {costs['compute_s'] * 1e3:.2f}ms, host copy {costs['host_copy_s'] * 1e3:.3f}ms "
          f"(weight {costs['host_weight']:.3f}), disk read {costs['disk_read_s'] * 1e3:.3f}ms "
          f"(weight {costs['disk_weight']:.3f}); outputs identical: {report['outputs_identical']}")
    if beside is not None:
        print(f"stream ITL p50 {beside['itl_p50_quiet_s'] * 1e3:.1f}ms quiet; while {beside['prefix_blocks']} blocks "
              f"came back from disk: worst gap {beside['itl_worst_during_s'] * 1e3:.1f}ms, "
              f"{beside['stream_tokens_during']} tokens streamed meanwhile")
    return report


if __name__ == "__main__":
    main()
