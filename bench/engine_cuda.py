"""GPU engine benchmark (``bench/engine.py --device cuda``): kvmesh vs its rooflines vs transformers.

For each model (bf16): decode tokens/s at several batch sizes and contexts, prefill tokens/s
at several prompt and cached-prefix lengths, each next to its roofline from two ceilings
measured first in the same process (device-to-device copy bandwidth, bf16 8192^3 matmul
rate), then transformers ``generate`` on the same shape. The raw per-step timings double as
the mock engine's H100 profile (``--profile-out``).

Decode roofline: a step reads every weight (the embedding only for its rows, so not counted)
plus the batch's KV once: step >= (weight bytes + KV bytes) / copy bandwidth. Prefill
roofline: 2 x layer parameters x new tokens plus causal attention (4 x layers x heads x
head_dim x new x (cached + new/2)) over the matmul rate.
"""

from __future__ import annotations

import gc
import statistics
import time

import torch

from services.engine import Engine, EngineConfig, SamplingParams

# (batch, context) decode points and (new tokens, cached prefix) prefill points.
DECODE_POINTS = [(1, 1024), (16, 1024), (64, 1024), (128, 1024), (8, 1024), (32, 1024), (64, 256),
                 (128, 256), (1, 4096), (16, 4096), (32, 4096)]
PREFILL_POINTS = [(128, 0), (512, 0), (1024, 0), (2048, 0), (4096, 0), (8192, 0), (512, 1024), (2048, 1024),
                  (512, 4096), (2048, 4096)]
HEADLINE_BATCHES = (1, 16, 64, 128)


def _cuda_time(fn, repeats: int = 10) -> float:
    """Median seconds of ``fn`` on the GPU (events; one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _copy_seconds(elements: int) -> float:
    src = torch.randn(elements, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    return _cuda_time(lambda: dst.copy_(src))


def _matmul_seconds(n: int) -> float:
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    return _cuda_time(lambda: a @ b)


def _host_link_GBps(nbytes: int = 256 << 20) -> tuple[float, float]:
    """Raw pinned host<->device copy rates (the ceiling for KV export/import)."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    down = _cuda_time(lambda: host.copy_(dev, non_blocking=True))
    up = _cuda_time(lambda: dev.copy_(host, non_blocking=True))
    return nbytes / down / 1e9, nbytes / up / 1e9


def measure_ceilings() -> dict:
    """Copy bandwidth (bytes read + written) of a 2 GiB bf16 copy, and the bf16 8192^3 matmul rate."""
    copy_s = _copy_seconds(1 << 30)
    mm_s = _matmul_seconds(8192)
    d2h, h2d = _host_link_GBps()
    return {"copy_GBps": 2 * (2 << 30) / copy_s / 1e9, "matmul_TFLOPs": 2 * 8192**3 / mm_s / 1e12,
            "pinned_d2h_GBps": d2h, "pinned_h2d_GBps": h2d, "device": torch.cuda.get_device_name(),
            "torch": torch.__version__}


def attention_sweep(shape: dict, points: list[tuple[int, int]]) -> list[dict]:
    """The decode attention kernel alone on one layer of the 8B shape (32 heads, 8 KV heads, dim
    128, pages of 16): achieved KV bandwidth per launch configuration, default marked."""
    from services.engine.cuda.paged_attention import decode_attention

    heads, kv_heads, dim, page = shape
    rows = []
    for batch, context in points:
        pages = -(-context // page)
        k = torch.randn(batch * pages + 1, page, kv_heads, dim, dtype=torch.bfloat16, device="cuda")
        v = torch.randn_like(k)
        tables = torch.randperm(batch * pages, device="cuda", dtype=torch.int32).view(batch, pages)
        lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
        q = torch.randn(batch, heads, dim, dtype=torch.bfloat16, device="cuda")
        out = torch.empty_like(q)
        kv_bytes = 2 * batch * context * kv_heads * dim * 2
        configs = ([dict()] + [dict(tile=t, num_warps=w, num_stages=st) for t in (32, 64, 128) for w in (4, 8)
                               for st in (2, 3, 4)] + [dict(splits=sp) for sp in (1, 2, 4, 8, 16)])
        args = (q, k, v, tables, lens, 0.1, out)
        for cfg in configs:
            try:
                sec = _cuda_time(lambda cfg=cfg, args=args: decode_attention(*args, **cfg), 20)
            except Exception as exc:  # a config that does not compile (shared memory) is skipped
                rows.append({"batch": batch, "context": context, **cfg, "error": str(exc)[:120]})
                continue
            rows.append({"batch": batch, "context": context, **cfg, "default": not cfg, "us": sec * 1e6,
                         "GBps": kv_bytes / sec / 1e9})
    return rows


def model_shape(engine: Engine) -> dict:
    model = engine.runner.model
    cfg = model.cfg
    layer_params = sum(p.numel() for p in model.layers.parameters())
    return {"layer_params": layer_params, "lm_head_params": model.lm_head.numel(),
            "weight_bytes": (layer_params + model.lm_head.numel()) * 2,
            "kv_bytes_per_token": cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 2,
            "layers": cfg.num_layers, "heads": cfg.num_heads, "head_dim": cfg.head_dim, "vocab": cfg.vocab_size}


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=gen).tolist()


