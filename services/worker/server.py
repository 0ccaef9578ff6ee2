"""Worker process wiring: load the engine, serve the Worker service, publish KV events,
register in etcd; on SIGTERM drain (``lifecycle.py``): deregister first, then let in-flight
requests finish within ``--drain-timeout-s``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

from kvmesh.config import SCRATCH_DISK_CACHE_ROOT, WorkerSettings, load_settings
from kvmesh.grpc_service import ServiceProcess
from kvmesh.logging_setup import setup_logging
from kvmesh_proto.v1 import common_pb2, transfer_pb2, worker_pb2, worker_pb2_grpc
from services.engine.async_engine import AsyncEngine
from services.engine.config import DEFAULT_MODEL, EngineConfig
from services.engine.llm_engine import Engine
from services.worker import metrics
from services.worker.kv_publisher import KvEventPublisher
from services.worker.kv_wire import add_transfer_servicer, keep_transfer_buffers
from services.worker.lifecycle import WorkerLifecycle
from services.worker.peer_fetch import PeerFetcher
from services.worker.role_switch import RoleSwitch
from services.worker.scratch_dir import ScratchDir, sweep_dead
from services.worker.servicer import WorkerServicer
from services.worker.transfer_servicer import KvTransferServicer, TransferSender

log = logging.getLogger(__name__)

SERVICE_NAMES = [
    worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name,
    transfer_pb2.DESCRIPTOR.services_by_name["KvTransfer"].full_name,
]


def engine_config(settings: WorkerSettings) -> EngineConfig:
    extra: dict[str, int] = {}
    if settings.kv_cache_blocks:
        extra["num_kv_blocks"] = settings.kv_cache_blocks
    if settings.max_num_seqs:
        extra["max_num_seqs"] = settings.max_num_seqs
    if settings.max_model_len:
        extra["max_model_len"] = settings.max_model_len
    if settings.num_threads:
        extra["num_threads"] = settings.num_threads
    elif settings.engine == "mock":
        extra["num_threads"] = 1  # it only fills small tensors: more threads would just contend
    return EngineConfig(model=settings.model or DEFAULT_MODEL, dtype=settings.dtype, device=settings.device,
                        block_size=settings.block_size, engine=settings.engine, mock_profile=settings.mock_profile,
                        host_cache_bytes=int(settings.host_cache_gb * 2**30),
                        disk_cache_bytes=int(settings.disk_cache_gb * 2**30), disk_cache_dir=settings.disk_cache_dir,
                        **extra)  # type: ignore[arg-type]


def build_engine(settings: WorkerSettings) -> Engine:
    return Engine(engine_config(settings))


async def serve(settings: WorkerSettings) -> None:
    keep_transfer_buffers()
    sweep_dead(Path(SCRATCH_DISK_CACHE_ROOT))
    scratch = ScratchDir(Path(settings.disk_cache_dir)) if settings.disk_cache_is_scratch else None
    engine = await asyncio.to_thread(build_engine, settings)
    async_engine = AsyncEngine(engine)
    process = ServiceProcess(settings, SERVICE_NAMES)
    peers = PeerFetcher(async_engine, settings.block_size, settings.transfer_timeout_s,
                        settings.peer_transfer_ms_per_block / 1000, settings.prefill_ms_per_block / 1000)
    servicer = WorkerServicer(async_engine, settings.instance_id, settings.role, settings.stats_interval_ms,
                              settings.transfer_timeout_s, settings.max_waiting_requests,
                              peers if settings.peer_fetch else None, settings.transfer_streams,
                              settings.transfer_transport == "tcp" and not settings.tls_cert)  # fmt: skip
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, process.server)
    lifecycle = WorkerLifecycle(process, servicer)
    process.on_drain(lambda: lifecycle.drain(settings.drain_timeout_s))
    # KV sent over plain TCP connections on request, unless that port is off or the mesh runs TLS.
    offers_tcp = settings.transfer_port >= 0 and not settings.tls_cert
    sender = TransferSender(settings.host, settings.transfer_port) if offers_tcp else TransferSender()
    add_transfer_servicer(KvTransferServicer(async_engine, settings.prefill_chunk_tokens, sender), process.server)
    publisher = KvEventPublisher(process.discovery, settings.instance_id, engine.model_id, async_engine,
                                 settings.event_flush_ms)  # fmt: skip
    engine.set_kv_event_callback(publisher.on_engine_events)

    def registration(role: str) -> common_pb2.InstanceInfo:
        return process.instance_info(
            role=role, model=engine.model_id, model_spec=settings.model or DEFAULT_MODEL,
            block_size=settings.block_size, capabilities=["kv_events", "kv_transfer", "switch_role"],
            engine=settings.engine, capacity_blocks=engine.stats().blocks_total, max_model_len=engine.max_model_len,
        )  # fmt: skip

    servicer.role_switch = RoleSwitch(lifecycle, servicer, registration, settings.drain_timeout_s)
    info = registration(settings.role)
    metrics.INFO.labels(settings.instance_id, settings.role, engine.model_id).set(1)
    try:
        await publisher.start()
        if sender.tcp is not None:
            sender.tcp.start()
        await process.run_until_signal(info)
    finally:
        await publisher.stop()
        if sender.tcp is not None:
            await sender.tcp.close(settings.drain_timeout_s)  # lets data connections still sending finish
        async_engine.shutdown()
        if scratch is not None:
            scratch.remove()


def main(argv: Sequence[str] | None = None) -> None:
    settings = load_settings(WorkerSettings, argv, prog="kvmesh worker")
    setup_logging(settings.log_level, f"worker[{settings.role}]")
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
