"""Write synthetic chat traces in the Mooncake format.

Deterministic (fixed seed), so tests and reports replay the same requests. Conversations
start as a Poisson process; each opens with one of a few shared system prompts and then sends
turns after a think time, every turn resending the whole history: its ``hash_ids`` repeat the
previous turn's full 512-token blocks and add fresh ids for the rest (the previous reply and
the new message), as in Mooncake's conversation traces.

Two shapes: ``short`` (``conversations.jsonl``: 1–3k-token prompts, small enough for tests)
and ``long`` (``conversations-long.jsonl``: longer system prompts, messages and histories,
prompts of several thousand tokens, closer to the published production traces, where most
of a prompt is history that a worker holding the conversation does not recompute).

    python -m bench.traces.make_conversation_trace [--shape short|long] [--out PATH] [--conversations N]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
from pathlib import Path

BLOCK = 512


@dataclasses.dataclass(frozen=True)
class Shape:
    conversations: int
    system_blocks: tuple[int, int]  # full 512-token blocks of a system prompt (min, max)
    turns: tuple[int, int]
    message_tokens: tuple[int, int]
    output_tokens: tuple[int, int]
    mean_gap_ms: float  # between conversation starts
    think_ms: tuple[float, float]  # between a conversation's turns
    file: str
    max_prompt_tokens: int = 1 << 30  # a conversation ends before its prompt would pass this


SHAPES = {
    "short": Shape(160, (2, 2), (2, 6), (40, 400), (16, 160), 1500.0, (3000, 12000), "conversations.jsonl"),
    # Prompts stay under 8,192 tokens with their answers: the context of SmolLM2 and Llama-3-8B.
    "long": Shape(120, (2, 6), (3, 10), (200, 1500), (100, 500), 2500.0, (5000, 20000), "conversations-long.jsonl",
                  max_prompt_tokens=8192 - 512),
}


def conversation_trace(shape: Shape, seed: int = 0, system_prompts: int = 6) -> list[dict]:
    rng = random.Random(seed)
    next_id = 0

    def fresh(n: int) -> list[int]:
        nonlocal next_id
        ids = list(range(next_id, next_id + n))
        next_id += n
        return ids

    systems = []
    for _ in range(system_prompts):
        low, high = shape.system_blocks
        blocks = low if low == high else rng.randint(low, high)  # (no draw: the short trace stays as shipped)
        systems.append((fresh(blocks), blocks * BLOCK + rng.randrange(0, 200)))
    requests = []
    start = 0.0
    for _ in range(shape.conversations):
        start += rng.expovariate(1 / shape.mean_gap_ms)
        system_ids, system_len = rng.choice(systems)
        full_ids, length = system_ids[: system_len // BLOCK], system_len
        tail = system_len - len(full_ids) * BLOCK
        at = start
        for _turn in range(rng.randint(*shape.turns)):
            message = rng.randint(*shape.message_tokens)
            length = len(full_ids) * BLOCK + tail + message
            if length > shape.max_prompt_tokens:
                break
            ids = full_ids + fresh(-(-length // BLOCK) - len(full_ids))
            output = rng.randint(*shape.output_tokens)
            requests.append({"timestamp": int(at), "input_length": length, "output_length": output,
                             "hash_ids": ids})  # fmt: skip
            # The next turn resends this prompt and the reply: its full blocks are shared.
            history = length + output
            full_ids = ids[: history // BLOCK] + fresh(max(0, history // BLOCK - len(ids)))
            tail = history - len(full_ids) * BLOCK
            at += rng.uniform(*shape.think_ms)
    requests.sort(key=lambda r: r["timestamp"])
    return requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="short")
    parser.add_argument("--out", type=Path, default=None, help="default: the shape's file beside this script")
    parser.add_argument("--conversations", type=int, default=0, help="0 = the shape's")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    if args.conversations:
        shape = dataclasses.replace(shape, conversations=args.conversations)
    out = args.out or Path(__file__).with_name(shape.file)
    rows = conversation_trace(shape, args.seed)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(rows)} requests -> {out}")


if __name__ == "__main__":
    main()
