"""Tokenizer and chat template, loadable without the model weights (the router uses this).

GGUF files carry their vocabulary, merges and chat template; transformers can turn them into
a fast tokenizer, but that takes ~15 s, so the result is cached once as ``tokenizer.json``
(keyed by the file's digest) under ``$KVMESH_CACHE_DIR`` (default ``~/.cache/kvmesh``). HF
directories use their own ``tokenizer.json`` and ``tokenizer_config.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer as FastTokenizer

from services.engine.detokenizer import IncrementalDetokenizer
from services.engine.model_source import ModelSource, _file_digest, gguf_reader, resolve


@dataclass
class Tokenizer:
    backend: FastTokenizer
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    add_bos: bool = False

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and self.bos_token is not None:
            bos = self.backend.token_to_id(self.bos_token)
            if bos is not None and (not ids or ids[0] != bos):
                ids = [bos, *ids]
        return ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render OpenAI-style ``[{"role", "content"}]`` messages with the model's own template."""
        if not self.chat_template:
            raise ValueError("this model has no chat template")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(
                    m.get("content"), str):
                raise ValueError("each message needs string 'role' and 'content'")
        return _compile(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        # The template already writes any special tokens it wants.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)

    def detokenizer(self, prompt_token_ids: list[int] | None = None) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.decode, prompt_token_ids or [])


def _raise(message: str) -> None:
    raise ValueError(f"chat template: {message}")


_TEMPLATES: dict[str, jinja2.Template] = {}


def _compile(source: str) -> jinja2.Template:
    if source not in _TEMPLATES:
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        _TEMPLATES[source] = env.from_string(source)
    return _TEMPLATES[source]


def _cache_dir() -> str:
    return os.environ.get("KVMESH_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "kvmesh")


def _token_str(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _from_gguf(path: str) -> Tokenizer:
    folder = os.path.join(_cache_dir(), "tokenizers", _file_digest(path))
    tok_file, meta_file = os.path.join(folder, "tokenizer.json"), os.path.join(folder, "meta.json")
    if not (os.path.isfile(tok_file) and os.path.isfile(meta_file)):
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
        fields = gguf_reader(path).fields
        add_bos = fields.get("tokenizer.ggml.add_bos_token")
        meta = {"chat_template": hf.chat_template, "bos_token": hf.bos_token, "eos_token": hf.eos_token,
                "eos_token_ids": [hf.eos_token_id] if hf.eos_token_id is not None else [],
                "add_bos": bool(add_bos.contents()) if add_bos is not None else False}
        os.makedirs(folder, exist_ok=True)
        # Written to temporary names then renamed, so concurrent first loads never see half a file.
        hf.backend_tokenizer.save(tok_file + ".tmp")
        with open(meta_file + ".tmp", "w") as f:
            json.dump(meta, f)
        os.replace(tok_file + ".tmp", tok_file)
        os.replace(meta_file + ".tmp", meta_file)
    with open(meta_file) as f:
        meta = json.load(f)
    return Tokenizer(FastTokenizer.from_file(tok_file), **meta)


def _from_hf_dir(path: str) -> Tokenizer:
    tok_file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tok_file):
        raise ValueError(f"{path} has no tokenizer.json")
    backend = FastTokenizer.from_file(tok_file)
    conf: dict = {}
    if os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        with open(os.path.join(path, "tokenizer_config.json")) as f:
            conf = json.load(f)
    template = conf.get("chat_template")
    if template is None and os.path.isfile(os.path.join(path, "chat_template.jinja")):
        with open(os.path.join(path, "chat_template.jinja")) as f:
            template = f.read()
    eos = _token_str(conf.get("eos_token"))
    eos_ids = [backend.token_to_id(eos)] if eos and backend.token_to_id(eos) is not None else []
    if os.path.isfile(os.path.join(path, "generation_config.json")):
        with open(os.path.join(path, "generation_config.json")) as f:
            gen_eos = json.load(f).get("eos_token_id")
        if gen_eos is not None:
            eos_ids = sorted(set(eos_ids) | set([gen_eos] if isinstance(gen_eos, int) else gen_eos))
    return Tokenizer(backend, template, _token_str(conf.get("bos_token")), eos, eos_ids,
                     bool(conf.get("add_bos_token", False)))


def load_tokenizer(model: str) -> Tokenizer | None:
    """The tokenizer of a model spec; None for random models whose vocabulary has no tokenizer.

    ``random:`` presets with SmolLM2's vocabulary size reuse SmolLM2's tokenizer.
    """
    src: ModelSource = resolve(model)
    if src.kind == "gguf":
        return _from_gguf(src.path)
    if src.kind == "hf":
        return _from_hf_dir(src.path)
    from services.engine.loader import random_config

    if random_config(src.path).vocab_size == 49152:
        from services.engine.model_source import default_gguf_path

        try:
            return _from_gguf(default_gguf_path())
        except FileNotFoundError:
            return None  # shapes-only use (e.g. a GPU box without the wheel): token ids still work
    return None
