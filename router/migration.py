"""Request migration: a stream that breaks after tokens were sent resumes on another worker.

The new worker is given the prompt plus every token already sent to the client as its prompt,
and the remaining token budget, so the client's stream goes on with the next token: nothing
repeated, nothing missing. Under greedy sampling the continuation is the one the first worker
would have produced. (With sampling, the resumed part is a fresh sample; repetition and
frequency penalties then see the sent tokens as prompt.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc

from kvmesh.grpc_service import cancelled_from_outside
from kvmesh_proto.v1 import worker_pb2
from router.worker_pool import WorkerState

# A stream that broke with one of these is resumed elsewhere; any other status is the answer.
MIGRATABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
                        grpc.StatusCode.INTERNAL, grpc.StatusCode.ABORTED,
                        grpc.StatusCode.RESOURCE_EXHAUSTED})  # fmt: skip


async def read(call: grpc.aio.UnaryStreamCall) -> worker_pb2.WorkerGenerateResponse | object:
    """``call.read()``, where a call cancelled under the reader fails like a worker gone away.

    The worker pool closes the channel of a worker that left etcd once its streams end or a grace
    passes (``--worker-leave-grace-s``); past it gRPC cancels the calls still open, and a read raises
    CancelledError. Read as UNAVAILABLE, that stream is resumed (or, before its first token,
    retried) on another worker; as CancelledError it would end the router's own handler without a
    status, and the client's stream would hang."""
    try:
        return await call.read()
    except asyncio.CancelledError:
        if not cancelled_from_outside():
            raise  # the router's request itself was cancelled (its client left)
        raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                   "the worker's stream was cut: it left the mesh") from None  # fmt: skip


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
