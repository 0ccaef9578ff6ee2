"""Aborting a request frees its blocks at once, and the rest of the batch is unaffected."""

from services.engine import Engine, SamplingParams


def test_abort_frees_blocks_immediately(engine: Engine, tokenizer):
    prompt = tokenizer.encode("Write a long story about a dragon. " * 4)
    sp = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    (expected,) = engine.generate([tokenizer.encode("Count to ten:")], SamplingParams(temperature=0, max_tokens=8))
    engine.add_request("victim", prompt, sp)
    engine.add_request("survivor", tokenizer.encode("Count to ten:"), SamplingParams(temperature=0, max_tokens=8))
    survivor = []
    for _ in range(2):
        survivor += [t for out in engine.step() if out.request_id == "survivor" for t in out.new_token_ids]
    used = engine.stats().blocks_used
    assert used >= -(-len(prompt) // 16)
    assert engine.abort("victim")
    assert engine.stats().blocks_used < used
    assert not engine.abort("victim")
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id == "survivor"
            survivor += out.new_token_ids
    assert survivor == expected.new_token_ids
    assert engine.stats().blocks_used == 0


def test_abort_waiting_request(engine: Engine, tokenizer):
    engine.add_request("queued", tokenizer.encode("hello"), SamplingParams(max_tokens=3))
    assert engine.stats().waiting == 1
    assert engine.abort("queued")
    assert not engine.has_unfinished()
    assert engine.step() == []
