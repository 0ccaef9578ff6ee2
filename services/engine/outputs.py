"""What the engine hands back each step; maps onto the worker's streamed response messages."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    """Maps onto ``kvmesh.v1.TokenLogprob``: the sampled token's log-probability and the top-N."""

    token_id: int
    logprob: float
    top_token_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)


@dataclass
class RequestOutput:
    """The increment of one request since its previous output.

    ``finish_reason``: None while running, else ``"stop"`` (EOS, a stop token or a stop string),
    ``"length"`` (max_tokens or the context limit) or ``"abort"``. ``text`` is the newly
    complete text (stop strings excluded); ``num_cached_tokens`` counts prompt tokens whose KV
    came from the prefix cache (``Usage.cached_tokens``).
    """

    request_id: str
    new_token_ids: list[int]
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    # Seconds the request waited before first scheduled; set on its first locally prefilled token.
    queue_s: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
