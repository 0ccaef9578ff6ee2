"""Sampling: seeds reproduce, stop rules end generation where they should, logprobs add up."""

import math

from services.engine import Engine, SamplingParams


def test_seeded_sampling_is_reproducible_even_in_a_different_batch(engine: Engine, tokenizer):
    prompt = tokenizer.encode("Once upon a time")
    sp = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=16, ignore_eos=True)
    (alone,) = engine.generate([prompt], sp)
    noise = SamplingParams(temperature=1.2, max_tokens=16, ignore_eos=True)
    outs = engine.generate([tokenizer.encode("Hello"), prompt], [noise, sp])
    assert outs[1].new_token_ids == alone.new_token_ids
    other = engine.generate([prompt], SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=4321,
                                                     max_tokens=16, ignore_eos=True))[0]
    assert other.new_token_ids != alone.new_token_ids


def test_top_k_one_is_greedy(engine: Engine, tokenizer):
    prompt = tokenizer.encode("The largest ocean on Earth is")
    (greedy,) = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=8))
    (topk1,) = engine.generate([prompt], SamplingParams(temperature=0.8, top_k=1, max_tokens=8))
    assert topk1.new_token_ids == greedy.new_token_ids


def test_stop_string_ends_generation_before_the_match(engine: Engine, tokenizer):
    prompt = tokenizer.encode("1, 2, 3, 4, 5,")
    (free,) = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    assert " 8" in free.text
    (stopped,) = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=20, stop=[" 8"]))
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.index(" 8")]
    assert len(stopped.new_token_ids) < len(free.new_token_ids)


def test_stop_token_ids_and_max_tokens(engine: Engine, tokenizer):
    prompt = tokenizer.encode("1, 2, 3, 4, 5,")
    (free,) = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert free.finish_reason == "length" and len(free.new_token_ids) == 10
    stop_id = free.new_token_ids[3]
    (stopped,) = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=10,
                                                          stop_token_ids=[stop_id]))
    first = free.new_token_ids.index(stop_id)
    assert stopped.new_token_ids == free.new_token_ids[: first + 1]
    assert stopped.finish_reason == "stop"


def test_logprobs_are_those_of_the_sampled_tokens(engine: Engine, tokenizer):
    prompt = tokenizer.encode("The capital of Germany is")
    (out,) = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=5, logprobs=3))
    assert len(out.logprobs) == 5
    for token, lp in zip(out.new_token_ids, out.logprobs, strict=True):
        assert lp.token_id == token
        # Greedy picks the most likely token, so it is the top alternative.
        assert lp.top_token_ids[0] == token
        assert math.isclose(lp.top_logprobs[0], lp.logprob, rel_tol=1e-5)
        assert lp.top_logprobs == sorted(lp.top_logprobs, reverse=True)
        assert lp.logprob <= 0


def test_penalties_discourage_repetition(engine: Engine, tokenizer):
    prompt = tokenizer.encode("la la la la la la la la")
    (plain,) = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    (penalized,) = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                            repetition_penalty=1.5, frequency_penalty=1.0))
    assert len(set(penalized.new_token_ids)) > len(set(plain.new_token_ids))
