"""Prefill in engine A, export the KV, import into engine B, decode in B: same tokens as A alone."""

import pytest

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
