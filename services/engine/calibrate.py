"""`kvmesh calibrate`: time the real engine on a few batch shapes and fit a timing profile.

Every forward pass the engine runs while serving the calibration requests is timed with its
shape (``TimedRunner``), so prefill, cached-prefix prefill and decode steps all feed one fit.
``--roofline`` instead derives a profile from a GPU's published-or-measured peak figures and the
model's size: no measurement, and the profile says so in its ``source`` field.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from services.engine.config import DEFAULT_MODEL, EngineConfig
from services.engine.llm_engine import Engine
from services.engine.loader import load_model_config
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import ScheduledItem
from services.engine.timing_model import (
    DEFAULT_PROFILE,
    PROFILES_DIR,
    StepShape,
    TimingProfile,
    fit_coefficients,
    prefill_pairs,
    step_shape,
)


@dataclass(frozen=True)
class Shape:
    """One calibration workload: ``batch`` requests of ``new_tokens`` uncached prompt tokens after
    ``cached_tokens`` cached ones, each decoding ``decode_steps`` tokens."""

    new_tokens: int
    cached_tokens: int = 0
    batch: int = 1
    decode_steps: int = 1

    def matches(self, shape: StepShape) -> bool:
        """Whether a measured step is this workload's characteristic step (its prefill, or its
        full-batch decode when it decodes)."""
        if self.decode_steps > 1:
            return shape.decode_seqs == self.batch and shape.prefill_tokens == 0
        return shape.prefill_tokens == self.new_tokens * self.batch and shape.decode_seqs == 0


DEFAULT_SHAPES = (
    Shape(64), Shape(128), Shape(256), Shape(512),
    Shape(64, cached_tokens=512), Shape(128, cached_tokens=512),
    Shape(32, batch=1, decode_steps=8), Shape(32, batch=4, decode_steps=8), Shape(32, batch=8, decode_steps=8),
    Shape(512, batch=4, decode_steps=8),
)  # fmt: skip


class TimedRunner:
    """The engine's runner, with every ``execute`` timed next to the shape it computed."""

    def __init__(self, runner) -> None:
        self.runner = runner
        self.samples: list[tuple[StepShape, float]] = []

    def __getattr__(self, name: str):
        return getattr(self.runner, name)

    def execute(self, items: list[ScheduledItem]):
        shape = step_shape(items)
        start = time.perf_counter()
        result = self.runner.execute(items)
        self.samples.append((shape, time.perf_counter() - start))
        return result


def measure(engine: Engine, shape: Shape, repeats: int, rng: random.Random) -> list[tuple[StepShape, float]]:
    """Serve ``shape`` ``repeats`` times on fresh prompts; every timed step, in order."""
    timed = TimedRunner(engine.runner)
    engine.runner = timed
    try:
        for _ in range(repeats):
            prefix = [rng.randrange(100, 40000) for _ in range(shape.cached_tokens)]
            if prefix:
                engine.generate([[*prefix, rng.randrange(100, 40000)]], SamplingParams(max_tokens=1))
            prompts = [prefix + [rng.randrange(100, 40000) for _ in range(shape.new_tokens)]
                       for _ in range(shape.batch)]  # fmt: skip
            engine.generate(prompts, SamplingParams(max_tokens=shape.decode_steps, ignore_eos=True))
    finally:
        engine.runner = timed.runner
    return timed.samples


def calibrate(engine: Engine, shapes: Sequence[Shape], repeats: int = 3, seed: int = 0
              ) -> tuple[dict[str, float], list[dict]]:  # fmt: skip
    """Fit coefficients on every step served for ``shapes``; also return per-shape medians."""
    rng = random.Random(seed)
    measure(engine, Shape(32), 2, rng)  # warm-up: first passes allocate and pick kernels
    samples: list[tuple[StepShape, float]] = []
    per_shape = []
    for shape in shapes:
        print(f"measuring {shape}", flush=True)
        steps = measure(engine, shape, repeats, rng)
        samples += steps
        typical = [(s, t) for s, t in steps if shape.matches(s)]
        per_shape.append({"shape": shape, "step": typical[0][0], "median_s": statistics.median(t for _, t in typical)})
    coefficients = fit_coefficients(samples)
    profile = TimingProfile("fit", "measured", "", coefficients)
    for row in per_shape:
        row["predicted_s"] = profile.predict(row["step"])
    return coefficients, per_shape


def roofline_profile(name: str, model: str, dtype_bytes: int, memory_tb_s: float, tflops: float) -> TimingProfile:
    """A step's time at the roofline: weights and KV are read at ``memory_tb_s``, matmuls run at
    ``tflops``. Decode is taken as memory-bound (all weights once per step, plus each row's KV),
    prefill as compute-bound (2 FLOPs per parameter per token, 4 per head-dim per attention pair
    and layer). The affine model sums the two where a real step would overlap them, so mixed steps
    are priced a little high; no launch overheads are modelled (they are not roofline terms)."""
    cfg = load_model_config(model)
    layers, kv_dim = cfg.num_layers, cfg.num_kv_heads * cfg.head_dim
    attn_dim = cfg.num_heads * cfg.head_dim
    params = (cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
              + layers * (cfg.hidden_size * (attn_dim + 2 * kv_dim) + attn_dim * cfg.hidden_size
                          + 3 * cfg.hidden_size * cfg.intermediate_size))  # fmt: skip
    bandwidth, flops = memory_tb_s * 1e12, tflops * 1e12
    kv_bytes_per_token = layers * 2 * kv_dim * dtype_bytes
    coefficients = {
        "base": params * dtype_bytes / bandwidth,
        "per_decode_seq": 2 * params / flops,
        "per_decode_context_token": kv_bytes_per_token / bandwidth,
        "per_prefill_token": 2 * params / flops,
        "per_prefill_attention_pair": 4 * layers * attn_dim / flops,
    }
    description = (f"ROOFLINE-DERIVED, NOT MEASURED: {model} ({params / 1e9:.2f} B parameters, {dtype_bytes}-byte "
                   f"weights and KV) at {memory_tb_s} TB/s memory and {tflops} TFLOP/s matmul "
                   f"(`kvmesh calibrate --roofline`). Replace with a measured profile when the GPU engine runs.")
    meta = {"model": model, "parameters": params, "memory_tb_s": memory_tb_s, "tflops": tflops,
            "dtype_bytes": dtype_bytes}  # fmt: skip
    return TimingProfile(name, "roofline", description, coefficients, meta)


