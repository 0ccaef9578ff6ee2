"""Prefix caching: reused blocks give the same output, and the stats and events say so."""

import itertools

from kvmesh.hashing import block_hashes
from services.engine import BlockRemoved, BlockStored, Engine, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12)


def _long_prompt(tokenizer, question: str) -> list[int]:
    system = ("You are a meticulous assistant. Answer in one sentence. " * 6).strip()
    return tokenizer.encode_chat([{"role": "system", "content": system}, {"role": "user", "content": question}])


def test_cached_prefix_gives_same_output_and_counts_reuse(engine: Engine, tokenizer):
    engine.reset_prefix_cache()
    first = _long_prompt(tokenizer, "Name a fruit.")
    second = _long_prompt(tokenizer, "Name a planet.")
    (uncached_second,) = engine.generate([second], GREEDY)
    engine.reset_prefix_cache()
    assert engine.stats().blocks_cached == 0

    hits_before = engine.stats().prefix_hit_tokens
    engine.generate([first], GREEDY)
    (cached_second,) = engine.generate([second], GREEDY)

    shared = 0
    while first[shared] == second[shared]:
        shared += 1
    reusable_blocks = shared // 16
    assert reusable_blocks >= 4
    assert cached_second.new_token_ids == uncached_second.new_token_ids
    assert cached_second.num_cached_tokens == reusable_blocks * 16
    assert uncached_second.num_cached_tokens == 0
    assert engine.stats().prefix_hit_tokens - hits_before == reusable_blocks * 16


def test_same_prompt_twice_reuses_all_but_the_last_token(engine: Engine, tokenizer):
    prompt = _long_prompt(tokenizer, "Why is the sea salty?")
    (a,) = engine.generate([prompt], GREEDY)
    (b,) = engine.generate([prompt], GREEDY)
    assert a.new_token_ids == b.new_token_ids
    # At least one token is always recomputed, to produce the next token's logits.
    assert b.num_cached_tokens == ((len(prompt) - 1) // 16) * 16


def test_kv_events_name_blocks_with_the_shared_hash_chain(engine: Engine, tokenizer):
    batches: list[tuple[int, list]] = []
    engine.set_kv_event_callback(lambda seq, events: batches.append((seq, events)))
    try:
        engine.reset_prefix_cache()
        prompt = _long_prompt(tokenizer, "Tell me about owls.")
        (out,) = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
        engine.reset_prefix_cache()
    finally:
        engine.set_kv_event_callback(None)
    seqs = [s for s, _ in batches]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert all(b - a == 1 for a, b in itertools.pairwise(seqs))
    stored = [e for _, events in batches for e in events if isinstance(e, BlockStored)]
    chain = [h for e in stored for h in e.block_hashes]
    full_tokens = (prompt + out.new_token_ids)[: len(prompt) + len(out.new_token_ids) - 1]
    assert chain == block_hashes(full_tokens, 16)
    # Parents link each event to the previous one.
    assert stored[0].parent_hash is None
    for prev, cur in itertools.pairwise(stored):
        assert cur.parent_hash == prev.block_hashes[-1]
    removed = {h for _, events in batches for e in events if isinstance(e, BlockRemoved) for h in e.block_hashes}
    assert set(chain) <= removed
