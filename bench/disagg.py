"""How much of the KV transfer a disaggregated prefill hides behind its own compute.

Against a live prefill worker, acting as the decode worker (the same ``pull_prefill`` it
uses), on fresh random prompts of the same length (nothing cached), interleaved per round:

- compute: ``Worker.Generate`` of 1 token on the prefill worker (prefill alone, no transfer);
- overlap off: pull with one prefill step for the whole prompt, then every block is sent;
  the stream after its first chunk gives the transfer rate (bytes / seconds), and
  transfer = all bytes at that rate;
- overlap on: pull with the worker's own prefill steps (``--prefill-chunk-tokens``), each
  step's finished blocks streamed while the next is computed.

hidden fraction = 1 − (TTFT with overlap − compute) / transfer: 1 when the pull costs no
more than the prefill alone, 0 when the whole transfer still follows the compute. Chunked
prefill's own extra compute counts against it. It is reported twice: against the wire time
above, and against what the pull adds to the compute when nothing overlaps (TTFT overlap off
− compute: the wire plus exporting, serializing and checking the first chunk, and the call).
"""

from __future__ import annotations

import random
import statistics
import time
import uuid

from kvmesh.grpc_service import mesh_channel
from kvmesh_proto.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from services.worker.disagg import pull_prefill

# Larger than any prompt: the whole prompt in one prefill step (within the engine's budget).
ONE_STEP = 1 << 20


def _fresh_request(rng: random.Random, model: str, prompt_tokens: int) -> worker_pb2.WorkerGenerateRequest:
    return worker_pb2.WorkerGenerateRequest(
        request_id=f"overlap-{uuid.uuid4().hex[:8]}", model=model,
        token_ids=[rng.randrange(1000, 40000) for _ in range(prompt_tokens)],
        sampling=common_pb2.SamplingParams(temperature=0, max_tokens=1),
    )  # fmt: skip


async def _compute_seconds(address: str, request: worker_pb2.WorkerGenerateRequest) -> float:
    async with mesh_channel(address) as channel:
        start = time.perf_counter()
        async for _ in worker_pb2_grpc.WorkerStub(channel).Generate(request, timeout=600):
            pass
        return time.perf_counter() - start


async def measure_overlap(address: str, model: str, prompt_tokens: int = 1500, rounds: int = 3, seed: int = 0
                          ) -> dict:  # fmt: skip
    """Medians over ``rounds`` of compute, transfer and both TTFTs on ``address`` (a prefill worker)."""
    rng = random.Random(seed)
    compute, transfer, rate, ttft_off, ttft_on, size = [], [], [], [], [], []
    for _ in range(rounds):
        compute.append(await _compute_seconds(address, _fresh_request(rng, model, prompt_tokens)))
        off = await pull_prefill(address, _fresh_request(rng, model, prompt_tokens), 0, 600, ONE_STEP)
        total = off.assembler.bytes_received
        bytes_per_s = (total - off.first_chunk_bytes) / off.transfer_seconds
        rate.append(bytes_per_s / 1e6)
        transfer.append(total / bytes_per_s)
        size.append(total)
        ttft_off.append(off.seconds)
        on = await pull_prefill(address, _fresh_request(rng, model, prompt_tokens), 0, 600)
        ttft_on.append(on.seconds)
    med = statistics.median
    exposed_on = med(ttft_on) - med(compute)
    return {"prompt_tokens": prompt_tokens, "rounds": rounds, "bytes": int(med(size)),
            "compute_ms": med(compute) * 1000, "transfer_ms": med(transfer) * 1000, "transfer_mb_per_s": med(rate),
            "ttft_overlap_off_ms": med(ttft_off) * 1000, "ttft_overlap_on_ms": med(ttft_on) * 1000,
            "hidden_fraction": 1 - exposed_on / med(transfer),
            "hidden_fraction_of_pull_cost": 1 - exposed_on / (med(ttft_off) - med(compute))}  # fmt: skip


def print_overlap(result: dict) -> None:
    print(f"overlap ({result['prompt_tokens']}-token prompt, {result['bytes'] / 1e6:.1f} MB of KV, medians of "
          f"{result['rounds']}): prefill compute {result['compute_ms']:.0f} ms, transfer alone "
          f"{result['transfer_ms']:.0f} ms ({result['transfer_mb_per_s']:.0f} MB/s), remote TTFT overlap off "
          f"{result['ttft_overlap_off_ms']:.0f} ms, on {result['ttft_overlap_on_ms']:.0f} ms -> hidden fraction "
          f"{result['hidden_fraction']:.0%} of the wire time, {result['hidden_fraction_of_pull_cost']:.0%} of what "
          f"the pull adds without overlap")  # fmt: skip
