"""Peer fetch on the real mesh: a worker told that a peer holds the prompt's prefix pulls those
blocks over the KV-transfer stream instead of recomputing them, with output identical to a
cold run; an unreachable peer only means recomputing."""

from __future__ import annotations

import uuid

import grpc

from kvmesh.hashing import block_hashes
from kvmesh.local_stores import free_port
from kvmesh.status import collect_status
from kvmesh_proto.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from services.engine import Engine, SamplingParams

MAX_TOKENS = 6


async def generate(address: str, tokens: list[int], peer: str = "", peer_blocks: int = 0) -> tuple[list[int], int]:
    request = worker_pb2.WorkerGenerateRequest(
        request_id=f"peer-{uuid.uuid4().hex[:8]}", token_ids=tokens, kv_peer_address=peer, kv_peer_blocks=peer_blocks,
        sampling=common_pb2.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))  # fmt: skip
    async with grpc.aio.insecure_channel(address) as channel:
        replies = [r async for r in worker_pb2_grpc.WorkerStub(channel).Generate(request)]
    return [t for r in replies for t in r.token_ids], replies[-1].usage.cached_tokens


async def test_a_worker_pulls_a_prefix_its_peer_holds_and_answers_as_a_cold_run(mesh, tokenizer, engine: Engine):
    holder, puller = mesh.worker_ids()[:2]
    rows = {r["id"]: r["address"] for r in await collect_status(mesh.etcd_endpoint, mesh.namespace)}
    topic = uuid.uuid4().hex[:8]
    messages = [{"role": "system", "content": f"Case {topic}: you are a meticulous archivist. " * 8},
                {"role": "user", "content": "Summarise the case file in one line."}]
    prompt = tokenizer.encode_chat(messages)
    blocks = (len(prompt) - 1) // 16
    engine.reset_prefix_cache()
    expected = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
    expected = expected[0].new_token_ids
    await generate(rows[holder], prompt)

    tokens, cached = await generate(rows[puller], prompt, rows[holder], len(block_hashes(prompt)))

    assert cached == blocks * 16
    assert tokens == expected
    # A peer that is not there: the same answer, computed here.
    other = tokenizer.encode_chat([messages[0], {"role": "user", "content": "Who filed it?"}])
    engine.reset_prefix_cache()
    expected_other = engine.generate([other], SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
    tokens, _ = await generate(rows[puller], other, f"127.0.0.1:{free_port()}", 4)
    assert tokens == expected_other[0].new_token_ids
    # A peer that holds none of it (the router's index was stale): nothing kept, computed here.
    unknown = tokenizer.encode(f"Unrelated note {uuid.uuid4().hex}: " + "the archive closes at noon. " * 12)
    tokens, cached = await generate(rows[puller], unknown, rows[holder], 4)
    assert cached == 0 and len(tokens) == MAX_TOKENS
