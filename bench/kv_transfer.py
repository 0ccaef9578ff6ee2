"""KV transfer throughput without model compute: how close the chunk path gets to a raw socket.

``python -m bench.kv_transfer`` builds a ``KvExport`` of a real model's KV shape (default
SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64, bf16, 16-token blocks) for a prompt of
``--tokens`` tokens and times, medians of ``--runs``:

- serialize: ``export_to_chunks`` → ``encode_chunk`` → ``decode_chunk`` → ``ChunkAssembler``
  writing into reserved pool blocks, in one process (the message bytes gRPC would carry, no
  socket);
- grpc: the same chunks streamed by a ``KvTransfer.PullBlocks`` servicer in another process
  over loopback to the real receiving side (``receive_into`` writing into blocks reserved in a
  KV pool, as a decode worker does), over each of ``--streams`` parallel stream counts (the
  worker's ``--transfer-streams``);
- tcp: the same pull with ``tcp_connections`` (the worker's default ``--transfer-transport tcp``):
  the chunks on as many plain TCP connections beside the call (``services/worker/kv_tcp.py``);
- grpc raw bytes: the same encoded messages as opaque bytes on the same server and as many
  connections (no chunk work on either side): gRPC's own ceiling on this machine;
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
import uuid
from pathlib import Path

import grpc
import torch

from bench.serve import loopback_mb_per_s
from kvmesh.grpc_service import CHANNEL_OPTIONS, mesh_channel
from kvmesh_proto.v1 import transfer_pb2, transfer_pb2_grpc
from services.engine.kv_transfer import KvExport, KvReservation
from services.engine.loader import load_model_config
from services.worker.kv_receive import ChunkAssembler, decode_chunk, receive_into, spread
from services.worker.kv_wire import (
    DEFAULT_CHUNK_BLOCKS,
    WireChunk,
    add_transfer_servicer,
    encode_chunk,
    export_to_chunks,
    keep_transfer_buffers,
)
from services.worker.transfer_servicer import TransferSender

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


class Pool:
    """A decode worker's KV pool, twice the transfer's size, reused by every run (as a worker's
    is); each run reserves a different scattered half of it, as a pool after some churn hands out."""

    def __init__(self, export: KvExport) -> None:
        self.export = export
        shape = list(export.data.shape)
        self.kv_cache = torch.zeros([*shape[:2], 2 * shape[2], *shape[3:]], dtype=export.data.dtype)
        self.runs = 0

    def reserve(self) -> KvReservation:
        self.runs += 1
        order = torch.randperm(self.kv_cache.shape[2], generator=torch.Generator().manual_seed(self.runs))
        block_ids = order[: self.export.num_blocks].tolist()
        return KvReservation(0, block_ids, self.export.num_tokens, self.kv_cache)

    def check(self, reservation: KvReservation) -> None:
        placed = self.kv_cache[:, :, reservation.block_ids]
        assert torch.equal(placed.view(torch.uint8), self.export.data.view(torch.uint8)), "placement is not bit-exact"


def time_serialize(pool: Pool, chunk_blocks: int) -> float:
    """What the decode worker does with the messages, without gRPC: decode, check, place."""
    reservation = pool.reserve()
    start = time.perf_counter()
    assembler = ChunkAssembler(0, reservation)
    for chunk in chunks_of(pool.export, chunk_blocks):
        assembler.add(*decode_chunk(encode_chunk(chunk)))
    assembler.check_complete()
    seconds = time.perf_counter() - start
    pool.check(reservation)
    return seconds


class ExportServicer(transfer_pb2_grpc.KvTransferServicer):
    """Serves an export's chunks as one finished transfer, serialized as they are sent (as
    ``serve_prefill`` does), through a worker's own ``TransferSender`` (by default one that offers
    TCP): over the transfer's streams or its TCP connections."""

    def __init__(self, export: KvExport, chunk_blocks: int, sender: TransferSender | None = None) -> None:
        self.export, self.chunk_blocks = export, chunk_blocks
        self.sender = sender or TransferSender("127.0.0.1", 0)

    async def PullBlocks(self, request, context):
        if request.stream_index:
            async for message in self.sender.follow(request.transfer_id, request.stream_index):
                yield message
            return

        async def chunks():
            for chunk in chunks_of(self.export, self.chunk_blocks):
                yield chunk

        async for message in self.sender.send(chunks(), request):
            yield message


def _serve(export: KvExport, chunk_blocks: int, ports: multiprocessing.Queue) -> None:
    keep_transfer_buffers()  # as the worker process does
    messages = [encode_chunk(chunk) for chunk in chunks_of(export, chunk_blocks)]

    async def raw(request: bytes, context: grpc.aio.ServicerContext):
        index, streams = map(int, request.split(b","))
        for message in messages[index::streams]:
            yield message

    async def run() -> None:
        server = grpc.aio.server(options=CHANNEL_OPTIONS)
        servicer = ExportServicer(export, chunk_blocks)
        servicer.sender.tcp.start()
        add_transfer_servicer(servicer, server)
        handler = grpc.unary_stream_rpc_method_handler(raw)  # bytes in, bytes out: no (de)serialization
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_RAW_SERVICE, {"Stream": handler}),))
        ports.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(run())


async def _pull_once(address: str, pool: Pool, streams: int, tcp: bool = False) -> float:
    """One pull as the decode worker makes it (``receive_into``: its streams or TCP connections,
    its checks, into reserved pool blocks)."""
    reservation = pool.reserve()
    start = time.perf_counter()
    pull = transfer_pb2.PullBlocksRequest(transfer_id=uuid.uuid4().hex, **spread(streams, tcp))
    await receive_into(ChunkAssembler(0, reservation), address, pull, timeout_s=60)
    seconds = time.perf_counter() - start
    pool.check(reservation)
    return seconds


