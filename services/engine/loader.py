"""Build a ``LlamaForCausalLM`` from a GGUF file, a Hugging Face directory or a random preset."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import torch

from services.engine.model_source import ModelSource, gguf_reader, resolve
from services.engine.models.config import ModelConfig
from services.engine.models.llama import LlamaForCausalLM

RANDOM_PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=16, max_position_embeddings=2048, tie_word_embeddings=True,
                 eos_token_ids=[2]),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                         num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
                         max_position_embeddings=8192, tie_word_embeddings=True, eos_token_ids=[2]),
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                       num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                       max_position_embeddings=131072, eos_token_ids=[128001, 128009]),
}

_GGUF_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _gguf_config(reader) -> ModelConfig:
    def get(key: str, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = get("general.architecture")
    if arch not in ("llama", "qwen2", "mistral"):
        raise ValueError(f"unsupported GGUF architecture {arch!r}")
    hidden = int(get(f"{arch}.embedding_length"))
    heads = int(get(f"{arch}.attention.head_count"))
    names = {t.name for t in reader.tensors}
    eos = get("tokenizer.ggml.eos_token_id")
    scaling = None
    if get(f"{arch}.rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": float(get(f"{arch}.rope.scaling.factor"))}
    return ModelConfig(
        name=str(get("general.name", "gguf")),
        vocab_size=int(get(f"{arch}.vocab_size", len(get("tokenizer.ggml.tokens", [])))),
        hidden_size=hidden,
        intermediate_size=int(get(f"{arch}.feed_forward_length")),
        num_layers=int(get(f"{arch}.block_count")),
        num_heads=heads,
        num_kv_heads=int(get(f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(get(f"{arch}.rope.dimension_count", hidden // heads)),
        rms_norm_eps=float(get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get(f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(get(f"{arch}.context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        bos_token_id=get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=[] if eos is None else [int(eos)],
    )


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved rope -> rotate-half rope)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _load_gguf(path: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    import gguf

    reader = gguf_reader(path)
    cfg = _gguf_config(reader)
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
        parts = t.name.split(".")
        if parts[0] == "blk":
            layer, kind, leaf = parts[1], parts[2], parts[3]
            if kind == "attn_q":
                w = _unpermute(w, cfg.num_heads)
            elif kind == "attn_k":
                w = _unpermute(w, cfg.num_kv_heads)
            name = f"model.layers.{layer}.{_GGUF_NAMES[kind]}.{leaf}"
        else:
            name = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                    "output.weight": "lm_head.weight"}.get(t.name)
            if name is None:
                continue
        state[name] = torch.from_numpy(np.ascontiguousarray(w))
    return cfg, state


def _load_hf(path: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    cfg = _hf_config(path)
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"{path} has no .safetensors files")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(file))
    return cfg, state


def _hf_config(path: str) -> ModelConfig:
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    heads = hf["num_attention_heads"]
    rope = hf.get("rope_parameters") or {}
    eos = hf.get("eos_token_id")
    return ModelConfig(
        name=hf.get("_name_or_path") or os.path.basename(os.path.abspath(path)),
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads", heads),
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
        # transformers >= 5 writes ``rope_parameters`` (theta and scaling together).
        rope_theta=hf.get("rope_theta") or rope.get("rope_theta", 10000.0),
        rope_scaling=hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        attention_bias=hf.get("attention_bias", hf.get("model_type") == "qwen2"),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
    )


def random_config(preset: str) -> ModelConfig:
    if preset not in RANDOM_PRESETS:
        raise ValueError(f"unknown random preset {preset!r}; known: {sorted(RANDOM_PRESETS)}")
    return ModelConfig(name=f"random-{preset}", **RANDOM_PRESETS[preset])


def load_model_config(model: str) -> ModelConfig:
    """The architecture alone, without reading weights: the mock engine sizes its pool from it."""
    src = resolve(model)
    if src.kind == "random":
        return random_config(src.path)
    return _gguf_config(gguf_reader(src.path)) if src.kind == "gguf" else _hf_config(src.path)


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: without either, CPU bf16 matmuls are emulated and slow."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def load_model(model: str, dtype: torch.dtype, device: torch.device,
               seed: int = 0) -> LlamaForCausalLM:
    """Load weights and return the model in eval mode, on ``device``, in ``dtype``.

    bf16 on a CPU without bf16 instructions keeps weights (and the KV pool) in bf16 but
    computes in fp32: same memory, about 4x the speed of emulated bf16 matmuls.
    """
    net = _load_weights(model, dtype, device, seed)
    if dtype == torch.bfloat16 and device.type == "cpu" and not cpu_has_native_bf16():
        net.compute_dtype = torch.float32
    return net


def _load_weights(model: str, dtype: torch.dtype, device: torch.device, seed: int) -> LlamaForCausalLM:
    src: ModelSource = resolve(model)
    if src.kind == "random":
        with torch.device("meta"):
            net = LlamaForCausalLM(random_config(src.path))
        net = net.to_empty(device=device).to(dtype)
        # Drawn on the CPU, so the same seed gives the same weights on any device; above ~1B
        # parameters that takes minutes, so big presets draw on their device (weights then
        # depend on the device, which shape benchmarks do not care about).
        big = sum(p.numel() for p in net.parameters()) > 1_000_000_000
        gen_device = device if big else torch.device("cpu")
        gen = torch.Generator(device=gen_device).manual_seed(seed)
        with torch.no_grad():
            for name, p in net.named_parameters():
                if "norm" in name:
                    p.fill_(1.0)
                else:
                    draw = torch.empty(p.shape, dtype=dtype, device=gen_device).normal_(0.0, 0.02, generator=gen)
                    p.copy_(draw)
        return net.eval()
    cfg, state = _load_gguf(src.path) if src.kind == "gguf" else _load_hf(src.path)
    with torch.device("meta"):
        net = LlamaForCausalLM(cfg)
    net = net.to_empty(device=device).to(dtype)
    net.load_hf_state(state)
    return net.eval()
