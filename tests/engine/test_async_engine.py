"""AsyncEngine streams from a background thread; a consumer that leaves aborts its request."""

import asyncio

import pytest

from services.engine import AsyncEngine, Engine, SamplingParams


@pytest.fixture(scope="module")
def async_engine(engine: Engine):
    wrapper = AsyncEngine(engine)
    yield wrapper
    wrapper.shutdown()


async def test_concurrent_streams_match_offline_generate(async_engine: AsyncEngine, engine_prompts):
    sp = SamplingParams(temperature=0, max_tokens=10)

    async def collect(rid, ids):
        tokens, text, last = [], "", None
        async for out in async_engine.generate(rid, ids, sp):
            tokens += out.new_token_ids
            text += out.text
            last = out
        return tokens, text, last.finish_reason

    results = await asyncio.gather(*(collect(f"s{i}", ids) for i, ids in enumerate(engine_prompts)))
    expected = await async_engine.run(lambda e: e.generate(engine_prompts, sp))
    for (tokens, text, reason), exp in zip(results, expected, strict=True):
        assert tokens == exp.new_token_ids and text == exp.text and reason == exp.finish_reason


async def test_consumer_leaving_aborts_and_frees_blocks(async_engine: AsyncEngine, engine_prompts):
    sp = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    stream = async_engine.generate("leaver", engine_prompts[0], sp)
    async for _ in stream:
        break
    await stream.aclose()
    stats = await async_engine.run(lambda e: e.stats())
    assert stats.running == stats.waiting == 0 and stats.blocks_used == 0

    task = asyncio.create_task(_drain(async_engine.generate("cancelled", engine_prompts[1], sp)))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)
    stats = await async_engine.run(lambda e: e.stats())
    assert stats.running == stats.waiting == 0 and stats.blocks_used == 0


async def test_bad_input_raises_before_streaming(async_engine: AsyncEngine):
    with pytest.raises(ValueError, match="empty"):
        async for _ in async_engine.generate("bad", [], SamplingParams()):
            pass


async def _drain(stream):
    async for _ in stream:
        pass


@pytest.fixture(scope="module")
def engine_prompts(reference_prompt_ids):
    return reference_prompt_ids[:4]
