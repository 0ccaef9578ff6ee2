"""One request through the router: validate → tokenize → hash → route → stream → detokenize.

Both front doors (gRPC ``Generate`` and the OpenAI HTTP API) call ``RouterCore.open``,
which returns only once a worker has produced the first output: every refusal (bad
input, no worker, a worker that failed before its first token and was retried elsewhere)
is therefore known before a client sees a status line or response header.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from kvmesh.config import RouterSettings
from kvmesh.hashing import block_hashes
from kvmesh_proto.v1 import common_pb2, worker_pb2
from router.admission import InflightLimit, InflightSlot
from router.auth import FrontDoorAuth
from router.errors import RouterError, exhausted, invalid
from router.kv_index import KvIndexClient
from router.migration import MIGRATABLE, Attempt, Resume, continuation_request, read
from router.request_limits import check_input_limits, check_max_tokens
from router.request_trace import RecentRequests, RouterRequestTrace
from router.scoring import Candidate, KvCost, PrefixOverlap, RoundRobin, candidate, choose_decode
from router.text_stream import TextStream
from router.tokenizers import TokenizerCache
from router.worker_pool import WorkerPool, WorkerState
from services.engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)

CHAT_ROLES = ("system", "user", "assistant", "developer", "tool")
DEFAULT_MAX_TOKENS = 1024
_MAX_ATTEMPTS = 3
# Before the first token these go to another worker: gone (UNAVAILABLE) or queue full (RESOURCE_EXHAUSTED).
_RETRIABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


@dataclass
class GenerationInput:
    """A request in the router's own terms, whichever front door it came through."""

    model: str = ""
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    token_ids: list[int] | None = None
    sampling: common_pb2.SamplingParams = field(default_factory=common_pb2.SamplingParams)
    request_id: str = ""
    # Seconds the client will wait (its gRPC deadline); None = the router's request_timeout_s.
    timeout_s: float | None = None


@dataclass
class Chunk:
    text: str
    token_ids: list[int]
    finish_reason: str = ""
    logprobs: list[common_pb2.TokenLogprob] = field(default_factory=list)


@dataclass
class RouteInfo:
    """Where a request went and why (the mode names the path: kv, round_robin, random,
    kv-load-only when the index was unreachable, disagg-remote / disagg-local)."""

    worker_id: str
    mode: str
    prefix_overlap: int
    prompt_blocks: int
    prefill_worker: WorkerState | None = None
    # The other prefill workers, best first: the decode worker pulls from them if the first fails.
    fallback_prefill_workers: list[WorkerState] = field(default_factory=list)
    runner_up_cost: float | None = None
    # Peer fetch: a worker holding more of the prompt's prefix than the chosen one, and how much.
    kv_peer: WorkerState | None = None
    kv_peer_blocks: int = 0
    # Where the prefix overlaps came from: local (the router's followed copy of the index),
    # kvstore (a FindMatches call), none (routed on load alone, or not a kv route).
    index: str = "none"
    # kv-cost ttft: the modelled prefill the chosen worker owes this request until its first token.
    prefill_s: float = 0.0


