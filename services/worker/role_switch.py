"""A worker changing role without restarting (the planner's ``Worker.SwitchRole``): drain with the
one drain primitive (``lifecycle.py``), take the new role, register again under it.

The engine, its KV cache and the gRPC server stay up throughout, so a switch costs the drain
(in-flight requests finishing) plus one etcd registration, not a process start. Switches are
serialized: a second request waits for the first and then finds the role already taken.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from kvmesh_proto.v1 import common_pb2, worker_pb2
from services.worker import metrics
from services.worker.lifecycle import WorkerLifecycle
from services.worker.servicer import WorkerServicer

log = logging.getLogger(__name__)


class RoleSwitch:
    def __init__(self, lifecycle: WorkerLifecycle, servicer: WorkerServicer,
                 registration: Callable[[str], common_pb2.InstanceInfo], default_timeout_s: float) -> None:  # fmt: skip
        """``registration(role)`` is the InstanceInfo the worker registers with in ``role``."""
        self._lifecycle = lifecycle
        self._servicer = servicer
        self._registration = registration
        self._default_timeout_s = default_timeout_s
        self._lock = asyncio.Lock()

    async def switch(self, role: str, timeout_s: float = 0.0) -> worker_pb2.SwitchRoleResponse:
        async with self._lock:
            previous = self._servicer.role
            if role == previous:
                return worker_pb2.SwitchRoleResponse(previous_role=previous, role=role)
            result = await self._lifecycle.drain(timeout_s or self._default_timeout_s)
            self._servicer.role = role
            metrics.INFO.labels(self._servicer.worker_id, previous, self._servicer.model_id).set(0)
            metrics.INFO.labels(self._servicer.worker_id, role, self._servicer.model_id).set(1)
            await self._lifecycle.resume(self._registration(role))
            log.info("switched %s -> %s: out of service %.2fs, %d requests finished, %d evicted", previous, role,
                     result.seconds, result.finished, result.evicted)  # fmt: skip
            return worker_pb2.SwitchRoleResponse(previous_role=previous, role=role, finished=result.finished,
                                                 evicted=result.evicted, seconds=result.seconds)  # fmt: skip
