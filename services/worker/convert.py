"""Between the wire (protobuf) and the engine's own dataclasses; the engine never sees protobuf."""

from __future__ import annotations

from kvmesh_proto.v1 import common_pb2, kvstore_pb2, worker_pb2
from services.engine.kv_events import AllCleared, BlockRemoved, BlockStored, KvEvent
from services.engine.outputs import RequestOutput
from services.engine.sampling_params import SamplingParams


def sampling_from_proto(sampling: common_pb2.SamplingParams) -> SamplingParams:
    """Proto zero values mean "default" (top_p 0 → 1, top_k 0 → off, repetition_penalty 0 → 1).

    Raises ValueError (→ INVALID_ARGUMENT) for values the engine refuses.
    """
    return SamplingParams(
        temperature=sampling.temperature,
        top_p=sampling.top_p or 1.0,
        top_k=sampling.top_k if sampling.top_k > 0 else -1,
        min_p=sampling.min_p,
        repetition_penalty=sampling.repetition_penalty or 1.0,
        frequency_penalty=sampling.frequency_penalty,
        presence_penalty=sampling.presence_penalty,
        seed=sampling.seed if sampling.HasField("seed") else None,
        max_tokens=sampling.max_tokens,
        stop=list(sampling.stop),
        stop_token_ids=list(sampling.stop_token_ids),
        logprobs=sampling.logprobs,
        ignore_eos=sampling.ignore_eos,
    )


def output_to_proto(output: RequestOutput, elapsed_s: float) -> worker_pb2.WorkerGenerateResponse:
    response = worker_pb2.WorkerGenerateResponse(
        request_id=output.request_id,
        token_ids=output.new_token_ids,
        finish_reason=output.finish_reason or "",
        cached_tokens=output.num_cached_tokens,
        worker_time_s=elapsed_s,
        logprobs=[
            common_pb2.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob, top_token_ids=lp.top_token_ids,
                                    top_logprobs=lp.top_logprobs)
            for lp in output.logprobs or []
        ],
    )
    if output.queue_s is not None:
        response.timings.CopyFrom(worker_pb2.WorkerTimings(queue_s=output.queue_s,
                                                           prefill_s=max(elapsed_s - output.queue_s, 0.0)))
    if output.finished:
        response.usage.CopyFrom(
            common_pb2.Usage(prompt_tokens=output.num_prompt_tokens, completion_tokens=output.num_output_tokens,
                             cached_tokens=output.num_cached_tokens)
        )
    return response


def event_to_proto(event: KvEvent) -> kvstore_pb2.KvEvent:
    if isinstance(event, BlockStored):
        stored = kvstore_pb2.BlockStored(block_hashes=event.block_hashes, tier=event.tier)
        if event.parent_hash is not None:
            stored.parent_hash = event.parent_hash
        return kvstore_pb2.KvEvent(stored=stored)
    if isinstance(event, BlockRemoved):
        return kvstore_pb2.KvEvent(removed=kvstore_pb2.BlockRemoved(block_hashes=event.block_hashes, tier=event.tier))
    if isinstance(event, AllCleared):
        return kvstore_pb2.KvEvent(cleared=kvstore_pb2.AllCleared())
    raise TypeError(f"not a KV event: {event!r}")
