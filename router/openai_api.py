"""The OpenAI-compatible HTTP API: /v1/models, /v1/completions, /v1/chat/completions, /health.

Request bodies are parsed by hand rather than by pydantic models so that every refusal is
an OpenAI-style error body with a 4xx status and a message naming the field, exactly as
OpenAI's own clients expect to read it.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from kvmesh_proto.v1 import common_pb2
from router.dashboard import add_dashboard_routes
from router.errors import RouterError, invalid, retry_after_header
from router.pipeline import Chunk, Generation, GenerationInput, RouterCore
from router.request_limits import read_body

WORKER_HEADER = "x-kvmesh-worker"
ROUTE_HEADER = "x-kvmesh-route"  # which path: kv, round_robin, disagg-remote, disagg-local, ...
PREFILL_HEADER = "x-kvmesh-prefill-worker"


def _error_response(exc: RouterError) -> JSONResponse:
    headers = {} if exc.retry_after_s is None else {"retry-after": retry_after_header(exc.retry_after_s)}
    return JSONResponse(exc.openai_body(), status_code=exc.http_status, headers=headers)


async def _json_body(request: Request, max_bytes: int) -> dict[str, Any]:
    raw = await read_body(request, max_bytes)
    try:
        body = json.loads(raw)
    except UnicodeDecodeError as exc:
        raise invalid(f"the body is not valid UTF-8: {exc.reason} at byte {exc.start}") from exc
    except json.JSONDecodeError as exc:
        raise invalid(f"the body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from exc
    if not isinstance(body, dict):
        raise invalid("the body must be a JSON object")
    return body


def _number(body: dict, name: str, default: float, kind: type = float) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and not isinstance(value, int)):
        raise invalid(f"{name} must be {'an integer' if kind is int else 'a number'}", name)
    if kind is int and not -(2**31) <= value < 2**31:  # the wire field is an int32
        raise invalid(f"{name} must be between {-(2**31)} and {2**31 - 1}", name)
    return kind(value)


def _stop_list(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return stop
    raise invalid("stop must be a string or a list of strings", "stop")


def sampling_from(body: dict, chat: bool) -> common_pb2.SamplingParams:
    """OpenAI parameters (plus vLLM-style extras) as the mesh's SamplingParams."""
    if _number(body, "n", 1, int) != 1:
        raise invalid("only n=1 is supported", "n")
    if body.get("best_of") not in (None, 1):
        raise invalid("best_of is not supported", "best_of")
    if body.get("echo"):
        raise invalid("echo is not supported", "echo")
    if chat and body.get("max_completion_tokens") is not None:
        max_tokens = _number(body, "max_completion_tokens", 0, int)
    else:
        max_tokens = _number(body, "max_tokens", 0 if chat else 16, int)
    if max_tokens <= 0 and (body.get("max_tokens") is not None or body.get("max_completion_tokens") is not None):
        raise invalid(f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
    if chat:
        logprobs = _number(body, "top_logprobs", 1 if body.get("logprobs") else 0, int) if body.get("logprobs") else 0
    else:
        logprobs = _number(body, "logprobs", 0, int)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64):
        raise invalid("seed must be a non-negative integer", "seed")
    top_p = _number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise invalid(f"top_p must be in (0, 1], got {top_p}", "top_p")
    sampling = common_pb2.SamplingParams(
        temperature=_number(body, "temperature", 1.0),
        top_p=top_p,
        top_k=_number(body, "top_k", -1, int),
        min_p=_number(body, "min_p", 0.0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0),
        presence_penalty=_number(body, "presence_penalty", 0.0),
        max_tokens=max_tokens,
        stop=_stop_list(body),
        logprobs=logprobs,
        ignore_eos=bool(body.get("ignore_eos", False)),
    )
    if seed is not None:
        sampling.seed = seed
    return sampling


def _completion_input(body: dict) -> GenerationInput:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return GenerationInput(model=_model(body), token_ids=prompt, sampling=sampling_from(body, chat=False))
    if not isinstance(prompt, str):
        raise invalid("prompt must be a string or a list of token ids (batches are not supported)", "prompt")
    return GenerationInput(model=_model(body), prompt=prompt, sampling=sampling_from(body, chat=False))


def _chat_input(body: dict) -> GenerationInput:
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise invalid("messages must be a list of {role, content} objects", "messages")
    flat = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise invalid(f"messages[{index}] must be an object", "messages")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text is supported
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise invalid(f"messages[{index}].content: only text parts are supported", "messages")
            content = "".join(str(p.get("text", "")) for p in content)
        flat.append({"role": message.get("role"), "content": content})
    return GenerationInput(model=_model(body), messages=flat, sampling=sampling_from(body, chat=True))


def _model(body: dict) -> str:
    model = body.get("model", "")
    if not isinstance(model, str):
        raise invalid("model must be a string", "model")
    return model


def _usage(generation: Generation) -> dict:
    usage = generation.usage()
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


