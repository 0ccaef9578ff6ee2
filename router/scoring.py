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
near-ties. That is the ``blocks`` cost (``--kv-cost blocks``, the default).

The ``ttft`` cost (``--kv-cost ttft``) prices in modelled seconds when each worker
would deliver the first token, with the step-time coefficients of a timing profile
(``--cost-profile``, the mock engine's model, see services/engine/timing_model.py):

    first_token_s = queued_prefill_s + prefill_s(prompt − cached, cached) + copy_s + decode_rows_s

``prefill_s(n, c)`` is ``per_prefill_token × n + per_prefill_attention_pair × pairs(n, c)``
(a cached prefix is not recomputed but still attended to); ``queued_prefill_s`` is the prefill
still owed to requests this router sent there that have no first token yet (or, when the
worker reports more waiting requests, that many prefills of this prompt); ``copy_s`` prices
lower-tier hits as above; ``decode_rows_s`` is what the worker's running decode rows add to the
step the prefill rides in. Then a second stage balances: of the workers within
``--ttft-slack-ms`` of the earliest first token, the one with the least decode load wins.
Decode load is nearly free per step on a GPU, so a TTFT-only choice would pile conversations
onto the workers holding them and leave others idle; a worker holding a request's history is
ahead by that history's prefill time, which a slack shorter than it keeps, while a request
whose cached part is short or held everywhere (a shared system prompt) goes to the least loaded;
of equally loaded ones, the earliest first token. A worker that lacks the prefix is priced as
recomputing it, although the router then names the holder for a peer fetch: the slack is the most
first-token time a move may cost, not what a fetch costs (bench/reports/routing-ttft/README.md
measures both).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from kvmesh.config import RouterSettings
from services.engine.timing_model import TimingProfile, prefill_pairs


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
    running_requests: int = 0
    # Modelled prefill seconds owed to this router's requests there that have no first token yet.
    queued_prefill_s: float = 0.0


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


def candidate(worker_id: str, overlap: PrefixOverlap | None, active_blocks: int, waiting_requests: int,
              running_requests: int = 0, queued_prefill_s: float = 0.0) -> Candidate:
    overlap = overlap or PrefixOverlap(0)
    return Candidate(worker_id, overlap.blocks, active_blocks, waiting_requests, overlap.host_blocks,
                     overlap.disk_blocks, running_requests, queued_prefill_s)


@dataclass(frozen=True)
class Decision:
    worker_id: str
    cost: float
    prefix_overlap: int
    runner_up_cost: float | None
    # ttft cost: the chosen worker's modelled prefill of this request (what it now owes it).
    prefill_s: float = 0.0


@dataclass(frozen=True)
class StepTimes:
    """A timing profile's coefficients (seconds) that price a request's first token."""

    per_prefill_token: float
    per_prefill_attention_pair: float
    per_decode_seq: float
    per_decode_context_token: float

    @classmethod
    def from_profile(cls, profile: TimingProfile) -> StepTimes:
        c = profile.coefficients
        return cls(c["per_prefill_token"], c["per_prefill_attention_pair"], c["per_decode_seq"],
                   c["per_decode_context_token"])  # fmt: skip

    def prefill_s(self, new_tokens: int, cached_tokens: int) -> float:
        return (self.per_prefill_token * new_tokens
                + self.per_prefill_attention_pair * prefill_pairs(new_tokens, cached_tokens))  # fmt: skip

    def decode_rows_s(self, rows: int, context_tokens: int) -> float:
        return self.per_decode_seq * rows + self.per_decode_context_token * context_tokens


def decode_load(candidate: Candidate, prompt_blocks: int) -> int:
    """Blocks held by running requests plus a prompt's worth for every queued one."""
    return candidate.active_blocks + candidate.waiting_requests * max(prompt_blocks, 1)


def copy_blocks(candidate: Candidate, tier_weights: TierWeights) -> float:
    """Lower-tier hits, in block prefills."""
    return tier_weights.host * candidate.host_overlap + tier_weights.disk * candidate.disk_overlap


def worker_cost(candidate: Candidate, prompt_blocks: int, overlap_weight: float,
                tier_weights: TierWeights = FREE_COPIES) -> float:
    """The blocks cost."""
    prefill_blocks = max(prompt_blocks - candidate.prefix_overlap, 0) + copy_blocks(candidate, tier_weights)
    return overlap_weight * prefill_blocks + decode_load(candidate, prompt_blocks)


def own_prefill_s(candidate: Candidate, prompt_tokens: int, block_size: int, times: StepTimes,
                  tier_weights: TierWeights = FREE_COPIES) -> float:
    """Modelled seconds of this request's own prefill there: the uncached part (at least the
    last token, which the engine always computes) and the copies of lower-tier hits."""
    cached = min(candidate.prefix_overlap * block_size, prompt_tokens - 1)
    copies = copy_blocks(candidate, tier_weights) * block_size * times.per_prefill_token
    return times.prefill_s(prompt_tokens - cached, cached) + copies


def first_token_s(candidate: Candidate, prompt_tokens: int, block_size: int, times: StepTimes,
                  tier_weights: TierWeights = FREE_COPIES) -> float:
    """The ttft cost: modelled seconds until the worker would deliver the first token."""
    queued = max(candidate.queued_prefill_s, candidate.waiting_requests * times.prefill_s(prompt_tokens, 0))
    decode_rows = times.decode_rows_s(candidate.running_requests, candidate.active_blocks * block_size)
    return queued + own_prefill_s(candidate, prompt_tokens, block_size, times, tier_weights) + decode_rows


def choose_first_token(
    candidates: Sequence[Candidate],
    prompt_tokens: int,
    block_size: int,
    times: StepTimes,
    slack_s: float,
    rng: random.Random | None = None,
    tier_weights: TierWeights = FREE_COPIES,
) -> Decision:
    """The ttft choice: the least decode load among the workers within ``slack_s`` of the
    earliest modelled first token; of equally loaded ones (idle workers, typically) the earliest
    first token, then any at random."""
    if not candidates:
        raise ValueError("no candidate workers")
    rng = rng or random.Random()
    prompt_blocks = prompt_tokens // block_size
    costs = [first_token_s(c, prompt_tokens, block_size, times, tier_weights) for c in candidates]
    keys = {i: (decode_load(candidates[i], prompt_blocks), costs[i]) for i, cost in enumerate(costs)
            if cost <= min(costs) + slack_s}  # fmt: skip
    best = min(keys.values())
    index = rng.choice([i for i, key in keys.items() if key == best])
    others = sorted(cost for i, cost in enumerate(costs) if i != index)
    chosen = candidates[index]
    return Decision(chosen.worker_id, costs[index], chosen.prefix_overlap, others[0] if others else None,
                    own_prefill_s(chosen, prompt_tokens, block_size, times, tier_weights))


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


@dataclass(frozen=True)
class KvCost:
    """kv mode's choice as the router's settings define it: the ttft cost when ``times`` is
    set (``--kv-cost ttft``), else the blocks cost."""

    tier_weights: TierWeights = FREE_COPIES
    overlap_weight: float = 1.0
    temperature: float = 0.0
    times: StepTimes | None = None
    slack_s: float = 0.0

    @classmethod
    def from_settings(cls, settings: RouterSettings) -> KvCost:
        tiers = TierWeights(settings.host_tier_weight, settings.disk_tier_weight)
        if settings.kv_cost == "blocks":
            return cls(tiers, settings.overlap_weight, settings.router_temperature)
        times = StepTimes.from_profile(TimingProfile.load(settings.cost_profile))
        return cls(tiers, times=times, slack_s=settings.ttft_slack_ms / 1000)

    def choose(self, candidates: Sequence[Candidate], prompt_tokens: int, block_size: int,
               rng: random.Random | None = None) -> Decision:  # fmt: skip
        if self.times is None:
            return choose_kv(candidates, prompt_tokens // block_size, self.overlap_weight, self.temperature, rng,
                             self.tier_weights)  # fmt: skip
        return choose_first_token(candidates, prompt_tokens, block_size, self.times, self.slack_s, rng,
                                  self.tier_weights)  # fmt: skip

    def rank(self, candidates: Sequence[Candidate], prompt_tokens: int, block_size: int) -> list[str]:
        """Worker ids, cheapest first: where to go next when the chosen worker fails."""
        if self.times is None:
            return rank_by_cost(candidates, prompt_tokens // block_size, self.overlap_weight, self.tier_weights)
        times = self.times
        return [c.worker_id for c in sorted(
            candidates, key=lambda c: first_token_s(c, prompt_tokens, block_size, times, self.tier_weights))]


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
