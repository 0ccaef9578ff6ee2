"""What a pool of workers can carry, priced by a calibrated timing profile
(``services/engine/profiles``, the same coefficients the mock engine sleeps by).

Prefill: a prompt of ``L`` uncached tokens keeps a prefill worker busy for
``ceil(L / chunk) × base + per_prefill_token × L + per_prefill_attention_pair × L(L+1)/2``;
the pool needs ``rate × that / utilization`` workers.

Decode: every decode step serves each running sequence one token, and costs
``base + B × c`` for ``B`` rows (``c`` = per row plus its context's KV read). ``B`` running
sequences at step time ``s`` is Little's law: ``B = rate × answer × s / d`` per worker, so
``s = base / (1 − c × rate × answer / d)``; holding ``s`` under the ITL target ``T`` needs
``d ≥ c × rate × answer / (1 − base / T)``. Prompts shorter than the router's
``max_local_prefill_tokens`` are prefilled on the decode worker, which is added to its load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from planner.predictor import LoadForecast
from services.engine.timing_model import TimingProfile, prefill_pairs


@dataclass(frozen=True)
class PoolNeeds:
    """Workers (fractional) each pool needs for a forecast load."""

    prefill: float
    decode: float


class CapacityModel:
    def __init__(self, profile: TimingProfile, utilization: float, itl_target_s: float, local_prefill_tokens: int = 256,
                 chunk_tokens: int = 256, ttft_target_s: float = 0.0) -> None:  # fmt: skip
        self.coef = profile.coefficients
        self.utilization = utilization
        self.itl_target_s = itl_target_s
        self.ttft_target_s = ttft_target_s
        self.local_prefill_tokens = local_prefill_tokens
        self.chunk_tokens = max(chunk_tokens, 1)

    def prefill_seconds(self, prompt_tokens: float) -> float:
        """One worker's busy time for one prompt of ``prompt_tokens`` uncached tokens."""
        tokens = max(int(prompt_tokens), 1)
        return (math.ceil(tokens / self.chunk_tokens) * self.coef["base"] + self.coef["per_prefill_token"] * tokens
                + self.coef["per_prefill_attention_pair"] * prefill_pairs(tokens, 0))  # fmt: skip

    def decode_workers(self, forecast: LoadForecast) -> float:
        """Decode workers that keep the step time under the ITL target (infinite if one step's
        fixed cost alone is over it: no number of workers helps)."""
        base = self.coef["base"]
        if base >= self.itl_target_s:
            return math.inf
        context = forecast.prompt_tokens + forecast.output_tokens / 2
        per_row = self.coef["per_decode_seq"] + self.coef["per_decode_context_token"] * context
        return per_row * forecast.request_rate * forecast.output_tokens / (1 - base / self.itl_target_s)

    def rows_per_step(self, context_tokens: float) -> float:
        """Most decode rows one step can hold and stay under the ITL target (0 if none can)."""
        base = self.coef["base"]
        per_row = self.coef["per_decode_seq"] + self.coef["per_decode_context_token"] * context_tokens
        return max(self.itl_target_s - base, 0.0) / per_row if per_row > 0 else math.inf

    def needs(self, forecast: LoadForecast, decoding: int = 0, prefilling: int = 0) -> PoolNeeds:
        """``decoding`` / ``prefilling``: requests on the decode / prefill pool now. Counted as well
        as the forecast, because the router's counters see a request only when it finishes — a
        minute late for a long answer — while the workers' own reports see it at once. A prefill
        backlog needs the workers that clear it within the TTFT target."""
        busy = forecast.request_rate * self.prefill_seconds(forecast.prompt_tokens)
        if self.ttft_target_s > 0:
            busy = max(busy, prefilling * self.prefill_seconds(forecast.prompt_tokens) / self.ttft_target_s)
        prefill = busy / self.utilization
        rows = self.rows_per_step(forecast.prompt_tokens + forecast.output_tokens / 2)
        observed = decoding / rows if rows else math.inf
        decode = max(self.decode_workers(forecast), observed) / self.utilization
        if forecast.prompt_tokens < self.local_prefill_tokens:
            return PoolNeeds(0.0, decode + prefill)  # prefilled where it is decoded
        return PoolNeeds(prefill, decode)
