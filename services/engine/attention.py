"""Paged attention in plain torch: K/V live in a block pool, read back through block tables.

The pool of one layer is ``[2, num_blocks, block_size, kv_heads, head_dim]``. A step writes
its new K/V into their slots, then each query reads only its own sequence's blocks: decode
queries are gathered into one padded batch (one matmul for all of them), prefill chunks run
one SDPA call each. Nothing copies the whole pool.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PrefillChunk:
    """A run of ``num_query`` tokens of one sequence at flat offset ``start``; ``context_slots``
    holds the pool slots of all its tokens so far (cached prefix + this chunk), or None when
    the chunk is the sequence's whole context (no gather needed)."""

    start: int
    num_query: int
    num_context: int
    context_slots: torch.Tensor | None


@dataclass
class AttentionMetadata:
    """Where this step's tokens go and what each one may read. Decode tokens come first."""

    slot_mapping: torch.Tensor
    num_decode: int = 0
    # [num_decode, max_context] pool slots to gather (padding points at slot 0, masked out).
    decode_slots: torch.Tensor | None = None
    # [num_decode, 1, 1, max_context] additive mask: 0 where readable, -inf on padding.
    decode_bias: torch.Tensor | None = None
    prefills: list[PrefillChunk] = field(default_factory=list)


def chunk_context(k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                  chunk: PrefillChunk) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V [num_context, kv_heads, dim] a prefill chunk attends to: its own new tokens, or
    (with a cached prefix) every slot of its sequence so far, gathered from the pool."""
    s, n = chunk.start, chunk.num_query
    if chunk.context_slots is None:
        return k[s : s + n], v[s : s + n]
    return (k_pool.index_select(0, chunk.context_slots).to(k.dtype),
            v_pool.index_select(0, chunk.context_slots).to(v.dtype))


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, heads, dim]; k, v: [T, kv_heads, dim]; returns [T, heads * dim]."""
    num_tokens, num_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    group = num_heads // kv_heads
    k_pool = kv_layer[0].view(-1, kv_heads, head_dim)
    v_pool = kv_layer[1].view(-1, kv_heads, head_dim)
    # The pool may be narrower than the activations (bf16 KV with fp32 compute).
    k_pool.index_copy_(0, meta.slot_mapping, k.to(k_pool.dtype))
    v_pool.index_copy_(0, meta.slot_mapping, v.to(v_pool.dtype))
    out = q.new_empty(num_tokens, num_heads, head_dim)

    b = meta.num_decode
    if b:
        slots = meta.decode_slots
        length = slots.shape[1]
        flat = slots.reshape(-1)
        kk = k_pool.index_select(0, flat).view(b, length, kv_heads, head_dim).transpose(1, 2).to(q.dtype)
        vv = v_pool.index_select(0, flat).view(b, length, kv_heads, head_dim).transpose(1, 2).to(q.dtype)
        qq = q[:b].view(b, kv_heads, group, head_dim)
        scores = torch.matmul(qq, kk.transpose(2, 3)).float().mul_(scale).add_(meta.decode_bias)
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        out[:b] = torch.matmul(probs, vv).view(b, num_heads, head_dim)

    for chunk in meta.prefills:
        s, n = chunk.start, chunk.num_query
        qq = q[s : s + n].transpose(0, 1).unsqueeze(0)
        kk, vv = chunk_context(k, v, k_pool, v_pool, chunk)
        kk = kk.transpose(0, 1).unsqueeze(0)
        vv = vv.transpose(0, 1).unsqueeze(0)
        if chunk.num_context == n:
            o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=scale, enable_gqa=True)
        else:
            # Query i sits at position (num_context - n + i) and reads every earlier position.
            offset = chunk.num_context - n
            rows = torch.arange(n, device=q.device).unsqueeze(1) + offset
            cols = torch.arange(chunk.num_context, device=q.device).unsqueeze(0)
            o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=cols <= rows, scale=scale,
                                               enable_gqa=True)
        out[s : s + n] = o.squeeze(0).transpose(0, 1)
    return out.view(num_tokens, num_heads * head_dim)
