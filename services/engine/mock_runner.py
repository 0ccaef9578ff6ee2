"""A stand-in for ``ModelRunner`` that sleeps instead of computing (``--engine mock``).

Everything around it stays real — scheduler, block manager, prefix caching, KV events, stop
rules — so a mock worker behaves like a real one to the router and the kvstore, at no compute
cost: a step sleeps for what the timing profile says it would take (``time.sleep`` releases the
GIL, so dozens of mock workers share a machine). The next token is a pseudo-random function of
the sequence's tokens so far, so equal requests get equal outputs on any worker.
"""

from __future__ import annotations

import struct
import time

import torch
import xxhash

from kvmesh.hashing import block_hash
from services.engine.models.config import ModelConfig
from services.engine.scheduler import ScheduledItem
from services.engine.sequence import Sequence
from services.engine.timing_model import TimingProfile, step_shape

_U64 = struct.Struct("<Q")


class MockRunner:
    """``ModelRunner``'s interface (``execute``, ``device``, ``kv_cache``) without a model."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, profile: TimingProfile) -> None:
        self.device = torch.device("cpu")
        self.block_size = block_size
        self.vocab_size = cfg.vocab_size
        self.profile = profile
        # One number per block: KV export/import between mock workers moves block ids, not KV.
        self.kv_cache = torch.zeros(1, 2, num_blocks, 1, 1, 1)
        # Reused step to step: filling a fresh [rows, vocab] tensor every step would cost more
        # CPU than the rest of a mock step, and dozens of mock workers share a few cores.
        self._logits = torch.full((0, cfg.vocab_size), float("-inf"))
        self._hot: torch.Tensor | None = None

    def _one_hot(self, tokens: list[int]) -> torch.Tensor:
        """Logits whose only finite entry per row is the chosen token (any sampler picks it)."""
        rows = len(tokens)
        if self._hot is not None:
            self._logits.scatter_(1, self._hot, float("-inf"))
        if rows > self._logits.shape[0]:
            self._logits = torch.full((max(rows, 2 * self._logits.shape[0]), self.vocab_size), float("-inf"))
        self._hot = torch.tensor(tokens, dtype=torch.long).unsqueeze(1)
        logits = self._logits[:rows]
        logits.scatter_(1, self._hot, 0.0)
        return logits

    def next_token(self, seq: Sequence) -> int:
        """A token determined by all of ``seq``'s tokens: the hash chain of its full blocks (the
        same chain the prefix cache uses, extended here without touching the sequence) and the
        partial tail."""
        bs = self.block_size
        tokens = seq.token_ids
        parent = seq.block_hashes[-1] if seq.block_hashes else None
        done = len(seq.block_hashes)
        full = len(tokens) // bs
        for i in range(done, full):
            parent = block_hash(tokens[i * bs : (i + 1) * bs], parent)
        tail = struct.pack(f"<{len(tokens) - full * bs}I", *tokens[full * bs :])
        payload = (b"" if parent is None else _U64.pack(parent)) + tail
        return xxhash.xxh3_64_intdigest(payload, seed=1) % self.vocab_size

    def execute(self, items: list[ScheduledItem]) -> tuple[list[Sequence], torch.Tensor | None]:
        """Sleep for the modelled step; return the sequences that get a token and one-hot logits."""
        start = time.perf_counter()
        duration = self.profile.predict(step_shape(items))
        sample_seqs = [s for s, n in items if s.num_computed_tokens + n == s.num_tokens]
        logits = None
        if sample_seqs:
            logits = self._one_hot([self.next_token(s) for s in sample_seqs])
        remaining = duration - (time.perf_counter() - start)
        if remaining > 0:
            time.sleep(remaining)
        return sample_seqs, logits
