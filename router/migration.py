"""Request migration: a stream that breaks after tokens were sent resumes on another worker.

The new worker is given the prompt plus every token already sent to the client as its prompt,
and the remaining token budget, so the client's stream goes on with the next token: nothing
repeated, nothing missing. Under greedy sampling the continuation is the one the first worker
would have produced. (With sampling, the resumed part is a fresh sample; repetition and
frequency penalties then see the sent tokens as prompt.)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc

from kvmesh_proto.v1 import worker_pb2
from router.worker_pool import WorkerState

# A stream that broke with one of these is resumed elsewhere; any other status is the answer.
MIGRATABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
                        grpc.StatusCode.INTERNAL, grpc.StatusCode.ABORTED,
                        grpc.StatusCode.RESOURCE_EXHAUSTED})  # fmt: skip


@dataclass
class Attempt:
    """A worker stream that has produced its first response."""

    worker: WorkerState
    call: grpc.aio.UnaryStreamCall
    first: worker_pb2.WorkerGenerateResponse
    request_id: str  # the id the worker knows the request by


# (tokens already sent, workers not to use, migration number) -> a stream on another worker
Resume = Callable[[list[int], set[str], int], Awaitable[Attempt]]


def continuation_request(original: worker_pb2.WorkerGenerateRequest, sent: list[int],
                         migration: int) -> worker_pb2.WorkerGenerateRequest:  # fmt: skip
    """The original request, its prompt extended by the tokens ``sent`` and its budget reduced.

    A new request id per migration: the broken worker may still hold the old one."""
    continued = worker_pb2.WorkerGenerateRequest()
    continued.CopyFrom(original)
    continued.request_id = f"{original.request_id}-m{migration}"
    continued.token_ids.extend(sent)
    continued.sampling.max_tokens = original.sampling.max_tokens - len(sent)
    return continued
