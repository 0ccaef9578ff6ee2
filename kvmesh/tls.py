"""TLS, mutual TLS and the mesh-peer check for every gRPC hop of a process.

A process has one identity, so TLS is configured once per process (``configure``, from its
settings) and every server port and channel the process opens uses it: the ``grpc_service``
helpers read ``active()``, so no call site has to pass certificates around.

Mesh-only endpoints (the KV transfer service) accept only peers of the mesh: with mutual
TLS, a certificate whose common name is a mesh service (``kvmesh-worker``, ...); without TLS,
the shared ``mesh_token`` in the ``x-kvmesh-mesh-token`` metadata, when one is set.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from kvmesh.certs import CA_FILE, cert_paths, common_name

MESH_TOKEN_HEADER = "x-kvmesh-mesh-token"
MESH_PEERS = frozenset(common_name(s).encode() for s in ("router", "worker", "kvstore"))


@dataclass(frozen=True)
class TlsConfig:
    """PEM bytes of this process's certificate, its key and the CA it trusts."""

    cert: bytes
    key: bytes
    ca: bytes
    client_auth: bool = True

    @classmethod
    def from_files(cls, cert: str | Path, key: str | Path, ca: str | Path, client_auth: bool = True) -> TlsConfig:
        return cls(Path(cert).read_bytes(), Path(key).read_bytes(), Path(ca).read_bytes(), client_auth)

    @classmethod
    def for_service(cls, cert_dir: str | Path, service: str) -> TlsConfig:
        """The files ``kvmesh certs`` wrote for ``service`` (router, worker, kvstore or client)."""
        cert, key = cert_paths(Path(cert_dir), service)
        return cls.from_files(cert, key, Path(cert_dir) / CA_FILE)

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca,
                                           require_client_auth=self.client_auth)  # fmt: skip

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)  # fmt: skip


@dataclass
class _ProcessSecurity:
    tls: TlsConfig | None = None
    mesh_token: str = ""


_process = _ProcessSecurity()


def configure(tls: TlsConfig | None, mesh_token: str = "") -> None:
    """Set this process's TLS identity (None = plaintext) and the mesh token it sends and expects."""
    _process.tls = tls
    _process.mesh_token = mesh_token


def active() -> TlsConfig | None:
    return _process.tls


def mesh_token() -> str:
    return _process.mesh_token


def metadata_value(metadata: Any, key: str) -> str:
    """One gRPC metadata value as text ("" when absent)."""
    for k, v in metadata or ():
        if k == key:
            return v if isinstance(v, str) else v.decode(errors="replace")
    return ""


async def check_mesh_peer(context: grpc.aio.ServicerContext) -> None:
    """Abort with PERMISSION_DENIED unless the caller is a peer of the mesh."""
    tls = active()
    if tls is not None and tls.client_auth:
        names = context.auth_context().get("x509_common_name", [])
        if not any(name in MESH_PEERS for name in names):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"only mesh services may call this; certificate names {names!r}")  # fmt: skip
        return
    token = mesh_token()
    offered = metadata_value(context.invocation_metadata(), MESH_TOKEN_HEADER)
    if token and not hmac.compare_digest(offered.encode(), token.encode()):
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "a valid mesh token is required")


class MeshPeerGuard(grpc.aio.ServerInterceptor):
    """Runs ``check_mesh_peer`` before every method whose name starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        self._prefixes = prefixes

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self._prefixes):
            return handler
        if handler.response_streaming:
            stream_kind = "stream_stream" if handler.request_streaming else "unary_stream"
            inner_stream = getattr(handler, stream_kind)

            async def guarded_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await check_mesh_peer(context)
                async for item in inner_stream(request, context):
                    yield item

            return handler._replace(**{stream_kind: guarded_stream})
        kind = "stream_unary" if handler.request_streaming else "unary_unary"
        inner = getattr(handler, kind)

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await check_mesh_peer(context)
            return await inner(request, context)

        return handler._replace(**{kind: guarded})


class _MeshTokenInterceptor(grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor,
                            grpc.aio.StreamUnaryClientInterceptor, grpc.aio.StreamStreamClientInterceptor):
    """Adds the mesh token to every call of a mesh channel (it is what mesh-only endpoints check)."""

    def __init__(self, token: str) -> None:
        self._token = token

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), (MESH_TOKEN_HEADER, self._token))
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                          details.wait_for_ready)  # fmt: skip

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)

    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(details), request_iterator)

    async def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(details), request_iterator)


def channel_interceptors() -> list[Any]:
    return [_MeshTokenInterceptor(mesh_token())] if mesh_token() else []
