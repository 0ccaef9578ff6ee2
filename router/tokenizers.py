"""Tokenizers by model identity, loaded from the spec the workers registered with.

Loading can take seconds the first time (a GGUF vocabulary is converted once and cached),
so it runs in a thread and each model's tokenizer is loaded once, even under a burst.
"""

from __future__ import annotations

import asyncio

import grpc

from router.errors import RouterError
from services.engine.tokenizer import Tokenizer, load_tokenizer


class TokenizerCache:
    def __init__(self) -> None:
        self._loading: dict[str, asyncio.Task[Tokenizer | None]] = {}

    async def get(self, model_id: str, model_spec: str) -> Tokenizer:
        task = self._loading.get(model_id)
        if task is None:
            task = asyncio.create_task(asyncio.to_thread(load_tokenizer, model_spec or "smollm2"))
            self._loading[model_id] = task
        try:
            tokenizer = await asyncio.shield(task)
        except Exception as exc:
            self._loading.pop(model_id, None)
            raise RouterError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"cannot load the tokenizer of {model_id} from {model_spec!r}: {exc}",
            ) from exc
        if tokenizer is None:
            raise RouterError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"model {model_id} has no tokenizer; send token ids instead of text",
            )
        return tokenizer
