"""Draining a worker without stopping it: the one primitive behind SIGTERM and role switches.

``drain`` takes the worker out of service in the order that loses no request: leave etcd
first (routers stop choosing it), refuse what still arrives with UNAVAILABLE (the router
retries elsewhere before any token was sent), let in-flight requests finish within the
deadline, then evict the rest with UNAVAILABLE (the router resumes them on another worker
from the tokens already sent, see ``router/migration.py``). ``resume`` puts it back, under
a new registration if its role changed. SIGTERM is ``drain`` then exit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from grpc_health.v1 import health_pb2

from kvmesh.grpc_service import ServiceProcess
from kvmesh_proto.v1 import common_pb2
from services.worker.servicer import WorkerServicer

log = logging.getLogger(__name__)

_POLL_S = 0.05


@dataclass(frozen=True)
class DrainResult:
    """How the requests in flight when the drain began ended."""

    finished: int  # on their own, within the deadline
    evicted: int  # still running at the deadline: ended with UNAVAILABLE, resumed elsewhere by the router
    seconds: float


class WorkerLifecycle:
    """Takes one worker process out of service and back, without restarting it."""

    def __init__(self, process: ServiceProcess, servicer: WorkerServicer) -> None:
        self._process = process
        self._servicer = servicer

    @property
    def draining(self) -> bool:
        return not self._servicer.accepting

    async def drain(self, timeout_s: float) -> DrainResult:
        """Deregister, refuse new requests, wait up to ``timeout_s`` for in-flight ones, evict the rest.

        Afterwards the worker holds no request and no router sends it any; the process,
        its engine and its KV cache stay up (``resume`` serves again). Idempotent.
        """
        started = time.monotonic()
        await self._process.deregister()
        self._servicer.accepting = False
        await self._process.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        in_flight = len(self._servicer.live)
        deadline = started + timeout_s
        while self._servicer.live and time.monotonic() < deadline:
            await asyncio.sleep(_POLL_S)
        evicted = await self._servicer.evict()  # all at once: one engine step boundary
        while self._servicer.live and time.monotonic() < deadline + 1.0:
            await asyncio.sleep(_POLL_S)  # the evicted streams close
        result = DrainResult(in_flight - evicted, evicted, time.monotonic() - started)
        log.info("drained in %.2fs: %d requests finished, %d evicted", result.seconds, result.finished,
                 result.evicted)  # fmt: skip
        return result

    async def resume(self, info: common_pb2.InstanceInfo) -> None:
        """Serve again and register ``info`` (e.g. with a new role) under a fresh lease."""
        self._servicer.accepting = True
        await self._process.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self._process.register(info)
