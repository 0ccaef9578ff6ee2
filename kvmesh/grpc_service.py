"""The life of a kvmesh gRPC process: serve, register, wait for a signal, drain, leave.

Every service's ``server.py`` only builds its servicers and hands them to
``ServiceProcess``; health, reflection, etcd registration and the shutdown order live
here once. Shutdown order matters: first deregister (routers stop sending new work),
then mark NOT_SERVING, then let in-flight streams finish within the drain deadline.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from kvmesh import tls
from kvmesh.config import ServiceSettings
from kvmesh.discovery import Discovery, EtcdAccess, Registration
from kvmesh.telemetry import setup_telemetry
from kvmesh_proto.v1 import common_pb2

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


# Services (and methods) only peers of the mesh may call (mTLS identity or mesh token, see kvmesh.tls).
MESH_ONLY_PREFIXES = ("/kvmesh.v1.KvTransfer/", "/kvmesh.v1.Worker/SwitchRole")


def mesh_channel(address: str, own_connection: bool = False) -> grpc.aio.Channel:
    """The one way services open channels to each other: same limits everywhere, and this
    process's TLS identity and mesh token when it has them. Channels to one address share a
    connection unless ``own_connection`` (parallel bulk streams want one each)."""
    config, interceptors = tls.active(), tls.channel_interceptors()
    options = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)] if own_connection else CHANNEL_OPTIONS
    if config is not None:
        return grpc.aio.secure_channel(address, config.channel_credentials(), options=options,
                                       interceptors=interceptors)  # fmt: skip
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)


def cancelled_from_outside() -> bool:
    """After an ``await`` raised CancelledError: True when this task was not the one cancelled.

    A gRPC client call cancelled under its reader (its channel closed, ``call.cancel()`` from
    elsewhere) and a sub-task someone else cancelled both raise CancelledError in the awaiting
    task. Let it escape a gRPC handler and the handler ends without a status: its client's stream
    never closes. Only a task cancelled itself (its caller went away) should let it propagate.
    """
    task = asyncio.current_task()
    return task is not None and not task.cancelling()


def tls_from_settings(settings: ServiceSettings) -> tls.TlsConfig | None:
    if not settings.tls_cert:
        return None
    return tls.TlsConfig.from_files(settings.tls_cert, settings.tls_key, settings.tls_ca, settings.tls_client_auth)


async def check_health(address: str, timeout_s: float = 1.0) -> bool:
    """True if the gRPC health service at ``address`` answers SERVING."""
    try:
        async with mesh_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
            return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.aio.AioRpcError:
        return False


class ServiceProcess:
    """A gRPC server with health, reflection and an etcd registration."""

    def __init__(self, settings: ServiceSettings, service_names: Sequence[str]) -> None:
        self.settings = settings
        role = getattr(settings, "role", "")
        self.telemetry = setup_telemetry(
            f"{settings.kind}-{role}" if role else settings.kind, settings.host, settings.metrics_port,
            settings.trace_exporter, settings.otlp_endpoint, settings.trace_sample_ratio,
            {"service.instance.id": settings.instance_id},
        )
        tls.configure(tls_from_settings(settings), settings.mesh_token)
        self.server = grpc.aio.server(options=CHANNEL_OPTIONS, interceptors=[tls.MeshPeerGuard(MESH_ONLY_PREFIXES)])
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], self.server)
        bind, config = f"{settings.host}:{settings.port}", tls.active()
        self.port = (self.server.add_secure_port(bind, config.server_credentials()) if config is not None
                     else self.server.add_insecure_port(bind))  # fmt: skip
        if self.port == 0:
            raise RuntimeError(f"cannot bind {settings.host}:{settings.port}")
        self.discovery = Discovery(settings.etcd_endpoint, settings.namespace, EtcdAccess.from_settings(settings))
        self.registration: Registration | None = None
        self._stop = asyncio.Event()
        self._on_drain: list[Callable[[], Awaitable[None]]] = []

    @property
    def address(self) -> str:
        return f"{self.settings.public_host}:{self.port}"

    def instance_info(self, **fields: object) -> common_pb2.InstanceInfo:
        return common_pb2.InstanceInfo(
            instance_id=self.settings.instance_id,
            kind=self.settings.kind,
            address=self.address,
            started_unix_ms=int(time.time() * 1000),
            pid=os.getpid(),
            metrics_port=self.telemetry.metrics_port,
            **fields,
        )

    def on_drain(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run ``callback`` after deregistering, before the server stops."""
        self._on_drain.append(callback)

    def request_stop(self) -> None:
        self._stop.set()

    async def start(self, info: common_pb2.InstanceInfo) -> None:
        await self.server.start()
        await self.register(info)
        log.info("%s %s serving on %s", info.kind, info.instance_id, self.address)

    async def register(self, info: common_pb2.InstanceInfo) -> None:
        """Put this instance in etcd (again, after ``deregister``) under a fresh lease."""
        await self.deregister()
        self.registration = await self.discovery.register(info, self.settings.lease_ttl_s)

    async def deregister(self) -> None:
        """Leave etcd now (routers stop choosing this instance); serving goes on."""
        if self.registration is not None:
            registration, self.registration = self.registration, None
            await registration.close()

    async def wait_for_signal(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        await self._stop.wait()
        log.info("shutting down: deregistering, then draining for up to %ss", self.settings.drain_timeout_s)

    async def shutdown(self) -> None:
        await self.deregister()
        await self.health.enter_graceful_shutdown()
        for callback in self._on_drain:
            try:
                await callback()
            except Exception:
                log.exception("drain callback failed")
        await self.server.stop(self.settings.drain_timeout_s)
        await self.discovery.close()
        await asyncio.to_thread(self.telemetry.shutdown)

    async def run_until_signal(self, info: common_pb2.InstanceInfo) -> None:
        await self.start(info)
        try:
            await self.wait_for_signal()
        finally:
            await self.shutdown()
