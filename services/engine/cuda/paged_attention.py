"""Attention on the GPU over the paged KV pool, with no gathering copies for decode.

Decode: one Triton program per (sequence, KV head) walks the sequence's block table and reads
each K/V page straight from the pool, online softmax (flash-decoding without the split), all
query heads of the GQA group at once so every KV byte is read once. Prefill: flash attention
(torch SDPA) on the chunk's new tokens; a chunk with a cached prefix gathers that prefix from
the pool once per layer (prompt-sized, not per step) and uses a lower-right causal mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.nn.attention.bias import causal_lower_right

from services.engine.attention import PrefillChunk, chunk_context


@dataclass
class CudaAttentionMetadata:
    """Where this step's tokens go and what each reads. Decode tokens come first.

    ``block_tables`` [>= num_decode, width] int32 and ``context_lens`` [>= num_decode] int32 may
    have padded rows (a captured graph's batch is padded): a row with context 0 reads nothing.
    """

    slot_mapping: torch.Tensor
    num_decode: int = 0
    block_tables: torch.Tensor | None = None
    context_lens: torch.Tensor | None = None
    prefills: list[PrefillChunk] = field(default_factory=list)


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, out_ptr, part_ptr, ml_ptr, tables_ptr, lens_ptr, scale, num_splits,
                   stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_tb, stride_ot, stride_oh,
                   GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
                   TILE: tl.constexpr, PRECISION: tl.constexpr, SPLIT: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(lens_ptr + seq)
    # Split-K (flash-decoding): split s reads its own run of whole tiles of the context.
    per_split = tl.cdiv(tl.cdiv(length, num_splits), TILE) * TILE
    lo = split * per_split
    hi = tl.minimum(lo + per_split, length)
    rows = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + rows
    q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + dims[None, :],
                mask=(rows < GROUP)[:, None], other=0.0)
    # exp2 instead of exp: fold log2(e) into the scale once.
    qk_scale = scale * 1.4426950408889634
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    denom = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    cols = tl.arange(0, TILE)
    for start in range(lo, hi, TILE):
        pos = start + cols
        valid = pos < hi
        page = tl.load(tables_ptr + seq * stride_tb + pos // PAGE, mask=valid, other=0).to(tl.int64)
        offs = page * stride_kb + (pos % PAGE) * stride_ks + kv_head * stride_kh
        k = tl.load(k_ptr + offs[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_ptr + offs[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        denom = denom * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    if SPLIT:
        # Unnormalised partials [batch, heads, splits, ...]; _combine_kernel merges them.
        part = (seq * tl.num_programs(1) * GROUP + heads) * num_splits + split
        tl.store(part_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=(rows < GROUP)[:, None])
        tl.store(ml_ptr + part * 2, m, mask=rows < GROUP)
        tl.store(ml_ptr + part * 2 + 1, denom, mask=rows < GROUP)
    else:
        # A padded row (length 0) writes zeros, never NaN.
        out = acc / tl.where(denom > 0, denom, 1.0)[:, None]
        tl.store(out_ptr + seq * stride_ot + heads[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=(rows < GROUP)[:, None])


@triton.jit
def _combine_kernel(part_ptr, ml_ptr, out_ptr, num_heads, stride_ot, stride_oh,
                    SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS)
    dims = tl.arange(0, HEAD_DIM)
    part = (seq * num_heads + head) * SPLITS + splits
    m = tl.load(ml_ptr + part * 2)
    denom = tl.load(ml_ptr + part * 2 + 1)
    top = tl.max(m, 0)
    # Empty splits (m = -inf) weigh nothing; an all-empty (padded) row writes zeros.
    weight = tl.where(m == float("-inf"), 0.0, tl.exp2(m - top))
    acc = tl.load(part_ptr + part[:, None] * HEAD_DIM + dims[None, :])
    total = tl.sum(weight * denom, 0)
    out = tl.sum(weight[:, None] * acc, 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty))


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_pool_ptr, v_pool_ptr, slots_ptr, width, stride_k, stride_v, stride_slot,
                     BLOCK: tl.constexpr):
    """Write one token's K and V rows ([kv_heads * dim] each) into its pool slot."""
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    tl.store(k_pool_ptr + slot * stride_slot + cols, tl.load(k_ptr + t * stride_k + cols, mask=mask), mask=mask)
    tl.store(v_pool_ptr + slot * stride_slot + cols, tl.load(v_ptr + t * stride_v + cols, mask=mask), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k, v: [T, kv_heads, dim] (rows may be strided views of qkv); kv_layer: [2, blocks, block_size,
    kv_heads, dim]. One launch for both, where ``index_copy_`` takes one each."""
    num_tokens, kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    width = kv_heads * head_dim
    _store_kv_kernel[(num_tokens,)](k, v, kv_layer[0], kv_layer[1], slot_mapping, width, k.stride(0), v.stride(0),
                                    width, BLOCK=triton.next_power_of_2(width), num_warps=4)


def decode_splits(batch: int, kv_heads: int, sm_count: int) -> int:
    """Context splits per sequence: enough programs to give every SM about two (small batches
    would otherwise leave most of the GPU idle), a power of two, at most 16."""
    want = -(-2 * sm_count // (batch * kv_heads))
    return min(16, triton.next_power_of_2(want)) if want > 1 else 1


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float, out: torch.Tensor, splits: int | None = None,
                     tile: int | None = None, num_warps: int = 4, num_stages: int | None = None) -> None:
    """q, out: [batch, heads, dim]; k_cache, v_cache: [blocks, block_size, kv_heads, dim] (one layer).
    ``splits``/``tile``/``num_warps``/``num_stages`` override the defaults (the bench sweeps them)."""
    batch, num_heads, head_dim = q.shape
    _, page, kv_heads, _ = k_cache.shape
    group = num_heads // kv_heads
    fp32 = q.dtype == torch.float32
    if splits is None:
        splits = decode_splits(batch, kv_heads, torch.cuda.get_device_properties(q.device).multi_processor_count)
    # fp32 tiles are twice the bytes: halve the tile so the pipelined stages fit in shared memory.
    tile = max(tile or (32 if fp32 else 64), page)
    part = ml = out
    if splits > 1:
        part = torch.empty(batch, num_heads, splits, head_dim, dtype=torch.float32, device=q.device)
        ml = torch.empty(batch, num_heads, splits, 2, dtype=torch.float32, device=q.device)
    _decode_kernel[(batch, kv_heads, splits)](
        q, k_cache, v_cache, out, part, ml, block_tables, context_lens, scale, splits,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, PAGE=page,
        TILE=tile, PRECISION="ieee" if fp32 else "tf32", SPLIT=splits > 1, num_warps=num_warps,
        num_stages=num_stages or (2 if fp32 else 3))
    if splits > 1:
        _combine_kernel[(batch, num_heads)](part, ml, out, num_heads, out.stride(0), out.stride(1),
                                            SPLITS=splits, HEAD_DIM=head_dim, num_warps=4)


def _prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
             chunk: PrefillChunk, scale: float) -> torch.Tensor:
    s, n = chunk.start, chunk.num_query
    kk, vv = chunk_context(k, v, k_pool, v_pool, chunk)
    group = q.shape[1] // kk.shape[1]
    if group > 1:
        # Full heads keep SDPA on its flash kernel; the copy is prompt-sized, once per layer.
        kk, vv = kk.repeat_interleave(group, dim=1), vv.repeat_interleave(group, dim=1)
    qq, kk, vv = (t.transpose(0, 1).unsqueeze(0) for t in (q[s : s + n], kk, vv))
    if chunk.num_context == n:
        o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=scale)
    else:
        o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=causal_lower_right(n, chunk.num_context),
                                           scale=scale)
    return o.squeeze(0).transpose(0, 1)


def paged_attention_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor,
                         meta: CudaAttentionMetadata, scale: float) -> torch.Tensor:
    """Same contract as ``attention.paged_attention``: q [T, heads, dim], k/v [T, kv_heads, dim]
    in, [T, heads * dim] out, this step's K/V written into the pool first."""
    num_tokens, num_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    k_pool = kv_layer[0].view(-1, kv_heads, head_dim)
    v_pool = kv_layer[1].view(-1, kv_heads, head_dim)
    store_kv(k, v, kv_layer, meta.slot_mapping)
    out = q.new_empty(num_tokens, num_heads, head_dim)
    b = meta.num_decode
    if b:
        decode_attention(q[:b], kv_layer[0], kv_layer[1], meta.block_tables, meta.context_lens, scale, out[:b])
    for chunk in meta.prefills:
        out[chunk.start : chunk.start + chunk.num_query] = _prefill(q, k, v, k_pool, v_pool, chunk, scale)
    return out.view(num_tokens, num_heads * head_dim)