class OpenAIFormatter:
    """Shapes chunks into the objects of one endpoint (chat or text completions)."""

    def __init__(self, chat: bool, model: str, core: RouterCore, generation: Generation) -> None:
        self.chat = chat
        self.model = model
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self._core = core
        self.generation = generation

    def _object(self, stream: bool) -> str:
        if self.chat:
            return "chat.completion.chunk" if stream else "chat.completion"
        return "text_completion"

    def _envelope(self, choices: list[dict], stream: bool) -> dict:
        return {"id": self.id, "object": self._object(stream), "created": self.created, "model": self.model,
                "choices": choices}  # fmt: skip

    async def logprobs(self, chunks: list[Chunk]) -> dict | None:
        entries = [lp for chunk in chunks for lp in chunk.logprobs]
        if not entries:
            return None
        tokenizer = await self._core.tokenizers.get(self.generation.model, self.generation.worker.info.model_spec)

        def token(token_id: int) -> str:
            return tokenizer.decode([token_id], skip_special_tokens=False)

        if self.chat:
            return {"content": [
                {"token": token(lp.token_id), "logprob": lp.logprob, "bytes": list(token(lp.token_id).encode()),
                 "top_logprobs": [{"token": token(t), "logprob": p, "bytes": list(token(t).encode())}
                                  for t, p in zip(lp.top_token_ids, lp.top_logprobs, strict=False)]}
                for lp in entries
            ]}  # fmt: skip
        return {
            "tokens": [token(lp.token_id) for lp in entries],
            "token_logprobs": [lp.logprob for lp in entries],
            "top_logprobs": [{token(t): p for t, p in zip(lp.top_token_ids, lp.top_logprobs, strict=False)}
                             for lp in entries],
            "text_offset": [],
        }  # fmt: skip

    async def full(self, chunks: list[Chunk]) -> dict:
        text = "".join(chunk.text for chunk in chunks)
        finish = self.generation.finish_reason or "stop"
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": await self.logprobs(chunks)}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        body = self._envelope([choice], stream=False)
        body["usage"] = _usage(self.generation)
        return body

    async def stream_event(self, chunk: Chunk, first: bool) -> dict:
        choice: dict[str, Any] = {"index": 0, "finish_reason": chunk.finish_reason or None,
                                  "logprobs": await self.logprobs([chunk])}  # fmt: skip
        if self.chat:
            choice["delta"] = {"role": "assistant", "content": chunk.text} if first else {"content": chunk.text}
        else:
            choice["text"] = chunk.text
        return self._envelope([choice], stream=True)

    def usage_event(self) -> dict:
        body = self._envelope([], stream=True)
        body["usage"] = _usage(self.generation)
        return body


def _sse(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def _stream_body(formatter: OpenAIFormatter, include_usage: bool) -> AsyncIterator[bytes]:
    generation = formatter.generation
    try:
        first = True
        async with contextlib.aclosing(generation.chunks()) as chunks:
            async for chunk in chunks:
                yield _sse(await formatter.stream_event(chunk, first))
                first = False
        if include_usage:
            yield _sse(formatter.usage_event())
    except RouterError as exc:
        yield _sse(exc.openai_body())
    finally:
        generation.close()
    yield _sse("[DONE]")


def create_app(core: RouterCore) -> FastAPI:
    app = FastAPI(title="kvmesh", docs_url=None, redoc_url=None)
    add_dashboard_routes(app, core)

    def api_key(request: Request) -> None:
        """Every /v1 path needs a key (when keys are set); only generation counts against its rate."""
        core.auth.admit(request.headers.get("authorization"), rate_limited=request.method == "POST")

    keyed = [Depends(api_key)]

    @app.exception_handler(RouterError)
    async def router_error(request: Request, exc: RouterError) -> JSONResponse:
        return _error_response(exc)

    @app.get("/health")
    async def health() -> JSONResponse:
        workers = len(core.pool.workers)
        body = {"status": "ok" if workers else "no_workers", "workers": workers,
                "kvstore_available": core.kv_index.available,
                "kv_routing_degraded_reason": core.kv_index.degraded_reason}  # fmt: skip
        return JSONResponse(body, status_code=200 if workers else 503)

    @app.get("/v1/models", dependencies=keyed)
    async def models() -> JSONResponse:
        now = int(time.time())
        data = [{"id": name, "object": "model", "created": now, "owned_by": "kvmesh", "root": infos[0].model_spec}
                for name, infos in sorted(core.pool.models().items())]  # fmt: skip
        return JSONResponse({"object": "list", "data": data})

    async def serve(request: Request, chat: bool) -> Any:
        body = await _json_body(request, core.settings.max_body_bytes)
        generation_input = _chat_input(body) if chat else _completion_input(body)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise invalid("stream must be a boolean", "stream")
        generation = await core.open(generation_input)
        formatter = OpenAIFormatter(chat, body.get("model") or generation.model, core, generation)
        headers = {WORKER_HEADER: generation.worker_id, ROUTE_HEADER: generation.route.mode}
        if generation.route.prefill_worker is not None:
            headers[PREFILL_HEADER] = generation.route.prefill_worker.worker_id
        if stream:
            include_usage = bool((body.get("stream_options") or {}).get("include_usage", False))
            return StreamingResponse(_stream_body(formatter, include_usage), media_type="text/event-stream",
                                     headers={**headers, "cache-control": "no-cache"})  # fmt: skip
        try:
            chunks = [chunk async for chunk in generation.chunks()]
        finally:
            generation.close()
        return JSONResponse(await formatter.full(chunks), headers=headers)

    @app.post("/v1/completions", dependencies=keyed)
    async def completions(request: Request) -> Any:
        return await serve(request, chat=False)

    @app.post("/v1/chat/completions", dependencies=keyed)
    async def chat_completions(request: Request) -> Any:
        return await serve(request, chat=True)

    return app
