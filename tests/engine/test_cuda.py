"""The same engine on an NVIDIA GPU (skipped where there is none): it agrees with the CPU."""

import time

import pytest
import torch

from services.engine import Engine, EngineConfig, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

PROMPTS = [[5, 17, 300, 4000, 12, 9], list(range(100, 140)), [7] * 33]


def test_cuda_matches_cpu_on_random_weights():
    torch.backends.cuda.matmul.allow_tf32 = False
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    cfg = dict(model="random:smollm2-135m", num_kv_blocks=64, seed=7)
    cpu = Engine(EngineConfig(device="cpu", **cfg)).generate(PROMPTS, sp)
    gpu = Engine(EngineConfig(device="cuda", **cfg)).generate(PROMPTS, sp)
    for c, g in zip(cpu, gpu, strict=True):
        assert c.new_token_ids == g.new_token_ids
        for a, b in zip(c.logprobs, g.logprobs, strict=True):
            assert abs(a.logprob - b.logprob) < 1e-3


def test_cuda_bf16_throughput_and_pressure():
    engine = Engine(EngineConfig(model="random:smollm2-135m", device="cuda", dtype="bfloat16",
                                 max_num_seqs=256, max_num_batched_tokens=8192))
    prompts = [[(i * 31 + j) % 49152 for j in range(48)] for i in range(128)]
    sp = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    engine.generate(prompts[:4], SamplingParams(temperature=0, max_tokens=4))
    torch.cuda.synchronize()
    t = time.perf_counter()
    outs = engine.generate(prompts, sp)
    dt = time.perf_counter() - t
    print(f"cuda bf16 random smollm2-135m: 128x64 tokens in {dt:.2f}s = {128 * 64 / dt:,.0f} tok/s")
    assert all(len(o.new_token_ids) == 64 for o in outs)
    small = Engine(EngineConfig(model="random:smollm2-135m", device="cuda", dtype="bfloat16", num_kv_blocks=12))
    res = small.generate(prompts[:8], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    assert all(len(o.new_token_ids) == 24 for o in res)
    st = small.stats()
    assert st.preemptions > 0 and st.blocks_used == 0
