"""The Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2 shapes) over a paged KV cache.

q/k/v and gate/up projections are fused into one matmul each: on a CPU each extra op in
30 layers costs real time per step, and the fused weights are the same numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from services.engine.attention import AttentionMetadata, paged_attention
from services.engine.models.config import ModelConfig
from services.engine.models.rope import apply_rope, rope_tables


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Computed in float32 and cast back, as the reference implementation does.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight.to(x.dtype) * xf.to(x.dtype)


class TorchOps:
    """The model's non-matmul steps in plain torch: the CPU path and the numerics reference. A
    CUDA runner swaps in fused kernels with the same contracts (``cuda/fused_ops.py``)."""

    attention = staticmethod(paged_attention)

    @staticmethod
    def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream after adding ``delta`` (if any), and its RMS norm."""
        if delta is not None:
            x = x + delta
        return x, rms_norm(x, weight, eps)

    @staticmethod
    def split_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int,
                   head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [T, heads, dim] and k [T, kv_heads, dim] rotated, v [T, kv_heads, dim]; cos/sin [T, dim]."""
        t = qkv.shape[0]
        q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = apply_rope(q.view(t, num_heads, head_dim), cos, sin)
        k = apply_rope(k.view(t, num_kv_heads, head_dim), cos, sin)
        return q, k, v.reshape(t, num_kv_heads, head_dim)

    @staticmethod
    def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_size = cfg.num_heads * d
        self.kv_size = cfg.num_kv_heads * d
        self.input_norm = nn.Parameter(torch.ones(h))
        self.qkv = nn.Linear(h, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_size, h, bias=False)
        self.post_norm = nn.Parameter(torch.ones(h))
        self.gate_up = nn.Linear(h, 2 * cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, h, bias=False)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.lm_head = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.scale = cfg.head_dim ** -0.5
        self.rope_cos: torch.Tensor | None = None
        self.rope_sin: torch.Tensor | None = None
        # Activations' dtype; differs from the weights' only for bf16 on CPUs without bf16
        # instructions, where bf16 matmuls run ~5x slower than upcasting the weights to fp32.
        self.compute_dtype: torch.dtype | None = None
        # Norms, rope, activation and paged attention; a CUDA runner swaps in fused kernels.
        self.ops = TorchOps

    def init_rope(self, max_positions: int) -> None:
        device = self.embed_tokens.weight.device
        dtype = self.compute_dtype or self.embed_tokens.weight.dtype
        self.rope_cos, self.rope_sin = rope_tables(self.cfg, max_positions, dtype, device)

    def _linear(self, x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
        bias = linear.bias
        if bias is not None:
            bias = bias.to(x.dtype)
        return F.linear(x, linear.weight.to(x.dtype), bias)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [T]; kv_cache: [layers, 2, blocks, block_size, kv_heads, dim].
        Returns the final hidden states [T, hidden]."""
        cfg = self.cfg
        ops = self.ops
        cos = self.rope_cos.index_select(0, positions)
        sin = self.rope_sin.index_select(0, positions)
        x = self.embed_tokens(input_ids)
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        lin = self._linear
        eps = cfg.rms_norm_eps
        delta = None
        for i, layer in enumerate(self.layers):
            x, h = ops.add_rms_norm(x, delta, layer.input_norm, eps)
            q, k, v = ops.split_rope(lin(h, layer.qkv), cos, sin, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
            attn = ops.attention(q, k, v, kv_cache[i], meta, self.scale)
            x, h = ops.add_rms_norm(x, lin(attn, layer.o_proj), layer.post_norm, eps)
            delta = lin(ops.silu_mul(lin(h, layer.gate_up)), layer.down)
        return ops.add_rms_norm(x, delta, self.norm, eps)[1]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head.to(hidden.dtype)).float()

    @torch.no_grad()
    def load_hf_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load tensors named as in a Hugging Face Llama checkpoint (``model.layers.N.self_attn...``)."""
        cfg = self.cfg

        def get(name: str) -> torch.Tensor:
            if name not in state:
                raise ValueError(f"checkpoint is missing tensor {name!r}")
            return state[name]

        self.embed_tokens.weight.copy_(get("model.embed_tokens.weight"))
        self.norm.copy_(get("model.norm.weight"))
        head = state.get("lm_head.weight")
        if head is None or cfg.tie_word_embeddings:
            head = get("model.embed_tokens.weight")
        self.lm_head.copy_(head)
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            layer.input_norm.copy_(get(p + "input_layernorm.weight"))
            layer.post_norm.copy_(get(p + "post_attention_layernorm.weight"))
            layer.qkv.weight.copy_(torch.cat([get(p + f"self_attn.{n}_proj.weight") for n in "qkv"]))
            if cfg.attention_bias:
                layer.qkv.bias.copy_(torch.cat([get(p + f"self_attn.{n}_proj.bias") for n in "qkv"]))
            layer.o_proj.weight.copy_(get(p + "self_attn.o_proj.weight"))
            layer.gate_up.weight.copy_(
                torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")]))
            layer.down.weight.copy_(get(p + "mlp.down_proj.weight"))