async def _raw_once(address: str, streams: int) -> float:
    """The same messages as opaque bytes, every ``streams``-th on each of ``streams`` connections:
    what gRPC itself costs, with no chunk work on either side."""

    async def one(index: int) -> None:
        async with mesh_channel(address, own_connection=streams > 1) as channel:
            async for _ in channel.unary_stream(f"/{_RAW_SERVICE}/Stream")(f"{index},{streams}".encode()):
                pass

    start = time.perf_counter()
    await asyncio.gather(*(one(index) for index in range(streams)))
    return time.perf_counter() - start


async def _time_all(address: str, pool: Pool, runs: int, streams: list[int]) -> dict[int, tuple[list, list, list]]:
    """Every pull in one event loop, as a decode worker's (its thread pool warm); each pull opens
    its own channels and connections, as a worker's does."""
    times: dict[int, tuple[list, list, list]] = {count: ([], [], []) for count in streams}
    for count in streams:
        await _pull_once(address, pool, count)  # warm-up: first-call costs, the pool's pages
        await _pull_once(address, pool, count, tcp=True)
    for _ in range(runs):
        for count in streams:
            times[count][0].append(await _pull_once(address, pool, count))
            times[count][1].append(await _raw_once(address, count))
            times[count][2].append(await _pull_once(address, pool, count, tcp=True))
    return times


def time_grpc(pool: Pool, chunk_blocks: int, runs: int, streams: list[int]) -> dict[int, tuple[list, list, list]]:
    """Per stream count: (PullBlocks seconds, raw-bytes seconds, TCP seconds) per run, interleaved."""
    ctx = multiprocessing.get_context("spawn")
    ports = ctx.Queue()
    server = ctx.Process(target=_serve, args=(pool.export, chunk_blocks, ports), daemon=True)
    server.start()
    try:
        return asyncio.run(_time_all(f"127.0.0.1:{ports.get(timeout=60)}", pool, runs, streams))
    finally:
        server.terminate()
        server.join()


def measure(model: str, tokens: int, chunk_blocks: int, runs: int, streams: list[int], block_size: int = 16) -> dict:
    keep_transfer_buffers()  # as the worker process does
    export = make_export(model, tokens, block_size, torch.bfloat16)
    size = export.data.numel() * export.data.element_size()
    loadavg_start = os.getloadavg()[0]
    loopback = [loopback_mb_per_s(size, repeats=runs)]
    pool = Pool(export)
    serialize = statistics.median(time_serialize(pool, chunk_blocks) for _ in range(runs))
    times = time_grpc(pool, chunk_blocks, runs, streams)
    loopback.append(loopback_mb_per_s(size, repeats=runs))
    loopback_rate = statistics.mean(loopback)  # before and after the gRPC runs

    def rate(seconds: list[float]) -> dict:
        mb_per_s = size / statistics.median(seconds) / 1e6
        return {"mb_per_s": mb_per_s, "ratio": mb_per_s / loopback_rate}

    return {"model": model, "tokens": tokens, "bytes": size, "chunk_blocks": chunk_blocks,
            "chunk_bytes": size // export.num_blocks * chunk_blocks, "runs": runs, "cpus": os.cpu_count(),
            "loopback_mb_per_s": loopback_rate, "loopback_before_after": loopback,
            "serialize": rate([serialize]),
            "streams": {str(count): {"grpc": rate(pulls), "grpc_raw_bytes": rate(raws), "tcp": rate(tcps)}
                        for count, (pulls, raws, tcps) in times.items()},
            "loadavg_start": loadavg_start, "loadavg_end": os.getloadavg()[0]}  # fmt: skip


def print_result(r: dict) -> None:
    print(f"KV transfer, {r['model']} {r['tokens']} tokens = {r['bytes'] / 1e6:.1f} MB, "
          f"{r['chunk_blocks']} blocks/chunk ({r['chunk_bytes'] / 1e6:.2f} MB), medians of {r['runs']}, "
          f"{r['cpus']} CPUs:")
    print(f"  {'path':<44}{'MB/s':>8}{'vs loopback':>13}")
    serialize = r["serialize"]
    print(f"  {'serialize + assemble (in-process)':<44}{serialize['mb_per_s']:>8.0f}{serialize['ratio']:>13.0%}")
    for count, row in r["streams"].items():
        for label, key in ((f"gRPC PullBlocks, {count} stream(s)", "grpc"),
                           (f"gRPC opaque bytes, {count} stream(s)", "grpc_raw_bytes"),
                           (f"PullBlocks + TCP data, {count} connection(s)", "tcp")):
            print(f"  {label:<44}{row[key]['mb_per_s']:>8.0f}{row[key]['ratio']:>13.0%}")
    print(f"  {'raw loopback socket copy (before/after)':<44}{r['loopback_mb_per_s']:>8.0f}{1:>13.0%}")
    print(f"  1-min load average {r['loadavg_start']:.1f} at start, {r['loadavg_end']:.1f} at end")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kv_transfer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="random:smollm2-135m", help="whose KV shape (any engine model spec)")
    parser.add_argument("--tokens", type=int, default=1500, help="prompt length")
    parser.add_argument("--chunk-blocks", type=int, default=DEFAULT_CHUNK_BLOCKS)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--streams", default="1,2,4", help="comma-separated stream counts per transfer to compare")
    parser.add_argument("--json", type=Path, default=Path("bench/results/kv-transfer.json"))
    args = parser.parse_args(argv)
    result = measure(args.model, args.tokens, args.chunk_blocks, args.runs,
                     [int(count) for count in args.streams.split(",")])
    print_result(result)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
