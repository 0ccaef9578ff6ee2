"""Request mixes for `kvmesh bench serve`: random, shared-prefix groups, multi-turn chats.

Each workload yields *conversations*: a list of user turns sent one after another, every
turn resending the whole history (with the real assistant replies), so multi-turn traffic
has the prefix structure real chats have. Single-turn workloads are one-turn conversations.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

WORDS = [
    "river",
    "stone",
    "light",
    "market",
    "garden",
    "engine",
    "letter",
    "winter",
    "signal",
    "harbor",
    "forest",
    "copper",
    "lantern",
    "meadow",
    "circuit",
    "canvas",
    "orbit",
    "thunder",
    "velvet",
    "compass",
    "granite",
    "falcon",
    "ember",
    "tide",
    "quartz",
]


@dataclass
class Conversation:
    system: str
    turns: list[str]
    max_tokens: int


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def random_workload(n: int, seed: int, prompt_words: int = 120, max_tokens: int = 32) -> list[Conversation]:
    rng = random.Random(seed)
    return [Conversation("You are a helpful assistant.", [_text(rng, prompt_words)], max_tokens) for _ in range(n)]


def shared_prefix_workload(n: int, seed: int, groups: int = 4, system_words: int = 400,
                           question_words: int = 12, max_tokens: int = 32) -> list[Conversation]:  # fmt: skip
    """G groups, each a long shared system prompt; short distinct questions, groups in random
    order (a fixed cycle would let round-robin line groups up with workers by accident)."""
    rng = random.Random(seed)
    systems = [f"Group {g}. " + _text(rng, system_words) for g in range(groups)]
    return [Conversation(rng.choice(systems), [_text(rng, question_words)], max_tokens) for _ in range(n)]


def multiturn_workload(n: int, seed: int, turns: int = 4, system_words: int = 150, turn_words: int = 40,
                       max_tokens: int = 32) -> list[Conversation]:  # fmt: skip
    rng = random.Random(seed)
    return [
        Conversation(
            f"Conversation {i}. " + _text(rng, system_words), [_text(rng, turn_words) for _ in range(turns)], max_tokens
        )
        for i in range(n)
    ]


def long_prompt_workload(n: int, seed: int, prompt_words: int = 1000, max_tokens: int = 64) -> list[Conversation]:
    """Distinct ~1,500-token prompts: prefill-heavy traffic, where disaggregation should pay."""
    return random_workload(n, seed, prompt_words=prompt_words, max_tokens=max_tokens)


WORKLOADS = {
    "random": random_workload,
    "shared-prefix": shared_prefix_workload,
    "multiturn": multiturn_workload,
    "long": long_prompt_workload,
}
