"""Fused Triton kernels for the model's element-wise steps: one launch where torch needs several.

A decode step is bound by kernel count as much as by bytes: torch's RMS norm is ~8 kernels,
rope ~10, SiLU-and-multiply 3, so a 30-layer model launched ~1,100 kernels per step (about
3 ms of graph replay on an H100 whatever the batch). These kernels do each step in one
launch, and round exactly where torch rounds (every torch op on bf16 rounds its fp32 result
to bf16), so the numbers match ``TorchOps`` bit for bit up to fp32 summation order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from services.engine.cuda.paged_attention import paged_attention_cuda
from services.engine.models.llama import TorchOps


@triton.jit
def _add_rms_norm_kernel(x_ptr, delta_ptr, w_ptr, out_ptr, n, eps, stride_x, stride_d, stride_o,
                         HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    dtype = x.dtype
    if HAS_DELTA:
        x = (x.to(tl.float32) + tl.load(delta_ptr + row * stride_d + cols, mask=mask, other=0.0).to(tl.float32))
        x = x.to(dtype)
        tl.store(x_ptr + row * stride_x + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / n + eps)
    normed = (xf * rstd).to(dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (w * normed).to(dtype), mask=mask)


@triton.jit
def _rope_kernel(qkv_ptr, cos_ptr, sin_ptr, stride_t, stride_c, num_rot_heads,
                 HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rotate q and k heads of one token in place (rotate-half layout): q and k heads sit side by
    side at the start of the token's qkv row."""
    t = tl.program_id(0)
    half: tl.constexpr = HEAD_DIM // 2
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, half)
    mask = (heads < num_rot_heads)[:, None]
    base = qkv_ptr + t * stride_t + heads[:, None] * HEAD_DIM + dims[None, :]
    x1 = tl.load(base, mask=mask, other=0.0)
    x2 = tl.load(base + half, mask=mask, other=0.0)
    dtype = x1.dtype
    c1 = tl.load(cos_ptr + t * stride_c + dims).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + t * stride_c + half + dims).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + t * stride_c + dims).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + t * stride_c + half + dims).to(tl.float32)[None, :]
    a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
    # torch: x * cos + cat(-x2, x1) * sin, each product and the sum rounded to the dtype.
    out1 = (a1 * c1).to(dtype).to(tl.float32) + (-a2 * s1).to(dtype).to(tl.float32)
    out2 = (a2 * c2).to(dtype).to(tl.float32) + (a1 * s2).to(dtype).to(tl.float32)
    tl.store(base, out1.to(dtype), mask=mask)
    tl.store(base + half, out2.to(dtype), mask=mask)


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, n, stride_g, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    gate = tl.load(gate_up_ptr + row * stride_g + cols, mask=mask, other=0.0)
    up = tl.load(gate_up_ptr + row * stride_g + n + cols, mask=mask, other=0.0)
    dtype = gate.dtype
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (act * up.to(tl.float32)).to(dtype), mask=mask)


class TritonOps(TorchOps):
    attention = staticmethod(paged_attention_cuda)

    @staticmethod
    def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Adds ``delta`` into ``x`` in place (the residual stream is the forward pass's own tensor)."""
        rows, n = x.shape
        out = torch.empty_like(x)
        block = triton.next_power_of_2(n)
        _add_rms_norm_kernel[(rows,)](x, x if delta is None else delta, weight, out, n, eps, x.stride(0),
                                      x.stride(0) if delta is None else delta.stride(0), out.stride(0),
                                      HAS_DELTA=delta is not None, BLOCK=block, num_warps=min(16, max(4, block // 512)))
        return x, out

    @staticmethod
    def split_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int,
                   head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotates q and k in place inside ``qkv``; returns strided views of it."""
        t = qkv.shape[0]
        rot = num_heads + num_kv_heads
        _rope_kernel[(t,)](qkv, cos, sin, qkv.stride(0), cos.stride(0), rot, HEAD_DIM=head_dim,
                           BLOCK_H=triton.next_power_of_2(rot), num_warps=4)
        q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
        return q.view(t, num_heads, head_dim), k.view(t, num_kv_heads, head_dim), v.view(t, num_kv_heads, head_dim)

    @staticmethod
    def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
        rows, width = gate_up.shape
        n = width // 2
        out = gate_up.new_empty(rows, n)
        block = 1024
        _silu_mul_kernel[(rows, triton.cdiv(n, block))](gate_up, out, n, gate_up.stride(0), out.stride(0),
                                                        BLOCK=block, num_warps=4)
        return out
