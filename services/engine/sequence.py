"""One request's state inside the engine: its tokens, its blocks and how far its KV is computed."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from kvmesh.hashing import block_hash
from services.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    # Waiting for prefix blocks read back from a lower tier (see Scheduler.loading).
    LOADING = "loading"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """A request being served.

    Invariant: ``block_hashes[i]`` names ``token_ids[i*bs:(i+1)*bs]`` and exists only once that
    block is full *and* its KV is computed, so a hash always names KV that really is in the pool.
    """

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    sampling: SamplingParams
    block_size: int
    arrival: int
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_prompt_tokens: int = 0
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    # Incremental detokenizer (None without a tokenizer) and how much of its text was released.
    detokenizer: object | None = None
    num_text_sent: int = 0
    # Keep the blocks after finishing, for a KV export (disaggregated prefill).
    keep_kv: bool = False
    # Admitted at least once (the prefix hit is counted on the first admission only).
    admitted: bool = False
    # At most this many tokens computed per step (0 = the step's budget): a disaggregated
    # prefill takes its prompt in small steps so its finished blocks can be sent meanwhile.
    max_tokens_per_step: int = 0
    # Monotonic times of arrival and first admission: the request's queueing time.
    added_at: float = field(default_factory=time.monotonic)
    admitted_at: float = 0.0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def extend_block_hashes(self) -> list[int]:
        """Name every block that became full and computed since the last call; returns the new hashes."""
        bs = self.block_size
        new: list[int] = []
        full = self.num_computed_tokens // bs
        while len(self.block_hashes) < full:
            i = len(self.block_hashes)
            parent = self.block_hashes[-1] if self.block_hashes else None
            h = block_hash(self.token_ids[i * bs : (i + 1) * bs], parent)
            self.block_hashes.append(h)
            new.append(h)
        return new
