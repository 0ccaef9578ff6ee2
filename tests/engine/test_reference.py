"""Greedy decoding matches Hugging Face transformers on the same SmolLM2 weights."""

import pytest

from services.engine import Engine, SamplingParams

GREEDY_32 = SamplingParams(temperature=0, max_tokens=32)


@pytest.mark.slow
def test_greedy_matches_transformers_one_at_a_time(engine: Engine, reference_prompt_ids, hf_greedy):
    for ids, expected in zip(reference_prompt_ids, hf_greedy, strict=True):
        (out,) = engine.generate([ids], GREEDY_32)
        assert out.new_token_ids == expected


@pytest.mark.slow
def test_greedy_matches_transformers_batched(engine: Engine, reference_prompt_ids, hf_greedy):
    outs = engine.generate(reference_prompt_ids, GREEDY_32)
    assert [o.new_token_ids for o in outs] == hf_greedy
    # A reference answer that stops early stops on EOS, and says so.
    for out, expected in zip(outs, hf_greedy, strict=True):
        assert out.finish_reason == ("length" if len(expected) == 32 else "stop")


def test_default_model_answers_in_english(engine: Engine, tokenizer):
    ids = tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    (out,) = engine.generate([ids], SamplingParams(temperature=0, max_tokens=16))
    assert "Paris" in out.text