class Generation:
    """An opened request: the chosen worker is producing tokens."""

    def __init__(
        self,
        request_id: str,
        model: str,
        prompt_token_ids: list[int],
        attempt: Attempt,
        text: TextStream,
        route: RouteInfo,
        block_size: int,
        trace: RouterRequestTrace,
        resume: Resume | None = None,
        migration_limit: int = 0,
    ) -> None:
        self.request_id = request_id
        self.model = model
        self.prompt_token_ids = prompt_token_ids
        self.route = route
        self.cached_tokens = attempt.first.cached_tokens
        self.output_token_ids: list[int] = []
        self.finish_reason = ""
        self.migrations = 0
        self._use(attempt)
        self._text = text
        self._block_size = block_size
        self.trace = trace
        self._resume = resume
        self._migration_limit = migration_limit
        self._excluded: set[str] = set()
        self.slot: InflightSlot | None = None

    def _use(self, attempt: Attempt) -> None:
        self.worker = attempt.worker
        self._call = attempt.call
        self._first: worker_pb2.WorkerGenerateResponse | None = attempt.first
        self._worker_request_id = attempt.request_id

    @property
    def worker_id(self) -> str:
        return self.worker.worker_id

    @property
    def completion_tokens(self) -> int:
        return len(self.output_token_ids)

    def usage(self) -> common_pb2.Usage:
        return common_pb2.Usage(
            prompt_tokens=len(self.prompt_token_ids),
            completion_tokens=self.completion_tokens,
            cached_tokens=self.cached_tokens,
        )

    async def _responses(self) -> AsyncIterator[worker_pb2.WorkerGenerateResponse]:
        while True:
            if self._first is not None:
                first, self._first = self._first, None
                yield first
                continue
            try:
                response = await read(self._call)
                failure = "ended the stream early" if response is grpc.aio.EOF else ""
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in MIGRATABLE:
                    expired = exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                    code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.UNAVAILABLE
                    raise RouterError(code, f"worker {self.worker_id} failed mid-stream: {exc.details()}") from exc
                failure = f"failed mid-stream ({exc.code().name}: {exc.details()})"
            if not failure:
                yield response
                continue
            await self._migrate(f"worker {self.worker_id} {failure}")

    async def _migrate(self, failure: str) -> None:
        """Resume on another worker from the tokens sent so far (``--migration-limit`` times at most)."""
        if self._resume is None or self.migrations >= self._migration_limit:
            raise RouterError(grpc.StatusCode.UNAVAILABLE, failure)
        self.migrations += 1
        log.warning("%s after %d tokens; resuming %s elsewhere (migration %d)", failure,
                    len(self.output_token_ids), self.request_id, self.migrations)  # fmt: skip
        self.worker.finish(self._worker_request_id)
        self._excluded.add(self.worker_id)
        self._use(await self._resume(list(self.output_token_ids), self._excluded, self.migrations))

    async def chunks(self) -> AsyncIterator[Chunk]:
        """Text deltas until the request finishes; closing early cancels it on the worker."""
        try:
            async for response in self._responses():
                token_ids = list(response.token_ids)
                self.output_token_ids += token_ids
                self._track_blocks()
                delta = self.trace.detokenize(self._text.push, token_ids)
                if self._text.stopped:
                    self.finish_reason = "stop"
                    self._call.cancel()
                    yield Chunk(delta, token_ids, "stop", list(response.logprobs))
                    return
                if response.finish_reason:
                    self.finish_reason = response.finish_reason
                    yield Chunk(delta + self._text.finish(), token_ids, response.finish_reason,
                                list(response.logprobs))  # fmt: skip
                    return
                yield Chunk(delta, token_ids, "", list(response.logprobs))
        finally:
            self.close()

    def _track_blocks(self) -> None:
        total = len(self.prompt_token_ids) + self.completion_tokens
        if self._worker_request_id in self.worker.inflight:
            self.worker.inflight[self._worker_request_id] = -(-total // self._block_size)

    def close(self) -> None:
        """Forget the request (and cancel it on the worker if it is still running)."""
        if not self._call.done():
            self._call.cancel()
        self.worker.finish(self._worker_request_id)
        self.trace.finish(request_id=self.request_id, finish_reason=self.finish_reason)
        if self.slot is not None:
            self.slot.release()


class RouterCore:
    def __init__(self, settings: RouterSettings, pool: WorkerPool, kv_index: KvIndexClient) -> None:
        self.settings = settings
        self.pool = pool
        self.kv_index = kv_index
        # kv mode's cost (fixed by the settings; a bad --cost-profile stops the router at start).
        self.kv_cost = KvCost.from_settings(settings)
        self.tokenizers = TokenizerCache()
        self.auth = FrontDoorAuth.from_settings(settings)
        self.admission = InflightLimit(settings.max_inflight_requests)
        self.migrations = 0  # streams resumed on another worker after they broke mid-way
        self._round_robin = RoundRobin()
        self._rng = random.Random()
        self.recent = RecentRequests()

    # -- the model -------------------------------------------------------------------------
    def resolve_model(self, requested: str) -> common_pb2.InstanceInfo:
        models = self.pool.models()
        if not models:
            raise RouterError(grpc.StatusCode.UNAVAILABLE, "no worker is registered yet; retry shortly")
        if not requested:
            if len(models) > 1:
                raise invalid(f"several models are served ({', '.join(sorted(models))}); name one", "model")
            return next(iter(models.values()))[0]
        for name, infos in models.items():
            if requested in (name, name.split("@", 1)[0], infos[0].model_spec):
                return infos[0]
        raise RouterError(
            grpc.StatusCode.NOT_FOUND,
            f"model {requested!r} is not served here; available: {', '.join(sorted(models))}",
            "model",
        )

    # -- the prompt ------------------------------------------------------------------------
    async def tokenize(self, request: GenerationInput, info: common_pb2.InstanceInfo) -> tuple[list[int], Tokenizer]:
        tokenizer = await self.tokenizers.get(info.model, info.model_spec)
        if request.token_ids is not None:
            return _checked_token_ids(request.token_ids, tokenizer.vocab_size), tokenizer
        if request.messages is not None:
            _check_messages(request.messages)
            text_size = sum(len(m["content"].encode()) for m in request.messages)
            self._check_size(text_size)
            try:
                tokens = await asyncio.to_thread(tokenizer.encode_chat, request.messages)
            except ValueError as exc:
                raise invalid(f"messages: {exc}", "messages") from exc
            return tokens, tokenizer
        if request.prompt is None:
            raise invalid("a prompt is required", "prompt")
        self._check_size(len(request.prompt.encode()))
        return await asyncio.to_thread(tokenizer.encode, request.prompt), tokenizer

    def _check_size(self, size: int) -> None:
        if size > self.settings.max_prompt_bytes:
            raise invalid(f"the prompt is {size} bytes; at most {self.settings.max_prompt_bytes} are accepted")

    # -- routing ---------------------------------------------------------------------------
    async def route(
        self, info: common_pb2.InstanceInfo, hashes: list[int], exclude: set[str], prompt_tokens: int = 0
    ) -> tuple[WorkerState, RouteInfo]:
        """``prompt_tokens`` (default: the full blocks of ``hashes``) prices the uncached tail."""
        block_size = info.block_size or 16
        prompt_tokens = max(prompt_tokens, len(hashes) * block_size, 1)
        decoders = [w for w in self.pool.candidates(info.model, ("decode",)) if w.worker_id not in exclude]
        if decoders:
            return await self._route_disaggregated(info, hashes, decoders, prompt_tokens)
        workers = [w for w in self.pool.candidates(info.model) if w.worker_id not in exclude]
        if not workers:
            raise RouterError(grpc.StatusCode.UNAVAILABLE, f"no live worker serves {info.model}")
        mode = self.settings.router_mode
        if mode == "round_robin":
            chosen = self._round_robin.choose([w.worker_id for w in workers])
            return self.pool.workers[chosen], RouteInfo(chosen, mode, 0, len(hashes))
        if mode == "random":
            worker = self._rng.choice(workers)
            return worker, RouteInfo(worker.worker_id, mode, 0, len(hashes))
        overlaps = await self.kv_index.find_overlaps(info.model, hashes)
        candidates = _candidates(workers, overlaps)
        decision = self.kv_cost.choose(candidates, prompt_tokens, block_size, self._rng)
        route_mode = "kv" if overlaps is not None else "kv-load-only"
        index = self._index_source(overlaps)
        peer = max((c for c in candidates if c.prefix_overlap > decision.prefix_overlap), default=None,
                   key=lambda c: c.prefix_overlap)  # fmt: skip
        return self.pool.workers[decision.worker_id], RouteInfo(
            decision.worker_id, route_mode, decision.prefix_overlap, len(hashes),
            runner_up_cost=decision.runner_up_cost, kv_peer=self.pool.workers[peer.worker_id] if peer else None,
            kv_peer_blocks=peer.prefix_overlap if peer else 0, index=index, prefill_s=decision.prefill_s,
        )

    def _index_source(self, overlaps: dict | None) -> str:
        if overlaps is None:
            return "none"
        return "local" if self.kv_index.following else "kvstore"

    async def _route_disaggregated(
        self, info: common_pb2.InstanceInfo, hashes: list[int], decoders: list[WorkerState], prompt_tokens: int
    ) -> tuple[WorkerState, RouteInfo]:
        """Decode worker by load then overlap; remote prefill only when worth a transfer."""
        overlaps = await self.kv_index.find_overlaps(info.model, hashes)
        index = self._index_source(overlaps)
        decode = choose_decode(_candidates(decoders, overlaps), len(hashes), self._rng)
        worker = self.pool.workers[decode.worker_id]
        block_size = info.block_size or 16
        uncached_tokens = (len(hashes) - decode.prefix_overlap) * block_size
        prefills = [w for w in self.pool.candidates(info.model, ("prefill",))
                    if w.waiting_requests < self.settings.prefill_queue_limit]  # fmt: skip
        if uncached_tokens < self.settings.max_local_prefill_tokens or not prefills:
            return worker, RouteInfo(worker.worker_id, "disagg-local", decode.prefix_overlap, len(hashes),
                                     runner_up_cost=decode.runner_up_cost, index=index)  # fmt: skip
        candidates = _candidates(prefills, overlaps)
        prefill = self.kv_cost.choose(candidates, prompt_tokens, block_size, self._rng)
        others = self.kv_cost.rank([c for c in candidates if c.worker_id != prefill.worker_id], prompt_tokens,
                                   block_size)  # fmt: skip
        route = RouteInfo(worker.worker_id, "disagg-remote", prefill.prefix_overlap, len(hashes),
                          self.pool.workers[prefill.worker_id], [self.pool.workers[w] for w in others],
                          prefill.runner_up_cost, index=index)  # fmt: skip
        return worker, route

    # -- the request -----------------------------------------------------------------------
    async def open(self, request: GenerationInput) -> Generation:
        """Admit (bounded in-flight count), then open; the slot is held until the generation closes."""
        trace = RouterRequestTrace(request, self.settings.router_mode, self.recent)
        slot: InflightSlot | None = None
        try:
            slot = self.admission.acquire()  # a refusal is a finished request too: traced and counted
            generation = await self._open(request, trace)
        except BaseException as exc:
            if slot is not None:
                slot.release()
            trace.finish(exc, request.request_id)
            raise
        generation.slot = slot
        return generation

    async def _open(self, request: GenerationInput, trace: RouterRequestTrace) -> Generation:
        check_input_limits(self.settings, request.messages, request.token_ids)
        info = self.resolve_model(request.model)
        with trace.phase("tokenize"):
            prompt, tokenizer = await self.tokenize(request, info)
        sampling = self._checked_sampling(request.sampling, len(prompt), info)
        request_id = request.request_id or f"req-{uuid.uuid4().hex}"
        block_size = info.block_size or 16
        hashes = block_hashes(prompt, block_size)
        worker_request = worker_pb2.WorkerGenerateRequest(
            request_id=request_id, model=info.model, token_ids=prompt, sampling=sampling
        )
        deadline = time.monotonic() + (request.timeout_s or self.settings.request_timeout_s)
        route, attempt = await self._start(info, worker_request, hashes, request.timeout_s, set(), trace)
        trace.first_response(attempt.first)

        async def resume(sent: list[int], exclude: set[str], migration: int) -> Attempt:
            continued = continuation_request(worker_request, sent, migration)
            self.migrations += 1
            _, attempt = await self._start(info, continued, block_hashes(list(continued.token_ids), block_size),
                                           deadline - time.monotonic(), exclude, trace)  # fmt: skip
            return attempt

        text = TextStream(tokenizer.detokenizer(prompt), list(sampling.stop))
        return Generation(request_id, info.model, prompt, attempt, text, route, block_size, trace, resume,
                          self.settings.migration_limit)  # fmt: skip

    async def _start(
        self, info: common_pb2.InstanceInfo, worker_request: worker_pb2.WorkerGenerateRequest, hashes: list[int],
        timeout_s: float | None, tried: set[str], trace: RouterRequestTrace,
    ) -> tuple[RouteInfo, Attempt]:
        """Route and open a worker stream until one produces its first response (plain retry
        elsewhere while nothing was sent); ``tried`` workers are skipped and grow with failures."""
        request_id = worker_request.request_id
        last_error = ""
        busy = False
        for _ in range(_MAX_ATTEMPTS):
            try:
                with trace.phase("route") as span:
                    worker, route = await self.route(info, hashes, tried, len(worker_request.token_ids))
                    trace.routed(span, route, len(worker_request.token_ids))
            except RouterError:
                if not tried:
                    raise
                break  # every worker was tried
            worker.inflight[request_id] = len(hashes) + 1
            worker.prefilling[request_id] = route.prefill_s
            call = self._call(worker, route, worker_request, timeout_s, trace.call_metadata())
            try:
                first = await read(call)
            except grpc.aio.AioRpcError as exc:
                worker.inflight.pop(request_id, None)
                if exc.code() not in _RETRIABLE:
                    raise RouterError(exc.code(), exc.details() or exc.code().name) from exc
                busy = busy or exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                tried.add(worker.worker_id)
                last_error = exc.details() or "unavailable"
                log.warning("worker %s refused before the first token (%s); retrying", worker.worker_id, last_error)
                continue
            finally:
                worker.prefilling.pop(request_id, None)
                if route.prefill_worker is not None:
                    route.prefill_worker.finish(request_id)
            if first is grpc.aio.EOF:
                worker.inflight.pop(request_id, None)
                tried.add(worker.worker_id)
                continue
            return route, Attempt(worker, call, first, request_id)
        if busy:
            raise exhausted(f"every worker is at its queue limit ({last_error}); retry shortly", 1.0)
        raise RouterError(grpc.StatusCode.UNAVAILABLE, f"no worker could take the request ({last_error})")

    def _call(
        self, worker: WorkerState, route: RouteInfo, request: worker_pb2.WorkerGenerateRequest,
        client_timeout_s: float | None, metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> grpc.aio.UnaryStreamCall:
        # The client's deadline travels on to the worker, which aborts the request (freeing its
        # blocks) when it passes, whether or not the router noticed the client leave.
        timeout = min(self.settings.request_timeout_s, client_timeout_s or self.settings.request_timeout_s)
        if worker.info.role != "decode":
            if route.kv_peer is not None:  # a copy: a migration resumes from the unhinted request
                hinted = worker_pb2.WorkerGenerateRequest()
                hinted.CopyFrom(request)
                hinted.kv_peer_address, hinted.kv_peer_blocks = route.kv_peer.info.address, route.kv_peer_blocks
                request = hinted
            return worker.stub.Generate(request, timeout=timeout, metadata=metadata)
        prefill_address = ""
        if route.prefill_worker is not None:
            # Counted on the prefill worker until the first token: that is its share of the work.
            route.prefill_worker.inflight[request.request_id] = route.prompt_blocks
            prefill_address = route.prefill_worker.info.address
        fallbacks = [w.info.address for w in route.fallback_prefill_workers]
        decode = worker_pb2.DecodeRequest(request=request, prefill_address=prefill_address,
                                          fallback_prefill_addresses=fallbacks)  # fmt: skip
        return worker.stub.Decode(decode, timeout=timeout, metadata=metadata)

    def _checked_sampling(
        self, sampling: common_pb2.SamplingParams, prompt_len: int, info: common_pb2.InstanceInfo
    ) -> common_pb2.SamplingParams:
        checked = common_pb2.SamplingParams()
        checked.CopyFrom(sampling)
        if prompt_len == 0:
            raise invalid("the prompt is empty", "prompt")
        context = info.max_model_len or 0
        if context and prompt_len >= context:
            raise invalid(f"the prompt has {prompt_len} tokens; this model's context is {context}", "prompt")
        remaining = context - prompt_len if context else DEFAULT_MAX_TOKENS
        if checked.max_tokens < 0:
            raise invalid(f"max_tokens must be positive, got {checked.max_tokens}", "max_tokens")
        if checked.max_tokens == 0:
            checked.max_tokens = min(remaining, DEFAULT_MAX_TOKENS, self.settings.max_output_tokens)
        elif context and checked.max_tokens > remaining:
            raise invalid(
                f"max_tokens {checked.max_tokens} + prompt {prompt_len} tokens exceeds the context of {context}",
                "max_tokens",
            )
        check_max_tokens(self.settings, checked.max_tokens)
        _check_sampling_ranges(checked)
        return checked


def _candidates(workers: list[WorkerState], overlaps: dict[str, PrefixOverlap] | None) -> list[Candidate]:
    return [candidate(w.worker_id, (overlaps or {}).get(w.worker_id), w.active_blocks, w.waiting_requests,
                      w.running_requests, w.queued_prefill_s) for w in workers]  # fmt: skip


def _check_sampling_ranges(sampling: common_pb2.SamplingParams) -> None:
    if sampling.temperature < 0 or sampling.temperature > 100:
        raise invalid(f"temperature must be in [0, 100], got {sampling.temperature}", "temperature")
    if not 0 <= sampling.top_p <= 1:
        raise invalid(f"top_p must be in (0, 1], got {sampling.top_p}", "top_p")
    if not 0 <= sampling.min_p <= 1:
        raise invalid(f"min_p must be in [0, 1], got {sampling.min_p}", "min_p")
    for name in ("frequency_penalty", "presence_penalty"):
        if not -2 <= getattr(sampling, name) <= 2:
            raise invalid(f"{name} must be in [-2, 2]", name)
    if sampling.repetition_penalty < 0:
        raise invalid("repetition_penalty must be > 0", "repetition_penalty")
    if not 0 <= sampling.logprobs <= 20:
        raise invalid("logprobs must be in [0, 20]", "logprobs")
    if len(sampling.stop) > 16 or any(not s or len(s) > 256 for s in sampling.stop):
        raise invalid("stop: at most 16 non-empty strings of at most 256 characters", "stop")


def _check_messages(messages: list[dict[str, str]]) -> None:
    if not messages:
        raise invalid("messages must not be empty", "messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise invalid(f"messages[{index}] must be an object", "messages")
        if message.get("role") not in CHAT_ROLES:
            raise invalid(
                f"messages[{index}].role must be one of {', '.join(CHAT_ROLES)}, got {message.get('role')!r}",
                "messages",
            )
        if not isinstance(message.get("content"), str):
            raise invalid(f"messages[{index}].content must be a string", "messages")
    if messages[-1]["role"] == "assistant" and len(messages) == 1:
        raise invalid("a conversation cannot start and end with an assistant message", "messages")


def _checked_token_ids(token_ids: list[int], vocab_size: int) -> list[int]:
    bad = [t for t in token_ids if not 0 <= t < vocab_size]
    if bad:
        raise invalid(f"token ids must be in [0, {vocab_size}); got {bad[:5]}", "prompt")
    return list(token_ids)
