"""The router's gRPC front door (used by the kvmesh SDK)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from kvmesh_proto.v1 import router_pb2, router_pb2_grpc
from router.auth import grpc_authorization
from router.errors import RouterError, invalid, retry_after_header
from router.pipeline import GenerationInput, RouterCore


async def abort_with(context: grpc.aio.ServicerContext, exc: RouterError) -> None:
    """End the call with the error's status; a back-off hint travels as ``retry-after`` metadata."""
    trailing = () if exc.retry_after_s is None else (("retry-after", retry_after_header(exc.retry_after_s)),)
    await context.abort(exc.code, exc.message, trailing_metadata=trailing)


def generation_input(request: router_pb2.GenerateRequest, timeout_s: float | None = None) -> GenerationInput:
    kind = request.WhichOneof("input")
    if kind is None:
        raise invalid("one of prompt, chat or tokens is required", "input")
    return GenerationInput(
        model=request.model,
        prompt=request.prompt if kind == "prompt" else None,
        messages=[{"role": m.role, "content": m.content} for m in request.chat.messages] if kind == "chat" else None,
        token_ids=list(request.tokens.token_ids) if kind == "tokens" else None,
        sampling=request.sampling,
        request_id=request.request_id,
        timeout_s=timeout_s,
    )


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, core: RouterCore) -> None:
        self.core = core

    async def Generate(
        self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.GenerateResponse]:
        try:
            self.core.auth.admit(grpc_authorization(context))
            generation = await self.core.open(generation_input(request, context.time_remaining()))
            await context.send_initial_metadata((("x-kvmesh-worker", generation.worker_id),))
            async for chunk in generation.chunks():
                yield router_pb2.GenerateResponse(
                    request_id=generation.request_id,
                    text=chunk.text,
                    token_ids=chunk.token_ids,
                    finish_reason=chunk.finish_reason,
                    logprobs=chunk.logprobs,
                    usage=generation.usage() if chunk.finish_reason else None,
                    worker_id=generation.worker_id,
                )
        except RouterError as exc:
            await abort_with(context, exc)

    async def _authenticate(self, context: grpc.aio.ServicerContext) -> None:
        try:
            self.core.auth.admit(grpc_authorization(context), rate_limited=False)
        except RouterError as exc:
            await abort_with(context, exc)

    async def ListModels(
        self, request: router_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ListModelsResponse:
        await self._authenticate(context)
        return router_pb2.ListModelsResponse(
            models=[
                router_pb2.ModelCard(name=name, workers=len(infos), block_size=infos[0].block_size)
                for name, infos in sorted(self.core.pool.models().items())
            ]
        )

    async def Status(
        self, request: router_pb2.StatusRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.StatusResponse:
        await self._authenticate(context)
        workers = []
        for state in sorted(self.core.pool.workers.values(), key=lambda s: s.worker_id):
            stats = state.stats
            workers.append(
                router_pb2.WorkerStatus(
                    worker_id=state.worker_id,
                    address=state.info.address,
                    role=state.info.role,
                    model=state.info.model,
                    running_requests=stats.running_requests if stats else 0,
                    waiting_requests=stats.waiting_requests if stats else 0,
                    kv_blocks_used=stats.kv_blocks_used if stats else 0,
                    kv_blocks_total=stats.kv_blocks_total if stats else 0,
                    inflight_assignments=len(state.inflight),
                )
            )
        return router_pb2.StatusResponse(
            router_mode=self.core.settings.router_mode,
            workers=workers,
            kvstore_available=self.core.kv_index.available,
            migrations=self.core.migrations,
            kv_routing_degraded_reason=self.core.kv_index.degraded_reason,
        )
