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


def test_a_reserved_import_is_written_in_place_and_named_only_when_started(engine: Engine, decode_engine: Engine,
                                                                           tokenizer):  # fmt: skip
    """What a decode worker does: reserve the prompt's blocks, write each chunk's bytes into
    them as it arrives, then start decoding; the output is the local one."""
    prompt = tokenizer.encode("Reserved blocks hold notes on amber rivers and slate towers. " * 3)
    full = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    (local,) = engine.generate([prompt], full)
    first, kv = prefill_and_export(engine, "prefill-reserved", prompt)
    used = decode_engine.stats().blocks_used

    reservation = decode_engine.reserve_kv("reserved", prompt, full)
    assert (reservation.first_block, len(reservation.block_ids)) == (0, kv.num_blocks)
    assert decode_engine.stats().blocks_used == used + kv.num_blocks
    for start in reversed(range(0, kv.num_blocks, 3)):  # in chunks of 3 blocks, last first
        stop = min(start + 3, kv.num_blocks)
        reservation.write(start, stop - start, tensor_to_bytes(kv.data[:, :, start:stop]))
        assert decode_engine.cached_prefix_blocks(prompt) == 0  # written, but nobody can match it yet
    with pytest.raises(ValueError, match="covers"):
        decode_engine.start_reserved("reserved", kv.num_tokens - 1, first)
    decode_engine.start_reserved("reserved", kv.num_tokens, first)
    assert decode_engine.cached_prefix_blocks(prompt) == (len(prompt) - 1) // 16
    assert first + run_to_completion(decode_engine) == local.new_token_ids
    assert decode_engine.stats().blocks_used == used


def test_a_released_or_refused_reservation_holds_no_block(decode_engine: Engine, tokenizer):
    prompt = tokenizer.encode("A prompt whose transfer fails halfway through its chunks.")
    sp = SamplingParams(temperature=0, max_tokens=4)
    used = decode_engine.stats().blocks_used
    decode_engine.reserve_kv("fails", prompt, sp)
    with pytest.raises(ValueError, match="duplicate"):
        decode_engine.reserve_kv("fails", prompt, sp)
    assert decode_engine.release_reservation("fails") and not decode_engine.release_reservation("fails")
    assert decode_engine.stats().blocks_used == used
    long = (prompt * 100)[: 40 * 16]  # 40 of the pool's 64 blocks: two cannot be held at once
    decode_engine.reserve_kv("long-1", long, sp)
    with pytest.raises(NoFreeBlocksError):
        decode_engine.reserve_kv("long-2", [t + 1 for t in long], sp)
    decode_engine.release_reservation("long-1")
    assert decode_engine.stats().blocks_used == used and not decode_engine.reservations