def bench_decode(engine: Engine, shape: dict, batch: int, context: int, steps: int, ceilings: dict) -> dict:
    """Time ``steps`` pure decode steps of ``batch`` sequences that start at ``context`` tokens."""
    margin = -(-batch * context // engine.config.max_num_batched_tokens) + 4
    sp = SamplingParams(temperature=0, max_tokens=steps + margin, ignore_eos=True)
    ids = []
    for i, p in enumerate(_prompts(batch, context, shape["vocab"], seed=batch * 7 + context)):
        ids.append(f"d{batch}-{context}-{i}")
        engine.add_request(ids[-1], p, sp)
    started: set[str] = set()
    while len(started) < batch:  # prefill (and mixed steps) until every sequence has decoded once
        started.update(o.request_id for o in engine.step())
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        outs = engine.step()
        times.append(time.perf_counter() - t)
        assert len(outs) == batch
    # The GPU time of one step alone: replay its graph again on the last step's inputs (bench
    # only: reaches into the runner). Wall step minus this is the host's share.
    graphs = getattr(engine.runner, "_graphs", {})
    size = min((b for kind, b in graphs if kind == "decode" and b >= batch), default=None)
    replay = _cuda_time(graphs["decode", size][0].replay) if size else None
    for rid in ids:
        engine.abort(rid)
    engine.reset_prefix_cache()
    step = statistics.median(times)
    mean_context = context + margin + steps / 2
    floor = (shape["weight_bytes"] + batch * mean_context * shape["kv_bytes_per_token"]) / (
        ceilings["copy_GBps"] * 1e9)
    return {"batch": batch, "context": context, "mean_context": mean_context, "step_ms": step * 1e3,
            "step_ms_all": [x * 1e3 for x in times], "gpu_step_ms": replay and replay * 1e3,
            "tok_s": batch / step, "roofline_step_ms": floor * 1e3,
            "roofline_tok_s": batch / floor, "of_roofline": floor / step}


def bench_prefill(engine: Engine, shape: dict, new: int, cached: int, repeats: int, ceilings: dict) -> dict:
    """Time-to-first-token of a prompt whose first ``cached`` tokens are in the prefix cache."""
    (prompt,) = _prompts(1, cached + new, shape["vocab"], seed=new * 3 + cached)
    one = SamplingParams(temperature=0, max_tokens=1)
    times = []
    for r in range(repeats + 1):
        engine.reset_prefix_cache()
        if cached:
            engine.generate([prompt[:cached]], one)
        torch.cuda.synchronize()
        t = time.perf_counter()
        (out,) = engine.generate([prompt], one)
        if r:  # the first run warms this shape up
            times.append(time.perf_counter() - t)
        assert out.num_cached_tokens == cached
    step = statistics.median(times)
    flops = 2 * shape["layer_params"] * new + 4 * shape["layers"] * shape["heads"] * shape["head_dim"] * new * (
        cached + new / 2)
    floor = flops / (ceilings["matmul_TFLOPs"] * 1e12)
    return {"new_tokens": new, "cached_tokens": cached, "ttft_ms": step * 1e3, "ttft_ms_all": [x * 1e3 for x in times],
            "tok_s": new / step, "roofline_ms": floor * 1e3, "roofline_tok_s": new / floor, "of_roofline": floor / step}


def bench_kv_transfer(engine: Engine, shape: dict, tokens: int = 1024) -> dict:
    """Export (device gather + pinned download) and import (pinned upload + scatter) of one sequence."""
    (prompt,) = _prompts(1, tokens, shape["vocab"], seed=11)
    engine.reset_prefix_cache()
    engine.add_request("kv", prompt, SamplingParams(temperature=0, max_tokens=1), keep_kv=True)
    first: list[int] = []
    while engine.has_unfinished():
        first += [t for o in engine.step() for t in o.new_token_ids]
    export_runs = []
    for release in (False, False, False, True):
        # One export alive at a time, as in a worker that ships and drops it: from the second on,
        # the pinned buffer comes from torch's host cache (the first pays for pinning it).
        kv = None
        t = time.perf_counter()
        kv = engine.export_kv("kv", release=release)
        export_runs.append(time.perf_counter() - t)
    export_s = statistics.median(export_runs[1:])
    import_runs = []
    for _ in range(3):
        engine.reset_prefix_cache()
        t = time.perf_counter()
        engine.add_request_with_kv("kv2", prompt, SamplingParams(temperature=0, max_tokens=2), kv,
                                   output_token_ids=first)
        torch.cuda.synchronize()
        import_runs.append(time.perf_counter() - t)
        engine.abort("kv2")
    import_s = statistics.median(import_runs)
    size = kv.data.numel() * kv.data.element_size()
    return {"tokens": tokens, "bytes": size, "export_GBps": size / export_s / 1e9,
            "first_export_GBps": size / export_runs[0] / 1e9, "import_GBps": size / import_s / 1e9}


def bench_kvmesh(model: str, ceilings: dict, steps: int, repeats: int, kv_bytes: int) -> dict:
    engine = Engine(EngineConfig(model=model, device="cuda", dtype="bfloat16", max_num_seqs=128,
                                 max_num_batched_tokens=8192, kv_cache_memory_bytes=kv_bytes))
    shape = model_shape(engine)
    limit = engine.max_model_len
    bench_prefill(engine, shape, 256, 0, 1, ceilings)  # warm-up of every kernel
    res = {"model_id": engine.model_id, "shape": shape, "decode": [], "prefill": []}
    for batch, context in DECODE_POINTS:
        if batch * (context + 64) <= engine.blocks.num_blocks * engine.config.block_size and context + 64 < limit:
            res["decode"].append(bench_decode(engine, shape, batch, context, steps, ceilings))
    for new, cached in PREFILL_POINTS:
        if new + cached < limit:
            res["prefill"].append(bench_prefill(engine, shape, new, cached, repeats, ceilings))
    res["kv_transfer"] = bench_kv_transfer(engine, shape)
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return res


# --- transformers -------------------------------------------------------------------------
def load_hf_random(engine_model: str):
    """transformers' Llama with the same shape as our ``random:`` preset, bf16 on the GPU (the
    weights are its own random init: speed depends on the shape only)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from services.engine.loader import random_config

    cfg = random_config(engine_model.removeprefix("random:"))
    hf = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                     num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                     num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rope_theta=cfg.rope_theta,
                     rope_scaling=cfg.rope_scaling, max_position_embeddings=cfg.max_position_embeddings,
                     tie_word_embeddings=cfg.tie_word_embeddings, eos_token_id=None, pad_token_id=0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(hf)
    finally:
        torch.set_default_dtype(default)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def bench_hf(model_name: str, vocab: int, new_tokens: int) -> dict:
    """Decode tok/s = batch x (N - 1) / (time(generate N) - time(generate 1)); prefill tok/s of one
    4,096-token prompt from generate(1). Default attention (SDPA), eager PyTorch, no compile."""
    model = load_hf_random(model_name)
    res: dict = {"attn_implementation": getattr(model.config, "_attn_implementation", None), "decode": [],
                 "prefill": []}

    def generate(batch: int, length: int, n: int) -> float:
        ids = torch.tensor(_prompts(batch, length, vocab, seed=batch + length), device="cuda")
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False)
        torch.cuda.synchronize()
        assert out.shape[1] == length + n
        return time.perf_counter() - t

    generate(2, 64, 4)
    for batch in HEADLINE_BATCHES:
        try:
            one, full = generate(batch, 1024, 1), generate(batch, 1024, new_tokens)
            res["decode"].append({"batch": batch, "context": 1024, "tok_s": batch * (new_tokens - 1) / (full - one)})
        except torch.OutOfMemoryError:
            res["decode"].append({"batch": batch, "context": 1024, "tok_s": None, "error": "out of memory"})
            torch.cuda.empty_cache()
    times = [generate(1, 4096, 1) for _ in range(3)]
    res["prefill"].append({"new_tokens": 4096, "cached_tokens": 0, "tok_s": 4096 / statistics.median(times)})
    return res


# --- report -------------------------------------------------------------------------------
def profile_of(report: dict) -> dict:
    """The raw timing profile for the mock engine: per model, prefill time vs (new, cached) tokens
    and decode step time vs (batch, context), plus the ceilings they were measured against."""
    doc = ("Raw GPU timings of kvmesh's engine (bf16), measured by bench/engine.py --device cuda. "
           "prefill: one request of new_tokens prompt tokens after cached_tokens prefix-cache hits, "
           "ttft_ms = wall time from add_request to its first token (one forward pass + sampling), "
           "median of the runs in ttft_ms_all. decode: batch sequences each at context tokens when "
           "the timing starts (mean_context over the timed steps), step_ms = median wall time of one "
           "engine.step() (schedule + CUDA-graph forward + sampling; batch tokens per step), all runs "
           "in step_ms_all. roofline_*: the floor from the measured ceilings (see bench/engine_cuda.py).")
    models = {name: {"shape": r["shape"], "prefill": r["prefill"], "decode": r["decode"]}
              for name, r in report["kvmesh"].items()}
    return {"doc": doc, "measured": report["when"], "ceilings": report["ceilings"], "models": models}


def print_table(report: dict) -> None:
    def fmt(v, spec=",.0f"):
        return "-" if v is None else format(v, spec)

    c = report["ceilings"]
    print(f"\n{c['device']}, torch {c['torch']}: copy {c['copy_GBps']:,.0f} GB/s, "
          f"bf16 matmul {c['matmul_TFLOPs']:,.0f} TFLOP/s (measured in this run)")
    print(f"{'model':22} {'measure':28} {'kvmesh':>9} {'roofline':>9} {'of roof':>8} {'HF':>8} {'x HF':>6}")
    for name, r in report["kvmesh"].items():
        hf = report["transformers"].get(name, {})
        hf_decode = {d["batch"]: d["tok_s"] for d in hf.get("decode", [])}
        hf_prefill = {p["new_tokens"]: p["tok_s"] for p in hf.get("prefill", [])}
        rows = [(f"decode b={d['batch']} ctx={d['context']}", d, hf_decode.get(d["batch"]))
                for d in r["decode"] if d["context"] == 1024 and d["batch"] in HEADLINE_BATCHES]
        rows += [(f"prefill {p['new_tokens']} tok", p, hf_prefill.get(p["new_tokens"]))
                 for p in r["prefill"] if p["cached_tokens"] == 0 and p["new_tokens"] == 4096]
        for label, m, hf_tok_s in rows:
            ratio = None if not hf_tok_s else m["tok_s"] / hf_tok_s
            print(f"{name:22} {label:28} {fmt(m['tok_s']):>9} {fmt(m['roofline_tok_s']):>9} "
                  f"{fmt(100 * m['of_roofline'], '.0f'):>7}% {fmt(hf_tok_s):>8} {fmt(ratio, '.1f'):>6}")
        kv = r.get("kv_transfer")
        if kv:
            print(f"{name:22} KV export {kv['bytes'] / 1e6:,.0f} MB: {kv['export_GBps']:.1f} GB/s, "
                  f"import {kv['import_GBps']:.1f} GB/s (pinned link: {c['pinned_d2h_GBps']:.1f} down, "
                  f"{c['pinned_h2d_GBps']:.1f} up)")
    print("(tok/s; decode = batch / median step; prefill = prompt tokens / median time to first token)")


def main_cuda(models: list[str], steps: int, repeats: int, skip_hf: bool, hf_new_tokens: int,
              kv_gib: float, sweep: bool) -> dict:
    report = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "steps": steps, "repeats": repeats,
              "ceilings": measure_ceilings(), "kvmesh": {}, "transformers": {}}
    if sweep:
        print("attention sweep ...", flush=True)
        report["attention_sweep"] = attention_sweep((32, 8, 128, 16), [(64, 1024), (1, 4096), (16, 1024)])
    for model in models:
        print(f"[{model}] kvmesh ...", flush=True)
        report["kvmesh"][model] = bench_kvmesh(model, report["ceilings"], steps, repeats, int(kv_gib * (1 << 30)))
        if not skip_hf and model.startswith("random:"):
            print(f"[{model}] transformers ...", flush=True)
            vocab = report["kvmesh"][model]["shape"]["vocab"]
            report["transformers"][model] = bench_hf(model, vocab, hf_new_tokens)
            gc.collect()
            torch.cuda.empty_cache()
    return report
