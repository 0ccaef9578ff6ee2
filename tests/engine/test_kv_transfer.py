"""Prefill in engine A, export the KV, import into engine B, decode in B: same tokens as A alone."""

import pytest
import torch

from services.engine import Engine, EngineConfig, KvExport, NoFreeBlocksError, SamplingParams
from services.engine.kv_transfer import tensor_from_bytes, tensor_to_bytes


@pytest.fixture(scope="module")
def decode_engine() -> Engine:
    return Engine(EngineConfig(num_kv_blocks=64))


def run_to_completion(engine: Engine) -> list[int]:
    tokens = []
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
    return tokens


def prefill_and_export(engine: Engine, request_id: str, prompt: list[int]) -> tuple[list[int], KvExport]:
    """Prefill ``prompt`` and sample its first token, then export (and release) its KV."""
    engine.add_request(request_id, prompt, SamplingParams(temperature=0, max_tokens=1), keep_kv=True)
    first = run_to_completion(engine)
    return first, engine.export_kv(request_id)


def test_prefill_export_import_decode_matches_local_decode(engine: Engine, decode_engine: Engine,
                                                           reference_prompt_ids):
    prompt = reference_prompt_ids[6]
    full = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    (local,) = engine.generate([prompt], full)

    first, kv = prefill_and_export(engine, "prefill", prompt)
    assert kv.num_tokens == len(prompt) and kv.token_ids == prompt
    assert kv.data.shape[2] == -(-len(prompt) // 16)
    assert kv.block_hashes[-1] == 0 or len(prompt) % 16 == 0
    assert engine.stats().blocks_used == 0  # export released the request

    # Over the wire: raw little-endian bytes, as the KvBlockChunk carries them.
    wire = KvExport(kv.token_ids, kv.num_tokens, kv.block_hashes,
                    tensor_from_bytes(tensor_to_bytes(kv.data), kv.dtype, list(kv.data.shape)))
    decode_engine.add_request_with_kv("decode", prompt, full, wire, output_token_ids=first)
    rest = run_to_completion(decode_engine)
    assert first + rest == local.new_token_ids
    assert decode_engine.stats().blocks_used == 0


def test_import_rejects_mismatched_kv(engine: Engine, decode_engine: Engine, tokenizer):
    prompt = tokenizer.encode("A short prompt that is exported.")
    engine.add_request("p2", prompt, SamplingParams(temperature=0, max_tokens=1), keep_kv=True)
    while engine.has_unfinished():
        engine.step()
    kv = engine.export_kv("p2")
    sp = SamplingParams(temperature=0, max_tokens=4)
    with pytest.raises(ValueError, match="prefix"):
        decode_engine.add_request_with_kv("bad", [t + 1 for t in prompt], sp, kv, output_token_ids=[5])
    with pytest.raises(NoFreeBlocksError):
        tiny = KvExport(kv.token_ids, kv.num_tokens, kv.block_hashes, kv.data)
        for i in range(100):
            decode_engine.add_request_with_kv(f"fill-{i}", prompt, sp, tiny, output_token_ids=[5])
    for i in range(100):
        decode_engine.abort(f"fill-{i}")
    assert decode_engine.stats().blocks_used == 0


def test_import_reuses_the_prefix_the_decode_pool_already_holds(engine: Engine, decode_engine: Engine, tokenizer):
    """Only blocks after the decode side's cached prefix travel; the output is unchanged."""
    shared = tokenizer.encode("Shared context about harbors and lanterns. " * 6)
    prompt = shared + tokenizer.encode(" Now a question about copper meadows and quartz falcons?")
    full = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    (local,) = engine.generate([prompt], full)
    decode_engine.generate([shared], SamplingParams(temperature=0, max_tokens=1))  # cache the prefix in B

    skip = decode_engine.cached_prefix_blocks(prompt)
    assert skip == len(shared) // 16
    first, kv = prefill_and_export(engine, "prefill-part", prompt)
    tail = KvExport(kv.token_ids, kv.num_tokens, kv.block_hashes[skip:], kv.data[:, :, skip:])
    decode_engine.add_request_with_kv("decode-part", prompt, full, tail, output_token_ids=first, kv_first_block=skip)
    rest = run_to_completion(decode_engine)
    assert first + rest == local.new_token_ids
    assert decode_engine.stats().blocks_used == 0


def test_a_prefill_in_capped_steps_exports_its_finished_blocks_as_it_goes(engine: Engine, reference_prompt_ids):
    """What the prefill worker streams while it computes: each step's newly full blocks, then the rest."""
    prompt = reference_prompt_ids[6] * 3  # ~150 tokens: several 32-token steps
    cached = engine.cached_prefix_blocks(prompt) * 16
    engine.add_request("stepped", prompt, SamplingParams(temperature=0, max_tokens=1), keep_kv=True,
                       max_tokens_per_step=32)  # fmt: skip
    pieces, next_block, steps = [], 0, 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
        piece = engine.export_kv("stepped", release=False, first_block=next_block, full_blocks_only=True)
        assert piece.first_block == next_block and piece.num_blocks == piece.num_tokens // 16 - next_block
        next_block += piece.num_blocks
        pieces.append(piece)
    assert steps == -(-(len(prompt) - cached) // 32) > 1
    whole = engine.export_kv("stepped", release=False)
    rest = engine.export_kv("stepped", first_block=next_block)
    sent = torch.cat([p.data for p in pieces] + [rest.data], dim=2)
    assert torch.equal(sent, whole.data)
    assert [h for p in [*pieces, rest] for h in p.block_hashes] == whole.block_hashes
    assert engine.stats().blocks_used == 0
