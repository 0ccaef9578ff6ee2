"""KV transfer throughput without model compute: how close the chunk path gets to a raw socket.

``python -m bench.kv_transfer`` builds a ``KvExport`` of a real model's KV shape (default
SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64, bf16, 16-token blocks) for a prompt of
``--tokens`` tokens and times, medians of ``--runs``:

- serialize: ``export_to_chunks`` → ``encode_chunk`` → ``decode_chunk`` → ``ChunkAssembler`` →
  ``kv()``, in one process (the message bytes gRPC would carry, no socket);
- grpc: the same chunks streamed by a ``KvTransfer.PullBlocks`` servicer in another process
  over loopback to the real receiving side (``mesh_channel``, ``pull_blocks``, ``kv()``);
- grpc raw bytes: the same encoded messages as opaque bytes on the same server (no chunk work
  on either side): gRPC's own ceiling on this machine;
- loopback: a raw TCP copy of the same bytes (``bench.serve.loopback_mb_per_s``), the ceiling.

Rates are KV bytes / seconds; ratios are against the loopback rate of the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import time
from pathlib import Path

import grpc
import torch

from bench.serve import loopback_mb_per_s
from kvmesh.grpc_service import CHANNEL_OPTIONS, mesh_channel
from kvmesh_proto.v1 import transfer_pb2, transfer_pb2_grpc
from services.engine.kv_transfer import KvExport
from services.engine.loader import load_model_config
from services.worker.kv_wire import (
    DEFAULT_CHUNK_BLOCKS,
    ChunkAssembler,
    WireChunk,
    add_transfer_servicer,
    decode_chunk,
    encode_chunk,
    export_to_chunks,
    keep_transfer_buffers,
    pull_blocks,
)

_RAW_SERVICE = "kvmesh.bench.RawBytes"


def make_export(model: str, tokens: int, block_size: int, dtype: torch.dtype, seed: int = 0) -> KvExport:
    """Random KV of ``model``'s shape for a ``tokens``-token prompt (partial tail block included)."""
    cfg = load_model_config(model)
    blocks = -(-tokens // block_size)
    gen = torch.Generator().manual_seed(seed)
    data = torch.randn(cfg.num_layers, 2, blocks, block_size, cfg.num_kv_heads, cfg.head_dim, generator=gen)
    hashes = [1000 + i for i in range(tokens // block_size)] + [0] * (blocks - tokens // block_size)
    return KvExport(list(range(tokens)), tokens, hashes, data.to(dtype))


def chunks_of(export: KvExport, chunk_blocks: int) -> list[WireChunk]:
    """The whole export as a finished transfer, as ``serve_prefill`` sends it."""
    chunks = list(export_to_chunks(export, 0, chunk_blocks, "bench", "bench"))
    chunks[-1].header.last = True
    chunks[-1].header.num_tokens = export.num_tokens
    return chunks


def receive(chunks, export: KvExport) -> KvExport:
    """What the decode worker does with (chunk, data) pairs off the wire."""
    assembler = ChunkAssembler(0)
    for chunk, data in chunks:
        assembler.add(chunk, data)
    return assembler.kv(export.token_ids)


def time_serialize(export: KvExport, chunk_blocks: int) -> float:
    start = time.perf_counter()
    kv = receive((decode_chunk(encode_chunk(chunk)) for chunk in chunks_of(export, chunk_blocks)), export)
    seconds = time.perf_counter() - start
    assert torch.equal(kv.data.view(torch.uint8), export.data.view(torch.uint8)), "reassembly is not bit-exact"
    return seconds


class _StreamingServicer(transfer_pb2_grpc.KvTransferServicer):
    """Streams the export's chunks, serialized as they are sent (as ``serve_prefill`` does)."""

    def __init__(self, export: KvExport, chunk_blocks: int) -> None:
        self.export, self.chunk_blocks = export, chunk_blocks

    async def PullBlocks(self, request, context):
        for chunk in chunks_of(self.export, self.chunk_blocks):
            yield chunk


def _serve(export: KvExport, chunk_blocks: int, ports: multiprocessing.Queue) -> None:
    keep_transfer_buffers()  # as the worker process does
    messages = [encode_chunk(chunk) for chunk in chunks_of(export, chunk_blocks)]

    async def raw(request: bytes, context: grpc.aio.ServicerContext):
        for message in messages:
            yield message

    async def run() -> None:
        server = grpc.aio.server(options=CHANNEL_OPTIONS)
        add_transfer_servicer(_StreamingServicer(export, chunk_blocks), server)
        handler = grpc.unary_stream_rpc_method_handler(raw)  # bytes in, bytes out: no (de)serialization
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_RAW_SERVICE, {"Stream": handler}),))
        ports.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(run())


