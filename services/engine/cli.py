"""``kvmesh generate``: run the engine offline on one prompt and print the text as it streams."""

from __future__ import annotations

import argparse
import sys
import time

from services.engine.config import DEFAULT_MODEL, EngineConfig
from services.engine.sampling_params import SamplingParams


def build_parser(prog: str = "kvmesh generate") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Generate text with the kvmesh engine (no servers needed).")
    p.add_argument("prompt", help="the user message (or raw text with --raw)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="smollm2, a .gguf file, an HF directory or random:<preset>")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--system", default=None, help="system message for the chat template")
    p.add_argument("--raw", action="store_true", help="send the prompt as plain text, without the chat template")
    p.add_argument("--stats", action="store_true", help="print token counts and speed to stderr")
    return p


def generate_main(argv: list[str] | None = None) -> int:
    """Entry point for ``kvmesh generate``; returns the process exit status."""
    args = build_parser().parse_args(argv)
    try:
        sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                  seed=args.seed, max_tokens=args.max_tokens, stop=args.stop)
        config = EngineConfig(model=args.model, dtype=args.dtype, device=args.device, max_num_seqs=1)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from services.engine.llm_engine import Engine

    return run_generate(Engine(config), args, sampling)


def run_generate(engine, args: argparse.Namespace, sampling: SamplingParams) -> int:
    """The part of ``generate_main`` after the engine exists (tests pass a shared engine)."""
    tok = engine.tokenizer
    if tok is None:
        print("error: this model has no tokenizer", file=sys.stderr)
        return 2
    if args.raw or not tok.chat_template:
        ids = tok.encode(args.prompt)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        ids = tok.encode_chat([*messages, {"role": "user", "content": args.prompt}])
    try:
        engine.add_request("cli", ids, sampling)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    start, first, n = time.perf_counter(), None, 0
    while engine.has_unfinished():
        for out in engine.step():
            first = first or time.perf_counter()
            n += len(out.new_token_ids)
            sys.stdout.write(out.text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    if args.stats:
        total = time.perf_counter() - start
        print(f"[{len(ids)} prompt tokens, {n} generated, TTFT {(first - start) * 1e3:.0f} ms, "
              f"{n / total:.1f} tok/s, model {engine.model_id}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(generate_main())