def gpu_report_profile(name: str, report: Path, model: str) -> TimingProfile:
    """A measured profile from ``bench/engine.py --device cuda``'s raw timings (``--profile-out``):
    each prefill point is one step of ``new_tokens`` after ``cached_tokens`` cached, each decode
    point one step of ``batch`` rows at ``mean_context``. Fitted like a CPU calibration."""
    data = json.loads(report.read_text())
    timings = data["models"].get(model)
    if timings is None:
        raise ValueError(f"{report} has no timings of {model}; it has {', '.join(data['models'])}")
    samples = [(StepShape(prefill_tokens=p["new_tokens"], prefill_attention=prefill_pairs(p["new_tokens"],
                                                                                           p["cached_tokens"])),
                p["ttft_ms"] / 1e3)
               for p in timings["prefill"]]  # fmt: skip
    samples += [(StepShape(decode_seqs=d["batch"], decode_context=round(d["batch"] * (d["mean_context"] + 1))),
                 d["step_ms"] / 1e3) for d in timings["decode"]]  # fmt: skip
    profile = TimingProfile(name, "measured", "", fit_coefficients(samples))
    errors = [profile.predict(shape) / seconds - 1 for shape, seconds in samples]
    ceilings = data.get("ceilings", {})
    profile.description = (f"MEASURED on {ceilings.get('device', 'a GPU')}: {model}, bf16, kvmesh's CUDA engine "
                           f"(`bench/engine.py --device cuda`, {data.get('measured', '')}); fitted with "
                           f"`kvmesh calibrate --from-gpu-report`.")
    profile.meta = {"model": model, "report": str(report), "ceilings": ceilings, "points": len(samples),
                    "max_abs_error": max(abs(e) for e in errors)}  # fmt: skip
    return profile


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvmesh calibrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="bfloat16", help="as the worker runs it (default bfloat16)")
    parser.add_argument("--num-threads", type=int, default=0, help="torch threads; 0 = torch's default")
    parser.add_argument("--repeats", type=int, default=3, help="runs of every shape")
    parser.add_argument("--name", default=DEFAULT_PROFILE, help="profile name (and file name under --out-dir)")
    parser.add_argument("--out", type=Path, default=None, help=f"profile path; default {PROFILES_DIR}/NAME.json")
    parser.add_argument("--roofline", action="store_true", help="derive from peak figures instead of measuring")
    parser.add_argument("--memory-tb-s", type=float, default=3.02, help="roofline: memory copy bandwidth (H100)")
    parser.add_argument("--tflops", type=float, default=796.0, help="roofline: bf16 matmul TFLOP/s (H100)")
    parser.add_argument("--from-gpu-report", type=Path, default=None,
                        help="fit to the raw timings of `bench/engine.py --device cuda --profile-out`")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = args.out or PROFILES_DIR / f"{args.name}.json"
    if args.from_gpu_report:
        profile = gpu_report_profile(args.name, args.from_gpu_report, args.model)
    elif args.roofline:
        profile = roofline_profile(args.name, args.model, 2, args.memory_tb_s, args.tflops)
    else:
        config = EngineConfig(model=args.model, dtype=args.dtype, num_kv_blocks=2048, max_num_batched_tokens=2048,
                              num_threads=args.num_threads or None)  # fmt: skip
        coefficients, rows = calibrate(Engine(config), DEFAULT_SHAPES, args.repeats)
        print(f"{'new':>5} {'cached':>6} {'batch':>5} {'decode':>6} {'measured ms':>11} {'model ms':>9} {'err':>6}")
        for row in rows:
            s = row["shape"]
            err = row["predicted_s"] / row["median_s"] - 1
            print(f"{s.new_tokens:>5} {s.cached_tokens:>6} {s.batch:>5} {s.decode_steps:>6} "
                  f"{row['median_s'] * 1e3:>11.1f} {row['predicted_s'] * 1e3:>9.1f} {err:>6.0%}")
        description = (f"MEASURED on this host's CPU: {args.model}, {args.dtype}, "
                       f"{args.num_threads or 'default'} threads (`kvmesh calibrate`).")
        meta = {"model": args.model, "dtype": args.dtype, "num_threads": args.num_threads,
                # A shared machine's load slows every step: record it beside the figures.
                "load_average_1m_after": os.getloadavg()[0],
                "shapes": [{**row["shape"].__dict__, "measured_s": row["median_s"], "predicted_s": row["predicted_s"]}
                           for row in rows]}  # fmt: skip
        profile = TimingProfile(args.name, "measured", description, coefficients, meta)
    profile.save(out)
    print(f"{profile.source} profile {profile.name}: " + ", ".join(f"{k}={v:.3g}" for k, v in
                                                                  profile.coefficients.items()))  # fmt: skip
    print(f"written: {out}")
    return 0
