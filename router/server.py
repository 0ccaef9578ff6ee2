"""Router process wiring: the worker pool, the kvstore client, the gRPC service and the
OpenAI HTTP API, all on one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator, Sequence

import uvicorn

from kvmesh.config import RouterSettings, load_settings
from kvmesh.grpc_service import ServiceProcess
from kvmesh.logging_setup import setup_logging
from kvmesh_proto.v1 import router_pb2, router_pb2_grpc
from router.grpc_api import RouterServicer
from router.kv_index import KvIndexClient
from router.openai_api import create_app
from router.pipeline import RouterCore
from router.worker_pool import WorkerPool

log = logging.getLogger(__name__)

SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: the ServiceProcess owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve(settings: RouterSettings) -> None:
    process = ServiceProcess(settings, [SERVICE_NAME])
    pool = WorkerPool(process.discovery, leave_grace_s=settings.worker_leave_grace_s)
    kv_index = KvIndexClient(process.discovery, settings.kvstore_timeout_ms, follow=settings.kv_index == "follow")
    core = RouterCore(settings, pool, kv_index)
    router_pb2_grpc.add_RouterServicer_to_server(RouterServicer(core), process.server)

    http_server: _EmbeddedUvicorn | None = None
    http_task: asyncio.Task | None = None
    http_address = ""
    if settings.http_port >= 0:
        config = uvicorn.Config(create_app(core), host=settings.host, port=settings.http_port,
                                log_level="warning", lifespan="off", timeout_graceful_shutdown=5)  # fmt: skip
        http_server = _EmbeddedUvicorn(config)
        http_task = asyncio.create_task(http_server.serve(), name="http")
        while not http_server.started:
            if http_task.done():
                http_task.result()  # raises the bind error
            await asyncio.sleep(0.02)
        port = http_server.servers[0].sockets[0].getsockname()[1]
        http_address = f"{settings.public_host}:{port}"
    try:
        await pool.start()
        await kv_index.start()
        await process.start(process.instance_info(http_address=http_address))
        log.info("router mode %s; OpenAI API on http://%s/v1", settings.router_mode, http_address)
        await process.wait_for_signal()
    finally:
        if http_server is not None:
            http_server.should_exit = True
            await http_task
        await process.shutdown()
        await kv_index.stop()
        await pool.stop()


def main(argv: Sequence[str] | None = None) -> None:
    settings = load_settings(RouterSettings, argv, prog="kvmesh router")
    setup_logging(settings.log_level, "router")
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
