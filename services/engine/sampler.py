"""Turn a step's logits into tokens on their device: greedy rows in one argmax, the rest one row
at a time; the chosen tokens come back to the host in one read per step.

Sampled rows use their own ``torch.Generator`` (seeded from the request's seed), so a seeded
request draws the same tokens whatever else is in the batch.
"""

from __future__ import annotations

import torch

from services.engine.outputs import TokenLogprob
from services.engine.sequence import Sequence


def apply_penalties(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """OpenAI-style frequency/presence penalties on output tokens, and the HF-style repetition
    penalty on every token seen (prompt and output)."""
    sp = seq.sampling
    if sp.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long, device=logits.device)
        vals = logits.index_select(0, seen)
        vals = torch.where(vals > 0, vals / sp.repetition_penalty, vals * sp.repetition_penalty)
        logits.index_copy_(0, seen, vals)
    if (sp.frequency_penalty or sp.presence_penalty) and seq.num_output_tokens:
        out = torch.tensor(seq.output_token_ids, dtype=torch.long, device=logits.device)
        counts = torch.zeros_like(logits).index_add_(0, out, torch.ones_like(out, dtype=logits.dtype))
        logits -= sp.frequency_penalty * counts + sp.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def _sample_row(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    sp = seq.sampling
    logits = logits / sp.temperature
    if 0 < sp.top_k < logits.shape[0]:
        kth = torch.topk(logits, sp.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if sp.min_p > 0:
        probs = probs.masked_fill(probs < sp.min_p * probs.max(), 0.0)
    if sp.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_probs, dim=-1)
        # Keep the smallest set whose mass reaches top_p (the first token always stays).
        drop = (cum - sorted_probs) >= sp.top_p * cum[-1]
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=seq.generator)


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits: [len(seqs), vocab] float32 (raw model output). Returns one token per sequence and,
    where asked, logprobs of the raw distribution (before temperature or penalties)."""
    raw = logits
    if any(s.sampling.needs_penalties for s in seqs):
        logits = logits.clone()
        for i, s in enumerate(seqs):
            if s.sampling.needs_penalties:
                apply_penalties(logits[i], s)
    tokens = logits.argmax(dim=-1)
    sampled = [i for i, s in enumerate(seqs) if not s.sampling.greedy]
    if sampled:
        # Drawn row by row (each row's own generator), read back together: one device sync a step.
        draws = torch.cat([_sample_row(logits[i], seqs[i]) for i in sampled])
        tokens = tokens.index_copy(0, torch.tensor(sampled, device=tokens.device), draws)
    tokens = tokens.tolist()
    logprobs: list[TokenLogprob | None] = [None] * len(seqs)
    want = [i for i, s in enumerate(seqs) if s.sampling.logprobs > 0]
    if want:
        lp = torch.log_softmax(raw[want], dim=-1)
        for row, i in enumerate(want):
            top = torch.topk(lp[row], seqs[i].sampling.logprobs)
            logprobs[i] = TokenLogprob(tokens[i], float(lp[row, tokens[i]]), top.indices.tolist(),
                                       top.values.tolist())
    return tokens, logprobs
