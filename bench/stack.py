"""A throwaway local stack for benchmarks: its own etcd and Redis, N workers, one router per mode."""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import grpc

from bench.replay import live_workers
from kvmesh.launcher import LocalStack, StackOptions
from kvmesh.local_stores import free_port
from kvmesh_proto.v1 import common_pb2, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc


class BenchStack:
    def __init__(self, workers: int, modes: list[str], worker_env: dict[str, str] | None = None,
                 prefill: int = 0, decode: int = 0, engine: str = "real", state_dir: Path | None = None,
                 ready_timeout_s: float = 300.0, fleet_size: int = 1) -> None:  # fmt: skip
        """``fleet_size`` > 1 (mock engine only) runs the workers that many to a process."""
        self.namespace = f"bench{uuid.uuid4().hex[:6]}"
        self.stack = LocalStack(StackOptions(workers=workers, prefill=prefill, decode=decode, engine=engine,
                                             namespace=self.namespace, grpc_port=free_port(), http_port=free_port(),
                                             router_mode=modes[0], worker_env=worker_env or {},
                                             ready_timeout_s=ready_timeout_s, mock_fleet_size=fleet_size,
                                             state_dir=state_dir
                                             or Path(tempfile.mkdtemp(prefix="kvmesh-bench-"))))  # fmt: skip
        self.modes = modes
        self.http: dict[str, str] = {}
        self.grpc: dict[str, str] = {}
        self.workers = self.stack.options.workers + prefill + decode

    def __enter__(self) -> BenchStack:
        stack = self.stack
        stack.start_stores()
        stack.start_services()
        self.http[self.modes[0]] = f"http://127.0.0.1:{stack.options.http_port}"
        self.grpc[self.modes[0]] = f"127.0.0.1:{stack.options.grpc_port}"
        for mode in self.modes[1:]:
            http_port, grpc_port = free_port(), free_port()
            stack.add_router(f"router-{mode}", mode, grpc_port, http_port)
            self.http[mode], self.grpc[mode] = f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"
        stack.wait_healthy()
        for url in self.http.values():
            stack.wait_router_workers(url, self.workers)
        return self


    def __exit__(self, *exc: object) -> None:
        self.stack.stop()

    def transfer_log(self) -> list[int]:
        """Bytes of every KV pull the decode workers logged."""
        return [int(line.split("(")[1].split()[0])
                for child in self.stack.children if child.name.startswith("decode")
                for line in child.log_path.read_text().splitlines() if " pulled " in line]  # fmt: skip

    async def live_workers(self) -> dict[str, common_pb2.InstanceInfo]:
        """The live workers as registered in etcd, by instance id."""
        return await live_workers(self.stack.etcd_endpoint, self.namespace)

    async def worker_info(self, role: str, timeout_s: float = 60.0) -> common_pb2.InstanceInfo:
        """A live worker of ``role``; waits while none is registered (on a loaded machine a
        lease can lapse for a moment until the worker's keep-alive registers it again)."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = [info for info in (await self.live_workers()).values() if info.role == role]
            if found:
                return found[0]
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {role} worker registered after {timeout_s:.0f}s")
            await asyncio.sleep(1.0)

    async def measure_overhead(self, samples: int = 40) -> dict:
        """TTFT through the router vs straight to the worker that served it (same prompt, 1 token)."""
        prompt = list(range(100, 164))
        sampling = common_pb2.SamplingParams(max_tokens=1)
        workers = await self.live_workers()
        router_ms, direct_ms = [], []
        async with grpc.aio.insecure_channel(self.grpc[self.modes[0]]) as router_channel:
            router = router_pb2_grpc.RouterStub(router_channel)
            request = router_pb2.GenerateRequest(tokens=router_pb2.TokenIds(token_ids=prompt), sampling=sampling)
            served_by = ""
            async for response in router.Generate(request):
                served_by = response.worker_id
            info = workers[served_by]
            async with grpc.aio.insecure_channel(info.address) as worker_channel:
                worker = worker_pb2_grpc.WorkerStub(worker_channel)
                for index in range(samples):
                    start = time.perf_counter()
                    async for _ in router.Generate(request):
                        router_ms.append((time.perf_counter() - start) * 1000)
                        break
                    direct = worker_pb2.WorkerGenerateRequest(request_id=f"direct-{index}", model=info.model,
                                                              token_ids=prompt, sampling=sampling)  # fmt: skip
                    start = time.perf_counter()
                    async for _ in worker.Generate(direct):
                        direct_ms.append((time.perf_counter() - start) * 1000)
                        break
        router_p50, direct_p50 = statistics.median(router_ms), statistics.median(direct_ms)
        return {"samples": samples, "router_ttft_ms_p50": router_p50, "direct_ttft_ms_p50": direct_p50,
                "overhead_ms_p50": router_p50 - direct_p50}  # fmt: skip
