"""A pool smaller than the batch needs: preemption (recompute) keeps every answer correct."""

import pytest

from services.engine import Engine, EngineConfig, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.mark.slow
def test_block_pressure_preempts_and_every_request_completes(engine: Engine, reference_prompt_ids):
    expected = [o.new_token_ids for o in engine.generate(reference_prompt_ids, GREEDY)]
    # 8 requests of up to 42 + 24 tokens need ~25 blocks at once; give the pool 8.
    small = Engine(EngineConfig(num_kv_blocks=8, max_num_seqs=8, max_num_batched_tokens=256))
    outs = small.generate(reference_prompt_ids, GREEDY)
    stats = small.stats()
    assert [o.new_token_ids for o in outs] == expected
    assert stats.preemptions > 0
    assert stats.running == stats.waiting == 0
    assert stats.blocks_used == 0
    assert stats.blocks_free + stats.blocks_cached == stats.blocks_total == 8


def test_no_block_leaks_after_a_batch(engine: Engine, reference_prompt_ids):
    engine.generate(reference_prompt_ids[:4], SamplingParams(temperature=0, max_tokens=4))
    stats = engine.stats()
    assert stats.blocks_used == 0
    assert stats.blocks_free + stats.blocks_cached == stats.blocks_total