async def _pull_once(address: str, export: KvExport) -> float:
    async with mesh_channel(address) as channel:
        start = time.perf_counter()
        stream = pull_blocks(channel)(transfer_pb2.PullBlocksRequest(transfer_id="bench"))
        kv = receive([pair async for pair in stream], export)
        seconds = time.perf_counter() - start
    assert torch.equal(kv.data.view(torch.uint8), export.data.view(torch.uint8)), "reassembly is not bit-exact"
    return seconds


async def _raw_once(address: str) -> float:
    """The same messages as opaque bytes: what gRPC itself costs, with no chunk work on either side."""
    async with mesh_channel(address) as channel:
        start = time.perf_counter()
        async for _ in channel.unary_stream(f"/{_RAW_SERVICE}/Stream")(b""):
            pass
        return time.perf_counter() - start


def time_grpc(export: KvExport, chunk_blocks: int, runs: int) -> tuple[list[float], list[float]]:
    """(PullBlocks seconds, raw-bytes stream seconds) per run, interleaved."""
    ctx = multiprocessing.get_context("spawn")
    ports = ctx.Queue()
    server = ctx.Process(target=_serve, args=(export, chunk_blocks, ports), daemon=True)
    server.start()
    try:
        address = f"127.0.0.1:{ports.get(timeout=60)}"
        asyncio.run(_pull_once(address, export))  # warm-up: channel, first-call costs
        pulls, raws = [], []
        for _ in range(runs):
            pulls.append(asyncio.run(_pull_once(address, export)))
            raws.append(asyncio.run(_raw_once(address)))
        return pulls, raws
    finally:
        server.terminate()
        server.join()


def measure(model: str, tokens: int, chunk_blocks: int, runs: int, block_size: int = 16) -> dict:
    keep_transfer_buffers()  # as the worker process does
    export = make_export(model, tokens, block_size, torch.bfloat16)
    size = export.data.numel() * export.data.element_size()
    loadavg_start = os.getloadavg()[0]
    serialize = statistics.median(time_serialize(export, chunk_blocks) for _ in range(runs))
    pulls, raws = time_grpc(export, chunk_blocks, runs)
    wire, raw = statistics.median(pulls), statistics.median(raws)
    loopback = loopback_mb_per_s(size, repeats=runs)
    rates = {"serialize_mb_per_s": size / serialize / 1e6, "grpc_mb_per_s": size / wire / 1e6,
             "grpc_raw_bytes_mb_per_s": size / raw / 1e6, "loopback_mb_per_s": loopback}  # fmt: skip
    return {"model": model, "tokens": tokens, "bytes": size, "chunk_blocks": chunk_blocks,
            "chunk_bytes": size // export.num_blocks * chunk_blocks, "runs": runs, **rates,
            "serialize_ratio": rates["serialize_mb_per_s"] / loopback, "grpc_ratio": rates["grpc_mb_per_s"] / loopback,
            "grpc_raw_bytes_ratio": rates["grpc_raw_bytes_mb_per_s"] / loopback,
            "loadavg_start": loadavg_start, "loadavg_end": os.getloadavg()[0]}  # fmt: skip


def print_result(r: dict) -> None:
    print(f"KV transfer, {r['model']} {r['tokens']} tokens = {r['bytes'] / 1e6:.1f} MB, "
          f"{r['chunk_blocks']} blocks/chunk ({r['chunk_bytes'] / 1e6:.2f} MB), medians of {r['runs']}:")
    print(f"  {'path':<34}{'MB/s':>8}{'vs loopback':>13}")
    rows = (("serialize + assemble (in-process)", "serialize"), ("gRPC PullBlocks stream (loopback)", "grpc"),
            ("gRPC stream of opaque bytes", "grpc_raw_bytes"))
    for label, key in rows:
        print(f"  {label:<34}{r[key + '_mb_per_s']:>8.0f}{r[key + '_ratio']:>13.0%}")
    print(f"  {'raw loopback socket copy':<34}{r['loopback_mb_per_s']:>8.0f}{1:>13.0%}")
    print(f"  1-min load average {r['loadavg_start']:.1f} at start, {r['loadavg_end']:.1f} at end (shared machine)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kv_transfer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="random:smollm2-135m", help="whose KV shape (any engine model spec)")
    parser.add_argument("--tokens", type=int, default=1500, help="prompt length")
    parser.add_argument("--chunk-blocks", type=int, default=DEFAULT_CHUNK_BLOCKS)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path, default=Path("bench/results/kv-transfer.json"))
    args = parser.parse_args(argv)
    result = measure(args.model, args.tokens, args.chunk_blocks, args.runs)
    print_result(result)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
