"""Owns the model and the KV pool tensor; turns a scheduled batch into one forward pass.

The pool is one tensor ``[layers, 2, num_blocks, block_size, kv_heads, head_dim]`` — the
same layout as ``kvmesh.v1.KvBlockChunk`` — so export and import are slices and copies.
"""

from __future__ import annotations

import torch

from services.engine.attention import AttentionMetadata, PrefillChunk
from services.engine.models.llama import LlamaForCausalLM
from services.engine.scheduler import ScheduledItem
from services.engine.sequence import Sequence


def create_runner(model: LlamaForCausalLM, num_blocks: int, block_size: int, max_model_len: int,
                  max_num_seqs: int) -> ModelRunner:
    """The runner for the model's device; the CUDA one (Triton, CUDA graphs) is imported only here."""
    if model.embed_tokens.weight.device.type == "cuda":
        from services.engine.cuda.runner import CudaModelRunner

        return CudaModelRunner(model, num_blocks, block_size, max_model_len, max_num_seqs)
    return ModelRunner(model, num_blocks, block_size, max_model_len)


class ModelRunner:
    # Pool blocks past ``num_blocks`` that the block manager never hands out (CUDA: padded
    # graph rows write their K/V there).
    scratch_blocks = 0

    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int, max_model_len: int) -> None:
        cfg = model.cfg
        weight = model.embed_tokens.weight
        self.model = model
        self.device = weight.device
        self.block_size = block_size
        self.kv_cache = torch.zeros(cfg.num_layers, 2, num_blocks + self.scratch_blocks, block_size,
                                    cfg.num_kv_heads, cfg.head_dim, dtype=weight.dtype, device=self.device)
        model.init_rope(max_model_len)
        self._offsets = torch.arange(block_size, device=self.device)

    def _slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        """Pool slots of positions [start, end) of a sequence."""
        bs = self.block_size
        first, last = start // bs, (end - 1) // bs
        table = torch.tensor(block_table[first : last + 1], dtype=torch.long)
        slots = (table.unsqueeze(1) * bs + self._offsets.cpu()).view(-1)
        return slots[start - first * bs : end - first * bs]

    def _decode_metadata(self, decode: list[Sequence]) -> tuple[torch.Tensor, AttentionMetadata]:
        """The pool slots of the decode tokens' new K/V (CPU tensor) and the metadata that lets each
        read its context: here a padded [batch, max_context] gather of slots and an additive mask."""
        if not decode:
            return torch.empty(0, dtype=torch.long), AttentionMetadata(slot_mapping=torch.empty(0))
        bs = self.block_size
        lens = [s.num_computed_tokens + 1 for s in decode]
        max_len = max(lens)
        max_blocks = -(-max_len // bs)
        tables = torch.tensor([s.block_table[:max_blocks] + [0] * (max_blocks - len(s.block_table))
                               for s in decode], dtype=torch.long)
        gather = (tables.unsqueeze(2) * bs + self._offsets.cpu()).view(len(decode), -1)[:, :max_len]
        lens_t = torch.tensor(lens, dtype=torch.long)
        slots = gather.gather(1, (lens_t - 1).unsqueeze(1)).squeeze(1)
        valid = torch.arange(max_len).unsqueeze(0) < lens_t.unsqueeze(1)
        bias = torch.zeros(len(decode), 1, 1, max_len).masked_fill_(~valid.view(len(decode), 1, 1, -1),
                                                                    float("-inf"))
        meta = AttentionMetadata(slot_mapping=slots, num_decode=len(decode), decode_slots=gather.to(self.device),
                                 decode_bias=bias.to(self.device))
        return slots, meta

    def _prepare(self, items: list[ScheduledItem]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata,
                                                             list[Sequence], list[int]]:
        decode = [s for s, n in items if n == 1]
        prefill = [(s, n) for s, n in items if n > 1]
        ids = [s.token_ids[s.num_computed_tokens] for s in decode]
        positions = [s.num_computed_tokens for s in decode]
        sample_rows = [row for row, s in enumerate(decode) if s.num_computed_tokens + 1 == s.num_tokens]
        sample_seqs = [decode[row] for row in sample_rows]
        decode_slots, meta = self._decode_metadata(decode)
        slots = [decode_slots]
        chunks: list[PrefillChunk] = []
        for s, n in prefill:
            start = s.num_computed_tokens
            offset = len(ids)
            ids.extend(s.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            slots.append(self._slots(s.block_table, start, start + n))
            context = None if start == 0 else self._slots(s.block_table, 0, start + n).to(self.device)
            chunks.append(PrefillChunk(offset, n, start + n, context))
            if start + n == s.num_tokens:
                sample_seqs.append(s)
                sample_rows.append(offset + n - 1)
        dev = self.device
        meta.slot_mapping = torch.cat(slots).to(dev)
        meta.prefills = chunks
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        pos = torch.tensor(positions, dtype=torch.long, device=dev)
        return input_ids, pos, meta, sample_seqs, sample_rows

    @torch.inference_mode()
    def execute(self, items: list[ScheduledItem]) -> tuple[list[Sequence], torch.Tensor | None]:
        """Run one forward pass; return the sequences that get a new token and their logits [n, vocab]."""
        input_ids, positions, meta, sample_seqs, rows = self._prepare(items)
        hidden = self.model(input_ids, positions, self.kv_cache, meta)
        if not sample_seqs:
            return [], None
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        return sample_seqs, self.model.compute_logits(hidden.index_select(0, index))
