"""How much of the KV transfer a disaggregated prefill hides behind its own compute.

Against a live prefill worker, acting as the decode worker (the same ``pull_prefill`` it
uses, over as many streams as it uses by default), on fresh random prompts of the same
length (nothing cached), interleaved per round:

- compute: the same pull with every full block skipped (only the tail block travels), so
  prefill alone on the same schedule (whole prompt in one step, or in the worker's steps);
- overlap off: pull with one prefill step for the whole prompt, then every block is sent;
  the stream after its first chunk gives the transfer rate (bytes / seconds), and
  transfer = all bytes at that rate;
- overlap on: pull with the worker's own prefill steps (``--prefill-chunk-tokens``), each
  step's finished blocks streamed while the next is computed.

hidden fraction = 1 − (TTFT with overlap − compute in steps) / transfer: 1 when the pull
costs no more than the stepped prefill alone, 0 when the whole transfer still follows the
compute. (Stepped prefill's own cost or gain against one step is reported beside it, not
mixed in: on CPU, 256-token steps measured faster than one 1,500-token step.) It is
reported twice: against the wire time above, and against what the pull adds to the compute
when nothing overlaps (TTFT overlap off − compute in one step: the wire plus exporting,
serializing and checking the first chunk, and the call).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import uuid
from pathlib import Path

from kvmesh.config import TRANSFER_TRANSPORTS, WorkerSettings
from kvmesh_proto.v1 import common_pb2, worker_pb2
from services.worker.disagg import PulledPrefill, pull_prefill

# As a decode worker pulls by default: its --transfer-streams, over its --transfer-transport.
_STREAMS = WorkerSettings().transfer_streams
_TCP = WorkerSettings().transfer_transport == "tcp"
# Larger than any prompt: the whole prompt in one prefill step (within the engine's budget).
ONE_STEP = 1 << 20
BLOCK_SIZE = 16


def _fresh_request(rng: random.Random, model: str, prompt_tokens: int) -> worker_pb2.WorkerGenerateRequest:
    return worker_pb2.WorkerGenerateRequest(
        request_id=f"overlap-{uuid.uuid4().hex[:8]}", model=model,
        token_ids=[rng.randrange(1000, 40000) for _ in range(prompt_tokens)],
        sampling=common_pb2.SamplingParams(temperature=0, max_tokens=1),
    )  # fmt: skip


async def _pull(address: str, request: worker_pb2.WorkerGenerateRequest, step_tokens: int, send: bool,
                tcp: bool) -> PulledPrefill:  # fmt: skip
    """A pull of a fresh prompt; ``send=False`` skips every full block (only the tail travels),
    which times the same prefill schedule with (almost) no transfer."""
    skip = 0 if send else (len(request.token_ids) - 1) // BLOCK_SIZE
    return await pull_prefill(address, request, 600, skip_blocks=skip, prefill_chunk_tokens=step_tokens,
                              streams=_STREAMS, tcp=tcp)  # fmt: skip


async def measure_overlap(address: str, model: str, prompt_tokens: int = 1500, rounds: int = 3, seed: int = 0,
                          tcp: bool = _TCP) -> dict:  # fmt: skip
    """Medians over ``rounds`` of compute, transfer and both TTFTs on ``address`` (a prefill worker),
    pulled over TCP data connections or (``tcp=False``) gRPC streams."""
    rng = random.Random(seed)
    samples: dict[str, list[float]] = {k: [] for k in ("compute_off", "compute_on", "off", "on", "rate", "size")}
    for _ in range(rounds):
        for name, step_tokens, send in (("compute_off", ONE_STEP, False), ("off", ONE_STEP, True),
                                        ("compute_on", 0, False), ("on", 0, True)):  # fmt: skip
            pulled = await _pull(address, _fresh_request(rng, model, prompt_tokens), step_tokens, send, tcp)
            samples[name].append(pulled.seconds)
            if name == "off":
                total = pulled.assembler.bytes_received
                samples["rate"].append((total - pulled.first_chunk_bytes) / pulled.transfer_seconds)
                samples["size"].append(total)
                transport = pulled.transport  # what carried it (a sender may not offer TCP)
    med = {name: statistics.median(values) for name, values in samples.items()}
    transfer = med["size"] / med["rate"]
    exposed_on = med["on"] - med["compute_on"]
    return {"prompt_tokens": prompt_tokens, "rounds": rounds, "bytes": int(med["size"]),
            "transport": transport, "streams": _STREAMS,
            "compute_ms": med["compute_on"] * 1000, "compute_one_step_ms": med["compute_off"] * 1000,
            "transfer_ms": transfer * 1000, "transfer_mb_per_s": med["rate"] / 1e6,
            "ttft_overlap_off_ms": med["off"] * 1000, "ttft_overlap_on_ms": med["on"] * 1000,
            "hidden_fraction": 1 - exposed_on / transfer,
            "hidden_fraction_of_pull_cost": 1 - exposed_on / (med["off"] - med["compute_off"])}  # fmt: skip


def print_overlap(result: dict) -> None:
    print(f"overlap ({result['prompt_tokens']}-token prompt, {result['bytes'] / 1e6:.1f} MB of KV, medians of "
          f"{result['rounds']}): prefill compute {result['compute_ms']:.0f} ms in steps "
          f"({result['compute_one_step_ms']:.0f} ms in one), transfer alone "
          f"{result['transfer_ms']:.0f} ms ({result['transfer_mb_per_s']:.0f} MB/s), remote TTFT overlap off "
          f"{result['ttft_overlap_off_ms']:.0f} ms, on {result['ttft_overlap_on_ms']:.0f} ms -> hidden fraction "
          f"{result['hidden_fraction']:.0%} of the wire time, {result['hidden_fraction_of_pull_cost']:.0%} of what "
          f"the pull adds without overlap")  # fmt: skip


async def serve_prefill_worker(args: argparse.Namespace) -> None:
    """A bare prefill worker (engine + KV-transfer service, no mesh): what ``--standalone``
    measures against, in a process of its own as a real prefill worker would be."""
    import grpc

    from kvmesh.grpc_service import CHANNEL_OPTIONS
    from services.engine import Engine, EngineConfig
    from services.engine.async_engine import AsyncEngine
    from services.worker.kv_wire import add_transfer_servicer
    from services.worker.transfer_servicer import KvTransferServicer, TransferSender

    config = EngineConfig(model=args.model, dtype=args.dtype, device=args.device, num_kv_blocks=args.kv_blocks,
                          max_num_batched_tokens=max(2048, args.prompt_tokens))  # fmt: skip
    engine = AsyncEngine(Engine(config))
    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    sender = TransferSender("127.0.0.1", 0)  # offers TCP, as a worker does
    sender.tcp.start()
    add_transfer_servicer(KvTransferServicer(engine, args.prefill_chunk_tokens, sender), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"PORT {port} MODEL {engine.engine.model_id}", flush=True)
    await server.wait_for_termination()


def measure_standalone(args: argparse.Namespace) -> dict:
    """Overlap against a bare prefill worker started as a child process (no etcd, Redis or router:
    what a GPU machine without the mesh's stores can run)."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-m", "bench.disagg", "--serve-prefill", *_engine_flags(args)],
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        line = child.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"the prefill worker did not start: {line!r}")
        _, port, _, model = line.split()
        return asyncio.run(measure_overlap(f"127.0.0.1:{port}", model, args.prompt_tokens, args.rounds,
                                           tcp=args.transfer_transport == "tcp"))  # fmt: skip
    finally:
        child.terminate()
        child.wait(30)


