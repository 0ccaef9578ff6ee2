"""The kvmesh client SDK: ``Client`` and its asyncio twin ``AsyncClient``, over the router's gRPC API.

    import kvmesh
    with kvmesh.Client("127.0.0.1:50051") as client:
        print(client.generate(messages=[{"role": "user", "content": "Hi"}], max_tokens=32).text)

A request that fails with UNAVAILABLE before its first token is retried (another worker
may take it); once tokens have flowed, errors surface to the caller.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import grpc

from kvmesh_proto.v1 import common_pb2, router_pb2, router_pb2_grpc

_SAMPLING_FIELDS = {f.name for f in common_pb2.SamplingParams.DESCRIPTOR.fields}


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass
class StreamChunk:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    worker_id: str
    request_id: str
    usage: Usage | None = None


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    worker_id: str
    request_id: str
    usage: Usage = field(default_factory=Usage)


def build_request(
    prompt: str | None = None,
    messages: list[dict[str, str]] | None = None,
    token_ids: list[int] | None = None,
    model: str = "",
    request_id: str = "",
    **sampling: object,
) -> router_pb2.GenerateRequest:
    """One GenerateRequest from exactly one of prompt / messages / token_ids, plus sampling kwargs."""
    if sum(x is not None for x in (prompt, messages, token_ids)) != 1:
        raise ValueError("give exactly one of prompt, messages or token_ids")
    unknown = set(sampling) - _SAMPLING_FIELDS
    if unknown:
        raise TypeError(f"unknown sampling parameters: {', '.join(sorted(unknown))}")
    if isinstance(sampling.get("stop"), str):
        sampling["stop"] = [sampling["stop"]]
    request = router_pb2.GenerateRequest(model=model, request_id=request_id,
                                         sampling=common_pb2.SamplingParams(**sampling))  # type: ignore[arg-type]
    if prompt is not None:
        request.prompt = prompt
    elif messages is not None:
        request.chat.messages.extend(router_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
    else:
        request.tokens.token_ids.extend(token_ids or [])
    return request


def _chunk(response: router_pb2.GenerateResponse) -> StreamChunk:
    usage = None
    if response.HasField("usage"):
        u = response.usage
        usage = Usage(u.prompt_tokens, u.completion_tokens, u.cached_tokens)
    return StreamChunk(response.text, list(response.token_ids), response.finish_reason or None,
                       response.worker_id, response.request_id, usage)


def _collect(chunks: list[StreamChunk]) -> Completion:
    last = chunks[-1]
    return Completion(
        text="".join(c.text for c in chunks),
        token_ids=[t for c in chunks for t in c.token_ids],
        finish_reason=last.finish_reason,
        worker_id=last.worker_id,
        request_id=last.request_id,
        usage=last.usage or Usage(),
    )


def _channel_credentials(root_certificates: bytes | None, private_key: bytes | None,
                         certificate_chain: bytes | None) -> grpc.ChannelCredentials:  # fmt: skip
    """TLS to the router; with a key and certificate also mutual TLS (a router run with --tls-ca)."""
    return grpc.ssl_channel_credentials(root_certificates=root_certificates, private_key=private_key,
                                        certificate_chain=certificate_chain)  # fmt: skip


def _auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...] | None:
    """The router's API-key metadata (``authorization: Bearer KEY``), sent with every call."""
    return (("authorization", f"Bearer {api_key}"),) if api_key else None


class Client:
    """Blocking client of a kvmesh router."""

    def __init__(self, address: str = "127.0.0.1:50051", *, timeout: float = 600.0, retries: int = 2,
                 tls: bool = False, root_certificates: bytes | None = None, api_key: str | None = None,
                 private_key: bytes | None = None, certificate_chain: bytes | None = None) -> None:  # fmt: skip
        credentials = _channel_credentials(root_certificates, private_key, certificate_chain)
        self._channel = grpc.secure_channel(address, credentials) if tls else grpc.insecure_channel(address)
        self._stub = router_pb2_grpc.RouterStub(self._channel)
        self.timeout = timeout
        self.retries = retries
        self._metadata = _auth_metadata(api_key)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def stream(self, prompt: str | None = None, **kwargs: object) -> Iterator[StreamChunk]:
        request = build_request(prompt, **kwargs)  # type: ignore[arg-type]
        for attempt in range(self.retries + 1):
            call = self._stub.Generate(request, timeout=self.timeout, metadata=self._metadata)
            try:
                first = next(call)
            except StopIteration:
                return
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE and attempt < self.retries:
                    time.sleep(0.2 * (attempt + 1))
                    continue
                raise
            yield _chunk(first)
            try:
                for response in call:
                    yield _chunk(response)
            finally:
                call.cancel()
            return

    def generate(self, prompt: str | None = None, **kwargs: object) -> Completion:
        return _collect(list(self.stream(prompt, **kwargs)))

    def models(self) -> list[str]:
        return [m.name for m in self._stub.ListModels(router_pb2.ListModelsRequest(), timeout=self.timeout,
                                            metadata=self._metadata).models]


class AsyncClient:
    """asyncio twin of ``Client``."""

    def __init__(self, address: str = "127.0.0.1:50051", *, timeout: float = 600.0, retries: int = 2,
                 tls: bool = False, root_certificates: bytes | None = None, api_key: str | None = None,
                 private_key: bytes | None = None, certificate_chain: bytes | None = None) -> None:  # fmt: skip
        credentials = _channel_credentials(root_certificates, private_key, certificate_chain)
        self._channel = grpc.aio.secure_channel(address, credentials) if tls else grpc.aio.insecure_channel(address)
        self._stub = router_pb2_grpc.RouterStub(self._channel)
        self.timeout = timeout
        self.retries = retries
        self._metadata = _auth_metadata(api_key)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def stream(self, prompt: str | None = None, **kwargs: object) -> AsyncIterator[StreamChunk]:
        request = build_request(prompt, **kwargs)  # type: ignore[arg-type]
        for attempt in range(self.retries + 1):
            call = self._stub.Generate(request, timeout=self.timeout, metadata=self._metadata)
            try:
                first = await call.read()
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE and attempt < self.retries:
                    await asyncio.sleep(0.2 * (attempt + 1))
                    continue
                raise
            if first is grpc.aio.EOF:
                return
            yield _chunk(first)
            try:
                while (response := await call.read()) is not grpc.aio.EOF:
                    yield _chunk(response)
            finally:
                call.cancel()
            return

    async def generate(self, prompt: str | None = None, **kwargs: object) -> Completion:
        return _collect([chunk async for chunk in self.stream(prompt, **kwargs)])

    async def models(self) -> list[str]:
        reply = await self._stub.ListModels(router_pb2.ListModelsRequest(), timeout=self.timeout,
                                            metadata=self._metadata)
        return [m.name for m in reply.models]
