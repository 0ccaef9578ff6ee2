"""How the router picks a worker.

The cost of sending a request to a worker, in KV blocks, is what the worker would have
to *prefill* plus what it is already *decoding*:

    cost = overlap_weight × (prompt_blocks − prefix_overlap + copy_blocks) + decode_load

``prefix_overlap`` is how many leading blocks of the prompt's hash chain the worker
already holds (from the kvstore), in any KV tier; ``copy_blocks`` prices the part of it held
only in a lower tier, which must be copied back into the device pool before prefill:
``host_weight × host_overlap + disk_weight × disk_overlap``, each weight a block copy's time
over a block's prefill time (so a lower-tier hit is dearer than a device hit, cheaper than a
recompute; the router's defaults, ``--host-tier-weight`` and ``--disk-tier-weight``, were
measured with ``python -m bench.kv_tiers``). ``decode_load`` is the KV blocks its running requests
hold (from its stats stream, or the router's own count of in-flight work when that is
higher, so a burst does not all land on one worker before stats catch up), plus a
prompt's worth of blocks for every queued request. With ``temperature`` 0 the cheapest
worker wins (ties broken at random, so equal workers share the load); above 0, workers
are drawn with probability ∝ exp(−cost / (temperature × prompt_blocks)), which spreads
near-ties.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    """One live worker as the router sees it at decision time."""

    worker_id: str
    prefix_overlap: int
    active_blocks: int
    waiting_requests: int = 0
    # Of ``prefix_overlap``, blocks the worker holds only in host memory / only on disk.
    host_overlap: int = 0
    disk_overlap: int = 0


@dataclass(frozen=True)
class TierWeights:
    """A lower-tier block's copy back to the device, in prefills of one block."""

    host: float
    disk: float


# Without weights (callers that know of no tiers) a lower-tier block is priced as a device hit.
FREE_COPIES = TierWeights(0.0, 0.0)


@dataclass(frozen=True)
class PrefixOverlap:
    """What the kvstore says a worker holds of a prompt: leading blocks, and how many of those
    are only in its host memory / on its disk."""

    blocks: int
    host_blocks: int = 0
    disk_blocks: int = 0


def candidate(worker_id: str, overlap: PrefixOverlap | None, active_blocks: int, waiting_requests: int) -> Candidate:
    overlap = overlap or PrefixOverlap(0)
    return Candidate(worker_id, overlap.blocks, active_blocks, waiting_requests, overlap.host_blocks,
                     overlap.disk_blocks)


@dataclass(frozen=True)
class Decision:
    worker_id: str
    cost: float
    prefix_overlap: int
    runner_up_cost: float | None


def worker_cost(candidate: Candidate, prompt_blocks: int, overlap_weight: float,
                tier_weights: TierWeights = FREE_COPIES) -> float:
    prefill_blocks = max(prompt_blocks - candidate.prefix_overlap, 0)
    copy_blocks = tier_weights.host * candidate.host_overlap + tier_weights.disk * candidate.disk_overlap
    decode_load = candidate.active_blocks + candidate.waiting_requests * max(prompt_blocks, 1)
    return overlap_weight * (prefill_blocks + copy_blocks) + decode_load


def choose_kv(
    candidates: Sequence[Candidate],
    prompt_blocks: int,
    overlap_weight: float = 1.0,
    temperature: float = 0.0,
    rng: random.Random | None = None,
    tier_weights: TierWeights = FREE_COPIES,
) -> Decision:
    """The kv-mode choice among ``candidates`` (at least one)."""
    if not candidates:
        raise ValueError("no candidate workers")
    rng = rng or random.Random()
    costs = [worker_cost(c, prompt_blocks, overlap_weight, tier_weights) for c in candidates]
    if temperature > 0:
        scale = temperature * max(prompt_blocks, 1)
        low = min(costs)
        weights = [math.exp(-(cost - low) / scale) for cost in costs]
        index = rng.choices(range(len(candidates)), weights=weights)[0]
    else:
        low = min(costs)
        index = rng.choice([i for i, cost in enumerate(costs) if cost == low])
    others = sorted(cost for i, cost in enumerate(costs) if i != index)
    chosen = candidates[index]
    return Decision(chosen.worker_id, costs[index], chosen.prefix_overlap, others[0] if others else None)


def rank_by_cost(candidates: Sequence[Candidate], prompt_blocks: int, overlap_weight: float = 1.0,
                 tier_weights: TierWeights = FREE_COPIES) -> list[str]:
    """Worker ids, cheapest first: where to go next when the chosen worker fails."""
    return [c.worker_id
            for c in sorted(candidates, key=lambda c: worker_cost(c, prompt_blocks, overlap_weight, tier_weights))]


def choose_decode(candidates: Sequence[Candidate], prompt_blocks: int, rng: random.Random | None = None) -> Decision:
    """Disaggregated mode's decode worker: the least loaded, then the longest prefix held.

    Decode is memory-bound and long-lived, so its load decides first; the overlap only
    breaks ties (it spares the prefill worker's transfer of blocks already there).
    """
    if not candidates:
        raise ValueError("no candidate workers")
    rng = rng or random.Random()

    def load(c: Candidate) -> int:
        return c.active_blocks + c.waiting_requests * max(prompt_blocks, 1)

    best = min((load(c), -c.prefix_overlap) for c in candidates)
    chosen = rng.choice([c for c in candidates if (load(c), -c.prefix_overlap) == best])
    others = sorted(load(c) for c in candidates if c is not chosen)
    return Decision(chosen.worker_id, load(chosen), chosen.prefix_overlap, others[0] if others else None)


class RoundRobin:
    """Cycles through the workers in a stable order, whatever joins or leaves."""

    def __init__(self) -> None:
        self._next = 0

    def choose(self, worker_ids: Sequence[str]) -> str:
        if not worker_ids:
            raise ValueError("no candidate workers")
        ordered = sorted(worker_ids)
        chosen = ordered[self._next % len(ordered)]
        self._next += 1
        return chosen
