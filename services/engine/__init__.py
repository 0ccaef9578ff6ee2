"""kvmesh's inference engine: paged KV cache, prefix caching, continuous batching, Llama models.

A library with no network code; the worker service wraps it. Start from ``Engine`` (sync,
one ``step()`` at a time) or ``AsyncEngine`` (background thread, async streams).
"""

from services.engine.async_engine import AsyncEngine, EngineDeadError
from services.engine.config import EngineConfig
from services.engine.kv_events import AllCleared, BlockRemoved, BlockStored, KvEvent, KvEventCallback
from services.engine.kv_transfer import KvExport, tensor_from_bytes, tensor_to_bytes
from services.engine.llm_engine import Engine, EngineStats, NoFreeBlocksError
from services.engine.model_source import model_id
from services.engine.outputs import RequestOutput, TokenLogprob
from services.engine.sampling_params import SamplingParams
from services.engine.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "AllCleared", "AsyncEngine", "BlockRemoved", "BlockStored", "Engine", "EngineConfig", "EngineDeadError",
    "EngineStats", "KvEvent", "KvEventCallback", "KvExport", "NoFreeBlocksError", "RequestOutput",
    "SamplingParams", "TokenLogprob", "Tokenizer", "load_tokenizer", "model_id", "tensor_from_bytes",
    "tensor_to_bytes",
]