def _engine_flags(args: argparse.Namespace) -> list[str]:
    return ["--model", args.model, "--dtype", args.dtype, "--device", args.device, "--kv-blocks", str(args.kv_blocks),
            "--prefill-chunk-tokens", str(args.prefill_chunk_tokens), "--prompt-tokens", str(args.prompt_tokens)]


def main() -> None:
    """``python -m bench.disagg``: the overlap figures alone, on a fresh 1 prefill + 1 decode stack,
    or with ``--standalone`` against a bare prefill worker (e.g. ``--device cuda`` on a GPU machine)."""
    parser = argparse.ArgumentParser(prog="python -m bench.disagg", description=main.__doc__.split(":")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=1500)
    parser.add_argument("--standalone", action="store_true", help="a bare prefill worker, no mesh")
    parser.add_argument("--serve-prefill", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="smollm2", help="--standalone: the prefill worker's model")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kv-blocks", type=int, default=2048)
    parser.add_argument("--prefill-chunk-tokens", type=int, default=256)
    parser.add_argument("--transfer-transport", choices=TRANSFER_TRANSPORTS, default="tcp" if _TCP else "grpc",
                        help="pull over TCP data connections or gRPC streams (the decode worker's flag)")
    parser.add_argument("--json", type=Path, default=Path("bench/results/disagg-overlap.json"))
    args = parser.parse_args()
    if args.serve_prefill:
        asyncio.run(serve_prefill_worker(args))
        return
    if args.standalone:
        result = measure_standalone(args)
    else:
        from bench.stack import BenchStack

        with BenchStack(0, ["kv"], prefill=1, decode=1) as stack:
            prefill = asyncio.run(stack.worker_info("prefill"))
            result = asyncio.run(measure_overlap(prefill.address, prefill.model, args.prompt_tokens, args.rounds,
                                                 tcp=args.transfer_transport == "tcp"))  # fmt: skip
    result.update(device=args.device, model=args.model if args.standalone else "stack default",
                  dtype=args.dtype if args.standalone else "stack default")  # fmt: skip
    from bench.serve import loopback_mb_per_s  # (bench.serve imports this module)

    result["loopback_mb_per_s"] = loopback_mb_per_s(result["bytes"])
    print_overlap(result)
    print(f"transfer {result['transfer_mb_per_s']:.0f} MB/s over {result['transport']} vs a raw loopback socket copy "
          f"of the same bytes {result['loopback_mb_per_s']:.0f} MB/s "
          f"({result['transfer_mb_per_s'] / result['loopback_mb_per_s']:.0%})")  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"results: {args.json}")


if __name__ == "__main__":
    main()
