"""Write ``conversations.jsonl``: a small synthetic chat trace in the Mooncake format.

Deterministic (fixed seed), so tests and reports replay the same requests. Conversations
start as a Poisson process; each opens with one of a few shared system prompts and then sends
turns after a think time, every turn resending the whole history: its ``hash_ids`` repeat the
previous turn's full 512-token blocks and add fresh ids for the rest (the previous reply and
the new message), as in Mooncake's conversation traces.

    python -m bench.traces.make_conversation_trace [--out PATH] [--conversations N]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

BLOCK = 512


def conversation_trace(conversations: int = 160, seed: int = 0, system_prompts: int = 6,
                       mean_gap_ms: float = 1500.0) -> list[dict]:  # fmt: skip
    rng = random.Random(seed)
    next_id = 0

    def fresh(n: int) -> list[int]:
        nonlocal next_id
        ids = list(range(next_id, next_id + n))
        next_id += n
        return ids

    systems = [(fresh(2), 2 * BLOCK + rng.randrange(0, 200)) for _ in range(system_prompts)]
    requests = []
    start = 0.0
    for _ in range(conversations):
        start += rng.expovariate(1 / mean_gap_ms)
        system_ids, system_len = rng.choice(systems)
        full_ids, length = system_ids[: system_len // BLOCK], system_len
        tail = system_len - len(full_ids) * BLOCK
        at = start
        for _turn in range(rng.randint(2, 6)):
            message = rng.randint(40, 400)
            length = len(full_ids) * BLOCK + tail + message
            ids = full_ids + fresh(-(-length // BLOCK) - len(full_ids))
            output = rng.randint(16, 160)
            requests.append({"timestamp": int(at), "input_length": length, "output_length": output,
                             "hash_ids": ids})  # fmt: skip
            # The next turn resends this prompt and the reply: its full blocks are shared.
            history = length + output
            full_ids = ids[: history // BLOCK] + fresh(max(0, history // BLOCK - len(ids)))
            tail = history - len(full_ids) * BLOCK
            at += rng.uniform(3000, 12000)
    requests.sort(key=lambda r: r["timestamp"])
    return requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("conversations.jsonl"))
    parser.add_argument("--conversations", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = conversation_trace(args.conversations, args.seed)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(rows)} requests -> {args.out}")


if __name__ == "__main__":
    main()
