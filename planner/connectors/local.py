"""The ``local`` connector: the mesh of `kvmesh up` on this machine.

- switch: ``Worker.SwitchRole`` on the worker (drain, come back in the other role, re-register);
- add: a new worker process, started the way `kvmesh up` starts its workers
  (``LocalStack.add_worker``; it logs under ``<state-dir>/logs`` and dies with the planner);
- remove: SIGTERM to the worker's process (its pid is in its registration), which drains it
  first. A process hosting several workers (a mock fleet) is never signalled: that would stop
  them all.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
from pathlib import Path

from kvmesh.config import PlannerSettings
from kvmesh.discovery import Discovery
from kvmesh.grpc_service import mesh_channel
from kvmesh.launcher import LocalStack, StackOptions
from kvmesh_proto.v1 import worker_pb2, worker_pb2_grpc
from planner.policy import Decision

log = logging.getLogger(__name__)


class LocalConnector:
    def __init__(self, settings: PlannerSettings, discovery: Discovery) -> None:
        self._settings = settings
        self._discovery = discovery
        self._stack = LocalStack(StackOptions(
            workers=0, engine=settings.worker_engine, model=settings.worker_model, namespace=settings.namespace,
            etcd_endpoint=settings.etcd_endpoint, redis_url="unused", state_dir=Path(settings.state_dir),
            tls=bool(settings.tls_cert),
        ))  # fmt: skip
        self._stack.log_dir.mkdir(parents=True, exist_ok=True)
        self._added = 0

    async def apply(self, decision: Decision) -> None:
        if decision.action == "switch":
            # In parallel: each drains its own in-flight requests.
            await asyncio.gather(*(self._switch(worker_id, decision.role) for worker_id in decision.worker_ids))
        elif decision.action == "add":
            self._added += 1
            index = f"planned{os.getpid()}-{self._added}"
            instance_id = await asyncio.to_thread(self._stack.add_worker, decision.role, index)
            log.info("started %s worker %s", decision.role, instance_id)
        elif decision.action == "remove":
            for worker_id in decision.worker_ids:
                await self._remove(worker_id)
        else:
            raise ValueError(f"unknown action {decision.action!r}")

    async def _switch(self, worker_id: str, role: str) -> None:
        info = (await self._discovery.list("worker")).get(worker_id)
        if info is None:
            raise LookupError(f"worker {worker_id} is not registered")
        async with mesh_channel(info.address) as channel:
            reply = await worker_pb2_grpc.WorkerStub(channel).SwitchRole(
                worker_pb2.SwitchRoleRequest(role=role, drain_timeout_s=self._settings.switch_timeout_s),
                timeout=self._settings.switch_timeout_s + 30,
            )  # fmt: skip
        log.info("%s switched %s -> %s in %.2fs (%d finished, %d evicted)", worker_id, reply.previous_role,
                 reply.role, reply.seconds, reply.finished, reply.evicted)  # fmt: skip

    async def _remove(self, worker_id: str) -> None:
        workers = await self._discovery.list("worker")
        info = workers.get(worker_id)
        if info is None or not info.pid:
            raise LookupError(f"worker {worker_id} is not registered with a pid")
        sharing = [w for w in workers.values() if w.pid == info.pid and w.address.rpartition(":")[0]
                   == info.address.rpartition(":")[0]]  # fmt: skip
        if len(sharing) > 1:
            raise RuntimeError(f"worker {worker_id} shares process {info.pid} with {len(sharing) - 1} others")
        os.kill(info.pid, signal.SIGTERM)

    async def close(self) -> None:
        """Stop the workers this planner started."""
        await asyncio.to_thread(self._stack.stop_children)
        shutil.rmtree(self._stack.data_dir, ignore_errors=True)
